"""Fit the shipped default Macenko reference on the PBC ``train`` split.

Usage: python scripts/fit_macenko_reference.py [--pbc ../shared/datasets/pbc] [--per-class 40]

Takes the first ``--per-class`` images of each class of the PBC train split (``splits.csv``,
sorted by path, so the selection is reproducible), fits one MacenkoNormalizer on all of
them together and writes ``src/smearpipe/data/macenko_reference_pbc.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

from smearpipe.io import read_image
from smearpipe.preprocess import MacenkoNormalizer

OUT = Path(__file__).resolve().parents[1] / "src" / "smearpipe" / "data" / "macenko_reference_pbc.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pbc", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "pbc"))
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    root = Path(args.pbc)
    by_class: dict[str, list[str]] = defaultdict(list)
    with open(root / "splits.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "train":
                by_class[row["class"]].append(row["path"])
    chosen = [p for cls in sorted(by_class) for p in sorted(by_class[cls])[: args.per_class]]
    images = [read_image(root / "PBC_dataset_normal_DIB" / p) for p in chosen]
    source = (
        f"PBC (Acevedo et al. 2020) train split: first {args.per_class} images per class by sorted path "
        f"({len(chosen)} images, classes {sorted(by_class)}), fitted together with MacenkoNormalizer(beta=0.15, alpha=1.0) "
        "by scripts/fit_macenko_reference.py"
    )
    norm = MacenkoNormalizer().fit(images, source=source)
    payload = {"reference": norm.reference.to_dict(), "images": chosen}
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(norm.reference.to_dict(), indent=1))


if __name__ == "__main__":
    main()
