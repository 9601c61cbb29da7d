"""`unmask prepare` on real photos: triplets, manifest, skips, reuse, resume after a kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jpeg
from PIL import Image

from unmask_cli.config import PrepareConfig
from unmask_cli.data import MASK_DIR, MASKED_DIR, ORIGINAL_DIR, read_manifest
from unmask_cli.errors import UnmaskError
from unmask_cli.fileio import TMP_MARK, read_image, read_mask
from unmask_cli.prepare import run_prepare


def check_dataset(root: Path, count: int, size: int) -> list[dict]:
    """Exactly ``count`` complete triplets, masked == original outside the map, no stray files."""
    records = read_manifest(root)
    stems = [r["stem"] for r in records]
    assert stems == [f"{i:06d}" for i in range(count)]
    for sub in (ORIGINAL_DIR, MASKED_DIR, MASK_DIR):
        names = sorted(p.name for p in (root / sub).iterdir())
        assert names == [f"{s}.png" for s in stems], sub
    for stem in stems:
        original = read_image(root / ORIGINAL_DIR / f"{stem}.png")
        masked = read_image(root / MASKED_DIR / f"{stem}.png")
        mask = read_mask(root / MASK_DIR / f"{stem}.png", (size, size))
        assert original.shape == (size, size, 3)
        assert (masked[~mask] == original[~mask]).all()
        assert 0.03 < mask.mean() < 0.6
        assert (masked[mask] != original[mask]).any(axis=-1).mean() > 0.5
    return records


@pytest.fixture
def source_dir(tmp_path, astronaut, grace_hopper):
    from skimage.data import coffee

    src = tmp_path / "src"
    src.mkdir()
    write_jpeg(src / "astronaut.jpg", astronaut)
    Image.fromarray(grace_hopper).save(src / "hopper.png")
    write_jpeg(src / "coffee.jpg", coffee())  # real photo, no face
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("not a picture\n")
    data = (src / "astronaut.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.fromarray(np.full((10, 10, 3), 128, np.uint8)).save(src / "tiny.png")
    return src


def test_builtin_default_runs_offline(tmp_path):
    summary = run_prepare(PrepareConfig(num_samples=10, size=64), tmp_path / "p")
    records = check_dataset(tmp_path / "p", 10, 64)
    assert summary.written == 10 and summary.faces == 10 and not summary.skipped
    assert {r["source"].split("#")[0] for r in records} == {"builtin:astronaut", "builtin:grace_hopper"}
    record = records[0]
    assert len(record["landmarks"]) == 68 and len(record["aligned_landmarks"]) == 68
    assert record["mask"]["style"] in ("rect", "oval") and record["split"] in ("train", "val", "test")


def test_folder_with_bad_files_skips_and_reuses(tmp_path, source_dir):
    out = tmp_path / "out"
    summary = run_prepare(PrepareConfig(source=source_dir, num_samples=5, size=64, workers=2), out)
    records = check_dataset(out, 5, 64)
    assert summary.faces == 2 and summary.reused == 3
    assert [r["reused"] for r in records] == [False, False, True, True, True]
    # reused samples keep the face, get a fresh mask
    for r in records[2:]:
        base = next(b for b in records[:2] if b["source"] == r["source"])
        assert (read_image(out / ORIGINAL_DIR / f"{r['stem']}.png") == read_image(out / ORIGINAL_DIR / f"{base['stem']}.png")).all()
        assert r["mask"] != base["mask"]
    with open(out / "skipped.csv", newline="") as handle:
        rows = {row["source"]: row for row in csv.DictReader(handle)}
    assert {k: v["reason"] for k, v in rows.items()} == {
        "coffee.jpg": "no face",
        "empty.jpg": "empty file",
        "notes.jpg": "not an image",
        "truncated.jpg": "truncated",
        "tiny.png": "too small",
    }
    assert all(k in v["detail"] for k, v in rows.items())
    assert summary.skipped == {"no face": 1, "empty file": 1, "not an image": 1, "truncated": 1, "too small": 1}
    # the split follows the source photo
    by_source = {}
    for r in records:
        by_source.setdefault(r["source"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_source.values())


def test_rerun_continues_without_duplicates(tmp_path, source_dir):
    out = tmp_path / "out"
    run_prepare(PrepareConfig(source=source_dir, num_samples=3, size=64), out)
    first = read_manifest(out)
    # simulate a kill: an orphan triplet file, a temp file and a partial manifest line
    (out / MASKED_DIR / "000003.png").write_bytes(b"orphan")
    (out / ORIGINAL_DIR / f".000003.png{TMP_MARK}x").write_bytes(b"partial")
    with open(out / "manifest.jsonl", "a") as handle:
        handle.write('{"stem": "000003", "sou')
    summary = run_prepare(PrepareConfig(source=source_dir, num_samples=6, size=64), out)
    records = check_dataset(out, 6, 64)
    assert records[:3] == first
    assert summary.resumed_from == 3 and summary.written == 3 and summary.orphans_removed == 2
    again = run_prepare(PrepareConfig(source=source_dir, num_samples=6, size=64), out)
    assert again.written == 0 and read_manifest(out) == records
    with pytest.raises(UnmaskError, match="other settings"):
        run_prepare(PrepareConfig(source=source_dir, num_samples=6, size=128), out)
    # the same source folder spelled as a relative path is the same setting
    relative = Path(os.path.relpath(source_dir))
    assert not relative.is_absolute()
    assert run_prepare(PrepareConfig(source=relative, num_samples=6, size=64), out).written == 0
    other = tmp_path / "other"
    other.mkdir()
    first_photo = sorted(source_dir.iterdir())[0]
    (other / first_photo.name).write_bytes(first_photo.read_bytes())
    with pytest.raises(UnmaskError, match="other settings"):
        run_prepare(PrepareConfig(source=other, num_samples=6, size=64), out)


def dataset_alignment(root):
    from unmask_cli.data import dataset_framing

    return dataset_framing(root)[0]


def test_alignment_is_recorded_and_a_resume_keeps_it(tmp_path, source_dir):
    out = tmp_path / "out"
    run_prepare(PrepareConfig(source=source_dir, num_samples=2, size=64), out)
    assert dataset_alignment(out) == "visible"
    assert all(len(r["eyes"]) == 2 for r in read_manifest(out))  # the eye centres the crops were aligned on
    with pytest.raises(UnmaskError, match="alignment: 'visible' -> 'ffhq'"):
        run_prepare(PrepareConfig(source=source_dir, num_samples=4, size=64, alignment="ffhq"), out)
    # a folder prepared before alignments were recorded holds ffhq crops: a visible resume is refused
    settings = json.loads((out / "prepare.json").read_text())
    del settings["settings"]["alignment"]
    (out / "prepare.json").write_text(json.dumps(settings))
    assert dataset_alignment(out) == "ffhq"
    with pytest.raises(UnmaskError, match="alignment: 'ffhq' -> 'visible'"):
        run_prepare(PrepareConfig(source=source_dir, num_samples=4, size=64), out)
    legacy = run_prepare(PrepareConfig(source=source_dir, num_samples=2, size=64, alignment="ffhq", detector="hog"), tmp_path / "legacy")
    assert legacy.written == 2 and dataset_alignment(tmp_path / "legacy") == "ffhq"
    assert "eyes" not in read_manifest(tmp_path / "legacy")[0]
    with pytest.raises(UnmaskError, match="unknown alignment 'mouth'"):
        run_prepare(PrepareConfig(source=source_dir, alignment="mouth"), tmp_path / "bad")


def test_crop_is_recorded_tightens_the_face_and_a_resume_keeps_it(tmp_path, source_dir):
    """A 0.7 crop of the same photo: the face (its landmarks) spans about 1/0.7 of the full crop's
    share of the frame, the chin stays inside, and the folder and a resume keep the crop."""
    from unmask_cli.data import dataset_framing

    full, tight = tmp_path / "full", tmp_path / "tight"
    run_prepare(PrepareConfig(source=source_dir, num_samples=2, size=64, mask_types="surgical"), full)
    run_prepare(PrepareConfig(source=source_dir, num_samples=2, size=64, mask_types="surgical", crop=0.7), tight)
    assert dataset_framing(full) == ("visible", 1.0) and dataset_framing(tight) == ("visible", 0.7)
    for a, b in zip(read_manifest(full), read_manifest(tight), strict=True):
        assert a["source"] == b["source"]
        spans = [np.ptp(np.asarray(r["aligned_landmarks"]), axis=0).mean() for r in (a, b)]
        assert spans[1] / spans[0] == pytest.approx(1 / 0.7, rel=0.02)
        assert 0 < np.asarray(b["aligned_landmarks"])[8][1] < 64  # the chin
        masks = [read_mask(root / "mask_maps" / f"{r['stem']}.png").mean() for root, r in ((full, a), (tight, b))]
        assert masks[1] > 1.5 * masks[0]  # the mask takes a larger share of the frame
    with pytest.raises(UnmaskError, match="crop: 0.7 -> 1.0"):
        run_prepare(PrepareConfig(source=source_dir, num_samples=4, size=64, mask_types="surgical"), tight)
    with pytest.raises(UnmaskError, match=r"crop 2.0 is outside \[0.4, 1.5\]"):
        run_prepare(PrepareConfig(source=source_dir, crop=2.0), tmp_path / "bad")


def test_deterministic(tmp_path, source_dir):
    a = run_prepare(PrepareConfig(source=source_dir, num_samples=4, size=64, workers=1), tmp_path / "a")
    b = run_prepare(PrepareConfig(source=source_dir, num_samples=4, size=64, workers=2), tmp_path / "b")
    assert a.total == b.total == 4
    for sub in (ORIGINAL_DIR, MASKED_DIR, MASK_DIR):
        for i in range(4):
            assert (tmp_path / "a" / sub / f"{i:06d}.png").read_bytes() == (tmp_path / "b" / sub / f"{i:06d}.png").read_bytes()


def test_source_errors(tmp_path):
    with pytest.raises(UnmaskError, match="source folder not found"):
        run_prepare(PrepareConfig(source=tmp_path / "missing"), tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnmaskError, match="source folder is empty"):
        run_prepare(PrepareConfig(source=tmp_path / "empty"), tmp_path / "o")
    (tmp_path / "noface").mkdir()
    (tmp_path / "noface" / "a.jpg").write_text("x")
    with pytest.raises(UnmaskError, match="no usable face"):
        run_prepare(PrepareConfig(source=tmp_path / "noface"), tmp_path / "o2")
    with pytest.raises(UnmaskError, match="inside the source"):
        run_prepare(PrepareConfig(source=tmp_path / "noface"), tmp_path / "noface" / "out")
    with pytest.raises(UnmaskError, match="unknown mask type"):
        run_prepare(PrepareConfig(mask_types="rect,balaclava"), tmp_path / "o3")


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unmask_cli", *args], capture_output=True, text=True, **kwargs)


def test_cli_prepare_and_errors(tmp_path):
    result = _cli("prepare", "--out", str(tmp_path / "p"), "--num-samples", "4", "--size", "64")
    assert result.returncode == 0, result.stderr
    assert "samples in folder" in result.stdout and "4 / 4 requested" in result.stdout
    check_dataset(tmp_path / "p", 4, 64)
    bad = _cli("prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "q"))
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope" in lines[0] and "not found" in lines[0]
    typo = _cli("prepare", "--set", "prepare.num_sample=3", "--out", str(tmp_path / "q"))
    assert typo.returncode == 2 and "prepare.num_sample" in typo.stderr


def test_kill_and_rerun_gives_exact_count(tmp_path):
    """SIGKILL the CLI mid-run (2 workers), rerun: exactly N complete triplets, nothing partial."""
    out = tmp_path / "p"
    args = ["prepare", "--out", str(out), "--num-samples", "24", "--size", "64", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "unmask_cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    manifest = out / "manifest.jsonl"
    while time.time() < deadline and (not manifest.exists() or manifest.read_bytes().count(b"\n") < 5):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= len(read_manifest(out)) < 24
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    check_dataset(out, 24, 64)
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]


def test_shared_faces_group_photos(tmp_path, shared_faces):
    out = tmp_path / "shared"
    summary = run_prepare(PrepareConfig(source=shared_faces, num_samples=40, size=256, workers=2), out)
    records = check_dataset(out, 40, 256)
    assert summary.faces == 13 and not summary.skipped  # one face per photo, the 63 px face included
    groups = [r for r in records if r["source"] in ("obama_and_biden.jpg", "two_people.jpg") and not r["reused"]]
    assert len(groups) == 2
    summary_all = run_prepare(PrepareConfig(source=shared_faces, num_samples=16, size=64, all_faces=True), tmp_path / "all")
    assert summary_all.faces == 16  # 13 photos, +2 and +1 extra faces in the group photos
    json.loads((tmp_path / "all" / "prepare.json").read_text())["summary"]


def test_cli_preview_sheet(tmp_path):
    sheet = tmp_path / "missing" / "folder" / "sheet.png"  # folders that do not exist yet are made
    result = _cli("prepare", "--out", str(sheet), "--preview", "4", "--size", "64", "--mask-types", "surgical,n95")
    assert result.returncode == 0, result.stderr
    image = read_image(sheet)
    assert image.shape[0] >= 2 * 64 and image.shape[1] >= 6 * 64  # 4 triplets, two per row
    bad = _cli("prepare", "--out", str(tmp_path / "sheet.jpg"), "--preview", "4")
    assert bad.returncode == 1 and "must be a .png" in bad.stderr


def test_a_failed_append_is_one_line_and_cuts_the_file_back(tmp_path):
    """A full disk (here a file-size limit: writes past it fail with EFBIG) in the middle of appending to
    manifest.jsonl or skipped.csv: one line naming the file and the reason, and the file is left with its
    previous bytes (no partial line)."""
    import resource

    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"stem": "000000"}\n' * 10)
    before = path.read_bytes()
    code = ("import sys; from pathlib import Path; from unmask_cli.data import append_or_restore\n"
            "try:\n    append_or_restore(Path(sys.argv[1]), b'{\"stem\": \"000010\"}' * 60 + b'\\n')\n"
            "except Exception as err:\n    print(err)")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 200, len(before) + 200))

    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, preexec_fn=limit,
                         timeout=120)
    assert run.stdout.strip() == f"{path}: cannot write (File too large)", run.stdout + run.stderr
    assert path.read_bytes() == before


def test_degraded_samples_keep_the_pair_rule_and_record_the_chain(tmp_path, source_dir, astronaut):
    """prepare.degrade: the face and its masked copy get the same downscale/blur/noise/JPEG chain, and
    they stay equal outside the map; the chain is recorded; the masks themselves are the undegraded run's."""
    from unmask_cli.degrade import degrade_pair

    mask = np.zeros(astronaut.shape[:2], bool)
    mask[300:420, 180:330] = True
    masked = astronaut.copy()
    masked[mask] = (40, 90, 210)
    scene, out, ops = degrade_pair(astronaut, masked, mask, np.random.default_rng(3))
    assert np.array_equal(out[~mask], scene[~mask]) and not np.array_equal(scene, astronaut)
    again = degrade_pair(astronaut, masked, mask, np.random.default_rng(3))
    assert np.array_equal(again[0], scene) and again[2] == ops

    plain, degraded = tmp_path / "plain", tmp_path / "degraded"
    run_prepare(PrepareConfig(source=str(source_dir), num_samples=4, size=96, mask_types="surgical"), plain)
    run_prepare(PrepareConfig(source=str(source_dir), num_samples=4, size=96, mask_types="surgical",
                              degrade=1.0), degraded)
    records = check_dataset(degraded, 4, 96)
    assert all("degraded" in r["mask"] for r in records)
    for stem in ("000000", "000001"):
        assert np.array_equal(read_mask(plain / MASK_DIR / f"{stem}.png", (96, 96)),
                              read_mask(degraded / MASK_DIR / f"{stem}.png", (96, 96)))
        assert not np.array_equal(read_image(plain / ORIGINAL_DIR / f"{stem}.png"),
                                  read_image(degraded / ORIGINAL_DIR / f"{stem}.png"))


def test_backdrop_paints_a_scene_past_a_tight_crop_and_leaves_the_face(tmp_path, astronaut):
    """prepare.backdrop: where the crop reaches past a tightly cropped source photo, a synthetic scene
    (background, shoulders, neck) replaces the smear; the face, the masks and the pair rule stay."""
    import cv2

    src = tmp_path / "tight"
    src.mkdir()
    write_jpeg(src / "face.jpg", astronaut[40:290, 150:350])  # the face fills the photo, like UTKFace's crops
    smear, scene = tmp_path / "smear", tmp_path / "scene"
    common = dict(source=str(src), num_samples=3, size=96, mask_types="surgical", alignment="visible-neck",
                  crop=1.1)
    run_prepare(PrepareConfig(**common), smear)
    run_prepare(PrepareConfig(**common, backdrop=1.0), scene)
    records = check_dataset(scene, 3, 96)
    assert all("backdrop" in r["mask"] and r["border_fraction"] > 0.1 for r in records)
    matrix = np.asarray(records[0]["matrix"])
    inside = cv2.warpAffine(np.ones((250, 200), np.uint8), matrix, (96, 96), flags=cv2.INTER_NEAREST)
    deep = cv2.erode(inside, np.ones((21, 21), np.uint8)) > 0  # beyond the band where the photo fades out
    plain = read_image(smear / ORIGINAL_DIR / "000000.png").astype(int)
    painted = read_image(scene / ORIGINAL_DIR / "000000.png").astype(int)
    assert deep.sum() > 500 and np.abs(plain - painted)[deep].max() <= 1
    assert np.abs(plain - painted)[inside == 0].mean() > 10  # a scene, not the smear
    for stem in ("000000", "000001", "000002"):
        assert np.array_equal(read_mask(smear / MASK_DIR / f"{stem}.png", (96, 96)),
                              read_mask(scene / MASK_DIR / f"{stem}.png", (96, 96)))
    again = tmp_path / "again"
    run_prepare(PrepareConfig(**common, backdrop=1.0), again)
    assert (again / MASKED_DIR / "000001.png").read_bytes() == (scene / MASKED_DIR / "000001.png").read_bytes()
