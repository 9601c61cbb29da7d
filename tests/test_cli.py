"""The CLI only maps options onto config keys: every command takes --config and --set, its own options win
over --set, and a bad value is a one-line error naming the key (exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import BASE, make_dataset

from unmask_cli.checkpoints import Checkpoint
from unmask_cli.config import load_config
from unmask_cli.fileio import write_image
from unmask_cli.models import build_networks

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def unmask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unmask_cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained but complete 64 px checkpoint (the CLI's mapping is under test, not the model)."""
    cfg = load_config(None, BASE)
    path = tmp_path_factory.mktemp("ckpt") / "untrained.pt"
    nets = build_networks(cfg)
    Checkpoint(config=cfg.to_dict(), networks={k: v.state_dict() for k, v in nets.items()}, vgg="random",
               alignment="visible").save(path)
    return path


@pytest.mark.parametrize("command, key, value", [
    (["eval"], "eval.batch_size", "0"),
    (["infer", "in", "out"], "infer.threshold", "1.5"),
    (["prepare"], "prepare.workers", "0"),
    (["train"], "train.batch_size", "0"),
])
def test_a_bad_set_value_is_a_one_line_error_naming_the_key(command, key, value):
    done = unmask(*command, "--set", f"{key}={value}")
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in done.stderr


def test_an_option_is_a_shorthand_for_its_key_and_wins_over_set(tmp_path, checkpoint, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(photos / "astronaut.png", astronaut)
    out = tmp_path / "out"
    done = unmask("infer", str(photos), str(out), "--set", f"infer.checkpoint={checkpoint}",
                  "--set", "infer.save_masks=true", "--set", "infer.compare=true", "--no-compare",
                  "--set", "infer.threshold=0.4", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert (out / "astronaut.png").is_file() and (out / "masks").is_dir() and not (out / "compare").exists()


def test_eval_reads_its_section(tmp_path, checkpoint):
    data = make_dataset(tmp_path / "data", n_train=2, n_val=4)
    report = tmp_path / "report"
    config = tmp_path / "eval.yaml"
    config.write_text(f"eval:\n  checkpoint: {checkpoint}\n  split: val\n  sheet_images: 0\n  baselines: telea\n")
    done = unmask("eval", "--config", str(config), "--data", str(data), "--out", str(report),
                  "--set", "eval.batch_size=4", "--set", "eval.max_images=3", "--device", "cpu",
                  "--vgg-weights", "random")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    assert not (report / "comparison.png").exists()
    assert (report / "per_image.csv").read_text().count("\n") >= 3
    assert "telea" in json.dumps(metrics) and "navier" not in json.dumps(metrics).lower()
