"""`unmask eval` (run_eval): reports, metrics recomputed independently, the sheet, splits and errors.

One tiny prepared dataset (8 built-in portraits at 64 px) and one checkpoint trained for a single step by
the real trainer are shared by the module.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unmask_cli.config import EvalConfig
from unmask_cli.data import MANIFEST, dataset_stems, load_triplet, read_manifest
from unmask_cli.errors import UnmaskError
from unmask_cli.evaluation import (
    METRICS,
    SHEET_CAPTION_HEIGHT,
    SHEET_HEADER_HEIGHT,
    EvalReport,
    feature_distances,
    load_fd_network,
    report_table,
    run_eval,
)
from unmask_cli.fileio import read_image

SIZE = 64
METHODS = ["ours", "telea", "ns", "biharmonic", "masked"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from unmask_cli.config import PrepareConfig
    from unmask_cli.prepare import run_prepare

    root = tmp_path_factory.mktemp("eval") / "data"
    run_prepare(PrepareConfig(num_samples=8, size=SIZE, val_fraction=0.25, test_fraction=0.25), root)
    return root


@pytest.fixture(scope="module")
def checkpoint(data_root: Path) -> Path:
    from rich.console import Console

    from unmask_cli.config import load_config
    from unmask_cli.training import train

    cfg = load_config(None, [f"data.image_size={SIZE}", "data.num_workers=0", "model.ngf=8", "model.ndf=8",
                             "model.nmf=4", "loss.vgg_weights=random", "train.epochs=1", "train.batch_size=4",
                             "train.device=cpu", "train.num_sample_images=2"])
    run_dir = data_root.parent / "run"
    summary = train(cfg, run_dir, data_root, resume=None, console=Console(quiet=True))
    assert summary.status == "completed"
    return run_dir / "last.pt"


@pytest.fixture(scope="module")
def report(checkpoint: Path, data_root: Path) -> EvalReport:
    # batch size 3 over 8 images: two full batches and a remainder
    return evaluate(checkpoint, data_root, split="all", out=data_root.parent / "eval_all", batch_size=3,
                    device="cpu", sheet_images=3)


def evaluate(checkpoint: Path, data: Path | None, **settings) -> EvalReport:
    """run_eval with an EvalConfig of these settings (paths as the strings a YAML config holds)."""
    for key in ("out", "data"):
        if settings.get(key) is not None:
            settings[key] = str(settings[key])
    return run_eval(EvalConfig(checkpoint=str(checkpoint), data=None if data is None else str(data), **settings))


def _strict_json(path: Path) -> dict:
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _triplet_tensors(root: Path, stem: str):
    original, masked, mask = load_triplet(root, stem, SIZE)

    def unit(rgb: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].double() / 255.0

    return unit(original), unit(masked), torch.from_numpy(mask.copy())[None, None].double()


# ------------------------------------------------------------------------------------------- outputs

def test_files_exist_and_parse(report: EvalReport, checkpoint: Path, data_root: Path):
    stems = dataset_stems(data_root, None)
    assert len(stems) == 8
    assert report.n_images == 8 and report.methods == METHODS
    assert set(report.files) == {"metrics", "per_image", "comparison"}
    assert all(p.parent == data_root.parent / "eval_all" and p.is_file() for p in report.files.values())

    doc = _strict_json(report.files["metrics"])
    assert doc["checkpoint"] == str(checkpoint.resolve())
    assert doc["epoch"] == 1 and doc["global_step"] == 1
    assert doc["data"] == str(data_root.resolve())
    assert doc["split"] == "all" and doc["n_images"] == 8 and doc["image_size"] == SIZE
    assert doc["device"] == "cpu" and doc["generator_weights"] == "G"
    assert doc["vgg_random"] is True and "RANDOM" in doc["vgg"] and doc["vgg_layers"] == [3, 8, 15, 22]
    assert set(doc["summary"]) == set(METHODS)
    for method in METHODS:
        for key in METRICS:
            entry = doc["summary"][method][key]
            assert set(entry) == {"mean", "std", "count", "nan"}
            assert entry["count"] + entry["nan"] == 8
            assert entry["count"] >= 1 and math.isfinite(entry["mean"]) and entry["std"] >= 0
    assert [row["stem"] for row in doc["per_image"]] == stems
    assert all(set(row["methods"]) == set(METHODS) for row in doc["per_image"])

    with open(report.files["per_image"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 * len(METHODS)
    assert {(r["stem"], r["method"]) for r in rows} == {(s, m) for s in stems for m in METHODS}
    assert list(rows[0]) == ["stem", "split", "method", "mask_fraction", *METRICS]
    splits = {r["stem"]: r["split"] for r in read_manifest(data_root)}
    assert all(r["split"] == splits[r["stem"]] for r in rows)


def test_summary_is_the_mean_of_the_per_image_values(report: EvalReport):
    for method in METHODS:
        for key in ("psnr_mask", "ssim_whole", "fd_mask", "identity"):
            values = [row["methods"][method][key] for row in report.per_image]
            assert report.mean(method, key) == pytest.approx(float(np.nanmean(values)), rel=1e-12)


def test_masked_baseline_psnr_equals_independent_recomputation(report: EvalReport, data_root: Path):
    from unmask_cli.metrics import psnr, ssim

    with open(report.files["per_image"], newline="", encoding="utf-8") as handle:
        csv_rows = {(r["stem"], r["method"]): r for r in csv.DictReader(handle)}
    expected = []
    for row in report.per_image:
        original, masked, mask = _triplet_tensors(data_root, row["stem"])
        region = float(psnr(masked, original, mask)[0])
        whole = float(psnr(masked, original)[0])
        expected.append(region)
        got = row["methods"]["masked"]
        assert got["psnr_mask"] == pytest.approx(region, abs=1e-9)
        assert got["psnr_whole"] == pytest.approx(whole, abs=1e-9)
        assert got["ssim_mask"] == pytest.approx(float(ssim(masked, original, mask)[0]), abs=1e-9)
        assert float(csv_rows[(row["stem"], "masked")]["psnr_mask"]) == pytest.approx(region, rel=1e-5)
        assert row["mask_fraction"] == pytest.approx(float(mask.mean()), abs=1e-12)
    assert report.mean("masked", "psnr_mask") == pytest.approx(float(np.mean(expected)), rel=1e-12)


def test_every_method_keeps_the_input_outside_the_mask(report: EvalReport):
    """Masked == original outside the map in the data, so for an output that keeps the input there (the
    composite, the baselines) MSE_whole = MSE_mask * mask_fraction exactly: a raw generator output (not
    composited) would break this for "ours"."""
    for row in report.per_image:
        shift = -10.0 * math.log10(row["mask_fraction"])
        for method in METHODS:
            m = row["methods"][method]
            assert m["psnr_whole"] == pytest.approx(m["psnr_mask"] + shift, abs=1e-6), (row["stem"], method)


def test_whole_image_metrics_beat_region_metrics_for_baselines(report: EvalReport):
    for method in ("telea", "ns", "biharmonic", "masked"):
        assert report.mean(method, "psnr_whole") > report.mean(method, "psnr_mask") + 3
        assert report.mean(method, "ssim_whole") > report.mean(method, "ssim_mask")
        assert report.mean(method, "fd_whole") < report.mean(method, "fd_mask")
    # doing nothing is the worst in the region: both inpainting methods improve on the masked input
    for method in ("telea", "ns", "biharmonic"):
        assert report.mean(method, "psnr_mask") > report.mean("masked", "psnr_mask")


def test_fd_matches_metrics_feature_distance(report: EvalReport, data_root: Path):
    from unmask_cli.metrics import feature_distance, vgg_feature_maps

    layers = [3, 8, 15, 22]
    features, description = load_fd_network("random", layers)
    assert "RANDOM" in description
    for row in report.per_image[:2]:
        original, masked, mask = (t.float() for t in _triplet_tensors(data_root, row["stem"]))
        got = row["methods"]["masked"]
        assert got["fd_mask"] == pytest.approx(
            float(feature_distance(features, masked, original, layers, mask=mask)[0]), rel=1e-5)
        assert got["fd_whole"] == pytest.approx(
            float(feature_distance(features, masked, original, layers)[0]), rel=1e-5)

    # the shared-feature helper against metrics.feature_distance on random images and masks
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.rand(3, 3, 40, 40, generator=gen), torch.rand(3, 3, 40, 40, generator=gen)
    mask = (torch.rand(3, 1, 40, 40, generator=gen) > 0.6).float()
    mask[2] = 0  # empty mask -> NaN region value
    whole, region = feature_distances(vgg_feature_maps(features, pred, layers),
                                      vgg_feature_maps(features, target, layers), mask)
    assert torch.allclose(whole, feature_distance(features, pred, target, layers).cpu(), rtol=1e-6)
    expected = feature_distance(features, pred, target, layers, mask=mask).cpu()
    assert torch.allclose(region[:2], expected[:2], rtol=1e-6)
    assert torch.isnan(region[2]) and torch.isnan(expected[2])


def test_identity_uses_the_manifest_landmarks(report: EvalReport, data_root: Path):
    from unmask_cli.identity import IdentityScorer

    assert "manifest" in report.identity_landmarks
    records = {r["stem"]: r for r in read_manifest(data_root)}
    scorer = IdentityScorer()
    row = report.per_image[0]
    original, masked, _ = load_triplet(data_root, row["stem"], SIZE)
    record = records[row["stem"]]
    landmarks = (np.asarray(record["aligned_landmarks"]) + 0.5) * SIZE / record["size"] - 0.5
    expected = scorer.identity_distance(masked, original, landmarks, landmarks)
    assert row["methods"]["masked"]["identity"] == pytest.approx(expected, abs=1e-6)
    assert row["methods"]["masked"]["landmarks"] == pytest.approx(scorer.landmark_distance(masked, original),
                                                                  abs=1e-9)
    for row in report.per_image:
        for method in METHODS:
            assert 0 < row["methods"][method]["identity"] < 2
            assert 0 <= row["methods"][method]["landmarks"] < 5


def test_table_and_caption_name_the_vgg_weights(report: EvalReport, checkpoint: Path):
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(report_table(report))
    text = console.export_text()
    for label in ("ours (GAN)", "telea", "ns", "biharmonic", "masked (input)"):
        assert label in text
    assert "PSNR mask" in text and "SSIM whole" in text and "landmark" in text and "ID dist" in text
    assert "RANDOM VGG" in text and "NOT meaningful" in text
    flat = " ".join(text.split())  # the caption wraps at the table's width, wherever the tmp path ends
    assert str(checkpoint) in flat and "split all" in flat and "8 images" in flat and "weights: G" in flat
    assert f"{report.mean('ours', 'psnr_mask'):.2f}" in text


def test_comparison_sheet_size_and_content(report: EvalReport, data_root: Path):
    sheet = read_image(report.files["comparison"])
    tile = 3 * SIZE  # 64 px enlarged x3 to reach the 192 px minimum tile
    rows, pad = 3, 2
    assert sheet.shape == (SHEET_HEADER_HEIGHT + rows * (tile + SHEET_CAPTION_HEIGHT + pad) + pad,
                           4 * (tile + pad) + pad, 3)
    first = report.per_image[0]["stem"]
    original, masked, _ = load_triplet(data_root, first, SIZE)
    top = SHEET_HEADER_HEIGHT + pad
    assert np.array_equal(sheet[top:top + tile:3, pad:pad + tile:3], original)  # nearest-neighbour x3
    left = pad + (tile + pad)
    assert np.array_equal(sheet[top:top + tile:3, left:left + tile:3], masked)
    caption = sheet[top + tile:top + tile + SHEET_CAPTION_HEIGHT, 2 * (tile + pad) + pad:3 * (tile + pad)]
    assert (caption < 200).any()  # the telea caption is drawn as text


def test_eval_scores_the_ema_weights_unless_told_not_to(checkpoint: Path, data_root: Path, tmp_path: Path):
    """A checkpoint with an EMA of G (train.ema_decay > 0) is scored with it; --no-ema scores G itself.
    Scores are compared with checkpoints that hold the same weights as their only G."""
    import dataclasses

    from unmask_cli.checkpoints import Checkpoint

    ckpt = Checkpoint.load(checkpoint)
    averaged = {k: v * 0.9 if v.is_floating_point() else v for k, v in ckpt.networks["G"].items()}
    with_ema = dataclasses.replace(ckpt, ema={"decay": 0.99, "updates": 1, "G": averaged}).save(tmp_path / "ema.pt")
    as_plain_g = dataclasses.replace(ckpt, networks={**ckpt.networks, "G": averaged}).save(tmp_path / "plain.pt")

    def scores(path: Path, **kwargs) -> tuple[list[float], EvalReport]:
        rep = evaluate(path, data_root, split="val", out=tmp_path / f"eval_{path.stem}_{len(kwargs)}",
                       device="cpu", sheet_images=0, baselines="masked", **kwargs)
        return [row["methods"]["ours"]["psnr_mask"] for row in rep.per_image], rep

    ema_scores, rep = scores(with_ema)
    assert ema_scores == scores(as_plain_g)[0]
    assert rep.weights == "EMA of G (decay 0.99, 1 updates)"
    assert _strict_json(rep.files["metrics"])["generator_weights"] == rep.weights
    raw_scores, raw_rep = scores(with_ema, ema=False)
    assert raw_scores == scores(checkpoint)[0] != ema_scores
    assert raw_rep.weights == "G (its EMA not used)"


# ------------------------------------------------------------------------------------- splits and errors

def test_split_filter_and_default_output_folder(checkpoint: Path, data_root: Path):
    val = dataset_stems(data_root, "val")
    assert 0 < len(val) < 8
    rep = evaluate(checkpoint, data_root, split="val", device="cpu", sheet_images=0, baselines="masked")
    assert [row["stem"] for row in rep.per_image] == val
    assert rep.n_images == len(val) and rep.split == "val" and rep.methods == ["ours", "masked"]
    assert rep.out == checkpoint.parent / "eval_val"
    assert (rep.out / "metrics.json").is_file() and not (rep.out / "comparison.png").exists()
    assert all(r["split"] == "val" for r in rep.per_image)


def test_folder_without_manifest_uses_every_image_and_skips_unreadable_ones(checkpoint: Path, data_root: Path,
                                                                           tmp_path: Path):
    bare = tmp_path / "bare"
    shutil.copytree(data_root, bare, ignore=shutil.ignore_patterns(MANIFEST))
    stems = dataset_stems(data_root, None)
    broken = bare / "masked_images" / f"{stems[1]}.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated PNG
    rep = evaluate(checkpoint, bare, split="test", out=tmp_path / "out", device="cpu", max_images=3,
                   sheet_images=1, baselines="telea")
    assert rep.n_images == 2 and [r["stem"] for r in rep.per_image] == [stems[0], stems[2]]
    assert [s["stem"] for s in rep.skipped] == [stems[1]] and str(broken) in rep.skipped[0]["error"]
    assert _strict_json(rep.files["metrics"])["skipped"] == rep.skipped
    assert "no manifest" in rep.note and "detector" in rep.identity_landmarks
    assert read_image(rep.files["comparison"]).shape[0] == SHEET_HEADER_HEIGHT + 3 * SIZE + SHEET_CAPTION_HEIGHT + 4
    with open(rep.files["per_image"], newline="", encoding="utf-8") as handle:
        assert [(r["stem"], r["method"]) for r in csv.DictReader(handle)] == [
            (stems[0], "ours"), (stems[0], "telea"), (stems[2], "ours"), (stems[2], "telea")]


def test_empty_split_is_a_one_line_error(checkpoint: Path, data_root: Path, tmp_path: Path):
    root = tmp_path / "notest"
    shutil.copytree(data_root, root)
    lines = [json.loads(line) for line in (root / MANIFEST).read_text().splitlines() if line.strip()]
    (root / MANIFEST).write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in lines))
    with pytest.raises(UnmaskError) as info:
        evaluate(checkpoint, root, split="test", out=tmp_path / "out", device="cpu")
    message = str(info.value)
    assert "\n" not in message and "'test' split" in message
    assert "--split val" in message and "--split all" in message and str(root) in message
    assert not (tmp_path / "out").exists()


def test_bad_arguments(checkpoint: Path, data_root: Path, tmp_path: Path):
    from unmask_cli.config import load_config

    with pytest.raises(UnmaskError, match="unknown split 'tset'"):
        evaluate(checkpoint, data_root, split="tset")
    with pytest.raises(UnmaskError, match="data folder not found"):
        evaluate(checkpoint, tmp_path / "missing", device="cpu")
    with pytest.raises(UnmaskError, match="unknown baseline 'opencv'"):
        evaluate(checkpoint, data_root, baselines="telea,opencv")
    with pytest.raises(UnmaskError, match="eval.max_images"):  # the config checks values (0 = all images)
        load_config(None, ["eval.max_images=-1"])
    with pytest.raises(UnmaskError, match=r"eval needs a checkpoint \(--checkpoint or eval.checkpoint; .shipped."):
        run_eval(EvalConfig(data=str(data_root)))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing"])
def test_broken_checkpoint_is_a_one_line_error(kind: str, checkpoint: Path, data_root: Path, tmp_path: Path):
    bad = tmp_path / "model.pt"
    if kind == "garbage":
        bad.write_bytes(b"this is not a checkpoint\n" * 10)
    elif kind == "truncated":
        bad.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(UnmaskError) as info:
        evaluate(bad, data_root, out=tmp_path / "out", device="cpu")
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(bad))
    assert ("not found" if kind == "missing" else "checkpoint") in message
    assert not (tmp_path / "out").exists()


def test_faces_without_a_mask_are_not_scored(checkpoint: Path, tmp_path: Path):
    """Bare faces and look-alikes have nothing to fill (every method would score 100 dB on them): eval
    leaves them out and says how many."""
    from unmask_cli.config import PrepareConfig
    from unmask_cli.prepare import run_prepare

    data = tmp_path / "mixed"
    run_prepare(PrepareConfig(num_samples=8, size=SIZE, mask_types="rect,bare", val_fraction=0,
                              test_fraction=0, seed=1), data)
    styles = [json.loads(line)["mask"]["style"] for line in (data / "manifest.jsonl").read_text().splitlines()]
    bare = styles.count("bare")
    assert 0 < bare < len(styles)
    report = evaluate(checkpoint, data, split="all", out=tmp_path / "out", device="cpu", sheet_images=0,
                      baselines="telea,masked")
    assert report.n_images == len(styles) - bare and f"{bare} faces without a mask" in report.note
    assert all(row["mask_fraction"] > 0 for row in report.per_image)
    finding = json.loads((tmp_path / "out" / "metrics.json").read_text())["mask_finding"]
    assert finding["masked_faces"] == len(styles) - bare and finding["faces_without_a_mask"] == bare
    assert 0 <= finding["found"] <= finding["masked_faces"] and 0 <= finding["map_iou"] <= 1


def test_mask_finding_is_scored_the_way_infer_decides(checkpoint: Path, tmp_path: Path):
    """eval scores the map module's mask / no-mask decision with infer's rule (inference.mask_decision at
    eval.threshold and eval.min_mask_area): its counts are those of the maps recomputed here."""
    from unmask_cli.checkpoints import build_networks_from_checkpoint
    from unmask_cli.config import PrepareConfig
    from unmask_cli.data import PairedDataset
    from unmask_cli.inference import mask_decision
    from unmask_cli.prepare import run_prepare

    data = tmp_path / "mixed"
    run_prepare(PrepareConfig(num_samples=6, size=SIZE, mask_types="rect,bare", val_fraction=0,
                              test_fraction=0, seed=1), data)
    M = build_networks_from_checkpoint(checkpoint, "cpu").M.eval()
    samples = [PairedDataset(data, None, SIZE)[i] for i in range(6)]
    with torch.no_grad():
        probs = torch.sigmoid(M(torch.stack([s["masked"] for s in samples])))[:, 0].numpy()
    truth = [s["mask"][0].numpy() > 0.5 for s in samples]
    threshold = float(np.median(probs))  # thresholds and areas where this barely trained map module's
    maps = probs > threshold  # decisions split, so that a rule not applied would show
    area = float(np.median(maps.mean(axis=(1, 2))))
    decisions = {}
    for min_area in (0.0, area):
        finding = evaluate(checkpoint, data, split="all", out=tmp_path / f"a{min_area}", device="cpu",
                           sheet_images=0, baselines="masked", threshold=threshold, min_mask_area=min_area).mask_finding
        decided = decisions[min_area] = [mask_decision(m, min_area).any() for m in maps]
        assert finding.masked == sum(t.any() for t in truth) > 0 and finding.bare == 6 - finding.masked > 0
        assert finding.found == sum(d for d, t in zip(decided, truth, strict=True) if t.any())
        assert finding.left_alone == sum(not d for d, t in zip(decided, truth, strict=True) if not t.any())
        assert f"min area {min_area:g}" in finding.describe()
    assert decisions[0.0] != decisions[area]
