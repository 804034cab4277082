"""Scale test: BCCD test fields at a 2.5x lower magnification, with and without the red-cell ruler.

Usage:
  python scripts/eval_scale.py [--factor 2.5] [--tiles 2] [--split test] [--detector NAME] [--out reports/scale]
                               [--overwrite]

A lower magnification on the same camera shows more cells, each smaller, in a field of the same
pixel size. Shrinking a field alone does not simulate that: the detector letterboxes every image to
its input size, so a shrunk 640x480 field is enlarged back and the cells are seen at the training
scale again. Here the 72 BCCD test fields are shrunk by ``--factor`` and tiled 2x2 (four different
fields, 18 mosaics, each field used once) on a 640x480 canvas of the slide's background colour; the
ground truth is the union of their VOC boxes, scaled and shifted. ``--tiles 1`` places each shrunk field
alone at the centre of the canvas (72 images). On a canvas, a red cell cut by its field's edge borders
another field or the canvas instead of the image's edge, and the detector finds fewer of them
(``rbc_recall_at_counting_threshold`` below).

For each mosaic, the detector runs (a) as is, at its training input size, and (b) at the input size
chosen from the field's red-cell diameter (:func:`smearpipe.scale.rescale_factor` +
:func:`smearpipe.scale.detector_input_size`, what ``analyze_smear`` does with ``PipelineConfig(rescale=True)``),
(c) ``rescaled_slide``: at the input size from one diameter for all mosaics, the median over the first
``slide_scale_fields`` mosaics, what ``analyze_fields`` does with ``rescale=True``, and (d) ``auto``: at the
input size the default ``rescale="auto"`` ends at (the detector's own red-cell boxes measure the mosaic).
As a reference, (e) ``native_mosaic``: the same mosaic built at the fields' own scale (``--factor`` times
larger, tiles unshrunk: the same seams and borders) and detected at training scale.
Reported:
AP@0.5 and AP@0.5:0.95 per class (ultralytics' ``ap_per_class`` on predictions at conf 0.001), the
RBC count error against the annotations, against the detector's own count on the unshrunk fields
(BCCD annotations miss some red cells) and against its count on the native-scale mosaic (which isolates
the magnification from the seams and borders a mosaic adds), WBC count
exactness, the recall of annotated red cells at the counting thresholds (cells cut by their field's
edge apart from the others) and the estimated scale factor. Writes ``metrics_x<factor>.json`` and
``per_mosaic_x<factor>.csv`` under ``--out``/<detector name>/ (``_single`` with ``--tiles 1``; ``_val`` with
``--split val``: the val fields, 21 mosaics of 84 of the 87, for choosing between detectors; the shipped
detectors saw these fields in training, at their own scale); an existing report is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from smearpipe.datasets import DETECTION_CLASSES, normalize_detection_class, read_voc
from smearpipe.detect import Detector
from smearpipe.io import read_image
from smearpipe.pipeline import PipelineConfig, analyze_smear, load_pipeline
from smearpipe.preprocess import estimate_background
from smearpipe.scale import detector_input_size, estimate_rbc_diameter, rescale_factor

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd" / "BCCD"
SLIDE_FIELDS = PipelineConfig().slide_scale_fields


def edge_cut(box, shape: tuple[int, ...], margin: float = 1.0) -> bool:
    """Whether a VOC box (1-based pixel coordinates, 1..W) reaches within ``margin`` px of its field's border:
    a cell cut by the field's edge."""
    h, w = shape[:2]
    return box.xmin <= 1 + margin or box.ymin <= 1 + margin or box.xmax >= w - margin or box.ymax >= h - margin


def matched(gts: list[tuple[float, ...]], preds: list[tuple[float, ...]], iou: float = 0.5) -> list[bool]:
    """For each ground-truth box in turn, whether a prediction not yet taken overlaps it by ``iou`` (it takes the
    one of highest IoU): a greedy matching in ground-truth order."""
    import torch
    from ultralytics.utils.metrics import box_iou

    if not gts or not preds:
        return [False] * len(gts)
    m = box_iou(torch.tensor(gts, dtype=torch.float32), torch.tensor(preds, dtype=torch.float32)).numpy()
    hit, used = [], set()
    for row in m:
        order = [j for j in np.argsort(-row) if j not in used and row[j] >= iou]
        hit.append(bool(order))
        if order:
            used.add(order[0])
    return hit


Placement = tuple[float, float, float, float]  # x0, y0, sx, sy: field pixel (x, y) -> canvas (x * sx + x0, y * sy + y0)


def add_rbc_recall(hits: dict[str, list[bool]], rbc_gt: list, boxes: list[tuple[float, ...]]) -> None:
    """Append, per annotated red cell, whether a counted box matches it, under "edge_cut" or "other"."""
    for gt, hit in zip(rbc_gt, matched([gt[0] for gt in rbc_gt], boxes), strict=True):
        hits["edge_cut" if gt[2] else "other"].append(hit)


def mosaic(stems: list[str], factor: float, *, canvas_scale: float = 1.0,
           ) -> tuple[np.ndarray, list[tuple[tuple[float, ...], int, bool]], list[np.ndarray], list[Placement]]:
    """Shrink one or four fields by ``factor``, tile them 1x1 or 2x2 centred on a field-sized background canvas.

    ``canvas_scale`` enlarges the canvas and the tiles together: ``canvas_scale=factor`` gives the same
    mosaic at the fields' own scale (tiles unshrunk, the same seams and borders). Returns the canvas, its
    ground truth (box, class index, whether the box is cut by its field's edge), the fields and where each
    was placed.
    """
    fields = [read_image(BCCD / "JPEGImages" / f"{s}.jpg") for s in stems]
    h, w = fields[0].shape[:2]
    th, tw = round(h * canvas_scale / factor), round(w * canvas_scale / factor)
    h, w = round(h * canvas_scale), round(w * canvas_scale)
    canvas = np.empty((h, w, 3), np.uint8)
    canvas[:] = np.round(np.median([estimate_background(f) for f in fields], axis=0)).astype(np.uint8)
    n = round(len(stems) ** 0.5)
    if n * n != len(stems):
        raise ValueError(f"mosaic needs 1 or 4 fields, got {len(stems)}")
    oy, ox = (h - n * th) // 2, (w - n * tw) // 2
    boxes, placements = [], []
    for k, (stem, field) in enumerate(zip(stems, fields, strict=True)):
        y0, x0 = oy + (k // n) * th, ox + (k % n) * tw
        same = (tw, th) == (field.shape[1], field.shape[0])
        canvas[y0:y0 + th, x0:x0 + tw] = field if same else cv2.resize(field, (tw, th), interpolation=cv2.INTER_AREA)
        sx, sy = tw / field.shape[1], th / field.shape[0]
        placements.append((x0, y0, sx, sy))
        for b, cls in field_truth(stem):
            boxes.append(((b.xmin * sx + x0, b.ymin * sy + y0, b.xmax * sx + x0, b.ymax * sy + y0), cls,
                          edge_cut(b, field.shape)))
    return canvas, boxes, fields, placements


def field_truth(stem: str) -> list[tuple]:
    """A BCCD field's VOC boxes with their class index in ``DETECTION_CLASSES`` (empty boxes left out)."""
    out = []
    for b in read_voc(BCCD / "Annotations" / f"{stem}.xml")[1]:
        label = normalize_detection_class(b.label)
        if label is not None and b.xmax > b.xmin and b.ymax > b.ymin:  # BCCD has a few empty boxes
            out.append((b, DETECTION_CLASSES.index(label)))
    return out


def write_report(metrics_path: Path, metrics: dict, table_path: Path, rows: list[dict]) -> None:
    """The metrics as indented JSON and the per-image rows as CSV (their folder created)."""
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    with table_path.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


def ap_by_class(stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]], targets: list[int]) -> tuple[dict, dict]:
    """AP@0.5 and AP@0.5:0.95 per class name (ultralytics' ``ap_per_class``) from per-image ``(tp, conf, cls)``."""
    from ultralytics.utils.metrics import ap_per_class

    res = ap_per_class(np.concatenate([s[0] for s in stats]), np.concatenate([s[1] for s in stats]),
                       np.concatenate([s[2] for s in stats]), np.array(targets))
    ap50 = {DETECTION_CLASSES[int(c)]: float(a[0]) for c, a in zip(res[6], res[5], strict=True)}
    ap = {DETECTION_CLASSES[int(c)]: float(a.mean()) for c, a in zip(res[6], res[5], strict=True)}
    return ap50, ap


def correct_matrix(preds: list, gts: list) -> np.ndarray:
    """(N_pred, 10) true-positive matrix at IoU 0.5:0.95 (the greedy matching of ultralytics' validator,
    ultralytics 8.4; called unbound with just the IoU thresholds it reads from ``self``)."""
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import box_iou

    if not preds:
        return np.zeros((0, 10), bool)
    if not gts:
        return np.zeros((len(preds), 10), bool)
    iou = box_iou(torch.tensor([g[0] for g in gts], dtype=torch.float32), torch.tensor([p[0] for p in preds], dtype=torch.float32))
    this = SimpleNamespace(iouv=torch.linspace(0.5, 0.95, 10))
    return BaseValidator.match_predictions(this, torch.tensor([p[2] for p in preds]), torch.tensor([g[1] for g in gts]), iou).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=float, default=2.5)
    ap.add_argument("--tiles", type=int, choices=(1, 2), default=2, help="fields per canvas side: 2 (2x2 mosaics) or 1")
    ap.add_argument("--split", choices=("val", "test"), default="test", help="BCCD ImageSets split of the fields")
    ap.add_argument("--detector", default=None, help="weights name or path (default: the shipped detector)")
    ap.add_argument("--out", default=str(REPO / "reports" / "scale"), help="reports go to OUT/<detector name>/")
    ap.add_argument("--overwrite", action="store_true", help="replace this detector's earlier report of the same setting")
    args = ap.parse_args()
    if args.factor < args.tiles:
        ap.error(f"--factor must be >= {args.tiles} ({args.tiles}x{args.tiles} shrunk fields must fit on one field-sized canvas)")
    det = Detector.load(args.detector)
    out = Path(args.out) / det.record.name
    suffix = f"_x{args.factor:g}" + ("" if args.tiles == 2 else "_single") + ("" if args.split == "test" else f"_{args.split}")
    written = [f for f in (out / f"metrics{suffix}.json", out / f"per_mosaic{suffix}.csv") if f.exists()]
    if written and not args.overwrite:
        ap.error(f"{', '.join(map(str, written))} exist: pass --overwrite to replace them")
    pipe = load_pipeline(detector=det)  # default config: rescale="auto"
    meta = det.record.metadata
    target, long_side = float(meta["rbc_diameter_px"]), float(meta["train_long_side_px"])
    stems = (BCCD / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    per = args.tiles ** 2
    groups = [stems[i:i + per] for i in range(0, len(stems) - per + 1, per)]
    modes = ("as_is", "rescaled", "rescaled_slide", "auto")
    all_modes = ("native_mosaic", *modes)
    stats: dict[str, list] = {m: [] for m in all_modes}
    targets: list[int] = []
    rows = []
    t0 = time.time()
    mosaics = [mosaic(group, args.factor) for group in groups]
    estimates = [estimate_rbc_diameter(m[0]) for m in mosaics]
    slide_est = float(np.median(estimates[:SLIDE_FIELDS]))  # as analyze_fields: median over the slide's first fields
    rbc_hits: dict[str, dict[str, list[bool]]] = {m: {"edge_cut": [], "other": []} for m in ("native", *all_modes)}
    for group, (canvas, gts, fields, placements), est in zip(groups, mosaics, estimates, strict=True):
        targets += [g[1] for g in gts]
        rbc_gt = [g for g in gts if DETECTION_CLASSES[g[1]] == "RBC"]
        native = [det.predict(f) for f in fields]
        native_counts = [d.label for dets in native for d in dets]
        add_rbc_recall(rbc_hits["native"], rbc_gt, [
            (d.box[0] * sx + x0, d.box[1] * sy + y0, d.box[2] * sx + x0, d.box[3] * sy + y0)
            for dets, (x0, y0, sx, sy) in zip(native, placements, strict=True) for d in dets if d.label == "RBC"])
        factor = rescale_factor(canvas, target_rbc_diameter=target, rbc_diameter_px=est, tolerance=0.0)  # as the pipeline
        slide_factor = target / slide_est
        big, big_gts, _, _ = mosaic(group, args.factor, canvas_scale=args.factor)  # the same at the fields' own scale
        big_rbc_gt = [g for g in big_gts if DETECTION_CLASSES[g[1]] == "RBC"]
        sizes = {"native_mosaic": detector_input_size(big.shape, factor=1.0, input_size=det.record.input_size,
                                                      train_long_side=long_side),  # seen at training scale
                 "as_is": None,
                 "rescaled": detector_input_size(canvas.shape, factor=factor, input_size=det.record.input_size,
                                                 train_long_side=long_side),
                 "rescaled_slide": detector_input_size(canvas.shape, factor=slide_factor, input_size=det.record.input_size,
                                                       train_long_side=long_side),
                 # what analyze_smear's default rescale="auto" ends at (the detector's own red-cell boxes decide)
                 "auto": analyze_smear(canvas, pipeline=pipe).detector_imgsz}
        row = {"fields": " ".join(group), "rbc_diameter_est": round(est, 1), "expected_rbc_diameter": round(target / args.factor, 1),
               "scale_factor": round(factor, 3), "imgsz_rescaled": sizes["rescaled"],
               "imgsz_rescaled_slide": sizes["rescaled_slide"], "imgsz_auto": sizes["auto"],
               "gt_WBC": sum(g[1] == 0 for g in gts), "gt_RBC": sum(g[1] == 1 for g in gts),
               "native_pred_WBC": native_counts.count("WBC"), "native_pred_RBC": native_counts.count("RBC")}
        for m in all_modes:
            image, truth, rbc_truth = (big, big_gts, big_rbc_gt) if m == "native_mosaic" else (canvas, gts, rbc_gt)
            dets = det.predict(image, conf=0.001, imgsz=sizes[m])
            preds = [(d.box, d.score, DETECTION_CLASSES.index(d.label)) for d in dets]
            tp = correct_matrix(preds, truth)
            stats[m].append((tp, np.array([p[1] for p in preds]), np.array([p[2] for p in preds])))
            counted_dets = det.predict(image, imgsz=sizes[m])  # the counting thresholds, as in the pipeline
            counted = [d.label for d in counted_dets]
            add_rbc_recall(rbc_hits[m], rbc_truth, [d.box for d in counted_dets if d.label == "RBC"])
            row[f"{m}_WBC"] = counted.count("WBC")
            row[f"{m}_RBC"] = counted.count("RBC")
        rows.append(row)
    report: dict = {
        "protocol": f"BCCD {args.split} fields (ImageSets/Main/{args.split}.txt, {len(stems)}) shrunk {args.factor}x, tiled "
                    f"{args.tiles}x{args.tiles} on a 640x480 background canvas: {len(groups)} mosaics, each field once",
        "detector": {"name": det.record.name, "sha256": det.record.sha256, "input_size": det.record.input_size,
                     "rbc_diameter_px": target, "train_long_side_px": long_side},
        "factor": args.factor, "mosaics": len(groups), "seconds": round(time.time() - t0, 1),
        "scale_factor_estimated": {"median": float(np.median([r["scale_factor"] for r in rows])),
                                   "min": min(r["scale_factor"] for r in rows), "max": max(r["scale_factor"] for r in rows)},
        "scale_factor_slide": {"fields": SLIDE_FIELDS, "factor": target / slide_est,
                               "note": "rescaled_slide: one red-cell diameter for all mosaics, the median over the first "
                                       f"{SLIDE_FIELDS} (PipelineConfig.slide_scale_fields, as analyze_fields does)"},
    }
    gt_rbc = np.array([r["gt_RBC"] for r in rows], float)
    native_rbc = np.array([r["native_pred_RBC"] for r in rows], float)
    has_rbc = gt_rbc > 0  # per-canvas % errors where red cells are annotated (a few single BCCD fields have none)
    mosaic_rbc = np.array([r["native_mosaic_RBC"] for r in rows], float)
    has_native = native_rbc > 0
    has_mosaic = mosaic_rbc > 0
    for m in all_modes:
        ap50, ap = ap_by_class(stats[m], targets)
        pred_rbc = np.array([r[f"{m}_RBC"] for r in rows], float)
        report[m] = {
            "AP50": ap50, "AP50_95": ap, "mAP50": float(np.mean(list(ap50.values()))),
            "WBC_count_exact": float(np.mean([r[f"{m}_WBC"] == r["gt_WBC"] for r in rows])),
            "RBC_count_vs_annotations": {"mean_abs_pct_error": float(np.mean(np.abs(pred_rbc - gt_rbc)[has_rbc] / gt_rbc[has_rbc]) * 100),
                                         "total_pct_error": float((pred_rbc.sum() - gt_rbc.sum()) / gt_rbc.sum() * 100)},
            "RBC_count_vs_native_scale_prediction": {
                "mean_abs_pct_error": float(np.mean(np.abs(pred_rbc - native_rbc)[has_native] / native_rbc[has_native]) * 100),
                "total_pct_error": float((pred_rbc.sum() - native_rbc.sum()) / native_rbc.sum() * 100)},
            "RBC_count_vs_native_scale_mosaic": {
                "mean_abs_pct_error": float(np.mean(np.abs(pred_rbc - mosaic_rbc)[has_mosaic] / mosaic_rbc[has_mosaic]) * 100),
                "total_pct_error": float((pred_rbc.sum() - mosaic_rbc.sum()) / mosaic_rbc.sum() * 100)},
        }
    report["rbc_recall_at_counting_threshold"] = {
        "note": "share of annotated red cells matched (IoU >= 0.5) by a counted box, for cells cut by their field's edge "
                "and all others; 'native': the unshrunk fields, boxes mapped onto the canvas",
        **{m: {k: {"cells": len(v), "recall": round(float(np.mean(v)), 3) if v else None} for k, v in h.items()}
           for m, h in rbc_hits.items()}}
    report["native_scale_reference"] = {
        "RBC_count_vs_annotations": {"mean_abs_pct_error": float(np.mean(np.abs(native_rbc - gt_rbc)[has_rbc] / gt_rbc[has_rbc]) * 100),
                                     "total_pct_error": float((native_rbc.sum() - gt_rbc.sum()) / gt_rbc.sum() * 100)},
        "WBC_count_exact": float(np.mean([r["native_pred_WBC"] == r["gt_WBC"] for r in rows])),
    }
    write_report(out / f"metrics{suffix}.json", report, out / f"per_mosaic{suffix}.csv", rows)
    print(json.dumps({k: v for k, v in report.items() if k in (*all_modes, "native_scale_reference", "rbc_recall_at_counting_threshold", "scale_factor_estimated",
                                                                 "scale_factor_slide")}, indent=1))


if __name__ == "__main__":
    main()
