"""Fit the shipped default Reinhard reference (``reinhard_normalize``) on the PBC ``train`` split.

Usage: python scripts/fit_reinhard_reference.py [--pbc ../shared/datasets/pbc]

Every PBC train image (``splits.csv``), cut to its central 70 % as the classifier is trained on it:
the reference is the class-balanced average of each image's own L*a*b* mean and standard deviation
(:func:`smearpipe.preprocess.lab_statistics`). Writes ``src/smearpipe/data/reinhard_reference_pbc.json``.
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

OUT = Path(__file__).resolve().parents[1] / "src" / "smearpipe" / "data" / "reinhard_reference_pbc.json"
CENTER = 0.7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pbc", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "pbc"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    root = Path(args.pbc)
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
    payload = {"reference": ref.to_dict(),
               "per_class": {c: {"mean": list(np.round(m, 4)), "std": list(np.round(s, 4))}
                             for c, m, s in zip(WBC_CLASSES, means, stds, strict=True)}}
    Path(args.out).write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print(json.dumps(payload, indent=1, default=float))


if __name__ == "__main__":
    main()
