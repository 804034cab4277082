"""A classifier on PBC crops under simulated lab shifts: camera, stain, magnification, framing.

Usage: python scripts/eval_shift_panel.py [MODEL ...] [--split val] [--n 400] [--out reports/cross_lab/shift_panel]

Each shift is applied to the same PBC crops (a random subset of ``--split``, seed 1) before
``Classifier.predict_proba``, which then frames and normalises them as always: accuracy and per-class
recall per shift, one JSON per model. This is a check of robustness to *known* kinds of change, not a
substitute for another lab's images (scripts/cross_lab_protocol.py, scripts/eval_other_lab_fields.py):
on PBC the cells themselves never change. Choices are made on ``val``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from skimage.color import hed2rgb, rgb2hed

from smearpipe.classify import Classifier
from smearpipe.io import read_image
from smearpipe.train import center_crop

REPO = Path(__file__).resolve().parents[1]
PBC = REPO.parent / "shared" / "datasets" / "pbc"
Shift = Callable[[np.ndarray], np.ndarray]


def _resize(f: float) -> Shift:
    return lambda im: cv2.resize(im, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def _jpeg(q: int) -> Shift:
    def f(im: np.ndarray) -> np.ndarray:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
        return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return f


def _hed(h_scale: float, e_scale: float) -> Shift:
    def f(im: np.ndarray) -> np.ndarray:
        hed = rgb2hed(im)
        hed[..., 0] *= h_scale
        hed[..., 1] *= e_scale
        return np.clip(np.rint(hed2rgb(hed) * 255), 0, 255).astype(np.uint8)
    return f


def _affine(gain: list[float], offset: list[float]) -> Shift:
    return lambda im: np.clip(im * np.asarray(gain) + np.asarray(offset), 0, 255).astype(np.uint8)


def _gamma(g: float) -> Shift:
    lut = np.clip(np.rint(255 * (np.arange(256) / 255.0) ** g), 0, 255).astype(np.uint8)
    return lambda im: lut[im]


SHIFTS: dict[str, Shift] = {
    "none": lambda im: im,
    "magnification 1/2": _resize(0.5), "magnification 1/3": _resize(1 / 3), "magnification 2x": _resize(2.0),
    "jpeg quality 30": _jpeg(30),
    "defocus blur sigma 1.5": lambda im: cv2.GaussianBlur(im, (0, 0), 1.5),
    "defocus blur sigma 3": lambda im: cv2.GaussianBlur(im, (0, 0), 3.0),
    "tight crop (central 45 %)": lambda im: center_crop(im, 0.45), "central 70 %": lambda im: center_crop(im, 0.7),
    "off-centre by 15 %": lambda im: np.roll(im, int(0.15 * im.shape[1]), axis=1),
    "haematoxylin x1.5": _hed(1.5, 1.0), "haematoxylin x0.6": _hed(0.6, 1.0),
    "eosin x1.6": _hed(1.0, 1.6), "eosin x0.5": _hed(1.0, 0.5),
    "blue cast": _affine([0.85, 0.9, 1.0], [0, 5, 25]), "pale (washed out)": _affine([0.6, 0.6, 0.6], [100, 100, 100]),
    "dark (dim lamp)": _affine([0.7, 0.7, 0.7], [0, 0, 0]),
    "gamma 0.6": _gamma(0.6), "gamma 1.6": _gamma(1.6),
    # a camera writing linear intensities where sRGB is expected (2.2), or the reverse
    "gamma 2.2": _gamma(2.2), "gamma 1/2.2": _gamma(1 / 2.2),
}


def panel_sample(split: str = "val", n: int = 400) -> tuple[list[dict], list[np.ndarray]]:
    """The panel's images: a random subset of ``split`` (seed 1), whole frames, with their splits.csv rows."""
    with (PBC / "splits.csv").open() as f:
        items = [r for r in csv.DictReader(f) if r["split"] == split]
    items = random.Random(1).sample(items, min(n, len(items)))
    return items, [read_image(PBC / "PBC_dataset_normal_DIB" / r["path"]) for r in items]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=[None], help="names or files (default: the shipped classifier)")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--out", default=str(REPO / "reports" / "cross_lab" / "shift_panel"))
    args = ap.parse_args()
    items, images = panel_sample(args.split, args.n)
    for model in args.models:
        clf = Classifier.load(model)
        y = np.array([clf.classes.index(r["class"]) for r in items])
        results = {}
        for name, shift in SHIFTS.items():
            pred = clf.predict_proba([shift(im) for im in images]).argmax(1)
            recall = {c: float(np.mean(pred[y == k] == k)) for k, c in enumerate(clf.classes) if (y == k).any()}
            results[name] = {"accuracy": float(np.mean(pred == y)), "recall": recall}
            print(f"{clf.record.name:40s} {name:28s} {100 * results[name]['accuracy']:5.1f} %",
                  " ".join(f"{c[:4]} {v:.2f}" for c, v in recall.items()), flush=True)
        out = Path(args.out) / f"{clf.record.name}_{args.split}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"classifier": clf.record.name, "sha256": clf.record.sha256, "split": args.split,
                                   "images": len(items), "support": {c: int((y == k).sum()) for k, c in enumerate(clf.classes)},
                                   "shifts": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
