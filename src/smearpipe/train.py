"""Training entry points: :func:`train_detector` (YOLO) and, later, the classifier."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .datasets import DETECTION_CLASSES, normalize_detection_class, read_yolo_labels
from .errors import DatasetError, ImageReadError, WeightsError
from .io import read_image, write_image
from .preprocess import Preprocessing
from .weights import WeightsRecord, sha256_file

__all__ = ["DetectorTrainResult", "train_detector", "load_data_yaml", "unique_run_dir"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def unique_run_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``, ... if it exists: runs are never overwritten."""
    base = Path(out_dir)
    candidate = base / name
    n = 2
    while candidate.exists():
        candidate = base / f"{name}-{n}"
        n += 1
    return candidate


def _split_dirs(cfg: Mapping[str, Any], root: Path, split: str) -> tuple[Path, Path]:
    rel = cfg.get(split)
    if rel is None:
        raise DatasetError(f"data YAML has no {split!r} entry")
    img_dir = Path(rel) if Path(rel).is_absolute() else root / rel
    if not img_dir.is_dir():
        raise DatasetError(f"{split} image folder not found: {img_dir}")
    parts = list(img_dir.parts)
    if "images" not in parts:
        raise DatasetError(f"{split} image folder {img_dir} is not inside an 'images' folder (YOLO layout)")
    i = len(parts) - 1 - parts[::-1].index("images")
    label_dir = Path(*parts[:i], "labels", *parts[i + 1 :])
    return img_dir, label_dir


def load_data_yaml(
    data: str | os.PathLike, *, splits: tuple[str, ...] = ("train", "val"), check_images: bool = True
) -> dict[str, Any]:
    """Read and check an ultralytics data YAML (see :func:`smearpipe.datasets.voc_to_yolo`).

    Checks that the file parses, class names are WBC/RBC/Platelets spellings, each split folder
    exists with images that decode and label files that parse, and that each split has boxes.

    Returns
    -------
    dict
        The YAML content plus ``"_root"`` (dataset folder) and ``"_stats"`` per split.

    Raises
    ------
    DatasetError
        With a message naming the file or folder at fault.
    """
    path = Path(data)
    if not path.is_file():
        raise DatasetError(f"data YAML not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DatasetError(f"cannot parse data YAML {path}: {exc}") from None
    if not isinstance(cfg, dict) or "names" not in cfg:
        raise DatasetError(f"data YAML {path} must be a mapping with 'names' and split entries")
    names = cfg["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    unknown = [n for n in names if normalize_detection_class(n) is None]
    if unknown:
        raise DatasetError(f"data YAML {path}: unknown class name(s) {unknown}; expected spellings of {list(DETECTION_CLASSES)}")
    root = Path(cfg.get("path") or path.parent)
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    stats = {}
    for split in splits:
        img_dir, label_dir = _split_dirs(cfg, root, split)
        files = sorted(p for p in img_dir.iterdir() if p.is_file() or p.is_symlink())
        images = []
        for f in files:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise DatasetError(f"non-image file in {split} images folder: {f} (remove it or move it out)")
            if check_images:
                try:
                    read_image(f)
                except ImageReadError as exc:
                    raise DatasetError(f"{split} image cannot be read: {exc}") from None
            images.append(f)
        if not images:
            raise DatasetError(f"no images in {split} folder {img_dir}")
        n_boxes, empty = 0, 0
        for f in images:
            lf = label_dir / f"{f.stem}.txt"
            if not lf.exists():
                empty += 1
                continue
            boxes = read_yolo_labels(lf, num_classes=len(names))
            n_boxes += len(boxes)
            empty += len(boxes) == 0
        if n_boxes == 0:
            raise DatasetError(
                f"{split} split has no boxes: all {len(images)} label files in {label_dir} are empty or missing"
            )
        stats[split] = {"images": len(images), "boxes": n_boxes, "images_without_boxes": empty}
    cfg["names"] = names
    cfg["_root"] = str(root)
    cfg["_stats"] = stats
    return cfg


def _preprocessed_copy(cfg: Mapping[str, Any], prep: Preprocessing, dest: Path, splits: tuple[str, ...]) -> Path:
    """Write preprocessed images (+ labels) for ``splits`` under ``dest``; return the new data YAML."""
    root = Path(cfg["_root"])
    out = {"path": str(dest.resolve()), "names": dict(enumerate(cfg["names"]))}
    for split in splits:
        img_dir, label_dir = _split_dirs(cfg, root, split)
        (dest / "images" / split).mkdir(parents=True, exist_ok=True)
        (dest / "labels" / split).mkdir(parents=True, exist_ok=True)
        for f in sorted(img_dir.iterdir()):
            write_image(dest / "images" / split / f"{f.stem}.png", prep(read_image(f)), overwrite=True)
            lf = label_dir / f"{f.stem}.txt"
            if lf.exists():
                shutil.copyfile(lf, dest / "labels" / split / lf.name)
        out[split] = f"images/{split}"
    yaml_path = dest / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(out))
    return yaml_path


@dataclass(frozen=True)
class DetectorTrainResult:
    """What :func:`train_detector` produced."""

    run_dir: Path
    weights: Path  # run_dir / "detector.pt"
    record: Path  # run_dir / "detector.json"
    metrics: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "weights": str(self.weights), "record": str(self.record), "metrics": dict(self.metrics)}


def train_detector(
    data: str | os.PathLike,
    *,
    model: str = "yolov8n.yaml",
    epochs: int = 100,
    imgsz: int = 640,
    batch: int = 16,
    device: str = "cpu",
    out_dir: str | os.PathLike = "runs/detector",
    name: str = "train",
    resume: bool = False,
    preprocessing: Preprocessing | None = None,
    select: str = "best",
    record_name: str | None = None,
    workers: int = 0,
    seed: int = 0,
    train_args: Mapping[str, Any] | None = None,
) -> DetectorTrainResult:
    """Train a YOLO WBC/RBC/platelet detector and write the weights with their record.

    Parameters
    ----------
    data : path
        ultralytics data YAML with ``train`` and ``val`` splits (e.g. from ``smearpipe convert-voc``).
    model : str
        A model config to train from scratch (``"yolov8n.yaml"``, ``"yolo11n.yaml"``, ...) or a local
        ``.pt`` file to fine-tune. Nothing is downloaded: a ``.pt`` that is not a local file raises.
    epochs, imgsz, batch, device, workers, seed :
        Passed to ultralytics ``train``.
    out_dir, name : path, str
        The run goes to ``out_dir/name``; if that exists it goes to ``name-2``, ``name-3``, ...
        (never overwritten) unless ``resume=True``.
    resume : bool
        Continue the interrupted run ``out_dir/name`` from its ``weights/last.pt``.
    preprocessing : Preprocessing, optional
        Applied to every training/validation image (a preprocessed copy is written in the run folder)
        and stored in the record, so :class:`~smearpipe.detect.Detector` applies it at inference.
    select : {"best", "last"}
        Which checkpoint becomes ``detector.pt``: best validation fitness, or the final epoch.
    record_name : str, optional
        ``name`` written in the record (default: the run folder's name).
    train_args : mapping, optional
        Further ultralytics training arguments (``cos_lr``, ``close_mosaic``, ``mosaic``, ``scale``...).

    Returns
    -------
    DetectorTrainResult
    """
    from .detect import import_ultralytics

    if select not in ("best", "last"):
        raise ValueError(f"select must be 'best' or 'last', got {select!r}")
    if epochs < 1 or imgsz < 32 or batch < 1:
        raise ValueError(f"epochs >= 1, imgsz >= 32 and batch >= 1 required, got {epochs}, {imgsz}, {batch}")
    cfg = load_data_yaml(data)
    prep = (preprocessing or Preprocessing()).resolved()
    is_config = str(model).endswith((".yaml", ".yml"))
    if not is_config and not Path(model).is_file():
        raise WeightsError(
            f"model {model!r} is neither a model config (.yaml) nor a local weights file; pretrained COCO "
            "weights are not downloaded automatically: download them yourself and pass the file path"
        )
    out_dir = Path(out_dir)
    if resume:
        run_dir = out_dir / name
        last = run_dir / "weights" / "last.pt"
        if not last.is_file():
            raise DatasetError(f"cannot resume: {last} not found")
    else:
        run_dir = unique_run_dir(out_dir, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_yaml = Path(data)
    if prep.steps and not resume:
        data_yaml = _preprocessed_copy(cfg, prep, run_dir / "data", ("train", "val"))
    elif prep.steps:
        data_yaml = run_dir / "data" / "data.yaml"

    ultralytics = import_ultralytics()
    t0 = time.time()
    if resume:
        yolo = ultralytics.YOLO(str(run_dir / "weights" / "last.pt"))
        yolo.train(resume=True)
    else:
        yolo = ultralytics.YOLO(str(model), task="detect")
        args = dict(
            data=str(data_yaml), epochs=int(epochs), imgsz=int(imgsz), batch=int(batch), device=device,
            workers=int(workers), seed=int(seed), project=str(run_dir.parent.resolve()), name=run_dir.name,
            exist_ok=True, pretrained=not is_config, amp=False, plots=True, verbose=False,
        )
        args.update(dict(train_args or {}))
        yolo.train(**args)
    minutes = (time.time() - t0) / 60

    chosen = run_dir / "weights" / f"{select}.pt"
    if not chosen.is_file():
        raise WeightsError(f"training finished without {chosen}")
    weights = run_dir / "detector.pt"
    shutil.copyfile(chosen, weights)
    metrics = {}
    results_csv = run_dir / "results.csv"
    if results_csv.is_file():
        import csv

        rows = list(csv.DictReader(results_csv.open()))
        if rows:
            metrics = {"final_epoch_val": {k.strip(): float(v) for k, v in rows[-1].items() if k.strip()}}
    record = WeightsRecord(
        name=record_name or run_dir.name,
        kind="detector",
        file=weights.name,
        sha256=sha256_file(weights),
        classes=tuple(normalize_detection_class(n) or n for n in cfg["names"]),
        input_size=int(imgsz),
        preprocessing=prep,
        metadata={
            "architecture": str(model),
            "training": {
                "data": str(Path(data).resolve()),
                "splits": {"train": cfg.get("train"), "val": cfg.get("val")},
                "stats": cfg["_stats"],
                "epochs": int(epochs),
                "imgsz": int(imgsz),
                "batch": int(batch),
                "seed": int(seed),
                "checkpoint": select,
                "train_args": dict(train_args or {}),
                "wall_minutes": round(minutes, 1),
            },
            "metrics": metrics,
            "default_conf": 0.25,
            "default_iou": 0.7,
        },
        folder=str(run_dir),
    )
    record_path = record.write(run_dir / "detector.json", overwrite=True)
    (run_dir / "train_summary.json").write_text(json.dumps({"run_dir": str(run_dir), **record.to_dict()}, indent=2))
    return DetectorTrainResult(run_dir=run_dir, weights=weights, record=record_path, metrics=metrics)
