"""Montage of a classifier's answers (its mistakes by default) from an ``evaluate_classifier`` predictions.csv.

Usage: python scripts/error_gallery.py PREDICTIONS_CSV OUT_PNG [--per-row 10] [--rows 4] [--root DIR]
                                       [--shared-with OTHER_PREDICTIONS_CSV] [--group TRUE:PRED ...] [--overwrite]

One row per confusion (true -> predicted), the most frequent first, the most confident mistakes first
within a row; each tile is the crop as given (before the classifier's framing and normalisation) with
the predicted probability. Paths in the CSV are absolute or relative to ``--root`` (the data folder of
the machine the CSV was written on may differ: pass its replacement). ``--shared-with`` keeps only the mistakes
that a second run (another seed) made too, with the same wrong class: errors that belong to the crops, for a
reviewer to check the crop and its label. ``--group TRUE:PRED`` (repeatable) shows those rows instead, in the
order given (``--rows`` is then not used; a group named twice is shown once), and may name answers that are right (``eosinophil:eosinophil``), to set a reviewer's eye beside
the mistakes. Beside the PNG, ``OUT.csv`` lists the crops shown, row by row.
"""

from __future__ import annotations

import argparse
import csv
import sys
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
    ap.add_argument("--shared-with", default=None, metavar="CSV",
                    help="another run's predictions.csv: show only the mistakes it made too (same wrong class)")
    ap.add_argument("--group", action="append", default=None, metavar="TRUE:PRED",
                    help="show this row (repeatable, in this order; TRUE may equal PRED) instead of the commonest mistakes")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_PNG and its .csv if they exist")
    args = ap.parse_args()
    out = Path(args.out)
    listing = out.with_suffix(".csv")
    if not args.overwrite and (out.exists() or listing.exists()):
        sys.exit(f"{out} or {listing.name} exists; pass --overwrite or another OUT_PNG")
    wanted = []
    for group in args.group or []:
        true, sep, pred = group.partition(":")
        if not (sep and true and pred):
            sys.exit(f"--group {group!r}: expected TRUE:PRED, e.g. eosinophil:neutrophil")
        if (true, pred) not in wanted:
            wanted.append((true, pred))
    with open(args.predictions) as f:
        rows = [r for r in csv.DictReader(f) if r["true"] != r["pred"] or (r["true"], r["pred"]) in wanted]
    if args.shared_with:
        with open(args.shared_with) as f:
            other = {_key(r): (r["true"], r["pred"]) for r in csv.DictReader(f)}
        rows = [r for r in rows if other.get(_key(r)) == (r["true"], r["pred"])]
    if not rows:
        raise SystemExit("no misclassified crops" + (" shared by both runs" if args.shared_with else ""))
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["true"], r["pred"])].append(r)
    order = sorted(groups, key=lambda k: -len(groups[k]))[: args.rows]
    if wanted:
        missing = [f"{a}:{b}" for a, b in wanted if (a, b) not in groups]
        if missing:
            sys.exit(f"--group {', '.join(missing)}: no such crops" + (" shared by both runs" if args.shared_with else ""))
        order = wanted
    lines, shown = [], []
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
            shown.append({"row": len(lines) + 1, "true": key[0], "pred": key[1], "p_pred": r[f"p_{key[1]}"],
                          "crop": _key(r)})
        tiles += [np.full((TILE, TILE, 3), 255, np.uint8)] * (args.per_row + 1 - len(tiles))
        lines.append(np.hstack(tiles))
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(np.vstack(lines), cv2.COLOR_RGB2BGR))
    with listing.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["row", "true", "pred", "p_pred", "crop"])
        w.writeheader()
        w.writerows(shown)
    print(f"wrote {args.out}: {', '.join(f'{a}->{b} {len(groups[(a, b)])}' for a, b in order)}")


def _key(row: dict) -> str:
    """A crop's class folder and file name: the same crop in CSVs written on different machines."""
    return str(Path(*Path(row["path"]).parts[-2:]))


if __name__ == "__main__":
    main()
