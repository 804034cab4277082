"""Choose a detector's per-class counting thresholds on BCCD val (never on test).

Usage: python scripts/choose_count_thresholds.py WEIGHTS_PT_OR_NAME [--split val]
Then:  python scripts/ship_detector.py RUN_DIR --name NAME --class-conf '<the printed JSON>'

The detector predicts every val field once at score 0.05; for each class, every threshold from 0.05 to
0.80 in steps of 0.05 is scored on the per-field counts: WBC and platelets by the fraction of fields
counted exactly (ties: lower mean absolute error; of thresholds still tied, the middle one), RBC by the mean absolute percentage error (BCCD's RBC
boxes are incomplete, so exact RBC counts are rare). BCCD val is part of the detector's training fields
(trainval), so the thresholds are fitted on training data; test stays untouched.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from smearpipe.datasets import read_voc
from smearpipe.detect import Detector

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd" / "BCCD"
GRID = np.round(np.arange(0.05, 0.801, 0.05), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--split", choices=("train", "val"), default="val")
    args = ap.parse_args()
    det = Detector.load(args.weights)
    stems = (BCCD / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    classes = det.record.classes
    truth = {c: [] for c in classes}
    scores = {c: [] for c in classes}
    for stem in stems:
        _, boxes = read_voc(BCCD / "Annotations" / f"{stem}.xml")
        dets = det.predict(BCCD / "JPEGImages" / f"{stem}.jpg", conf=0.05)
        for c in classes:
            truth[c].append(sum(1 for b in boxes if b.label == c and b.xmax > b.xmin))
            scores[c].append(np.array([d.score for d in dets if d.label == c]))
    chosen, table = {}, {}
    for c in classes:
        t = np.array(truth[c], float)
        rows = []
        for th in GRID:
            p = np.array([(s >= th).sum() for s in scores[c]], float)
            nz = t > 0
            rows.append({"threshold": float(th), "exact": float(np.mean(p == t)), "mae": float(np.mean(np.abs(p - t))),
                         "mape": float(np.mean(np.abs(p[nz] - t[nz]) / t[nz]) * 100) if nz.any() else None})
        if c == "RBC":
            best = min(rows, key=lambda r: (r["mape"], r["mae"]))
        else:  # the middle of the best plateau: exactness is flat over a range of thresholds on ~90 fields
            top = max((r["exact"], -r["mae"]) for r in rows)
            plateau = [r for r in rows if (r["exact"], -r["mae"]) == top]
            best = plateau[len(plateau) // 2]
        chosen[c], table[c] = best["threshold"], rows
        print(c, {k: round(v, 3) for k, v in best.items()})
    print(json.dumps(chosen))


if __name__ == "__main__":
    main()
