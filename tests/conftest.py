from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from smearpipe.io import read_image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMEARPIPE_SHARED", REPO.parent / "shared")) / "datasets"
SAMPLES = REPO / "datasets" / "bccd_samples"


def _need(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared dataset missing in CI: {path}")
        pytest.skip(f"shared dataset not available: {path}")
    return path


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    return _need(SHARED / "bccd" / "BCCD")


@pytest.fixture(scope="session")
def pbc_root() -> Path:
    return _need(SHARED / "pbc")


@pytest.fixture(scope="session")
def bccd_field(bccd_root: Path) -> np.ndarray:
    return read_image(bccd_root / "JPEGImages" / "BloodImage_00000.jpg")


@pytest.fixture(scope="session")
def pbc_crops(pbc_root: Path) -> dict[str, np.ndarray]:
    """One PBC train image per class."""
    seen: dict[str, np.ndarray] = {}
    with open(pbc_root / "splits.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "train" and row["class"] not in seen:
                seen[row["class"]] = read_image(pbc_root / "PBC_dataset_normal_DIB" / row["path"])
    return seen
