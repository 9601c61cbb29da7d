"""Kill suite (issue 7): ``kill -9`` ``unmask prepare`` / ``unmask train`` at seeded random moments,
rerun the same command after every kill, and check that nothing is ever corrupt, partial, lost or doubled.

After every kill: the manifest parses and names complete samples only, every finished PNG decodes, every
checkpoint loads (``Checkpoint.load``: weights_only, format checks), metrics.csv parses with continuous
epochs, and no worker process outlives the killed command. At the end: exactly N samples (stems
000000..N-1, three files each, the expected sources in order, no orphans, no temporary files), and for
training every epoch 1..E once in metrics.csv, each rerun resumed from the checkpoint the kill left, the
final epoch reached, every checkpoint loadable.

One implementation, parametrised by the number of kills and the way the command is started:

* default (CI): 3 kills each; the commands are forked from ``badfiles.CliServer``, so the killed process
  runs ``unmask_cli.cli.main()`` exactly like ``unmask`` but skips ~3-8 s of imports per run;
* ``-m slow``: 12 kills each of cold ``python -m unmask_cli`` processes, and the results are compared with
  uninterrupted runs (byte-identical dataset, bitwise-identical weights).

Kill moments are seeded: mostly a random fraction of a sample / an epoch after the run has made progress
(so kills land in writes, renames, checkpoint copies and the next step), sometimes a random time into
start-up (orphan clean-up, manifest repair, checkpoint loading).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from badfiles import REPO, leftovers, shared_server

from unmask_cli.checkpoints import Checkpoint
from unmask_cli.data import MANIFEST, SUBDIRS, read_manifest
from unmask_cli.fileio import TMP_MARK, read_image, read_mask
from unmask_cli.training import read_metrics

SIZE = 64
PREPARE_SAMPLES = 24
TRAIN_SETS = ["--set", f"data.image_size={SIZE}", "--set", "model.ngf=8", "--set", "model.ndf=8", "--set",
              "model.nmf=8", "--set", "train.batch_size=4", "--set", "loss.vgg_weights=random", "--set",
              "train.save_interval=2", "--set", "train.max_steps_per_epoch=2"]
EPOCH_LINE = re.compile(r"^epoch \d+/\d+ ", re.M)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------- process

class Command:
    """``python -m unmask_cli ARGS`` from a cold start, in its own session (so every process it starts can be
    found: pgid == pid)."""

    def __init__(self, args: list, log: Path):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "unmask_cli", *map(str, args)], cwd=REPO, env=ENV,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.log_path = log

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the command itself (like ``kill -9 PID``); its worker processes must die with it."""
        assert self.running(), f"the command ended before the kill:\n{self.output()[-3000:]}"
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL
        no_survivors(self.pid)

    def finish(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.running() or live_members(self.pid):
            try:
                os.killpg(self.pid, signal.SIGKILL)  # only this command's own session
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=60)
        self.log.close()


class Forked:
    """The same command forked from ``badfiles.CliServer`` (torch and the dlib models already imported):
    the killed process runs ``unmask_cli.cli.main()`` exactly as ``unmask`` does, minus ~3-5 s of imports."""

    def __init__(self, args: list, log: Path):
        self.run = shared_server().start(*args, timeout=600)
        self.pid = self.run.pid

    def running(self) -> bool:
        return self.run.poll() is None

    def kill9(self) -> None:
        assert self.running(), f"the command ended before the kill:\n{self.output()[-3000:]}"
        os.kill(self.pid, signal.SIGKILL)
        assert self.run.wait().code == -signal.SIGKILL
        no_survivors(self.pid)

    def finish(self, timeout: float = 600) -> int:
        return self.run.wait().code

    def output(self) -> str:
        return self.run.output()

    def close(self) -> None:
        if self.running() or live_members(self.pid):
            try:
                os.killpg(self.pid, signal.SIGKILL)  # only this command's own session
            except ProcessLookupError:
                pass
        self.run.wait()


LAUNCHERS = {"cold": Command, "forked": Forked}


def no_survivors(pgid: int) -> None:
    deadline = time.monotonic() + 10
    while live_members(pgid):
        assert time.monotonic() < deadline, f"processes outlived the killed command: {live_members(pgid)}"
        time.sleep(0.05)


def live_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that still run (zombies waiting to be reaped do not count)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def wait_for(condition, command, timeout: float = 180) -> bool:
    """Poll ``condition()`` until true; False when the command exited first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not command.running():
            return False
        assert time.monotonic() < deadline, f"no progress after {timeout} s:\n{command.output()[-3000:]}"
        time.sleep(0.01)
    return True


# ------------------------------------------------------------------------------------------- prepare

def manifest_lines(root: Path) -> int:
    try:
        return (root / MANIFEST).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def check_prepared_after_kill(root: Path) -> int:
    """Invariants that hold at every instant: complete manifest lines name complete, decodable samples;
    any other file is a complete orphan (written, not yet recorded) or a temporary file."""
    if not (root / MANIFEST).exists():
        return 0
    records = read_manifest(root)  # a cut last line is tolerated; a corrupt line elsewhere raises
    stems = [r["stem"] for r in records]
    assert stems == [f"{i:06d}" for i in range(len(stems))], "manifest stems not contiguous"
    for sub in SUBDIRS:
        for path in (root / sub).iterdir():
            if TMP_MARK in path.name:
                continue
            image = read_image(path)  # every finished file decodes, orphans included
            assert image.shape == (SIZE, SIZE, 3), path
        for stem in stems:
            assert (root / sub / f"{stem}.png").is_file(), f"{sub}/{stem}.png missing for a recorded sample"
    return len(records)


def check_prepared_final(root: Path, n: int) -> list[dict]:
    raw = (root / MANIFEST).read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.decode().splitlines()]  # every line parses
    assert [r["stem"] for r in records] == [f"{i:06d}" for i in range(n)]
    for sub in SUBDIRS:
        assert sorted(p.name for p in (root / sub).iterdir()) == [f"{i:06d}.png" for i in range(n)], sub
    for r in records:
        original = read_image(root / SUBDIRS[0] / f"{r['stem']}.png")
        masked = read_image(root / SUBDIRS[1] / f"{r['stem']}.png")
        mask = read_mask(root / SUBDIRS[2] / f"{r['stem']}.png", (SIZE, SIZE))
        assert original.shape == masked.shape == (SIZE, SIZE, 3) and mask.any()
        assert (masked[~mask] == original[~mask]).all()
    # no sample lost or doubled: every usable built-in source once, in order, then reuses cycling over them
    from unmask_cli.prepare import BUILTIN_VARIANTS
    from unmask_cli.samples import sample_keys

    skipped = set()
    if (root / "skipped.csv").exists():
        skipped = {line.split(",")[0] for line in (root / "skipped.csv").read_text().splitlines()[1:]}
    usable = [k for k in sample_keys(BUILTIN_VARIANTS) if k not in skipped]
    base = min(n, len(usable))
    assert [r["source"] for r in records[:base]] == usable[:base]
    assert not any(r["reused"] for r in records[:base]) and all(r["reused"] for r in records[base:])
    assert [r["source"] for r in records[base:]] == [usable[j % base] for j in range(n - base)]
    assert len({(r["source"], json.dumps(r["mask"], sort_keys=True)) for r in records}) == n  # fresh masks
    assert json.loads((root / "prepare.json").read_text())["status"] == "complete"
    assert leftovers(root) == []
    return records


class Moments:
    """Seeded kill moments. Usually: once the run has made progress (a new sample / a new epoch), after a
    random share of ``span`` seconds. Sometimes (``early``): a random time into start-up, before any
    progress, when the run is cleaning up, reading the manifest or loading the checkpoint."""

    def __init__(self, seed: int, early: float = 0.25):
        self.rng = random.Random(seed)
        self.early = early
        self.startup: float | None = None  # seconds from launch to first progress, measured on run 0

    def pick(self) -> tuple[bool, float]:
        if self.startup is not None and self.rng.random() < self.early:
            return True, self.rng.uniform(0.0, self.startup)
        return False, self.rng.random()


def kill_at_random_moment(command, moments: Moments, progressed, span) -> bool:
    """Kill ``command`` at the next seeded moment; True when it was killed after making progress."""
    launched = time.monotonic()
    early, fraction = moments.pick()
    if early:
        time.sleep(fraction)
        command.kill9()
        return False
    if not wait_for(progressed, command):
        pytest.fail(f"the command ended before it could be killed:\n{command.output()[-3000:]}")
    if moments.startup is None:
        moments.startup = time.monotonic() - launched
    time.sleep(fraction * span())
    command.kill9()
    return True


def run_prepare_kills(tmp_path: Path, launch, kills: int, n: int, seed: int) -> tuple[Path, list[int]]:
    """Kill ``unmask prepare`` ``kills`` times and rerun the same command after each kill (1 and 2 workers
    alternately), then let the last run finish. Returns (folder, complete samples after each kill)."""
    moments = Moments(seed)
    out = tmp_path / "prepared"
    base = ["prepare", "--out", out, "--num-samples", str(n), "--size", str(SIZE),
            "--mask-types", "surgical,n95,kn95,cloth,rect,oval"]
    at_kill: list[int] = []
    for i in range(kills):
        before = manifest_lines(out)
        command = launch([*base, "--workers", str(1 + i % 2)], tmp_path / f"prepare_{i}.log")
        try:
            kill_at_random_moment(command, moments, lambda before=before: manifest_lines(out) > before,
                                  lambda: 0.6)
        finally:
            command.close()
        at_kill.append(check_prepared_after_kill(out))
    final = launch([*base, "--workers", "2"], tmp_path / "prepare_final.log")
    try:
        assert final.finish() == 0, final.output()[-3000:]
    finally:
        final.close()
    assert "already there (resumed)" in final.output()
    return out, at_kill


@pytest.mark.parametrize("kills,n,launcher", [pytest.param(3, 24, "forked", id="3-kills"),
                                              pytest.param(12, 72, "cold", id="12-kills", marks=pytest.mark.slow)])
def test_kill_prepare(tmp_path, kills, n, launcher):
    out, at_kill = run_prepare_kills(tmp_path, LAUNCHERS[launcher], kills, n, seed=kills)
    assert at_kill == sorted(at_kill) and 0 < at_kill[-1] < n  # never lost, never finished early
    check_prepared_final(out, n)
    if kills >= 10:  # the resumed dataset is the one an uninterrupted run writes, byte for byte
        from unmask_cli.config import PrepareConfig
        from unmask_cli.prepare import run_prepare

        clean = tmp_path / "clean"
        run_prepare(PrepareConfig(num_samples=n, size=SIZE, mask_types="surgical,n95,kn95,cloth,rect,oval"), clean)
        assert read_manifest(clean) == read_manifest(out)
        for sub in SUBDIRS:
            for path in sorted((clean / sub).iterdir()):
                assert path.read_bytes() == (out / sub / path.name).read_bytes(), path


# --------------------------------------------------------------------------------------------- train

@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    """12 built-in faces at 64 px, a quarter of the sources in the val split."""
    root = tmp_path_factory.mktemp("kill_train") / "data"
    shared_server()("prepare", "--out", root, "--num-samples", "12", "--size", str(SIZE), "--set",
                    "prepare.val_fraction=0.25", "--set", "prepare.test_fraction=0").ok()
    return root


def metric_epochs(run: Path) -> list[int]:
    return [int(r["epoch"]) for r in read_metrics(run / "metrics.csv")]


def check_run_after_kill(run: Path) -> int | None:
    """Every checkpoint loads; metrics.csv has epochs 1..m where m is the checkpoint's epoch or one more
    (metrics are written just before last.pt). Returns the epoch of last.pt (None if there is none)."""
    epochs = {}
    for path in run.glob("*.pt"):
        epochs[path.name] = int(Checkpoint.load(path).epoch)
    last = epochs.get("last.pt")
    rows = metric_epochs(run)
    assert rows == list(range(1, len(rows) + 1)), f"metrics epochs {rows}"
    if last is not None:
        assert len(rows) in (last, last + 1), (rows, last)
        assert all(e <= last for name, e in epochs.items()), epochs
    for path in (run / "samples").glob("epoch_*.png"):
        read_image(path)
    return last


def run_train_kills(tmp_path: Path, data: Path, launch, kills: int, epochs: int, seed: int) -> tuple[Path, list]:
    """Kill ``unmask train`` ``kills`` times and rerun the same command after each kill, then let the last run
    finish. A kill after progress comes within ~1.3 epochs of an epoch end (checkpoint, copies, metrics,
    sample sheet, next epoch). Returns (run folder, epoch of last.pt after each kill)."""
    moments = Moments(seed)
    runs = tmp_path / "runs"
    run = runs / "kill"
    args = ["train", "-c", REPO / "configs" / "quick.yaml", "--data", data, "--runs", runs, "--name", "kill",
            "--device", "cpu", *TRAIN_SETS, "--set", f"train.epochs={epochs}"]
    at_kill: list[int | None] = []

    def epoch_seconds() -> float:  # train + validation time of the last epoch, plus its files
        return float(read_metrics(run / "metrics.csv")[-1]["time_s"]) * 1.3 + 0.2

    def check_resumed_from(previous: int | None) -> None:
        meta = json.loads((run / "meta.json").read_text())
        if previous is None:
            assert meta["resumed"] == []
        else:  # this run continued from the checkpoint the kill left
            entry = meta["resumed"][-1]
            assert entry["epoch"] == previous and entry["samples_in_epoch"] == 0, meta["resumed"]

    for i in range(kills):
        last_before = at_kill[-1] if at_kill else None
        command = launch(args, tmp_path / f"train_{i}.log")
        try:  # progress: this run printed an epoch line, i.e. it finished an epoch and saved last.pt
            progressed = kill_at_random_moment(
                command, moments, lambda command=command: EPOCH_LINE.search(command.output()) is not None,
                epoch_seconds)
        finally:
            command.close()
        if progressed:
            check_resumed_from(last_before)
        at_kill.append(check_run_after_kill(run))
    final = launch(args, tmp_path / "train_final.log")
    try:
        assert final.finish() == 0, final.output()[-3000:]
    finally:
        final.close()
    check_resumed_from(at_kill[-1])
    assert f"finished {epochs} epochs" in final.output()
    return run, at_kill


@pytest.mark.parametrize("kills,epochs,launcher", [pytest.param(3, 8, "forked", id="3-kills"),
                                                   pytest.param(12, 28, "cold", id="12-kills", marks=pytest.mark.slow)])
def test_kill_train(tmp_path, train_data, kills, epochs, launcher):
    run, at_kill = run_train_kills(tmp_path, train_data, LAUNCHERS[launcher], kills, epochs, seed=kills)
    progress = [e or 0 for e in at_kill]
    assert progress == sorted(progress) and 1 <= progress[-1] < epochs  # never back; killed before the end
    rows = read_metrics(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # no gap, no repeat
    steps = [int(r["step"]) for r in rows]
    assert steps == [steps[0] * e for e in range(1, epochs + 1)]  # every epoch trained exactly once
    last = Checkpoint.load(run / "last.pt")
    assert last.epoch == epochs and last.global_step == steps[-1] and last.samples_in_epoch == 0
    for path in run.glob("*.pt"):
        Checkpoint.load(path)
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == [f"epoch_{e:03d}.pt" for e in range(2, epochs + 1, 2)]
    for e in range(2, epochs + 1, 2):
        assert Checkpoint.load(run / f"epoch_{e:03d}.pt").epoch == e
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"epoch_{e:03d}.png" for e in range(1, epochs + 1)]
    assert leftovers(run) == []
    if kills >= 10:  # resumed from epoch ends: the same weights as an uninterrupted run, bit for bit
        import torch

        clean = subprocess.run([sys.executable, "-m", "unmask_cli", *map(str, [
            "train", "-c", REPO / "configs" / "quick.yaml", "--data", train_data, "--runs", tmp_path / "clean",
            "--name", "kill", "--device", "cpu", *TRAIN_SETS, "--set", f"train.epochs={epochs}"])],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
        assert clean.returncode == 0, clean.stderr
        a = Checkpoint.load(tmp_path / "clean" / "kill" / "last.pt").networks
        b = last.networks
        assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
        assert np.allclose([float(r["g_total"]) for r in read_metrics(tmp_path / "clean" / "kill" / "metrics.csv")],
                           [float(r["g_total"]) for r in rows])
