"""The whole pipeline on BCCD fields under simulated stain and camera shifts (the shift panel, on fields).

Usage:
  python scripts/eval_field_shift_panel.py [--split val] [--out reports/cross_lab/field_shift_panel] [--overwrite]

``scripts/eval_shift_panel.py`` asks whether the classifier types a PBC crop the same under another stain or
camera; this asks it of the whole default pipeline (``analyze_smear``, ``rescale="auto"``): each field of BCCD
``--split`` is shifted (the same stain, colour, tone, blur and JPEG shifts; the crop-framing and magnification
ones are left out: magnification is ``scripts/eval_scale.py``'s) and analysed. Per shift: annotated WBC boxes
found (a WBC box of IoU >= 0.5, greedy), fields whose WBC count is exact, the RBC total against the annotations,
the median colour of the glass (``estimate_background``), and the WBC type of the fields with a single-type label
and as many annotated WBCs as labels (as ``scripts/eval_end_to_end.py`` scores it: every WBC found typed as the
label). The stain shifts are done in optical density relative to the field's glass, without clipping
(``hed_shift``): scikit-image's ``rgb2hed`` clips negative stain amounts, which turns BCCD's near-white glass
pink even with both scales at 1, a change of the glass, not of the stain, measured separately as "HED
round trip (clipped)". Choices are made on ``val``; ``test`` is for reports. Writes
``<out>/<detector>+<classifier>/<split>.json``; an existing report is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from eval_scale import matched
from eval_shift_panel import SHIFTS, _hed
from skimage.color import hed_from_rgb, rgb_from_hed

from smearpipe.datasets import read_bccd_subtype_labels, read_voc
from smearpipe.io import read_image
from smearpipe.pipeline import analyze_smear, load_pipeline
from smearpipe.preprocess import estimate_background

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
BCCD = SHARED / "bccd" / "BCCD"
LEFT_OUT = ("magnification", "tight crop", "central", "off-centre")  # not stain or camera: other scripts test them


def hed_shift(h_scale: float, e_scale: float):
    """Scale the haematoxylin and eosin amounts of an RGB uint8 image (Ruifrok-Johnston vectors, as scikit-image's),
    in optical density relative to the image's own glass (``estimate_background``: the lamp, which a stain does not
    change), with negative amounts kept: both scales 1 give the image back (values of 0 come back as 1). The crop
    panel's stain rows of the same names use scikit-image's clipped transform instead."""
    def f(im: np.ndarray) -> np.ndarray:
        glass = np.maximum(estimate_background(im), 1.0)
        od = -np.log(np.maximum(im.astype(np.float64), 1.0) / glass)
        amounts = od @ hed_from_rgb
        amounts[..., 0] *= h_scale
        amounts[..., 1] *= e_scale
        return np.clip(np.rint(glass * np.exp(-(amounts @ rgb_from_hed))), 0, 255).astype(np.uint8)
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("val", "test"), default="val", help="BCCD ImageSets split of the fields")
    ap.add_argument("--out", default=str(REPO / "reports" / "cross_lab" / "field_shift_panel"))
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier report of the same split")
    args = ap.parse_args()
    pipe = load_pipeline()
    out = Path(args.out) / f"{pipe.detector.record.name}+{pipe.classifier.record.name}" / f"{args.split}.json"
    if out.exists() and not args.overwrite:
        ap.error(f"{out} exists: pass --overwrite to replace it")
    labels = read_bccd_subtype_labels(SHARED / "bccd_wbc_subtypes" / "labels.csv")
    fields = []
    for stem in (BCCD / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split():
        boxes = read_voc(BCCD / "Annotations" / f"{stem}.xml")[1]
        wbc = [(b.xmin - 1, b.ymin - 1, b.xmax, b.ymax) for b in boxes if b.label == "WBC" and b.xmax > b.xmin]
        rbc = sum(1 for b in boxes if b.label == "RBC" and b.xmax > b.xmin)
        label = labels.get(stem)
        single = label[0] if label and len(set(label)) == 1 and len(wbc) == len(label) else None
        fields.append((stem, read_image(BCCD / "JPEGImages" / f"{stem}.jpg"), wbc, rbc, single))
    shifts = {k: f for k, f in SHIFTS.items() if not k.startswith(LEFT_OUT)}
    for name in [k for k in shifts if k.startswith(("haematoxylin", "eosin"))]:
        stain, scale = name.split(" x")
        shifts[name] = hed_shift(float(scale), 1.0) if stain == "haematoxylin" else hed_shift(1.0, float(scale))
    shifts["HED round trip (clipped)"] = _hed(1.0, 1.0)
    result = {"what": " ".join(__doc__.split("\n\n")[2].split()), "split": args.split, "fields": len(fields),
              "models": pipe.models, "shifts": {}}
    t0 = time.time()
    for name, shift in shifts.items():
        found = exact = rbc_true = rbc_pred = typed = typed_right = 0
        per_label: dict[str, list[int]] = {}
        glass = []
        for _, image, wbc, rbc, single in fields:
            shifted = shift(image)
            glass.append(estimate_background(shifted))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. a ruler refused on a shifted field: counted as analysed
                r = analyze_smear(shifted, pipeline=pipe)
            found += sum(matched(wbc, [c.box for c in r.wbcs]))
            exact += r.counts["WBC"] == len(wbc)
            rbc_true, rbc_pred = rbc_true + rbc, rbc_pred + r.counts["RBC"]
            if single is not None:
                right = bool(r.wbcs) and all(c.wbc_type == single for c in r.wbcs)
                typed, typed_right = typed + 1, typed_right + right
                per_label.setdefault(single, [0, 0])[0] += right
                per_label[single][1] += 1
        n_wbc = sum(len(f[2]) for f in fields)
        row = {"wbc_found": found, "wbc_annotated": n_wbc, "wbc_count_exact_fields": exact,
               "rbc_total_error_percent": round(100 * (rbc_pred - rbc_true) / rbc_true, 1),
               "glass_rgb_median": [round(float(v), 1) for v in np.median(glass, axis=0)],
               "type_correct_fields": typed_right, "typed_fields": typed,
               "type_correct_per_label": {k: {"correct": v[0], "fields": v[1]} for k, v in sorted(per_label.items())}}
        result["shifts"][name] = row
        print(f"{name}: WBC found {found}/{n_wbc}, count exact {exact}/{len(fields)}, RBC total "
              f"{row['rbc_total_error_percent']:+.1f} %, typed {typed_right}/{typed}", flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
