"""Shared fixtures: real portraits from installed packages, ../shared/ when present, small temp files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def grace_hopper() -> np.ndarray:
    from unmask_cli.samples import portrait

    return portrait("grace_hopper")


@pytest.fixture(scope="session")
def aligner():
    from unmask_cli.faces import FaceAligner

    return FaceAligner(size=128)


@pytest.fixture
def shared_faces() -> Path:
    folder = SHARED / "faces"
    if not folder.is_dir():
        pytest.skip("../shared/faces not present")
    return folder


@pytest.fixture
def shared_utkface() -> Path:
    folder = SHARED / "utkface"
    if not folder.is_dir():
        pytest.skip("../shared/utkface not present")
    return folder


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 92, **kwargs) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path, quality=quality, **kwargs)
    return path


@pytest.fixture
def one_torch_thread():
    """For modules of tiny networks (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): one
    intra-op thread is as fast, and immune to OpenMP oversubscription when other jobs share the machine's
    cores. Results do not depend on it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
