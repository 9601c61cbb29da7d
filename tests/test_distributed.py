"""Multi-process training: ``torchrun --nproc_per_node 2 -m unmask_cli train`` on the CPU (gloo), tiny sizes.

It trains, writes the run folder once (rank 0), records the world size and backend, gives the epoch and
step counts of a single-process run with the same global batch, resumes a finished run to a raised
target (on two processes, then on one), and resumes after every process is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import BASE, make_dataset, quiet

from unmask_cli.checkpoints import Checkpoint
from unmask_cli.config import load_config
from unmask_cli.fileio import TMP_MARK
from unmask_cli.training import read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
# 8 training faces, a global batch of 4 (2 per process): 2 steps per epoch
SETS = [*BASE, "train.batch_size=4", "loss.lambda_perc=0", "train.ema_decay=0.5"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def torchrun(data: Path, runs: Path, epochs: int) -> list[str]:
    sets = [arg for s in [*SETS, f"train.epochs={epochs}"] for arg in ("--set", s)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "unmask_cli", "train", "--data", str(data), "--runs", str(runs), "--name", "ddp",
            "--device", "cpu", *sets]


def run(cmd: list[str]) -> str:
    """The command's output (the CLI logs to stdout, torchrun to stderr)."""
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (torchrun starts its workers in their own sessions)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def test_two_gloo_processes_train_resume_and_match_a_single_process(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_val=3)
    runs = tmp_path / "runs"
    first = run(torchrun(data, runs, 2))
    folder = runs / "ddp"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["backend"] == "gloo"
    assert "x 2 processes (gloo)" in first and first.count("finished 2 epochs") == 1  # rank 0 alone logs
    ckpt = Checkpoint.load(folder / "last.pt")
    assert (ckpt.epoch, ckpt.global_step, ckpt.world_size, ckpt.ema["updates"]) == (2, 4, 2, 4)
    rows = read_metrics(folder / "metrics.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "2"), ("2", "4")]
    assert all(0 < float(r["val_psnr"]) < 100 for r in rows)  # reduced over both processes' shares
    for name in ("curves.png", "best.pt", "epoch_002.pt", "samples/epoch_002.png", "config.yaml"):
        assert (folder / name).is_file(), name
    assert not [p for p in folder.rglob("*") if TMP_MARK in p.name]

    single = train(load_config(None, [*SETS, "train.epochs=2"]), tmp_path / "single", data, device_spec="cpu",
                   console=quiet())
    single_rows = read_metrics(tmp_path / "single" / "metrics.csv")
    assert single.global_step == ckpt.global_step and [r["step"] for r in single_rows] == [r["step"] for r in rows]

    more = run(torchrun(data, runs, 3))  # the same command with a raised target resumes
    assert "resuming" in more
    assert [r["step"] for r in read_metrics(folder / "metrics.csv")] == ["2", "4", "6"]
    assert Checkpoint.load(folder / "last.pt").global_step == 6

    alone = train(load_config(None, [*SETS, "train.epochs=4"]), folder, data, device_spec="cpu", console=quiet())
    assert alone.resumed_from == folder / "last.pt" and alone.global_step == 8  # one process continues it
    assert Checkpoint.load(folder / "last.pt").world_size == 1


def test_sigkill_of_every_process_then_rerun_resumes(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_val=2)
    runs, epochs = tmp_path / "runs", 8
    cmd = torchrun(data, runs, epochs)
    agent = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = runs / "ddp" / "last.pt"
    try:
        deadline = time.monotonic() + 180
        while not last.exists():
            assert agent.poll() is None, agent.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.05)
    finally:
        for pid in [*children(agent.pid), agent.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        agent.wait(timeout=60)
    killed_at = Checkpoint.load(last).epoch
    assert 1 <= killed_at < epochs

    rerun = run(cmd)
    assert "resuming" in rerun
    rows = read_metrics(runs / "ddp" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert [int(r["step"]) for r in rows] == [2 * e for e in range(1, epochs + 1)]
    meta = json.loads((runs / "ddp" / "meta.json").read_text())
    assert meta["resumed"] and meta["resumed"][0]["epoch"] == killed_at and meta["world_size"] == 2
