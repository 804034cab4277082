"""Scale test, the other way: BCCD test fields at a higher magnification (cells larger), with and without rescaling.

Usage:
  python scripts/eval_scale_up.py [--zoom 2.0] [--split test] [--out reports/scale] [--overwrite]

A higher magnification on the same camera shows fewer cells, each larger, in a field of the same pixel
size. Here each BCCD field of ``--split`` (72 test, 87 val) is enlarged ``--zoom`` times (bicubic) and a 640x480
window is cut from it, centred on its first annotated WBC (clamped to the image), as a user centres the cell of
interest: with ``--zoom 2`` the WBCs are ~200-300 px wide. The ground truth is the field's VOC boxes,
enlarged, clipped to the window and kept where at least half of the box is inside (cells cut by the window's
edge count when most of them shows). For each window the shipped pipeline runs (a) ``as_is``: the detector at
its training input size (``PipelineConfig(rescale=False)``) and (b) ``auto``: the default
``rescale="auto"`` (the detector's red-cell boxes measure the field and choose the input size). As a paired
reference, (c) ``native``: the unenlarged field through the default pipeline, its boxes mapped into the
window by the same rule. Reported: AP@0.5 and AP@0.5:0.95 per class (a and b; conf 0.001, ultralytics'
``ap_per_class``), WBC count exactness, red-cell count error (against the kept annotations and against
``native``), and the WBC type of the field end to end where ``labels.csv`` gives one type and the field has
exactly one annotated WBC (``eval_end_to_end.py``'s rule; that WBC is inside its window). Writes ``metrics_zoom<zoom>.json`` and
``per_field_zoom<zoom>.csv`` under ``--out``/<detector name>/ (``_val`` with ``--split val``); an existing
report is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from eval_scale import BCCD, ap_by_class, correct_matrix, field_truth, write_report

from smearpipe.datasets import DETECTION_CLASSES, read_bccd_subtype_labels
from smearpipe.io import read_image
from smearpipe.pipeline import PipelineConfig, analyze_smear, load_pipeline

REPO = Path(__file__).resolve().parents[1]
LABELS = REPO.parent / "shared" / "datasets" / "bccd_wbc_subtypes" / "labels.csv"
WINDOW = (640, 480)  # w, h: BCCD's own field size
MIN_VISIBLE = 0.5


def pct_error(pred: float, ref: float) -> float | None:
    """``(pred - ref) / ref`` in percent; None where nothing is to count (``ref`` 0)."""
    return float((pred - ref) / ref * 100) if ref else None


def in_window(box: tuple[float, ...], zoom: float, x0: float, y0: float) -> tuple[float, ...] | None:
    """A field box (x1, y1, x2, y2) enlarged by ``zoom``, shifted into the window at (x0, y0) and clipped;
    None where less than :data:`MIN_VISIBLE` of its area is inside."""
    x1, y1, x2, y2 = (box[0] * zoom - x0, box[1] * zoom - y0, box[2] * zoom - x0, box[3] * zoom - y0)
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, WINDOW[0]), min(y2, WINDOW[1])
    area = (x2 - x1) * (y2 - y1)
    if cx2 <= cx1 or cy2 <= cy1 or area <= 0 or (cx2 - cx1) * (cy2 - cy1) < MIN_VISIBLE * area:
        return None
    return (cx1, cy1, cx2, cy2)


def window_of(stem: str, zoom: float) -> tuple[np.ndarray, list[tuple[tuple[float, ...], int]], float, float]:
    """The enlarged field's window centred on its first annotated WBC: ``(image, ground truth as (box, class
    index), x0, y0)``, the window's corner in the enlarged field."""
    field = read_image(BCCD / "JPEGImages" / f"{stem}.jpg")
    h, w = field.shape[:2]
    big = cv2.resize(field, (round(w * zoom), round(h * zoom)), interpolation=cv2.INTER_CUBIC)
    boxes = [((b.xmin, b.ymin, b.xmax, b.ymax), c) for b, c in field_truth(stem)]
    wbcs = [b for b, c in boxes if DETECTION_CLASSES[c] == "WBC"]
    cx, cy = ((wbcs[0][0] + wbcs[0][2]) / 2 * zoom, (wbcs[0][1] + wbcs[0][3]) / 2 * zoom) if wbcs else (w * zoom / 2, h * zoom / 2)
    x0 = float(np.clip(round(cx - WINDOW[0] / 2), 0, big.shape[1] - WINDOW[0]))
    y0 = float(np.clip(round(cy - WINDOW[1] / 2), 0, big.shape[0] - WINDOW[1]))
    image = np.ascontiguousarray(big[int(y0):int(y0) + WINDOW[1], int(x0):int(x0) + WINDOW[0]])
    truth = [(kept, c) for b, c in boxes if (kept := in_window(b, zoom, x0, y0)) is not None]
    return image, truth, x0, y0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoom", type=float, default=2.0)
    ap.add_argument("--split", choices=("val", "test"), default="test", help="BCCD ImageSets split of the fields")
    ap.add_argument("--out", default=str(REPO / "reports" / "scale"), help="reports go to OUT/<detector name>/")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier report of the same setting")
    args = ap.parse_args()
    if not 1.0 < args.zoom <= 4.0:
        ap.error("--zoom must be in (1, 4]")
    pipes = {"as_is": load_pipeline(config=PipelineConfig(rescale=False)), "auto": load_pipeline()}
    det = pipes["auto"].detector
    out = Path(args.out) / det.record.name
    suffix = f"_zoom{args.zoom:g}" + ("" if args.split == "test" else f"_{args.split}")
    written = [f for f in (out / f"metrics{suffix}.json", out / f"per_field{suffix}.csv") if f.exists()]
    if written and not args.overwrite:
        ap.error(f"{', '.join(map(str, written))} exist: pass --overwrite to replace them")
    labels = read_bccd_subtype_labels(LABELS)
    stems = (BCCD / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    if not stems:
        raise SystemExit(f"no fields in the BCCD {args.split} split")
    modes = ("as_is", "auto")
    stats: dict[str, list] = {m: [] for m in modes}
    targets: list[int] = []
    rows = []
    t0 = time.time()
    for stem in stems:
        image, truth, x0, y0 = window_of(stem, args.zoom)
        targets += [c for _, c in truth]
        n_true = {k: sum(DETECTION_CLASSES[c] == k for _, c in truth) for k in DETECTION_CLASSES}
        field_label = labels.get(stem)
        field_wbcs = sum(DETECTION_CLASSES[c] == "WBC" for _, c in field_truth(stem))
        typed_field = (bool(field_label) and len(set(field_label)) == 1 and field_wbcs == 1 == len(field_label)
                       and n_true["WBC"] == 1)
        native = analyze_smear(read_image(BCCD / "JPEGImages" / f"{stem}.jpg"), pipeline=pipes["auto"])
        native_in = [c for c in native.detections if in_window(c.box, args.zoom, x0, y0) is not None]
        row = {"field": stem, "window_x0": x0, "window_y0": y0, "label": ",".join(field_label or []),
               **{f"true_{k}": v for k, v in n_true.items()},
               **{f"native_{k}": sum(c.label == k for c in native_in) for k in DETECTION_CLASSES},
               "native_types": ",".join(c.wbc_type for c in native_in if c.label == "WBC")}
        row["native_type_correct"] = (all(c.wbc_type == field_label[0] for c in native_in if c.label == "WBC")
                                      and row["native_WBC"] > 0) if typed_field else None
        for m in modes:
            r = analyze_smear(image, pipeline=pipes[m])
            dets = det.predict(image, conf=0.001, imgsz=r.detector_imgsz)
            preds = [(d.box, d.score, DETECTION_CLASSES.index(d.label)) for d in dets]
            tp = correct_matrix(preds, truth)
            stats[m].append((tp, np.array([p[1] for p in preds]), np.array([p[2] for p in preds])))
            row.update({f"{m}_{k}": r.counts.get(k, 0) for k in DETECTION_CLASSES})
            row[f"{m}_imgsz"] = r.detector_imgsz or ""
            row[f"{m}_types"] = ",".join(d.wbc_type for d in r.wbcs)
            row[f"{m}_type_correct"] = (bool(r.wbcs) and all(d.wbc_type == field_label[0] for d in r.wbcs)) if typed_field else None
        rows.append(row)
    report: dict = {
        "protocol": f"BCCD {args.split} fields ({len(stems)}) enlarged {args.zoom:g}x, a 640x480 window centred on the first "
                    f"annotated WBC; boxes kept where >= {MIN_VISIBLE:g} of their area is inside",
        "models": pipes["auto"].models, "zoom": args.zoom, "fields": len(rows), "seconds": round(time.time() - t0, 1),
        "auto_imgsz": {"median": float(np.median([r["auto_imgsz"] or det.record.input_size for r in rows])),
                       "rescaled_fields": sum(r["auto_imgsz"] != "" for r in rows)},
    }
    true_rbc = np.array([r["true_RBC"] for r in rows], float)
    native_rbc = np.array([r["native_RBC"] for r in rows], float)
    for m in ("native", *modes):
        res = {}
        if m in stats:
            res["AP50"], res["AP50_95"] = ap_by_class(stats[m], targets)
        pred_rbc = np.array([r[f"{m}_RBC"] for r in rows], float)
        typed = [r[f"{m}_type_correct"] for r in rows if r[f"{m}_type_correct"] is not None]
        res.update({
            "WBC_count_exact": float(np.mean([r[f"{m}_WBC"] == r["true_WBC"] for r in rows])),
            "RBC_total_pct_error_vs_annotations": pct_error(pred_rbc.sum(), true_rbc.sum()),
            "RBC_total_pct_error_vs_native": pct_error(pred_rbc.sum(), native_rbc.sum()),
            "wbc_type": {"correct": int(sum(typed)), "fields": len(typed)},
        })
        report[m] = res
    write_report(out / f"metrics{suffix}.json", report, out / f"per_field{suffix}.csv", rows)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
