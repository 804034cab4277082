"""Inference-only diagnostic: what does a network trained without a mask say when the surroundings of the cell are hidden?

Usage:
  python scripts/mask_diagnostic.py OUT_JSON --model MODEL K [K ...] [--model MODEL K [K ...] ...]

After the model's own framing (cell framing: a square around the nucleus), everything farther from the square's
centre than K half-sides is blended into the crop's background colour (a linear ramp from K to K + 0.1 half-sides;
K = 0: no mask), then the model's recorded preprocessing with ``"sharpen"`` added (as the protocol model is
scored). The background colour is that of the framed square (the library's option takes the whole crop's), and a
crop is taken for framed when the framing returns a square (it returns a crop without a nucleus as given, which
may be square by chance: such a crop is masked too). Scored on PBC val (1,030, centre 70 %) and the 280 BCCD dev crops (``bccd_wbc_subtypes`` crops of BCCD
train/val fields); validation data only, no test split read. This chose the radius of the mask pilot
(``reports/cross_lab/mask_pilot.md``) and checks whether its inference-only effect repeats on other seeds. The
library's option (``Framing(mask_radius=k)``) ramps over a tenth of the radius instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from input_size_sweep import validation_crops
from sklearn.metrics import confusion_matrix

from smearpipe import framing as framing_module
from smearpipe.classify import Classifier
from smearpipe.preprocess import estimate_background

_RADIUS: list[float] = [0.0]  # the mask radius in force, in half-sides (0: none)
_frame = framing_module.Framing.__call__


def masked(rgb: np.ndarray, k: float) -> np.ndarray:
    """``rgb`` (a square) with everything beyond ``k`` half-sides from its centre blended into its background colour."""
    s = rgb.shape[0]
    yy, xx = np.mgrid[:s, :s]
    r = np.hypot(xx - (s - 1) / 2, yy - (s - 1) / 2) / (s / 2)
    w = np.clip((r - k) / 0.1, 0, 1)[..., None]
    bg = estimate_background(rgb, percentile=90.0).astype(np.float32)
    return (rgb * (1 - w) + bg * w).round().clip(0, 255).astype(np.uint8)


def _frame_and_mask(self, rgb):
    out = _frame(self, rgb)
    if not _RADIUS[0] or out.shape[0] != out.shape[1]:  # no mask, or no nucleus found (crop as given)
        return out
    return masked(out, _RADIUS[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model", nargs="+", action="append", required=True, metavar=("MODEL", "K"),
                    help="a classifier (name or .safetensors) and the radii to score it at")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; pick another name")
    if any(len(m) < 2 for m in args.model):
        raise SystemExit("--model: a classifier and at least one radius K")
    framing_module.Framing.__call__ = _frame_and_mask  # for this process only: restored below
    try:
        results, classes = _score(args.model)
    finally:
        framing_module.Framing.__call__ = _frame
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"what": __doc__, "classes": list(classes), "results": results}, indent=1))


def _score(models: list[list[str]]) -> tuple[list[dict], tuple[str, ...]]:
    results, data, classes = [], None, None
    for model, *radii in models:
        clf = Classifier.load(model)
        steps = tuple(clf.preprocessing.steps) + (() if "sharpen" in clf.preprocessing.steps else ("sharpen",))
        clf = Classifier(clf.model, dataclasses.replace(clf.record, preprocessing=dataclasses.replace(clf.preprocessing, steps=steps)))
        if classes is not None and clf.classes != classes:
            raise SystemExit(f"{clf.name}: classes {clf.classes} differ from the first model's {classes}")
        classes = clf.classes
        data = data or validation_crops(clf.classes)
        for k in map(float, radii):
            _RADIUS[0] = k
            row = {"model": clf.name, "sha256": clf.record.sha256, "radius_half_sides": k, "preprocessing": list(steps)}
            for key, (crops, y) in data.items():
                pred = clf.predict_proba(crops).argmax(1)
                row[key] = {"n": len(y), "correct": int((pred == y).sum()),
                            "confusion_matrix": confusion_matrix(y, pred, labels=range(len(clf.classes))).tolist()}
            print(f"{clf.name} k={k}: pbc_val {row['pbc_val']['correct']}, bccd_dev {row['bccd_dev']['correct']}", flush=True)
            results.append(row)
    return results, classes


if __name__ == "__main__":
    main()
