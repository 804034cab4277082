"""End-to-end evaluation of analyze_smear on the BCCD test fields (72), shipped weights by default.

Usage: python scripts/eval_end_to_end.py [--out DIR] [--detector NAME] [--classifier NAME]
       [--rescale auto|off|field|slide] [--split test|val] [--overwrite]

Per field: predicted vs annotated WBC / RBC / platelet counts; for fields whose labels.csv row is a
single WBC type (and that have exactly one annotated WBC), whether the predicted type of the field's
WBC(s) matches. ``--rescale``: ``auto`` (the default pipeline: the detector's red-cell boxes decide),
``off``, or the image's red-cell ruler measured on each field (``field``) or once on the slide's first
fields as analyze_fields does (``slide``); at BCCD's own magnification none should change much. Writes
``metrics_rescale_<mode>.json`` and ``per_field_rescale_<mode>.csv``, with a ``_val`` suffix for ``--split
val`` (BCCD val: part of the detector's training fields), to ``reports/end_to_end/<classifier name>/<detector
name>/`` by default (older reports directly under ``end_to_end/`` or ``<classifier name>/``, and those without
``_rescale_``, came before: no rescaling); an existing report is kept unless ``--overwrite``. Magnification
changes are tested by scripts/eval_scale.py.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from smearpipe.datasets import read_bccd_subtype_labels, read_voc
from smearpipe.io import read_image
from smearpipe.pipeline import PipelineConfig, analyze_smear, iter_fields, load_pipeline

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
BCCD = SHARED / "bccd" / "BCCD"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="default: reports/end_to_end/<classifier name>/<detector name>")
    ap.add_argument("--detector", default=None)
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--rescale", choices=("auto", "off", "field", "slide"), default="auto",
                    help="PipelineConfig.rescale 'auto' (default) or False, or the red-cell ruler (True) measured per "
                         "field (analyze_smear) or once for the slide (analyze_fields)")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier report of the same setting")
    args = ap.parse_args()
    rescale = {"auto": "auto", "off": False, "field": True, "slide": True}[args.rescale]
    pipe = load_pipeline(detector=args.detector, classifier=args.classifier, config=PipelineConfig(rescale=rescale))
    out = (Path(args.out) if args.out else
           REPO / "reports" / "end_to_end" / pipe.classifier.record.name / pipe.detector.record.name)
    suffix = f"_rescale_{args.rescale}" + ("" if args.split == "test" else "_val")
    written = [f for f in (out / f"metrics{suffix}.json", out / f"per_field{suffix}.csv") if f.exists()]
    if written and not args.overwrite:
        ap.error(f"{', '.join(map(str, written))} exist: pass --overwrite to replace them")
    labels = read_bccd_subtype_labels(SHARED / "bccd_wbc_subtypes" / "labels.csv")
    stems = (BCCD / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    rows = []
    slide = {}
    if args.rescale == "slide":  # the test fields as one slide, as `smearpipe analyze --rescale` does
        paths = [str(BCCD / "JPEGImages" / f"{stem}.jpg") for stem in stems]
        slide = dict(iter_fields(paths, pipeline=pipe, progress=False))
    for stem in stems:
        img = read_image(BCCD / "JPEGImages" / f"{stem}.jpg")
        (_, _), boxes = read_voc(BCCD / "Annotations" / f"{stem}.xml")
        true = {c: sum(1 for b in boxes if b.label == c and b.xmax > b.xmin) for c in ("WBC", "RBC", "Platelets")}
        r = slide[str(BCCD / "JPEGImages" / f"{stem}.jpg")] if slide else analyze_smear(img, pipeline=pipe)
        if isinstance(r, Exception):
            raise r
        field_label = labels.get(stem)
        typed = None
        if field_label and len(set(field_label)) == 1 and true["WBC"] == len(field_label):
            pred_types = [d.wbc_type for d in r.wbcs]
            typed = bool(pred_types) and all(t == field_label[0] for t in pred_types)
        rows.append({"field": stem, **{f"true_{k}": v for k, v in true.items()}, **{f"pred_{k}": v for k, v in r.counts.items()},
                     "label": ",".join(field_label or []), "pred_types": ",".join(d.wbc_type for d in r.wbcs),
                     "type_correct": typed, "scale_factor": r.scale_factor, "detector_imgsz": r.detector_imgsz or "",
                     "ms": round(r.timings_ms["total"], 1)})
    n = len(rows)
    wbc_exact = np.mean([r["true_WBC"] == r["pred_WBC"] for r in rows])
    typed_rows = [r for r in rows if r["type_correct"] is not None]
    type_acc = np.mean([r["type_correct"] for r in typed_rows]) if typed_rows else float("nan")
    rbc_t = np.array([r["true_RBC"] for r in rows], float)
    rbc_p = np.array([r["pred_RBC"] for r in rows], float)
    nz = rbc_t > 0
    by_label: dict[str, list[bool]] = {}
    for r in typed_rows:
        by_label.setdefault(r["label"].split(",")[0], []).append(r["type_correct"])
    metrics = {
        "fields": n, "split": args.split, "rescale": args.rescale, "models": pipe.models,
        "fields_rescaled": sum(r["detector_imgsz"] != "" for r in rows),
        "wbc_count_exact_fraction": float(wbc_exact),
        "wbc_type_accuracy": float(type_acc), "wbc_type_fields": len(typed_rows),
        "wbc_type_accuracy_per_label": {k: {"correct": int(sum(v)), "fields": len(v)} for k, v in sorted(by_label.items())},
        "rbc_count_mape_percent": float(np.mean(np.abs(rbc_p[nz] - rbc_t[nz]) / rbc_t[nz]) * 100),
        "rbc_count_total_error_percent": float((rbc_p.sum() - rbc_t.sum()) / rbc_t.sum() * 100),
        "platelet_count_exact_fraction": float(np.mean([r["true_Platelets"] == r["pred_Platelets"] for r in rows])),
        "median_ms_per_field": float(np.median([r["ms"] for r in rows])),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"metrics{suffix}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out / f"per_field{suffix}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
