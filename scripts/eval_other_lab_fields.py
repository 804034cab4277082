"""The whole pipeline on another lab's fields: PBC images (Hospital Clinic Barcelona, CellaVision DM96).

Usage: python scripts/eval_other_lab_fields.py [--split val|test] [--n N] [--out reports/cross_lab/fields_pbc]
       [--detector NAME] [--classifier NAME] [--wbc-max-overlap X|none] [--rescale auto|ruler|off]

The detector has only seen BCCD fields (another microscope, camera and stain). A PBC image is a small
field (360x363 px) with one annotated white cell at its centre, red cells and platelets around it, and
now and then part of a neighbouring white cell. Per image: is a WBC box found on the centre, and is the
type of that box (the highest-scoring one on the centre) the image's class. Also: images without any WBC
box, extra WBC boxes besides the centre one (some are real neighbouring cells, some duplicates).

The classifier has been trained on PBC train, so on PBC the type accuracy mostly measures the detector
and the crops it cuts; the classifier's own cross-lab number is scripts/cross_lab_protocol.py's.
Recipe choices are made on ``--split val``; ``test`` is for the report. Writes
``<out>/<classifier name>/<detector name>/<split>_rescale-<mode>/metrics.json`` and ``per_image.csv``
(older reports in ``<split>/`` folders: without rescaling).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

from smearpipe.datasets import WBC_CLASSES
from smearpipe.io import read_image
from smearpipe.pipeline import Pipeline, PipelineConfig, analyze_smear, load_pipeline

REPO = Path(__file__).resolve().parents[1]
PBC = REPO.parent / "shared" / "datasets" / "pbc"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--n", type=int, default=None, help="a random subset of this many images (seed 0); default all")
    ap.add_argument("--out", default=str(REPO / "reports" / "cross_lab" / "fields_pbc"))
    ap.add_argument("--detector", default=None)
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--wbc-max-overlap", default=None, help="PipelineConfig.wbc_max_overlap ('none' to keep every box)")
    ap.add_argument("--rescale", choices=("auto", "ruler", "off"), default="auto",
                    help="PipelineConfig.rescale: 'auto' (the default), 'ruler' (True: measured on each field) or 'off'")
    args = ap.parse_args()
    if args.n is not None and args.n < 1:
        ap.error("--n must be >= 1")
    overrides = {"rescale": {"auto": "auto", "ruler": True, "off": False}[args.rescale]}
    if args.wbc_max_overlap is not None:
        overrides["wbc_max_overlap"] = None if args.wbc_max_overlap == "none" else float(args.wbc_max_overlap)
    pipe = load_pipeline(detector=args.detector, classifier=args.classifier, config=PipelineConfig(**overrides))
    metrics, rows = evaluate(pipe, args.split, n=args.n)
    metrics["config"] = overrides
    write(Path(args.out) / pipe.classifier.record.name / pipe.detector.record.name / f"{args.split}_rescale-{args.rescale}",
          metrics, rows)
    print(json.dumps({k: v for k, v in metrics.items() if k != "models"}, indent=1))


def evaluate(pipe: Pipeline, split: str, *, n: int | None = None) -> tuple[dict, list[dict]]:
    """Run ``pipe`` on the PBC images of ``split`` (all, or ``n`` drawn with seed 0): metrics and per-image rows."""
    with (PBC / "splits.csv").open() as f:
        items = [r for r in csv.DictReader(f) if r["split"] == split]
    if n is not None and n < len(items):
        items = random.Random(0).sample(items, n)
    rows = []
    for item in items:
        img = read_image(PBC / "PBC_dataset_normal_DIB" / item["path"])
        r = analyze_smear(img, pipeline=pipe)
        h, w = img.shape[:2]
        centre = [c for c in r.wbcs if c.box[0] <= w / 2 <= c.box[2] and c.box[1] <= h / 2 <= c.box[3]]
        best = max(centre, key=lambda c: c.score) if centre else None
        rows.append({"image": item["path"], "label": item["class"], "wbc_boxes": len(r.wbcs), "centre_found": best is not None,
                     "pred_type": best.wbc_type if best else "", "type_correct": bool(best and best.wbc_type == item["class"]),
                     "extra_wbc_boxes": len(r.wbcs) - (best is not None), "scale_factor": round(r.scale_factor, 3),
                     "detector_imgsz": r.detector_imgsz or ""})
    total = len(rows)
    per_class = {}
    for c in WBC_CLASSES:
        sub = [r for r in rows if r["label"] == c]
        per_class[c] = {"images": len(sub), "centre_found": sum(r["centre_found"] for r in sub),
                        "type_correct": sum(r["type_correct"] for r in sub)}
    metrics = {
        "split": split, "images": total, "models": pipe.models,
        "centre_wbc_found": sum(r["centre_found"] for r in rows) / total,
        "type_accuracy": sum(r["type_correct"] for r in rows) / total,
        "type_accuracy_where_found": sum(r["type_correct"] for r in rows) / max(1, sum(r["centre_found"] for r in rows)),
        "images_without_wbc_box": sum(r["wbc_boxes"] == 0 for r in rows),
        "extra_wbc_boxes": sum(r["extra_wbc_boxes"] for r in rows),
        "rescaled_images": sum(r["detector_imgsz"] != "" for r in rows),
        "per_class": per_class,
        "confusions": _confusions(rows),
    }
    return metrics, rows


def write(out: Path, metrics: dict, rows: list[dict]) -> None:
    """``metrics.json`` and ``per_image.csv`` in ``out`` (replaced if present: a report of this script)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out / "per_image.csv").open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


def _confusions(rows: list[dict]) -> dict[str, int]:
    """'true->predicted' counts of the wrongly typed centre cells ('true->none': no box on the centre)."""
    counts: dict[str, int] = {}
    for r in rows:
        if not r["type_correct"]:
            key = f"{r['label']}->{r['pred_type'] or 'none'}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    main()
