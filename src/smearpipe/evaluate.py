"""Evaluation of the stages on annotated splits: metrics as JSON, figures as PNG."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import _split_dirs, normalize_detection_class, read_yolo_labels
from .detect import Detector, import_ultralytics, model_lock
from .errors import DatasetError
from .train import _preprocessed_copy, load_data_yaml

__all__ = ["evaluate_detector", "evaluate_classifier"]


def _true_counts(label_file: Path, names: list[str], classes: list[str]) -> dict[str, int]:
    """Per-class box counts of one YOLO label file (missing file: an empty field)."""
    truth = read_yolo_labels(label_file) if label_file.exists() else np.zeros((0, 5))
    counts = {c: 0 for c in classes}
    for cls_id in truth[:, 0].astype(int):
        counts[normalize_detection_class(names[cls_id]) or names[cls_id]] += 1
    return counts


def _count_summary(per_image: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Exact fraction, MAE, mean absolute % error (fields with cells) and totals of per-field counts."""
    summary = {}
    for c in classes:
        t = np.array([r["true"][c] for r in per_image], float)
        p = np.array([r["pred"][c] for r in per_image], float)
        nz = t > 0
        summary[c] = {
            "exact_fraction": float(np.mean(t == p)),
            "mae": float(np.mean(np.abs(t - p))),
            "mean_abs_pct_error": float(np.mean(np.abs(t[nz] - p[nz]) / t[nz]) * 100) if nz.any() else None,
            "total_true": int(t.sum()),
            "total_pred": int(p.sum()),
        }
    return summary


def _counting(detector: Detector, image_files: list[Path], label_dir: Path, names: list[str], conf: float | None) -> dict[str, Any]:
    classes = list(detector.record.classes)
    per_image = []
    for f in image_files:
        pred_counts = {c: 0 for c in classes}
        for det in detector.predict(f, conf=conf):
            pred_counts[det.label] += 1
        per_image.append({"image": f.name, "true": _true_counts(label_dir / f"{f.stem}.txt", names, classes), "pred": pred_counts})
    return {"summary": _count_summary(per_image, classes), "per_image": per_image}


def evaluate_detector(
    data: str | os.PathLike,
    *,
    detector: Detector | str | os.PathLike | None = None,
    split: str = "test",
    out_dir: str | os.PathLike = "runs/eval_detector",
    conf: float | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """mAP@0.5, mAP@0.5:0.95 (overall and per class) and per-image counting accuracy on a split.

    mAP comes from ultralytics' validator (conf 0.001, its default for mAP); counting uses
    :meth:`Detector.predict` at the detector's default confidence (or ``conf``). Writes
    ``metrics.json``, ``counts.csv`` and ultralytics' figures (PR curve, confusion matrix, ...) to
    ``out_dir``.

    Parameters
    ----------
    data : path
        ultralytics data YAML containing ``split``.
    detector : Detector, name or path, optional
        None for the shipped default.
    split : str
        Split to evaluate on (``"test"`` for reported numbers).
    out_dir : path
        Output folder; existing results are not overwritten unless ``overwrite=True``.

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    det = detector if isinstance(detector, Detector) else Detector.load(detector)
    cfg = load_data_yaml(data, splits=(split,))
    data_classes = [normalize_detection_class(n) or n for n in cfg["names"]]
    if data_classes != list(det.record.classes):
        raise DatasetError(
            f"class order of {data} {data_classes} differs from the detector's {list(det.record.classes)}: "
            "ultralytics compares class ids, so the metrics would be wrong; reorder the dataset's names"
        )
    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir / 'metrics.json'} exists; pass overwrite=True or another out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    data_yaml = Path(data)
    prep = det.preprocessing
    if prep.steps:
        data_yaml = _preprocessed_copy(cfg, prep, out_dir / "data", (split,))
    import_ultralytics()
    with model_lock(det.model):  # validation may fuse the model in place: not beside a prediction on it
        val = det.model.val(
            data=str(data_yaml), split=split, imgsz=det.record.input_size, batch=8, conf=0.001, iou=0.7,
            device="cpu", plots=True, project=str(out_dir.resolve()), name="ultralytics_val", exist_ok=True,
            verbose=False,
        )
    box = val.box
    names = cfg["names"]
    per_class = {}
    for i, cls_idx in enumerate(box.ap_class_index):
        name = normalize_detection_class(names[int(cls_idx)]) or names[int(cls_idx)]
        p, r, ap50, ap = box.class_result(i)
        per_class[name] = {"precision": float(p), "recall": float(r), "ap50": float(ap50), "ap50_95": float(ap)}
    img_dir, label_dir = _split_dirs(cfg, Path(cfg["_root"]), split)
    images = sorted(f for f in img_dir.iterdir() if f.is_file())
    if not images:
        raise DatasetError(f"no images in {img_dir}")
    counting = _counting(det, images, label_dir, names, conf)
    metrics = {
        "detector": det.record.name,
        "sha256": det.record.sha256,
        "data": str(Path(data).resolve()),
        "split": split,
        "images": len(images),
        "map50": float(box.map50),
        "map50_95": float(box.map),
        "per_class": per_class,
        "counting_thresholds": (det.class_conf or det.conf) if conf is None else conf,
        "counting": counting["summary"],
        "figures": sorted(str(p.relative_to(out_dir)) for p in (out_dir / "ultralytics_val").glob("*.png")),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out_dir / "counts.csv").open("w", newline="") as f:
        w = csv.writer(f)
        classes = list(det.record.classes)
        w.writerow(["image"] + [f"true_{c}" for c in classes] + [f"pred_{c}" for c in classes])
        for row in counting["per_image"]:
            w.writerow([row["image"]] + [row["true"][c] for c in classes] + [row["pred"][c] for c in classes])
    return metrics


def evaluate_classifier(
    sources: Any,
    *,
    classifier: Any = None,
    out_dir: str | os.PathLike = "runs/eval_classifier",
    overwrite: bool = False,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Classification report, confusion matrix, ROC/AUC, confidence distributions and training curves.

    Parameters
    ----------
    sources : CropSource, path, or list of them
        Labelled crops (e.g. ``CropSource(pbc_root, split="test", splits_csv=..., center_fraction=0.7)``).
    classifier : Classifier, name or path, optional
        None for the shipped default.
    out_dir : path
        Receives ``metrics.json``, ``predictions.csv`` and PNG figures; an existing ``metrics.json``
        is not overwritten unless ``overwrite=True``.

    Returns
    -------
    dict
        The content of ``metrics.json``: accuracy, macro/weighted averages, per-class precision/recall/F1/
        support, confusion matrix, per-class one-vs-rest AUC. Macro averages are over the classes the crops
        hold or the classifier answered (``macro_over``; scikit-learn's default, as training's validation
        macro-F1): a class neither present nor predicted is no 0 in them.
    """
    from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

    from .classify import Classifier
    from .io import read_image
    from .report import plot_confidence, plot_confusion_matrix, plot_roc_curves, plot_training_curves
    from .train import _as_sources, center_crop

    clf = classifier if isinstance(classifier, Classifier) else Classifier.load(classifier)
    srcs = _as_sources(sources)
    if not srcs:
        raise ValueError("evaluate_classifier needs at least one crop source")
    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir / 'metrics.json'} exists; pass overwrite=True or another out_dir")
    classes = clf.classes
    items = [(p, y, s) for s in srcs for p, y in s.samples(classes)]
    probas = []
    for i in range(0, len(items), batch_size):
        crops = []
        for path, _, src in items[i: i + batch_size]:
            crops.append(center_crop(read_image(path), src.center_fraction))
        probas.append(clf.predict_proba(crops))
    proba = np.concatenate(probas)
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails on its data leaves no empty folder
    y = np.array([y for _, y, _ in items])
    pred = proba.argmax(1)
    labels = list(range(len(classes)))
    rep = classification_report(y, pred, labels=labels, target_names=list(classes), output_dict=True, zero_division=0)
    # macro averages over the classes the crops hold or the classifier answered (scikit-learn's default, as
    # training's validation macro-F1): a class neither present nor predicted is not a 0 in the average
    seen = sorted(set(y.tolist()) | set(pred.tolist()))
    if seen != labels:
        rep["macro avg"] = classification_report(y, pred, labels=seen, output_dict=True, zero_division=0)["macro avg"]
    cm = confusion_matrix(y, pred, labels=labels)
    auc = {}
    for k, name in enumerate(classes):
        pos = y == k
        auc[name] = float(roc_auc_score(pos, proba[:, k])) if pos.any() and not pos.all() else None
    metrics = {
        "classifier": clf.name,
        "sha256": clf.record.sha256,
        "sources": [s.to_dict() for s in srcs],
        "n": int(len(y)),
        "accuracy": float(rep["accuracy"]),
        "macro_f1": float(rep["macro avg"]["f1-score"]),
        "macro_over": [classes[k] for k in seen],
        "weighted_f1": float(rep["weighted avg"]["f1-score"]),
        "per_class": {c: {k: float(v) for k, v in rep[c].items()} for c in classes},
        "macro_avg": {k: float(v) for k, v in rep["macro avg"].items()},
        "weighted_avg": {k: float(v) for k, v in rep["weighted avg"].items()},
        "confusion_matrix": cm.tolist(),
        "auc_ovr": auc,
    }
    figures = ["confusion_matrix.png", "roc_curves.png", "confidence.png"]
    plot_confusion_matrix(cm, classes, out_dir / figures[0])
    plot_roc_curves(y, proba, classes, out_dir / figures[1])
    plot_confidence(y, proba, classes, out_dir / figures[2])
    history = clf.record.metadata.get("metrics", {}).get("history")
    if history:
        figures.append("training_curves.png")
        plot_training_curves(history, out_dir / figures[-1])
    elif (out_dir / "training_curves.png").is_file():  # an earlier evaluation's (overwrite): another model's history
        (out_dir / "training_curves.png").unlink()
    metrics["figures"] = sorted(figures)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out_dir / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "pred"] + [f"p_{c}" for c in classes])
        for (path, yt, _), pr in zip(items, proba, strict=True):
            w.writerow([str(path), classes[yt], classes[int(pr.argmax())]] + [f"{v:.5f}" for v in pr])
    return metrics
