"""Where each ``bccd_wbc_subtypes`` crop comes from, and how the protocol's answers depend on it.

Usage: python scripts/bccd_label_audit.py OUT_DIR --predictions CSV [CSV ...]
                                          [--subtypes DIR] [--bccd DIR] [--overwrite]

The crops' labels are per field, not per cell: ``labels.csv`` gives one type for a BCCD field, and the crop
(``BloodImage_XXXXX_1.jpg``) is one white cell cut from that field. Where the field's annotation holds more than
one white-cell box, or the crop shows no annotated white cell, nothing says that the cell in the crop is the one
the field's label describes. This finds every crop in its field (the crops are uncut, unscaled pieces of the
fields: normalised cross-correlation of the grey images, best match), measures which annotated WBC box it shows
(intersection over the box's area) and how many WBC boxes the field has, and scores each ``predictions.csv``
(from ``evaluate_classifier`` / ``scripts/cross_lab_protocol.py``) per group. No model is run, and no label is
changed: the groups come from the dataset's own files alone.

Writes ``OUT_DIR/crops.csv`` (one row per crop: field, position, group, each run's answer) and
``OUT_DIR/summary.json`` (per group and run: correct of n, per class).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import cv2

from smearpipe.datasets import normalize_detection_class, normalize_wbc_class, read_voc
from smearpipe.io import read_image

MATCH_MIN = 0.95  # normalised cross-correlation; the crops found here score >= 0.99
COVER_MIN = 0.5  # share of a WBC box's area inside the crop for the crop to show that cell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--predictions", nargs="+", required=True, metavar="CSV",
                    help="predictions.csv files over the 351 crops (columns path, true, pred)")
    ap.add_argument("--subtypes", default="../shared/datasets/bccd_wbc_subtypes")
    ap.add_argument("--bccd", default="../shared/datasets/bccd/BCCD")
    ap.add_argument("--overwrite", action="store_true", help="replace the files of an earlier audit in OUT_DIR")
    args = ap.parse_args()
    out = Path(args.out_dir)
    names = ("crops.csv", "summary.json")
    if not args.overwrite and any((out / n).exists() for n in names):
        sys.exit(f"{out} holds an earlier audit; pass --overwrite or another OUT_DIR")

    crops = _locate_crops(Path(args.subtypes) / "BCCD_cropped", Path(args.bccd))
    runs = {}
    for p in args.predictions:
        preds = {}
        with open(p) as f:
            for r in csv.DictReader(f):
                if _key(r["path"]) in preds:
                    sys.exit(f"{p}: {_key(r['path'])} is listed twice")
                preds[_key(r["path"])] = r
        missing = [c["crop"] for c in crops if c["crop"] not in preds]
        if missing:
            sys.exit(f"{p}: no prediction for {len(missing)} crops, e.g. {missing[0]}")
        runs[p] = preds
        for c in crops:
            if normalize_wbc_class(preds[c["crop"]]["true"]) != c["label"]:
                sys.exit(f"{p}: {c['crop']} is labelled {preds[c['crop']]['true']!r} there")
    for i, p in enumerate(args.predictions):
        for c in crops:
            c[f"pred_{i}"] = normalize_wbc_class(runs[p][c["crop"]]["pred"])

    groups = {
        "all": lambda c: True,
        "in BCCD, one WBC box in the field, the crop shows it": lambda c: c["group"] == "one",
        "in BCCD, several WBC boxes in the field, the crop shows one": lambda c: c["group"] == "several",
        "in BCCD, the crop shows no annotated WBC box": lambda c: c["group"] == "none",
        "not in BCCD (Kaggle original)": lambda c: c["group"] == "not in bccd",
    }
    summary = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "thresholds": {"match_min": MATCH_MIN, "cover_min": COVER_MIN},
        "groups": {},
    }
    for name, keep in groups.items():
        sel = [c for c in crops if keep(c)]
        entry = {"n": len(sel), "labels": dict(sorted(Counter(c["label"] for c in sel).items()))}
        for i, p in enumerate(args.predictions):
            correct = sum(c[f"pred_{i}"] == c["label"] for c in sel)
            per_class = {}
            for cls in sorted({c["label"] for c in sel}):
                of = [c for c in sel if c["label"] == cls]
                per_class[cls] = {"correct": sum(c[f"pred_{i}"] == cls for c in of), "n": len(of)}
            entry[p] = {"correct": correct, "accuracy": correct / len(sel) if sel else None, "per_class": per_class}
        summary["groups"][name] = entry

    out.mkdir(parents=True, exist_ok=True)
    fields = ["crop", "label", "field", "group", "wbc_boxes", "box_cover", "match", "x", "y", "width", "height"]
    fields += [f"pred_{i}" for i in range(len(args.predictions))]
    with (out / "crops.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(crops)
    summary["predictions"] = {f"pred_{i}": p for i, p in enumerate(args.predictions)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, entry in summary["groups"].items():
        scores = ", ".join(f"{entry[p]['correct']}/{entry['n']}" for p in args.predictions)
        print(f"{name}: {scores}")


def _locate_crops(crop_root: Path, bccd: Path) -> list[dict]:
    """Each crop's field, position and the annotated WBC box it shows (see the module docstring)."""
    rows = []
    paths = sorted(crop_root.glob("*/*.jpg"))
    if not paths:
        sys.exit(f"no crops (*/*.jpg) under {crop_root}")
    for path in paths:
        stem = path.stem.rsplit("_", 1)[0]
        row = {"crop": _key(path), "label": normalize_wbc_class(path.parent.name), "field": stem}
        image_path = bccd / "JPEGImages" / f"{stem}.jpg"
        if not image_path.is_file():
            rows.append(row | {"group": "not in bccd"})
            continue
        crop = cv2.cvtColor(read_image(path), cv2.COLOR_RGB2GRAY)
        image = cv2.cvtColor(read_image(image_path), cv2.COLOR_RGB2GRAY)
        score = cv2.matchTemplate(image, crop, cv2.TM_CCOEFF_NORMED)
        _, best, _, (x, y) = cv2.minMaxLoc(score)
        if best < MATCH_MIN:
            sys.exit(f"{path}: not found in {image_path} (best correlation {best:.3f})")
        h, w = crop.shape
        _, boxes = read_voc(bccd / "Annotations" / f"{stem}.xml")
        wbcs = [b for b in boxes if normalize_detection_class(b.label) == "WBC"]
        covers = [_cover(b, x, y, w, h) for b in wbcs]
        shown = max(covers, default=0.0)
        group = "none" if shown < COVER_MIN else ("one" if len(wbcs) == 1 else "several")
        rows.append(row | {"group": group, "wbc_boxes": len(wbcs), "box_cover": round(shown, 3),
                           "match": round(best, 4), "x": x, "y": y, "width": w, "height": h})
    return rows


def _cover(box, x: int, y: int, width: int, height: int) -> float:
    """Share of ``box``'s area inside the crop whose top left corner is at (x, y) in the field."""
    w = max(0.0, min(box.xmax, x + width) - max(box.xmin, x))
    h = max(0.0, min(box.ymax, y + height) - max(box.ymin, y))
    area = (box.xmax - box.xmin) * (box.ymax - box.ymin)
    return w * h / area if area > 0 else 0.0


def _key(path) -> str:
    """A crop's class folder and file name: the same crop in CSVs written on different machines."""
    return str(Path(*Path(path).parts[-2:]))


if __name__ == "__main__":
    main()
