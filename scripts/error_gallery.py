"""Montage of misclassified crops from an ``evaluate_classifier`` predictions.csv, grouped by confusion.

Usage: python scripts/error_gallery.py PREDICTIONS_CSV OUT_PNG [--per-row 10] [--rows 4] [--root DIR]

One row per confusion (true -> predicted), the most frequent first, the most confident mistakes first
within a row; each tile is the crop as given (before the classifier's framing and normalisation) with
the predicted probability. Paths in the CSV are absolute or relative to ``--root`` (the data folder of
the machine the CSV was written on may differ: pass its replacement).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from smearpipe.io import read_image

TILE = 96
LABEL_W = 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions")
    ap.add_argument("out")
    ap.add_argument("--per-row", type=int, default=10)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--root", default=None, help="replace the folder part of each path up to the class folder")
    args = ap.parse_args()
    with open(args.predictions) as f:
        rows = [r for r in csv.DictReader(f) if r["true"] != r["pred"]]
    if not rows:
        raise SystemExit("no misclassified crops")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["true"], r["pred"])].append(r)
    order = sorted(groups, key=lambda k: -len(groups[k]))[: args.rows]
    lines = []
    for key in order:
        items = sorted(groups[key], key=lambda r: -float(r[f"p_{r['pred']}"]))[: args.per_row]
        label = np.full((TILE, LABEL_W, 3), 255, np.uint8)
        cv2.putText(label, f"{key[0]} ->", (6, 36), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(label, f"{key[1]} ({len(groups[key])})", (6, 64), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        tiles = [label]
        for r in items:
            path = Path(r["path"])
            if args.root:
                path = Path(args.root) / path.parent.name / path.name
            tile = cv2.resize(read_image(path), (TILE, TILE), interpolation=cv2.INTER_AREA)
            cv2.putText(tile, f"{float(r['p_' + r['pred']]):.2f}", (3, TILE - 5),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(tile)
        tiles += [np.full((TILE, TILE, 3), 255, np.uint8)] * (args.per_row + 1 - len(tiles))
        lines.append(np.hstack(tiles))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(np.vstack(lines), cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out}: {', '.join(f'{a}->{b} {len(groups[(a, b)])}' for a, b in order)}")


if __name__ == "__main__":
    main()
