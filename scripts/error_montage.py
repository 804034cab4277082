"""Contact sheets of a classifier's answers: the crops of chosen (true, predicted) groups side by side, for review by eye.

Usage:
  python scripts/error_montage.py PREDICTIONS_CSV OUT_PNG --group eosinophil:neutrophil --group eosinophil:eosinophil
      [--group TRUE:PRED ...] [--max 16] [--tile 128] [--per-row 8] [--seed 0] [--overwrite]

``PREDICTIONS_CSV`` is a ``predictions.csv`` of ``evaluate_classifier`` / ``scripts/cross_lab_protocol.py``
(columns ``path``, ``true``, ``pred``). Each ``--group TRUE:PRED`` becomes a block of rows headed by its name and
count: its crops (at most ``--max``, a seeded random sample where there are more, the most confident answers
first), each resized to ``--tile`` px with its aspect ratio kept (padded grey). No model is run; the crops are
shown as stored, before framing or normalisation. The sheet is for a person to judge, for example, whether crops a
network gets "wrong" look like their label's type at all; it measures nothing.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np

from smearpipe.io import read_image, write_image

GREY = (128, 128, 128)


def _tile(path: str, size: int) -> np.ndarray:
    rgb = read_image(path)
    h, w = rgb.shape[:2]
    f = size / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    out = np.full((size, size, 3), GREY, np.uint8)
    y, x = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    out[y: y + small.shape[0], x: x + small.shape[1]] = small
    return out


def _header(text: str, width: int) -> np.ndarray:
    bar = np.full((28, width, 3), 255, np.uint8)
    cv2.putText(bar, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions")
    ap.add_argument("out")
    ap.add_argument("--group", action="append", required=True, metavar="TRUE:PRED",
                    help="crops labelled TRUE that the classifier called PRED (repeat for more blocks)")
    ap.add_argument("--max", type=int, default=16, help="crops per group at most (default 16)")
    ap.add_argument("--tile", type=int, default=128, help="side of each crop's tile in px (default 128)")
    ap.add_argument("--per-row", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample where a group has more than --max")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        sys.exit(f"{out} exists; pass --overwrite or another name")
    if min(args.max, args.tile, args.per_row) < 1:
        sys.exit("--max, --tile and --per-row must be at least 1")
    with open(args.predictions, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"path", "true", "pred"} - set(rows[0] if rows else {})
    if missing:
        sys.exit(f"{args.predictions}: no rows, or columns {sorted(missing)} missing")
    rng = np.random.default_rng(args.seed)
    width = args.tile * args.per_row
    blocks = []
    for group in args.group:
        true, sep, pred = group.partition(":")
        if not sep or not true or not pred:
            sys.exit(f"--group {group!r}: expected TRUE:PRED, e.g. eosinophil:neutrophil")
        members = [r for r in rows if r["true"] == true and r["pred"] == pred]
        if not members:
            sys.exit(f"--group {group}: no crops (classes in the file: {sorted({r['true'] for r in rows})})")
        shown = members
        if len(members) > args.max:
            shown = [members[i] for i in sorted(rng.choice(len(members), args.max, replace=False))]
        column = f"p_{pred}"
        if column in shown[0]:
            shown = sorted(shown, key=lambda r: -float(r[column]))
        tiles = [_tile(r["path"], args.tile) for r in shown]
        tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % args.per_row)
        grid = np.vstack([np.hstack(tiles[i: i + args.per_row]) for i in range(0, len(tiles), args.per_row)])
        label = f"labelled {true}, called {pred}: {len(members)} crops" + (f", {len(shown)} shown" if len(shown) < len(members) else "")
        blocks.append(np.vstack([_header(label, width), grid]))
    write_image(out, np.vstack(blocks), overwrite=args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
