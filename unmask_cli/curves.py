"""A training run as pictures: ``curves.png`` from metrics.csv, and TensorBoard scalars when it is installed.

``curves.png`` is redrawn from every metrics row at each epoch end and replaced atomically, so a kill
leaves the previous picture. TensorBoard is optional (``pip install tensorboard``): without the package
nothing is written and nothing is required.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from unmask_cli.fileio import atomic_write_bytes

# (panel title, [(metrics.csv column, label)])
PANELS = (
    ("generator loss terms", [("g_l1", "L1"), ("g_ssim", "1 - SSIM"), ("g_perc", "perceptual"),
                              ("g_adv_whole", "adv whole"), ("g_adv_mask", "adv mask")]),
    ("generator total", [("g_total", "errG")]),
    ("discriminators, map module", [("d_whole", "D whole"), ("d_mask", "D mask"), ("map_loss", "map (BCE + Dice)")]),
    ("validation PSNR (dB)", [("val_psnr", "PSNR")]),
    ("validation SSIM, map IoU", [("val_ssim", "SSIM"), ("val_iou", "IoU")]),
    ("throughput (img/s)", [("img_per_s", "train img/s")]),
)


def _column(rows: list[dict], key: str) -> np.ndarray:
    values = []
    for row in rows:
        try:
            values.append(float(row.get(key, "nan")))
        except (TypeError, ValueError):
            values.append(math.nan)
    return np.array(values)


def render_curves(rows: list[dict], title: str = "") -> bytes:
    """PNG bytes: one panel per group of :data:`PANELS`, x = epoch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 7), dpi=100, layout="constrained")
    epochs = _column(rows, "epoch")
    for index, (name, series) in enumerate(PANELS):
        ax = fig.add_subplot(2, 3, index + 1)
        for key, label in series:
            values = _column(rows, key)
            if np.isfinite(values).any():
                ax.plot(epochs, values, marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_curves(path: Path, rows: list[dict], title: str = "") -> None:
    atomic_write_bytes(path, render_curves(rows, title))


class TensorBoard:
    """Scalars of every metrics row and the sample grids, in RUN/tensorboard/, when the package is there."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is not installed: it is optional
            return
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict, grid: np.ndarray | None) -> None:
        if self.writer is None:
            return
        step = int(row["step"])
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, float) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        if grid is not None:
            self.writer.add_image("samples (masked | output | original)", grid, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
