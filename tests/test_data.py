"""PairedDataset and its decoded-sample cache (``data.cache``): bitwise-equal items, staleness, kills, errors."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data as tud

from unmask_cli import data
from unmask_cli.data import CACHE_DIR, SUBDIRS, PairedDataset, ReportingDataset, cache_paths, dataset_stems
from unmask_cli.errors import UnmaskError
from unmask_cli.fileio import TMP_MARK, write_image

ROOT = Path(__file__).resolve().parents[1]
NATIVE = 48
KEYS = ("masked", "mask", "original")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def add_sample(root: Path, photo: np.ndarray, index: int, split: str = "train", size: int = NATIVE) -> str:
    """One sample in the documented layout, cut from a real photo: a crop resized to ``size``, a
    rectangular map over its lower part, the masked image equal to the original outside the map."""
    import cv2

    rng = np.random.default_rng(index)
    h, w = photo.shape[:2]
    side = int(rng.integers(h // 4, h // 2))
    top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    original = cv2.resize(photo[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA)
    mask = np.zeros((size, size), bool)
    mask[size // 2 + int(rng.integers(0, size // 8)):, size // 6: size - size // 6] = True
    masked = original.copy()
    masked[mask] = rng.integers(0, 256, 3)
    stem = f"{index:06d}"
    write_image(root / "original_celeba_aligned" / f"{stem}.png", original)
    write_image(root / "masked_images" / f"{stem}.png", masked)
    write_image(root / "mask_maps" / f"{stem}.png", (mask * 255).astype(np.uint8))
    with open(root / "manifest.jsonl", "a") as handle:
        handle.write(json.dumps({"stem": stem, "split": split, "size": size}) + "\n")
    return stem


@pytest.fixture
def prepared(tmp_path, astronaut) -> Path:
    root = tmp_path / "prepared"
    for sub in SUBDIRS:
        (root / sub).mkdir(parents=True)
    for i in range(8):
        add_sample(root, astronaut, i, "val" if i in (2, 5) else "train")
    return root


def items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def assert_same_items(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["stem"] == y["stem"]
        for key in KEYS:
            assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
            assert torch.equal(x[key], y[key]), f"{x['stem']} {key} differs"


def record_time(root: Path, split: str | None, size: int) -> int:
    return cache_paths(root, split, size)[1].stat().st_mtime_ns


# ------------------------------------------------------------------------------------- equal items

@pytest.mark.parametrize("size", [32, NATIVE, 64])  # downscaled (area), native, upscaled (linear)
@pytest.mark.parametrize("split", ["train", None])
def test_cached_items_are_bitwise_the_png_items(prepared, size, split):
    png = items(PairedDataset(prepared, split, size))
    cached_ds = PairedDataset(prepared, split, size, cache=True)
    assert_same_items(items(cached_ds), png)
    assert png[0]["masked"].shape == (3, size, size) and png[0]["mask"].shape == (1, size, size)
    array, record = cache_paths(prepared, split, size)
    assert array == prepared / CACHE_DIR / f"{split or 'all'}_{size}.npy" and array.exists() and record.exists()
    assert np.load(array, mmap_mode="r").shape == (len(png), 7, size, size)
    # the cache is invisible to everything that lists samples
    assert dataset_stems(prepared, split) == [item["stem"] for item in png]
    assert not any(p.suffix == ".npy" for sub in SUBDIRS for p in (prepared / sub).iterdir())


def test_a_valid_cache_is_read_not_rebuilt_and_never_decodes(prepared, monkeypatch):
    expected = items(PairedDataset(prepared, "train", 32, cache=True))
    built = record_time(prepared, "train", 32)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a PNG although the cache is valid")

    monkeypatch.setattr(data, "load_triplet", no_decoding)
    again = PairedDataset(prepared, "train", 32, cache=True)
    assert_same_items(items(again), expected)
    assert record_time(prepared, "train", 32) == built


def test_workers_share_the_map_and_get_the_same_items(prepared):
    from torch.utils.data import DataLoader

    ds = PairedDataset(prepared, "train", 32, cache=True)
    png = PairedDataset(prepared, "train", 32)
    ds[0]  # opens the memory map in this process
    assert len(pickle.dumps(ds)) < 20_000  # the map itself is not sent to workers (spawn pickles the dataset)
    loader = DataLoader(ReportingDataset(ds), batch_size=None, num_workers=1)
    assert_same_items(list(loader), items(png))


# ------------------------------------------------------------------------------------- staleness

def test_adding_a_sample_rebuilds_the_cache(prepared, astronaut):
    PairedDataset(prepared, "train", 32, cache=True)
    add_sample(prepared, astronaut, 8)
    ds = PairedDataset(prepared, "train", 32, cache=True)
    assert len(ds) == 7 and ds.stems[-1] == "000008"
    assert_same_items(items(ds), items(PairedDataset(prepared, "train", 32)))


def test_a_rewritten_sample_rebuilds_the_cache(prepared, astronaut):
    PairedDataset(prepared, "train", 32, cache=True)
    original = prepared / "original_celeba_aligned" / "000003.png"
    before = original.read_bytes()
    write_image(original, np.ascontiguousarray(255 - astronaut[100:100 + NATIVE, 200:200 + NATIVE]))
    assert original.read_bytes() != before
    ds = PairedDataset(prepared, "train", 32, cache=True)
    assert_same_items(items(ds), items(PairedDataset(prepared, "train", 32)))


def test_a_newer_manifest_rebuilds_the_cache(prepared):
    PairedDataset(prepared, "train", 32, cache=True)
    built = record_time(prepared, "train", 32)
    manifest = prepared / "manifest.jsonl"
    st = manifest.stat()
    os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same lines, newer file
    PairedDataset(prepared, "train", 32, cache=True)
    assert record_time(prepared, "train", 32) != built


def test_each_size_and_split_has_its_own_cache(prepared):
    a = PairedDataset(prepared, "train", 32, cache=True)
    b = PairedDataset(prepared, "train", 40, cache=True)
    c = PairedDataset(prepared, "val", 32, cache=True)
    assert a[0]["masked"].shape[-1] == 32 and b[0]["masked"].shape[-1] == 40 and len(c) == 2
    names = sorted(p.name for p in (prepared / CACHE_DIR).glob("*.npy"))
    assert names == ["train_32.npy", "train_40.npy", "val_32.npy"]
    assert_same_items(items(c), items(PairedDataset(prepared, "val", 32)))


def test_an_array_that_does_not_match_its_record_is_not_used(prepared):
    PairedDataset(prepared, "train", 32, cache=True)
    array, _ = cache_paths(prepared, "train", 32)
    fake = np.full((6, 7, 32, 32), 7, np.uint8)  # right shape, wrong content, written after the record
    np.save(array, fake)
    ds = PairedDataset(prepared, "train", 32, cache=True)
    assert_same_items(items(ds), items(PairedDataset(prepared, "train", 32)))


# ------------------------------------------------------------------------------------- kills

def test_an_exception_during_the_build_leaves_no_cache_that_gets_used(prepared, monkeypatch):
    good = items(PairedDataset(prepared, "train", 32))
    PairedDataset(prepared, "train", 32, cache=True)  # a complete old cache ...
    add_sample(prepared, np.zeros((64, 64, 3), np.uint8), 8)  # ... made stale
    real = data.load_triplet
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the build
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "load_triplet", interrupted)
    with pytest.raises(KeyboardInterrupt):
        PairedDataset(prepared, "train", 32, cache=True)
    folder = prepared / CACHE_DIR
    assert not [p for p in folder.iterdir() if TMP_MARK in p.name]
    assert not cache_paths(prepared, "train", 32)[1].exists()  # the old record is gone with the old array's use
    monkeypatch.setattr(data, "load_triplet", real)
    ds = PairedDataset(prepared, "train", 32, cache=True)
    assert len(ds) == 7
    assert_same_items(items(ds)[:6], good)


def test_leftovers_of_a_killed_build_are_removed_and_not_used(prepared):
    folder = prepared / CACHE_DIR
    folder.mkdir()
    array, record = cache_paths(prepared, "train", 32)
    leftover = folder / f".{array.name}{TMP_MARK}abc123"
    leftover.write_bytes(b"\x93NUMPY partial")
    np.save(array, np.zeros((6, 7, 32, 32), np.uint8))  # an array with no record (killed before it)
    ds = PairedDataset(prepared, "train", 32, cache=True)
    assert not leftover.exists() and record.exists()
    assert_same_items(items(ds), items(PairedDataset(prepared, "train", 32)))


def test_sigkill_during_the_build_then_a_rerun_builds_a_good_cache(prepared):
    script = textwrap.dedent(f"""
        import sys, time
        from unmask_cli import data
        real = data.load_triplet
        calls = []
        def slow(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                print("building", flush=True)
                time.sleep(60)
            return real(*args, **kwargs)
        data.load_triplet = slow
        data.PairedDataset({str(prepared)!r}, "train", 32, cache=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "building"
        temps = [p for p in (prepared / CACHE_DIR).iterdir() if TMP_MARK in p.name]
        assert temps, "the build writes to a temporary file"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    array, record = cache_paths(prepared, "train", 32)
    assert not array.exists() and not record.exists()
    start = time.monotonic()
    ds = PairedDataset(prepared, "train", 32, cache=True)  # the lock died with the killed process
    assert time.monotonic() - start < 30
    assert not [p for p in (prepared / CACHE_DIR).iterdir() if TMP_MARK in p.name]
    assert_same_items(items(ds), items(PairedDataset(prepared, "train", 32)))


# ------------------------------------------------------------------------------------- errors

def test_an_unreadable_sample_gives_the_same_error_item_as_the_png_path(prepared):
    bad = prepared / "masked_images" / "000003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    png = ReportingDataset(PairedDataset(prepared, "train", 32))
    cached = ReportingDataset(PairedDataset(prepared, "train", 32, cache=True))
    index = png.dataset.stems.index("000003")
    error = png[index]
    assert set(error) == {"stem", "error"} and str(bad) in error["error"] and "\n" not in error["error"]
    assert cached[index] == error
    others = [i for i in range(len(png)) if i != index]
    assert_same_items([cached[i] for i in others], [png[i] for i in others])


def test_a_sample_corrupted_after_the_build_is_an_error_not_stale_pixels(prepared):
    cached = PairedDataset(prepared, "train", 32, cache=True)
    index = cached.stems.index("000004")
    bad = prepared / "mask_maps" / "000004.png"
    bad.write_bytes(b"not a png at all")  # in place: the folder's time may not change, the file's does
    error = ReportingDataset(PairedDataset(prepared, "train", 32, cache=True))[index]
    assert error == ReportingDataset(PairedDataset(prepared, "train", 32))[index]
    assert "error" in error and str(bad) in error["error"]


def test_a_sample_fixed_after_the_build_loads(prepared, astronaut):
    bad = prepared / "original_celeba_aligned" / "000001.png"
    good = bad.read_bytes()
    bad.write_bytes(b"")
    cached = PairedDataset(prepared, "train", 32, cache=True)
    assert "error" in ReportingDataset(cached)[1]
    bad.write_bytes(good)
    assert_same_items([cached[1]], [PairedDataset(prepared, "train", 32)[1]])


def test_a_parallel_build_gives_the_same_items_and_errors(prepared, monkeypatch):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: the build never runs in parallel")
    (prepared / "mask_maps" / "000006.png").write_bytes(b"")
    monkeypatch.setattr(data, "CACHE_BUILD_PARALLEL_MIN", 0)
    calls = []
    original_init = tud.DataLoader.__init__

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("num_workers"))
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(tud.DataLoader, "__init__", spy)
    cached = ReportingDataset(PairedDataset(prepared, None, 32, cache=True))
    assert calls and calls[0] >= 2  # the build did run through decode processes
    png = ReportingDataset(PairedDataset(prepared, None, 32))
    index = png.dataset.stems.index("000006")
    assert "error" in png[index] and cached[index] == png[index]
    others = [i for i in range(len(png)) if i != index]
    assert_same_items([cached[i] for i in others], [png[i] for i in others])


def test_the_cache_needs_a_fixed_size(prepared):
    with pytest.raises(UnmaskError, match="image size"):
        PairedDataset(prepared, "train", None, cache=True)
