"""How much of a BCCD training field is stained: the basis of a field Reinhard reference's ``min_stained_fraction``.

Usage: python scripts/stained_share.py [--split trainval] --out FILE.json

For every field of the split, the fraction of its pixels that :func:`smearpipe.preprocess.stained_mask`
counts as stained (cells rather than bare background); writes the percentiles. A field whose share is
below the 5th percentile of the detector's training fields shows more bare glass than nearly any field
the detector was trained on; ``ReinhardReference(min_stained_fraction=...)`` maps such a field as if its
background weighed no more than that.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from smearpipe.io import read_image
from smearpipe.preprocess import stained_mask

BCCD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bccd" / "BCCD"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="trainval", choices=("train", "val", "trainval"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if Path(args.out).exists():
        ap.error(f"{args.out} exists: name a new file")
    stems = (BCCD / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    share = np.array([stained_mask(read_image(BCCD / "JPEGImages" / f"{s}.jpg")).mean() for s in stems])
    pct = (1, 5, 25, 50, 75, 95, 99)
    report = {"split": args.split, "fields": len(stems), "min": round(float(share.min()), 4),
              "max": round(float(share.max()), 4),
              "percentiles": {str(q): round(float(v), 4) for q, v in zip(pct, np.percentile(share, pct), strict=True)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
