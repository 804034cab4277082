"""Fit the shipped Reinhard references (``reinhard_normalize``): PBC crops, or BCCD fields.

Usage:
  python scripts/fit_reinhard_reference.py [--pbc ../shared/datasets/pbc]           # classifier crops
  python scripts/fit_reinhard_reference.py --bccd-fields [--region stained] [--bccd ../shared/datasets/bccd]  # detector fields

PBC (the classifier's): every PBC train image (``splits.csv``), cut to its central 70 % as the
classifier is trained on it; the reference is the class-balanced average of each image's own L*a*b*
mean and standard deviation (:func:`smearpipe.preprocess.lab_statistics`). Writes
``src/smearpipe/data/reinhard_reference_pbc.json``.

BCCD fields (the detector's): the average statistics of the 292 whole BCCD trainval fields the
detector is trained on. Fields of another lab mapped onto them look to the detector like its training
fields. Writes ``src/smearpipe/data/reinhard_reference_bccd_fields.json``; with ``--region stained``, the
statistics of each field's stained pixels only (``ReinhardReference.region``), written to
``reinhard_reference_bccd_fields_stained.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from smearpipe.datasets import WBC_CLASSES
from smearpipe.io import read_image
from smearpipe.preprocess import ReinhardReference, lab_statistics
from smearpipe.train import CropSource, center_crop

DATA = Path(__file__).resolve().parents[1] / "src" / "smearpipe" / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CENTER = 0.7


def fit_pbc(root: Path) -> dict:
    train = CropSource(str(root / "PBC_dataset_normal_DIB"), split="train", splits_csv=str(root / "splits.csv"))
    samples = train.samples(WBC_CLASSES)
    means, stds = [], []
    for k, cls in enumerate(WBC_CLASSES):
        stats = [lab_statistics(center_crop(read_image(p), CENTER))
                 for p, y in tqdm(samples, desc=cls, mininterval=5) if y == k]
        means.append(np.mean([m for m, _ in stats], axis=0))
        stds.append(np.mean([s for _, s in stats], axis=0))
    n = len(samples)
    ref = ReinhardReference(
        mean=tuple(np.mean(means, axis=0).round(4)), std=tuple(np.mean(stds, axis=0).round(4)),
        source=f"PBC (Acevedo et al. 2020) train split, all {n} images, central {CENTER:.0%}: class-balanced mean of "
               "each image's L*a*b* mean and standard deviation, by scripts/fit_reinhard_reference.py")
    return {"reference": ref.to_dict(),
            "per_class": {c: {"mean": list(np.round(m, 4)), "std": list(np.round(s, 4))}
                          for c, m, s in zip(WBC_CLASSES, means, stds, strict=True)}}


def fit_bccd_fields(root: Path, region: str = "all") -> dict:
    stems = (root / "BCCD" / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    stats = [lab_statistics(read_image(root / "BCCD" / "JPEGImages" / f"{s}.jpg"), region=region)
             for s in tqdm(stems, mininterval=5)]
    means, stds = np.array([m for m, _ in stats]), np.array([s for _, s in stats])
    pixels = "" if region == "all" else f" over its {region} pixels (smearpipe.preprocess.stained_mask)"
    ref = ReinhardReference(
        mean=tuple(means.mean(axis=0).round(4)), std=tuple(stds.mean(axis=0).round(4)), region=region,
        source=f"BCCD (Shenggan/BCCD_Dataset) ImageSets/Main/trainval.txt, all {len(stems)} whole fields: mean of each "
               f"field's L*a*b* mean and standard deviation{pixels}, by scripts/fit_reinhard_reference.py --bccd-fields"
               + ("" if region == "all" else f" --region {region}"))
    return {"reference": ref.to_dict(),
            "spread_between_fields": {"mean_sd": list(means.std(axis=0).round(4)), "std_sd": list(stds.std(axis=0).round(4))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pbc", default=str(SHARED / "pbc"))
    ap.add_argument("--bccd", default=str(SHARED / "bccd"))
    ap.add_argument("--bccd-fields", action="store_true", help="fit the detector's field reference on BCCD trainval")
    ap.add_argument("--region", choices=("all", "stained"), default="all", help="pixels the field statistics cover")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.region != "all" and not args.bccd_fields:
        ap.error("--region applies to --bccd-fields")
    if args.bccd_fields:
        suffix = "" if args.region == "all" else f"_{args.region}"
        payload, out = fit_bccd_fields(Path(args.bccd), args.region), DATA / f"reinhard_reference_bccd_fields{suffix}.json"
    else:
        payload, out = fit_pbc(Path(args.pbc)), DATA / "reinhard_reference_pbc.json"
    Path(args.out or out).write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print(json.dumps(payload, indent=1, default=float))


if __name__ == "__main__":
    main()
