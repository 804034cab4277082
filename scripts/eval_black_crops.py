"""WBC crops with black around them (cut out by a round mask, or padded to a square with black), classifier on PBC val.

Usage:
  python scripts/eval_black_crops.py [--classifier NAME] [--out reports/eyepiece]

Some tools and datasets hand over a WBC crop with black around the cell: a round mask (a segmented cell, or the
eyepiece's circle), or black padding that makes a crop square. The 1,030 PBC val images (the central 70 %, as in
training) are typed as they are, inside a centred circle of 0.42 x their side on black (45 % of each crop black),
padded with black by a quarter of their size on every side (56 % black), and 2.5x underexposed (every value x 0.4:
no black around them, but their darkest nuclei nearly as dark; the statistics must keep those). Each is typed
twice: with the per-crop Reinhard statistics as they are now (black reaching the crop's edge left out:
``smearpipe.preprocess._lit_mask``) and as before 2026-11-28 (every pixel counted;
``smearpipe.preprocess._UNLIT_MAX_SHARE`` set above 1 for that pass only). Validation data only: no test split is
read. Writes ``<out>/<classifier>/pbc_val_crops.json`` (refuses to overwrite).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from input_size_sweep import pbc_val

import smearpipe.preprocess as preprocess
from smearpipe.classify import Classifier

REPO = Path(__file__).resolve().parents[1]


def round_mask(crop: np.ndarray) -> np.ndarray:
    """The crop inside a centred circle of 0.42 x its shorter side, black around it."""
    h, w = crop.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    out = crop.copy()
    out[(xx - w / 2) ** 2 + (yy - h / 2) ** 2 > (0.42 * min(h, w)) ** 2] = 0
    return out


def black_pad(crop: np.ndarray) -> np.ndarray:
    """The crop with a black border of a quarter of its height and width on each side."""
    h, w = crop.shape[:2]
    return cv2.copyMakeBorder(crop, h // 4, h // 4, w // 4, w // 4, cv2.BORDER_CONSTANT, value=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", default=None, help="weights name or path (default: the shipped classifier)")
    ap.add_argument("--out", default=str(REPO / "reports" / "eyepiece"), help="reports go to OUT/<classifier name>/")
    args = ap.parse_args()
    clf = Classifier.load(args.classifier)
    out = Path(args.out) / clf.name / "pbc_val_crops.json"
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    _, crops, y = pbc_val(clf.classes)
    views = {"as_is": lambda c: c, "round_black": round_mask, "black_pad": black_pad,
             "dim": lambda c: (c * 0.4).astype(np.uint8)}
    result = {"what": __doc__.split("\n\n")[2].replace("\n", " "), "classifier": clf.name, "sha256": clf.record.sha256,
              "n": int(len(y))}
    now = preprocess._UNLIT_MAX_SHARE
    for key, share in (("now", now), ("before_2026_11_28", 1.1)):
        preprocess._UNLIT_MAX_SHARE = share
        try:
            result[key] = {view: int((clf.predict_proba([f(c) for c in crops]).argmax(1) == y).sum())
                           for view, f in views.items()}
        finally:
            preprocess._UNLIT_MAX_SHARE = now
        print(key, result[key], "of", len(y), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
