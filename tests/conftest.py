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


def gamma_lut(g: float) -> np.ndarray:
    """uint8 lookup table of a tone curve: ``lut[image]`` applies gamma ``g`` (as scripts/eval_shift_panel.py)."""
    return np.clip(np.rint(255 * (np.arange(256) / 255.0) ** g), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- smoke-trained models (tiny, seconds)
TINY_DET_TRAIN = ["BloodImage_00001", "BloodImage_00003", "BloodImage_00004", "BloodImage_00005"]
TINY_DET_VAL = ["BloodImage_00000", "BloodImage_00006"]


def make_voc(root: Path, bccd_root: Path, splits: dict[str, list[str]]) -> Path:
    """A small VOC dataset (BCCD layout) under root/VOC, with the given split lists."""
    import shutil

    voc = root / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for split, stems in splits.items():
        for stem in stems:
            shutil.copy(bccd_root / "Annotations" / f"{stem}.xml", voc / "Annotations")
            shutil.copy(bccd_root / "JPEGImages" / f"{stem}.jpg", voc / "JPEGImages")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return voc


@pytest.fixture(scope="session")
def tiny_data(bccd_root, tmp_path_factory) -> Path:
    from smearpipe.datasets import voc_to_yolo

    root = tmp_path_factory.mktemp("tiny")
    voc = make_voc(root, bccd_root, {"train": TINY_DET_TRAIN, "val": TINY_DET_VAL})
    voc_to_yolo(voc, root / "yolo", splits=("train", "val"))
    return root / "yolo" / "data.yaml"


@pytest.fixture(scope="session")
def smoke_run(tiny_data, tmp_path_factory):
    from smearpipe.train import train_detector

    out = tmp_path_factory.mktemp("runs")
    return train_detector(tiny_data, model="yolov8n.yaml", epochs=1, imgsz=96, batch=2, out_dir=out, name="smoke")


@pytest.fixture(scope="session")
def tiny_crops(pbc_root, tmp_path_factory) -> Path:
    """ImageFolder trees train/ and val/ with 3 PBC images per class."""
    import shutil

    root = tmp_path_factory.mktemp("crops")
    rows = list(csv.DictReader(open(pbc_root / "splits.csv", newline="")))
    for split in ("train", "val"):
        seen: dict[str, int] = {}
        for r in rows:
            if r["split"] == split and seen.get(r["class"], 0) < 3:
                seen[r["class"]] = seen.get(r["class"], 0) + 1
                dest = root / split / r["class"]
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(pbc_root / "PBC_dataset_normal_DIB" / r["path"], dest)
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_crops, tmp_path_factory):
    from smearpipe.train import CropSource, train_classifier

    out = tmp_path_factory.mktemp("clsruns")
    return train_classifier([tiny_crops / "train"], [CropSource(str(tiny_crops / "val"), center_fraction=0.7)],
                            input_size=32, epochs=1, batch_size=5, out_dir=out, name="smoke", num_workers=0)
