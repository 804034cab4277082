"""Training entry points: :func:`train_detector` (YOLO) and, later, the classifier."""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .datasets import DETECTION_CLASSES, _split_dirs, normalize_detection_class, read_data_yaml, read_yolo_labels
from .errors import DatasetError, ImageReadError, WeightsError
from .framing import Framing
from .io import IMAGE_SUFFIXES, read_image, replace_file, write_image
from .preprocess import Preprocessing
from .weights import WeightsRecord, sha256_file

__all__ = [
    "DetectorTrainResult",
    "train_detector",
    "load_data_yaml",
    "unique_run_dir",
    "CropSource",
    "ClassifierTrainConfig",
    "ClassifierTrainResult",
    "train_classifier",
    "center_crop",
    "js_divergence",
]


def unique_run_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``, ... if it exists: runs are never overwritten."""
    base = Path(out_dir)
    candidate = base / name
    n = 2
    while candidate.exists():
        candidate = base / f"{name}-{n}"
        n += 1
    return candidate


def _make_run_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """Make and return the new run folder :func:`unique_run_dir` names; two runs started at once get two."""
    base = Path(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = base / (name if n == 1 else f"{name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def _refuse_other_settings(saved: Mapping[str, Any], current: Mapping[str, Any],
                           before: Mapping[str, Any] | None = None) -> None:
    """ValueError naming the settings of ``current`` that differ from the run's ``saved`` ones (a setting the
    saved run lacks counts as ``before[key]``, its value before the option existed)."""
    before = before or {}
    differs = sorted(k for k in current if saved.get(k, before.get(k)) != json.loads(json.dumps(current[k])))
    if differs:
        started = [f"{k}={saved.get(k, before.get(k))!r}" for k in differs
                   if not isinstance(saved.get(k, before.get(k)), (dict, list))]
        raise ValueError(f"resume with other settings than the run was started with: {differs}"
                         + (f" (it was started with {', '.join(started)})" if started else ""))


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
    cfg, names, root = read_data_yaml(path)
    unknown = [n for n in names if normalize_detection_class(n) is None]
    if unknown:
        raise DatasetError(f"data YAML {path}: unknown class name(s) {unknown}; expected spellings of {list(DETECTION_CLASSES)}")
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
    # ultralytics' dataset check wants train and val keys even when only one split is evaluated
    out.setdefault("train", f"images/{splits[0]}")
    out.setdefault("val", f"images/{splits[0]}")
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


#: In a detector run's folder: the training seconds logged before the latest (re)start and how many rows
#: results.csv had then, so that a resumed run's record counts the whole run.
_TRAIN_TIME_FILE = "train_time.json"


def _logged_times(results_csv: Path) -> list[float]:
    """The ``time`` column of an ultralytics ``results.csv`` (seconds since that row's (re)start), one value per
    row; rows without a number there are skipped. [] without the file or column."""
    import csv

    if not results_csv.is_file():
        return []
    times = []
    with results_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            value = next((v for k, v in row.items() if k and k.strip() == "time"), None)
            try:
                times.append(float(value))
            except (TypeError, ValueError):
                continue
    return times


def _segments_seconds(times: list[float]) -> float:
    """Seconds in ``results.csv`` time values: the last value of each segment, a segment ending where the time
    falls back (a restart; one whose first epoch took longer than all of the segment before is not told apart)."""
    seconds, last = 0.0, 0.0
    for t in times:
        if t < last:
            seconds += last
        last = t
    return seconds + last


def _start_train_clock(run_dir: Path) -> float:
    """Record a (re)start of the detector run in ``run_dir``; returns the training seconds logged before it.

    ultralytics restarts ``results.csv``'s ``time`` at each start, so each start writes what came before it
    (:data:`_TRAIN_TIME_FILE`, replaced whole): the seconds logged up to the previous start plus those logged since
    (:func:`_segments_seconds`). Without a readable marker (a run from before it, a damaged file: warned) the whole
    column is read that way. Time after a segment's last logged epoch is not counted."""
    times = [t for t in _logged_times(run_dir / "results.csv") if np.isfinite(t) and t >= 0]
    marker = run_dir / _TRAIN_TIME_FILE
    seconds = None
    if marker.is_file():
        try:
            before = json.loads(marker.read_text())
            rows, earlier = int(before["rows"]), float(before["seconds"])
            if not (0 <= rows <= len(times) and np.isfinite(earlier) and earlier >= 0):
                raise ValueError(f"rows {rows} of {len(times)} logged, seconds {earlier}")
            seconds = earlier + _segments_seconds(times[rows:])
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            warnings.warn(f"{marker} is unreadable ({e}); the training time is read from results.csv alone",
                          stacklevel=3)
    if seconds is None:
        seconds = _segments_seconds(times)
    replace_file(marker, json.dumps({"seconds": seconds, "rows": len(times)}).encode())
    return seconds


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
        Passed to ultralytics ``train`` (``imgsz`` a multiple of 32, which ultralytics would round up to).
    out_dir, name : path, str
        The run goes to ``out_dir/name``; if that exists it goes to ``name-2``, ``name-3``, ...
        (never overwritten) unless ``resume=True``.
    resume : bool
        Continue the interrupted run ``out_dir/name`` from its ``weights/last.pt``, with the settings it was
        started with (ValueError naming those that differ: ultralytics would ignore them). A finished run
        cannot be resumed (DatasetError). A new run that fails before its first checkpoint removes its folder.
        The record's ``wall_minutes`` then adds the training time the run logged before (``results.csv``, with
        ``train_time.json`` marking each start; time after a segment's last logged epoch is lost) and
        ``resumed`` is true.
    preprocessing : Preprocessing, optional
        Applied to every training/validation image (a preprocessed copy is written in the run folder)
        and stored in the record, so :class:`~smearpipe.detect.Detector` applies it at inference. A
        ``"reinhard"`` step without a reference normalises to the average BCCD training *field*
        (:func:`~smearpipe.preprocess.field_reinhard_reference`), not to the classifier's crop reference.
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

    reserved = {"data", "epochs", "imgsz", "batch", "device", "workers", "seed", "project", "name", "exist_ok", "resume",
                "pretrained", "model"}
    clash = sorted(reserved & set(train_args or {}))
    if clash:
        raise ValueError(f"train_args may not set {clash}: use train_detector's own parameters")
    if select not in ("best", "last"):
        raise ValueError(f"select must be 'best' or 'last', got {select!r}")
    if epochs < 1 or imgsz < 32 or batch < 1:
        raise ValueError(f"epochs >= 1, imgsz >= 32 and batch >= 1 required, got {epochs}, {imgsz}, {batch}")
    if imgsz % 32:  # ultralytics would round it up silently, and the record would state the size asked for
        raise ValueError(f"imgsz must be a multiple of 32 (the network's largest stride), got {imgsz}; "
                         f"{imgsz + 32 - imgsz % 32} is the size it would train at")
    cfg = load_data_yaml(data)
    prep = preprocessing or Preprocessing()
    if "reinhard" in prep.steps and prep.reinhard_reference is None:  # whole fields, not the classifier's crops
        from .preprocess import field_reinhard_reference

        prep = replace(prep, reinhard_reference=field_reinhard_reference())
    prep = prep.resolved()
    is_config = str(model).endswith((".yaml", ".yml"))
    if not is_config and not Path(model).is_file():
        raise WeightsError(
            f"model {model!r} is neither a model config (.yaml) nor a local weights file; pretrained COCO "
            "weights are not downloaded automatically: download them yourself and pass the file path"
        )
    out_dir = Path(out_dir)
    model = str(Path(model).resolve()) if not is_config else str(model)  # a file: compared and recorded absolute
    settings = {"data": str(Path(data).resolve()), "model": model, "epochs": epochs, "imgsz": imgsz, "batch": batch,
                "seed": seed, "select": select, "train_args": dict(train_args or {}), "preprocessing": prep.to_dict()}
    if resume:
        run_dir = out_dir / name
        last = run_dir / "weights" / "last.pt"
        if not last.is_file():
            raise DatasetError(f"cannot resume: {last} not found")
        # the run goes on as it was started: a different setting would be ignored by ultralytics, so it is refused
        saved = json.loads((run_dir / "run_config.json").read_text())
        saved_prep = Preprocessing.from_dict(saved["preprocessing"])  # fields added since: their defaults
        saved["preprocessing"] = saved_prep.to_dict()
        if not str(saved.get("model", "")).endswith((".yaml", ".yml")):
            saved["model"] = str(Path(saved["model"]).resolve())  # a run from before models were kept absolute
        if preprocessing is None or preprocessing.reinhard_reference is None:  # no reference asked for: the run's
            settings["preprocessing"] = replace(prep, reinhard_reference=saved_prep.reinhard_reference).to_dict()
        _refuse_other_settings(saved, settings)
        prep = saved_prep
        made = False
    else:
        run_dir, made = _make_run_dir(out_dir, name), True
    from .detect import import_ultralytics

    try:
        if not resume:
            (run_dir / "run_config.json").write_text(json.dumps(settings, indent=2))
        data_yaml = Path(data)
        if prep.steps and not resume:
            data_yaml = _preprocessed_copy(cfg, prep, run_dir / "data", ("train", "val"))
        elif prep.steps:
            data_yaml = run_dir / "data" / "data.yaml"

        ultralytics = import_ultralytics()
        t0 = time.time()
        if resume:
            yolo = ultralytics.YOLO(str(run_dir / "weights" / "last.pt"))
            ck = yolo.ckpt or {}
            if ck.get("epoch", -1) < 0 or ck.get("optimizer") is None:  # ultralytics strips both when a run ends
                raise DatasetError(f"cannot resume {run_dir}: its training finished (weights/last.pt holds no optimizer "
                                   "state); nothing to continue. Start a new run to train longer")
            earlier_minutes = _start_train_clock(run_dir) / 60  # the record counts the time logged before too
            yolo.train(resume=True)
        else:
            yolo = ultralytics.YOLO(str(model), task="detect")
            earlier_minutes = _start_train_clock(run_dir) / 60  # 0: a new run
            args = dict(
                data=str(data_yaml), epochs=int(epochs), imgsz=int(imgsz), batch=int(batch), device=device,
                workers=int(workers), seed=int(seed), project=str(run_dir.parent.resolve()), name=run_dir.name,
                exist_ok=True, pretrained=not is_config, amp=False, plots=True, verbose=False,
            )
            args.update(dict(train_args or {}))
            yolo.train(**args)
        minutes = earlier_minutes + (time.time() - t0) / 60

        chosen = run_dir / "weights" / f"{select}.pt"
        if not chosen.is_file():
            raise WeightsError(f"training finished without {chosen}")
        weights = run_dir / "detector.pt"
        shutil.copyfile(chosen, weights)
        metrics: dict[str, Any] = {}
        results_csv = run_dir / "results.csv"
        if results_csv.is_file():
            import csv

            rows = list(csv.DictReader(results_csv.open()))
            if rows:
                last_epoch = {}
                for k, v in rows[-1].items():
                    try:
                        last_epoch[k.strip()] = float(v)
                    except (TypeError, ValueError):
                        continue
                metrics = {"last_epoch_val": last_epoch, "note": f"validation metrics of the last epoch; shipped checkpoint: {select}.pt"}
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
                    **({"resumed": True} if resume else {}),
                },
                "metrics": metrics,
                "default_conf": 0.25,
                "default_iou": 0.7,
            },
            folder=str(run_dir),
        )
        record_path = record.write(run_dir / "detector.json", overwrite=True)
        scale = _training_scale(weights, cfg)
        if scale:
            record = replace(record, metadata={**record.metadata, **scale})
            record.write(record_path, overwrite=True)
        (run_dir / "train_summary.json").write_text(json.dumps({"run_dir": str(run_dir), **record.to_dict()}, indent=2))
        return DetectorTrainResult(run_dir=run_dir, weights=weights, record=record_path, metrics=metrics)
    except BaseException:
        if made and not (run_dir / "weights" / "last.pt").exists():  # failed before its first epoch: nothing to resume
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


_SCALE_FIELDS = 100  # training fields measured for the scale keys of a detector's record


def _training_scale(weights: Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The record keys rescaling needs, measured on (at most ``_SCALE_FIELDS``, evenly spaced) training fields.

    ``train_long_side_px``, ``rbc_diameter_px`` (the image ruler) and ``rbc_box_px`` (the trained detector's
    own red-cell boxes, ``weights`` with its record beside it). A key that cannot be measured is left out
    (``rbc_box_missing`` says why for the box ruler, e.g. a detector that finds no red cells yet); unreadable
    fields are skipped, so a finished training run is never lost here.
    """
    from .detect import Detector
    from .scale import ScaleEstimationError, estimate_rbc_diameter, measure_rbc_box_px

    img_dir, _ = _split_dirs(cfg, Path(cfg["_root"]), "train")
    files = sorted(f for f in img_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    files = files[:: max(1, -(-len(files) // _SCALE_FIELDS))]
    sides, diameters = [], []
    for f in files:  # one image in memory at a time
        try:
            image = read_image(f)
        except ImageReadError:
            continue
        sides.append(max(image.shape[:2]))
        try:
            diameters.append(estimate_rbc_diameter(image))
        except ScaleEstimationError:
            pass
    if not sides:
        return {"scale_note": f"none of {len(files)} training fields could be read: scale not recorded"}
    out: dict[str, Any] = {"train_long_side_px": round(float(np.median(sides)))}
    if diameters:
        out["rbc_diameter_px"] = round(float(np.median(diameters)), 1)
    try:
        out["rbc_box_px"] = round(measure_rbc_box_px(Detector.load(weights), files), 1)
    except ScaleEstimationError as exc:
        out["rbc_box_missing"] = f"{exc} (rescale='auto' sees fields as they are with this detector)"
    out["scale_note"] = (f"medians over {len(sides)} training fields at their native scale: long side, "
                         "smearpipe.scale.estimate_rbc_diameter (rbc_diameter_px) and measure_rbc_box_px of this "
                         "detector (rbc_box_px); used by PipelineConfig(rescale=...)")
    return out


# ============================================================================ classifier


@dataclass(frozen=True)
class CropSource:
    """A set of labelled WBC crops.

    ``root`` is an ImageFolder tree (``root/<class>/<image>``). With ``splits_csv`` (columns
    ``path, class, split``; paths relative to ``root``, as PBC's ``splits.csv``), only rows of
    ``split`` are used. ``center_fraction`` in (0, 1]; < 1 keeps the central part of each image (PBC
    images are framed wider than detector crops). ``weight`` multiplies this source's sampling probability.

    Raises
    ------
    ValueError
        If ``center_fraction`` is not a number in (0, 1] (NaN included).
    """

    root: str
    split: str | None = None
    splits_csv: str | None = None
    center_fraction: float = 1.0
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.center_fraction <= 1.0:
            raise ValueError(f"CropSource center_fraction must be in (0, 1], got {self.center_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "split": self.split, "splits_csv": self.splits_csv,
                "center_fraction": self.center_fraction, "weight": self.weight, "name": self.name}

    def samples(self, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
        """``(path, class index)`` pairs.

        A class folder's images are found in its sub-folders too; hidden files and folders (names starting
        with ``.``: ``._x.jpg``, ``.ipynb_checkpoints``) are skipped, as ``smearpipe classify`` skips them. A
        folder or CSV class name matches one of ``classes`` in any letter case, with ``_`` for a space and a
        plural ``s`` (``Band_Cells`` is ``band cell``), or through the WBC spellings of
        :func:`~smearpipe.datasets.normalize_wbc_class` (``NEUTROPHIL``, ``Neutrophils``).

        Raises
        ------
        DatasetError
            Missing crop folder or splits file, a splits file without the columns it needs, unknown classes
            or an empty set.
        """
        import csv

        root = Path(self.root)
        if not root.is_dir():
            raise DatasetError(f"crop folder not found: {root}")
        out: list[tuple[Path, int]] = []
        if self.splits_csv:
            if not Path(self.splits_csv).is_file():
                raise DatasetError(f"splits file not found: {self.splits_csv} (columns path, class, split)")
            with open(self.splits_csv, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's UTF-8 mark
                reader = csv.DictReader(f)
                need = ["path", "class"] + (["split"] if self.split is not None else [])
                missing = [c for c in need if c not in (reader.fieldnames or [])]
                if missing:
                    raise DatasetError(f"{self.splits_csv}: no {' / '.join(missing)} column (it has "
                                       f"{reader.fieldnames or 'none'}; columns path, class, split are needed)")
                for row in reader:
                    if self.split is not None and row["split"] != self.split:
                        continue
                    k = class_index(row["class"], classes)
                    if k is None:
                        raise DatasetError(f"{self.splits_csv}: unknown class {row['class']!r} (known: {list(classes)})")
                    out.append((root / row["path"], k))
        else:
            folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not folders:
                raise DatasetError(f"{root} has no class folders (ImageFolder layout: root/<class>/<image>)")
            for folder in folders:
                k = class_index(folder.name, classes)
                if k is None:
                    raise DatasetError(f"{root}: unknown class folder {folder.name!r} (known: {list(classes)})")
                files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                               and not any(part.startswith(".") for part in p.relative_to(folder).parts))
                if not files:
                    raise DatasetError(f"class folder {folder} holds no images")
                out += [(p, k) for p in files]
        if not out:
            raise DatasetError(f"no crops found in {root}" + (f" for split {self.split!r}" if self.split else ""))
        return out


def class_index(name: str, classes: Sequence[str]) -> int | None:
    """Index of the class ``name`` spells in ``classes``, or None (see :meth:`CropSource.samples`).

    >>> class_index("Band_Cells", ("blast", "band cell")), class_index("NEUTROPHILS", ("basophil", "neutrophil"))
    (1, 1)
    """
    from .datasets import normalize_wbc_class

    def key(x: str) -> str:
        return " ".join(str(x).strip().lower().replace("_", " ").split())

    keys = {key(c): i for i, c in enumerate(classes)}
    k = key(name)
    for candidate in (k, k[:-1] if k.endswith("s") else None, normalize_wbc_class(name)):
        if candidate is not None and candidate in keys:
            return keys[candidate]
    return None


def center_crop(image: np.ndarray, fraction: float) -> np.ndarray:
    """Central ``fraction`` (in (0, 1]) of an image (both sides), at least one pixel.

    Raises
    ------
    ValueError
        If ``fraction`` is not in (0, 1] (NaN included).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"center fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1.0:
        return image
    h, w = image.shape[:2]
    ch, cw = max(1, int(round(h * fraction))), max(1, int(round(w * fraction)))
    return image[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]


class _WeightAverage:
    """Exponential moving average of a model's parameters and floating-point buffers.

    Integer buffers (batch-norm step counts) are copied. The decay at update ``t`` is
    ``min(decay, (1 + t) / (10 + t))``: early updates follow the model closely. ``update()`` moves the
    average towards the current weights of the model it was made from (its tensors, paired once).
    """

    def __init__(self, model: Any, decay: float) -> None:
        import copy

        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0
        pairs = list(zip([*self.model.parameters(), *self.model.buffers()], [*model.parameters(), *model.buffers()],
                         strict=True))
        self._floats = ([a for a, b in pairs if a.is_floating_point()], [b for a, b in pairs if a.is_floating_point()])
        self._others = [(a, b) for a, b in pairs if not a.is_floating_point()]

    def update(self) -> None:
        import torch

        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            torch._foreach_lerp_(self._floats[0], self._floats[1], 1.0 - d)
            for a, b in self._others:
                a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


class _CachedCrops:
    """Map-style dataset over cached uint8 crops (module level so that worker processes can pickle it)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch

        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


def _as_source(s: CropSource | str | os.PathLike) -> CropSource:
    return s if isinstance(s, CropSource) else CropSource(root=str(s))


def _as_sources(x: CropSource | str | os.PathLike | Sequence[CropSource | str | os.PathLike]) -> list[CropSource]:
    """One source, or a list of them, as a list of :class:`CropSource`."""
    return [_as_source(s) for s in ([x] if isinstance(x, (str, os.PathLike, CropSource)) else x)]


def _absolute(s: CropSource) -> CropSource:
    """``s`` with absolute paths (normalised: no trailing ``/``, no ``..``; links kept)."""
    return replace(s, root=os.path.abspath(s.root), splits_csv=os.path.abspath(s.splits_csv) if s.splits_csv else None)


def _load_crops(sources: list[CropSource], classes: tuple[str, ...], size: int, prep: Preprocessing,
                desc: str, resized_first: bool, framing: Framing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode, centre-crop, preprocess and resize every crop once: (N, size, size, 3) uint8, labels, source ids."""
    from tqdm.auto import tqdm

    from .classify import resize_preprocessed

    items = [(p, y, si) for si, src in enumerate(sources) for p, y in src.samples(classes)]
    images = np.empty((len(items), size, size, 3), np.uint8)
    for i, (path, _, si) in enumerate(tqdm(items, desc=desc, leave=False, mininterval=5)):
        try:
            img = read_image(path)
        except ImageReadError as exc:
            raise DatasetError(f"cannot read crop: {exc}") from None
        images[i] = resize_preprocessed(center_crop(img, sources[si].center_fraction), size=size, preprocessing=prep,
                                        preprocess_resized=resized_first, framing=framing)
    labels = np.array([y for _, y, _ in items], np.int64)
    src_ids = np.array([si for _, _, si in items], np.int64)
    return images, labels, src_ids


def bf16_available(device: Any) -> bool:
    """Whether ``device`` (a torch.device) should train in bfloat16: where oneDNN supports it on a CPU (AVX-512),
    compute capability 8 or more on a CUDA GPU (older ones only emulate it, slowly); not MPS."""
    import torch

    from .classify import _bf16_supported

    if device.type == "cpu":
        return _bf16_supported()
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return False


def _training_device(device: Any) -> Any:
    """``device`` as a torch.device that this machine has; ValueError naming what it has otherwise."""
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except RuntimeError:
        dev = None
    if not isinstance(device, (str, torch.device)) or dev is None:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s) that torch can use "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available on this machine")
        return dev
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")


def _finite_nonnegative(value: Any, name: str, what: str) -> float:
    """``value`` as a float: TypeError unless a real number (not a bool), ValueError if negative or not finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (a {what} >= 0), got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite {what} >= 0, got {value!r}")
    return float(value)


def _sam_second_gradient(model: Any, params: list[Any], rho: float,
                         loss_fn: Callable[[], tuple[Any, Any]]) -> None:
    """Replace each parameter's gradient by SAM's: the gradient at ``w + rho * g / ||g||`` (Foret et al. 2021).

    ``params`` hold the first pass's gradients ``g``. The weights are moved, ``loss_fn()[0]`` (the loss) is
    evaluated and back-propagated there, and the weights and every batch-norm buffer (running statistics and
    batch count: the first pass has already counted this batch) are restored bit for bit from copies. A zero
    or non-finite gradient norm leaves the first pass's gradients as they are.
    """
    import torch

    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if not torch.isfinite(norm) or norm == 0:
            return
        saved = [(b, b.clone()) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 for b in m.buffers()]
        for p in params:
            if p.grad is not None:
                saved.append((p, p.detach().clone()))
                p.add_(p.grad * (rho / norm))
    try:
        for p in params:
            p.grad = None
        loss_fn()[0].backward()
    finally:
        with torch.no_grad():
            for t, copy in saved:
                t.copy_(copy)


def js_divergence(logits_a: Any, logits_b: Any) -> Any:
    """Mean Jensen-Shannon divergence between the softmax distributions of two batches of logits.

    Parameters
    ----------
    logits_a, logits_b : torch.Tensor
        Logits of the same shape (N, C): N crops, C classes.

    Returns
    -------
    torch.Tensor
        0-dim: the divergence of each row pair (natural log, so between 0 and ln 2), averaged over the N rows.

    Raises
    ------
    ValueError
        If the inputs are not 2-D or their shapes differ.

    Notes
    -----
    As in AugMix (Hendrycks et al., "AugMix", ICLR 2020), the mixture is clamped to [1e-7, 1] before its log.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    >>> round(float(js_divergence(a, a)), 6), round(float(js_divergence(a, a.flip(1))), 3)
    (0.0, 0.603)
    """
    import torch.nn.functional as F

    if logits_a.ndim != 2 or tuple(logits_a.shape) != tuple(logits_b.shape):
        raise ValueError(f"js_divergence needs two (N, C) logit batches of one shape, got {tuple(logits_a.shape)} "
                         f"and {tuple(logits_b.shape)}")
    p, q = F.softmax(logits_a, dim=1), F.softmax(logits_b, dim=1)
    log_m = ((p + q) / 2).clamp(1e-7, 1.0).log()
    return (F.kl_div(log_m, p, reduction="batchmean") + F.kl_div(log_m, q, reduction="batchmean")) / 2


def _save_atomic(torch: Any, obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a run killed while saving keeps its last checkpoint."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ClassifierTrainResult:
    """What :func:`train_classifier` produced."""

    run_dir: Path
    weights: Path
    record: Path
    history: tuple[Mapping[str, float], ...]
    best_epoch: int
    best_val_macro_f1: float

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "weights": str(self.weights), "record": str(self.record),
                "best_epoch": self.best_epoch, "best_val_macro_f1": self.best_val_macro_f1, "history": list(self.history)}


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Settings of :func:`train_classifier` (each is also accepted as a keyword override there).

    See :func:`train_classifier` for the meaning of each field.
    """

    classes: tuple[str, ...] | None = None
    input_size: int = 112
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    preprocessing: Preprocessing | None = None
    augment: Any = None
    rebalance: str = "sampler"
    patience: int = 5
    pretrained: str | os.PathLike | None = None
    freeze_features: bool = False
    batch_norm: bool = True
    crop_scale: float = 2.0
    preprocess_resized: bool = True
    framing: Framing | str = "cell"
    normalize_after_augment: bool = False
    ema: float = 0.0
    consistency: float = 0.0
    sam_rho: float = 0.0
    mixup: float = 0.0
    cache_scale: float = 1.15
    max_minutes: float | None = None
    bf16: bool | None = None
    device: str = "cpu"
    num_workers: int = 1
    seed: int = 0


def train_classifier(
    train: CropSource | str | os.PathLike | Sequence[CropSource | str | os.PathLike],
    val: CropSource | str | os.PathLike | Sequence[CropSource | str | os.PathLike],
    *,
    config: ClassifierTrainConfig | None = None,
    out_dir: str | os.PathLike = "runs/classifier",
    name: str = "train",
    record_name: str | None = None,
    resume: bool = False,
    **options: Any,
) -> ClassifierTrainResult:
    """Train the VGG16 WBC-crop classifier.

    Parameters
    ----------
    train, val : CropSource, ImageFolder path, or a list of them
        Training and validation crops (never a test split). Recorded with absolute paths.
    config : ClassifierTrainConfig, optional
        All training settings in one frozen record; keyword ``options`` override its fields
        (``train_classifier(tr, va, epochs=3)`` is ``config=ClassifierTrainConfig(epochs=3)``).
    **options
        Any field of :class:`ClassifierTrainConfig`, described here:
    classes : tuple of str, optional
        Class names in output order (default :data:`~smearpipe.datasets.WBC_CLASSES`).
    input_size : int
        Network input side in pixels.
    epochs, batch_size, lr, weight_decay, label_smoothing :
        AdamW with a one-cycle schedule over ``epochs``; cross-entropy with label smoothing.
    preprocessing : Preprocessing, optional
        Applied once to every crop before caching (training crops: per batch instead, with
        ``normalize_after_augment``), and recorded: :class:`~smearpipe.classify.Classifier`
        applies the same at inference. Default: Reinhard normalisation to the shipped PBC reference
        (:func:`~smearpipe.preprocess.reinhard_normalize`), as the shipped ``classifier-vgg16bn-v4`` to ``-v6``: on
        another lab it lifted the leave-one-lab-out accuracy from 38 to 61 % at equal PBC accuracy, where
        Macenko (v2) cost PBC accuracy (96.4 vs 98.7 %) (README, "Other labs and microscopes"). The shipped
        ``classifier-vgg16bn-v8`` adds the ``"sharpen"`` step after it in its second run
        (``Preprocessing(steps=("reinhard", "sharpen"))`` with ``normalize_after_augment=True``).
    augment : AugmentConfig, optional
        Augmentation strengths (default :class:`~smearpipe.augment.AugmentConfig`); ``False`` disables.
        Its ``mixstyle_p`` acts inside the network, during training steps only
        (:func:`~smearpipe.augment.add_mix_style`; not with ``freeze_features``, whose features run in eval mode).
        Its ``gray_p`` acts last on each batch, after colour augmentation and normalisation
        (:func:`~smearpipe.augment.grayscale_batch`).
    rebalance : {"sampler", "loss", "none"}
        Class rebalancing: a weighted sampler drawing classes equally often (times each source's
        ``weight``), inverse-frequency class weights in the loss, or nothing.
    patience : int
        Early stopping: epochs without a better validation macro-F1.
    pretrained, freeze_features, batch_norm :
        See :func:`~smearpipe.classify.build_vgg16` (the paper's recipe: ``pretrained="imagenet",
        freeze_features=True``).
    crop_scale : float
        Crop side relative to the detector box used when cutting crops (recorded for the pipeline).
    preprocess_resized : bool
        Resize each crop first, then preprocess (recorded; inference resizes to ``input_size`` and
        then preprocesses, training crops are preprocessed at the cache size before random resized
        crops). Macenko on a small image is far cheaper than on a 360 px crop; pixel-sized steps
        (median kernel, CLAHE tiles) then act on the small image. False: preprocess at native size.
    framing : Framing or {"cell", "as_given"}
        ``"cell"`` (``Framing()``): every crop is recut around its WBC nucleus first
        (:func:`~smearpipe.framing.frame_cell`), so that tightly cut crops (BCCD) and wide ones (PBC) show
        the cell at about the same size; recorded with its parameters and applied at inference.
        ``"as_given"``: crops are only resized.
    normalize_after_augment : bool
        Cache training crops framed and resized but not normalised, and apply the ``"reinhard"`` step
        (and ``"sharpen"`` after it, if the preprocessing has it; no other preprocessing is allowed then) to each
        batch *after* colour augmentation (:func:`~smearpipe.augment.reinhard_batch`,
        :func:`~smearpipe.augment.match_sharpness_batch`), as inference normalises another lab's shifted crop.
        False (up to ``classifier-vgg16bn-v5``): crops are normalised once when cached and the colour
        augmentation acts on normalised crops, so some of it is a shift that normalisation would have
        removed, and what normalisation leaves of a real shift (a tone curve, say) is never seen. An
        approximation: the statistics are those of the geometrically augmented crop (a random crop of
        at least ``crop_scale_min`` of the area, corners of rotations filled with a fixed pale
        colour), not of the whole crop as at inference. Validation crops are normalised as at
        inference either way.
    ema : float
        Decay of an exponential moving average of the weights (and batch-norm statistics), updated
        after every step; 0 (default) turns it off. When on, validation, early stopping and the saved
        weights use the average, not the last step's weights. The decay ramps up as
        ``min(ema, (1 + t) / (10 + t))`` at step ``t``, so the starting weights (random or ``pretrained``)
        are forgotten within tens of steps; 0.998 averages over roughly the last 500 steps. The
        batch-norm statistics are averaged too (not re-measured for the averaged weights). TypeError
        for a non-number, ValueError outside [0, 1).
    consistency : float
        Weight of a colour-consistency term (0, the default, turns it off). Each batch is then
        colour-augmented twice: two independent draws of everything
        :func:`~smearpipe.augment.color_augment_batch` does (stain, colour, low resolution, blur, RandConv,
        noise), while the geometry and JPEG artefacts, drawn per crop when loading, are shared; each view is
        normalised as ``normalize_after_augment`` says. Both go through the network in one batch, and the loss
        is the mean cross-entropy of the two plus ``consistency`` times the Jensen-Shannon divergence of their
        predicted distributions (:func:`js_divergence`; AugMix, Hendrycks et al. 2020, uses 12). The answer
        should not depend on the stain. Twice the compute per step. The history's ``train_loss`` is then
        that whole loss and ``train_acc`` that of the first view. TypeError for a non-number, ValueError if
        negative or not finite, or with ``augment=False``.
    sam_rho : float
        Sharpness-aware minimisation (SAM, Foret et al. 2021) with this neighbourhood radius (0, the default,
        turns it off; 0.05 is the paper's usual value). Each step first moves the weights by ``sam_rho`` along
        the normalised gradient of the batch loss, takes the gradient there on the same crops and colour views
        (dropout and MixStyle draw afresh; batch-norm running statistics are not updated by this second pass),
        moves back and lets AdamW step with that gradient: it prefers weights whose whole neighbourhood has a
        low loss. Twice the compute per step. With bf16 autocast each layer sees the moved weights rounded to
        bf16, whose steps are larger than most weights' share of a 0.05 move; over a whole layer the rounding
        averages out (``scripts/sam_bf16_check.py``: SAM's change of the gradient has a cosine of 0.999
        between float32 and bf16 on v8). The history's ``train_loss`` and ``train_acc`` are those of the first
        pass. TypeError for a non-number, ValueError if negative or not finite.
    mixup : float
        Mixup (Zhang et al. 2018) with this Beta(a, a) parameter (0, the default, turns it off; 0.2-0.4 is usual):
        each training batch is blended with a shuffled copy of itself by a weight drawn from Beta(a, a), after
        colour augmentation and normalisation, and the loss mixes the two labels' by the same weight. The
        history's ``train_acc`` is then measured against the batch's own labels. Not with ``consistency``.
        TypeError for a non-number, ValueError if negative or not finite.
    cache_scale : float
        Training crops are cached at ``cache_scale * input_size`` px so that random resized crops
        keep some detail (validation crops at ``input_size``).
    out_dir, name, resume :
        The run folder is ``out_dir/name`` (``name-2``... if it exists, unless ``resume``, which
        continues from ``checkpoint.pt`` there). The data are listed and checked before the folder is made, and
        a run that fails before its first checkpoint removes the folder it made. A resume takes the settings
        the run was started with, ``epochs`` included (ValueError naming those that differ; data paths are
        compared as absolute paths), and continues torch's random state and the order crops are drawn in: with
        ``num_workers=0`` it is the run it would have been uninterrupted; with worker processes the order and
        the workers' augmentation draws go on from the checkpoint, but not as the uninterrupted run's did.
    max_minutes : float, optional
        Stop after the first epoch that ends past this wall time, counted over the whole run (a resumed
        run continues the clock of its history; checkpoint kept, resumable).
    bf16 : bool, optional
        bfloat16 autocast (default: where the device has it natively, :func:`bf16_available`; float32
        elsewhere, several times slower per step on a CPU, see ``benchmarks/bench_train_step.py``).
    device : str
        Where the network trains: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ``"mps"``. Crops are
        augmented on the CPU either way; only the network's steps move (dropout then draws from the device's
        generator, so runs on different devices differ). A resumed run may continue on another device. An unknown or unavailable device raises ValueError
        before any work.

    Returns
    -------
    ClassifierTrainResult
    """
    import dataclasses

    try:
        cfg = dataclasses.replace(config or ClassifierTrainConfig(), **options)
    except TypeError:
        known = [f.name for f in dataclasses.fields(ClassifierTrainConfig)]
        raise TypeError(f"unknown train_classifier option(s) {sorted(set(options) - set(known))}; known: {known}") from None
    (classes, input_size, epochs, batch_size, lr, weight_decay, label_smoothing, preprocessing, augment, rebalance, patience,
     pretrained, freeze_features, batch_norm, crop_scale, preprocess_resized, framing, normalize_after_augment, ema, consistency,
     sam_rho, mixup, cache_scale, max_minutes, bf16, device,
     num_workers, seed) = (
        getattr(cfg, f.name) for f in dataclasses.fields(ClassifierTrainConfig))
    import torch
    from sklearn.metrics import f1_score
    from torch.utils.data import DataLoader, WeightedRandomSampler
    from tqdm.auto import tqdm

    from .augment import (
        AugmentConfig,
        add_mix_style,
        color_augment_batch,
        geometric_transform,
        grayscale_batch,
        match_sharpness_batch,
        reinhard_batch,
    )
    from .classify import IMAGENET_MEAN, IMAGENET_STD, build_vgg16, save_classifier
    from .datasets import WBC_CLASSES

    classes = tuple(classes or WBC_CLASSES)
    if rebalance not in ("sampler", "loss", "none"):
        raise ValueError(f"rebalance must be 'sampler', 'loss' or 'none', got {rebalance!r}")
    if input_size < 32 or epochs < 1 or batch_size < 1:
        raise ValueError(f"input_size >= 32, epochs >= 1, batch_size >= 1 required, got {input_size}, {epochs}, {batch_size}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an integer >= 1 (epochs without a better val macro-F1), got {patience!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    framing = Framing.from_value(framing)  # ValueError for unknown names or bad numbers
    if not (isinstance(cache_scale, (int, float)) and cache_scale >= 1):
        raise ValueError(f"cache_scale must be a number >= 1, got {cache_scale!r}")
    # one source alone may be given as itself; paths are kept absolute (a resume from another folder, the record)
    train_sources, val_sources = ([_absolute(s) for s in _as_sources(x)] for x in (train, val))
    if not train_sources or not val_sources:
        raise ValueError("train and val need at least one source each")
    prep = (preprocessing if preprocessing is not None else Preprocessing(steps=("reinhard",))).resolved()
    aug = None if augment is False else (augment or AugmentConfig())
    normalize_after_augment = bool(normalize_after_augment)
    if isinstance(ema, bool) or not isinstance(ema, numbers.Real):
        raise TypeError(f"ema must be a real number (a decay in [0, 1)), got {type(ema).__name__}")
    ema = float(ema)
    if not 0 <= ema < 1:  # NaN fails too
        raise ValueError(f"ema must be a decay in [0, 1), got {ema!r}")
    consistency = _finite_nonnegative(consistency, "consistency", "weight")
    if consistency and not aug:
        raise ValueError("consistency compares two colour augmentations of each crop; it needs augmentation on")
    if record_name is not None:  # now, not when the weights are written after hours of training
        from .classify import check_weights_name

        check_weights_name(record_name)
    sam_rho = _finite_nonnegative(sam_rho, "sam_rho", "radius")
    mixup = _finite_nonnegative(mixup, "mixup", "Beta parameter")
    if mixup and consistency:
        raise ValueError("mixup and consistency do not combine: the consistency term compares two colour views of one "
                         "crop, mixup blends two crops")
    if normalize_after_augment and (prep.steps not in (("reinhard",), ("reinhard", "sharpen")) or not preprocess_resized
                                    or not aug):
        raise ValueError("normalize_after_augment needs preprocessing steps ('reinhard',) or ('reinhard', 'sharpen'), "
                         "preprocess_resized=True "
                         f"and augmentation on; got steps {list(prep.steps)}, preprocess_resized={preprocess_resized}, "
                         f"augment={'on' if aug else 'off'}")
    if normalize_after_augment and (prep.reinhard_reference.region != "all"
                                    or prep.reinhard_reference.min_stained_fraction is not None):
        raise ValueError("normalize_after_augment normalises each batch with statistics of all pixels; the Reinhard "
                         f"reference's region is {prep.reinhard_reference.region!r}, min_stained_fraction "
                         f"{prep.reinhard_reference.min_stained_fraction}")
    if "sharpen" in prep.steps and aug and not normalize_after_augment:
        # augmented training crops are cached larger than the input size, and sharpness depends on the size
        raise ValueError("the 'sharpen' preprocessing step needs normalize_after_augment=True when augmenting: it "
                         "then runs on each batch at the input size, as at inference")
    dev = _training_device(device)
    if bf16 is None:
        use_bf16 = bf16_available(dev)
    else:
        use_bf16 = bool(bf16)
    config = {"classes": list(classes), "input_size": input_size, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "label_smoothing": label_smoothing, "preprocessing": prep.to_dict(),
              "augment": aug.to_dict() if aug else None, "rebalance": rebalance, "batch_norm": batch_norm,
              "pretrained": str(pretrained) if pretrained else None, "freeze_features": freeze_features,
              "crop_scale": crop_scale, "preprocess_resized": preprocess_resized, "framing": framing.to_dict(),
              "normalize_after_augment": normalize_after_augment, "ema": ema, "consistency": consistency,
              "sam_rho": sam_rho, "mixup": mixup, "cache_scale": cache_scale, "seed": seed,
              "train": [s.to_dict() for s in train_sources],
              "val": [s.to_dict() for s in val_sources]}

    out_dir = Path(out_dir)
    if resume:
        run_dir = out_dir / name
        if not (run_dir / "checkpoint.pt").is_file():
            raise DatasetError(f"cannot resume: {run_dir / 'checkpoint.pt'} not found")
        saved = json.loads((run_dir / "run_config.json").read_text())
        for key in ("train", "val"):  # runs from before paths were kept absolute: relative to this folder
            if isinstance(saved.get(key), list):
                saved[key] = [_absolute(CropSource(**d)).to_dict() if isinstance(d, dict) else d for d in saved[key]]
        # runs started before an option existed ran with its old behaviour
        before = {"preprocess_resized": False, "cache_scale": 1.15, "framing": Framing("as_given").to_dict(),
                  "normalize_after_augment": False, "ema": 0.0, "consistency": 0.0, "sam_rho": 0.0, "mixup": 0.0}
        if isinstance(saved.get("augment"), dict):  # augment keys added later: their defaults (off)
            saved["augment"] = {**AugmentConfig().to_dict(), **saved["augment"]}
        if isinstance(saved.get("preprocessing"), dict):  # Preprocessing fields added later: their defaults
            saved["preprocessing"] = Preprocessing.from_dict(saved["preprocessing"]).to_dict()
        _refuse_other_settings(saved, config, before)  # epochs too: the schedule was built for the run's steps

    # the data are listed and checked before the run folder is made: a refused run leaves no folder behind
    listed = [[(p, y) for p, y in s.samples(classes)] for s in train_sources + val_sources]
    n_train = [y for pairs in listed[:len(train_sources)] for _, y in pairs]
    if len(n_train) < batch_size:
        raise DatasetError(f"only {len(n_train)} training crops for batch_size {batch_size}: lower batch_size or add data")
    missing = [c for k, c in enumerate(classes) if k not in set(n_train)]
    if missing:
        raise DatasetError(f"no training crops for class(es) {missing}")
    val_pairs = [pair for pairs in listed[len(train_sources):] for pair in pairs]
    train_files = {os.path.realpath(p) for pairs in listed[:len(train_sources)] for p, _ in pairs}
    shared = [p for p, _ in val_pairs if os.path.realpath(p) in train_files]
    if shared:
        raise DatasetError(f"{len(shared)} validation crops are training crops too (e.g. {shared[0]}): early stopping "
                           "and the recorded validation metrics would be measured on what the network learnt")
    unvalidated = [c for k, c in enumerate(classes) if k not in {y for _, y in val_pairs}]
    if unvalidated:
        warnings.warn(f"no validation crops for class(es) {unvalidated}: early stopping's macro-F1 is over the "
                      "other classes only", stacklevel=2)
    made = not resume
    if made:
        run_dir = _make_run_dir(out_dir, name)
        (run_dir / "run_config.json").write_text(json.dumps(config, indent=2))
    try:
        cache_size = int(round(input_size * cache_scale)) if aug else input_size
        # Decoded + preprocessed crops are cached per (sources, classes, sizes, preprocessing), shared by runs.
        import hashlib

        # key: the options and every file's path, size and mtime (a moved or replaced crop invalidates it)
        files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns, y) for pairs in listed for p, y in pairs]
        key = json.dumps([[t.to_dict() for t in train_sources], [v.to_dict() for v in val_sources], classes,
                          cache_size, input_size, prep.to_dict(), preprocess_resized, framing.to_dict(), files]
                         + (["normalize_after_augment"] if normalize_after_augment else []), sort_keys=True)
        cache = out_dir / ".crop_cache" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        cache.parent.mkdir(parents=True, exist_ok=True)
        if cache.is_file():
            z = np.load(cache)
            tr_x, tr_y, tr_s, va_x, va_y, va_s = (z[k] for k in ("tr_x", "tr_y", "tr_s", "va_x", "va_y", "va_s"))
        else:
            tr_prep = Preprocessing() if normalize_after_augment else prep  # then normalised per batch, after augmentation
            tr_x, tr_y, tr_s = _load_crops(train_sources, classes, cache_size, tr_prep, "caching train crops", preprocess_resized,
                                           framing)
            va_x, va_y, va_s = _load_crops(val_sources, classes, input_size, prep, "caching val crops", preprocess_resized, framing)
            tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, tr_x=tr_x, tr_y=tr_y, tr_s=tr_s, va_x=va_x, va_y=va_y, va_s=va_s)
            os.replace(tmp, cache)  # atomic: a concurrent run never reads a half-written cache

        # restored at the end: training does not reseed the caller's RNGs (the CPU's, and the GPU's it trains on)
        caller_rng = torch.get_rng_state()
        caller_cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        torch.manual_seed(seed)
        counts = np.bincount(tr_y, minlength=len(classes)).astype(np.float64)  # none is 0: checked above
        mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
        geo = geometric_transform(input_size, aug) if aug else None

        train_set = _CachedCrops(tr_x, tr_y, geo)
        sample_rng = torch.Generator().manual_seed(seed)  # the order crops are drawn in: checkpointed, as torch's RNG
        if rebalance == "sampler":
            src_w = np.array([s.weight for s in train_sources])[tr_s]
            w = src_w / counts[tr_y]
            sampler = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), num_samples=len(tr_y), replacement=True,
                                            generator=sample_rng)
            loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                                persistent_workers=num_workers > 0)
        else:
            loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                                generator=sample_rng, persistent_workers=num_workers > 0)
        class_weight = (torch.as_tensor(counts.sum() / (len(classes) * counts), dtype=torch.float32, device=dev)
                        if rebalance == "loss" else None)
        criterion = torch.nn.CrossEntropyLoss(weight=class_weight, label_smoothing=label_smoothing)

        model = build_vgg16(len(classes), batch_norm=batch_norm, pretrained=pretrained, freeze_features=freeze_features)
        # which file the run started from, by content: a path alone can be overwritten (scripts/average_classifiers.py)
        start_sha256 = (sha256_file(pretrained) if pretrained is not None and str(pretrained) != "imagenet"
                        and Path(pretrained).is_file() else None)
        model = model.to(dev, memory_format=torch.channels_last)
        if aug and aug.mixstyle_p:  # training-mode hooks: validation and the saved network are plain VGG
            add_mix_style(model.features, aug.mixstyle_p, aug.mixstyle_alpha)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader), pct_start=0.15)
        history: list[dict[str, float]] = []
        best_f1, best_epoch, start_epoch = -1.0, -1, 0
        averaged = _WeightAverage(model, ema) if ema else None
        kept = averaged.model if averaged is not None else model  # the weights validated and saved
        if resume:
            ck = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
            model.load_state_dict(ck["model"])
            if averaged is not None:
                averaged.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            history, best_f1, best_epoch, start_epoch = ck["history"], ck["best_f1"], ck["best_epoch"], ck["epoch"] + 1
            torch.set_rng_state(ck["rng"])
            if "sample_rng" in ck:  # a run from before it was saved replays its first epochs' order
                sample_rng.set_state(ck["sample_rng"])
            if dev.type == "cuda" and "cuda_rng" in ck:
                torch.cuda.set_rng_state(ck["cuda_rng"], dev)

        def evaluate() -> tuple[float, float, float, np.ndarray]:
            kept.eval()
            probs = []
            with torch.inference_mode():
                for i in range(0, len(va_y), 64):
                    x = torch.from_numpy(va_x[i:i + 64]).to(dev).permute(0, 3, 1, 2).float().div(255)
                    x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                        probs.append(torch.softmax(kept(x).float(), 1).cpu())
            p = torch.cat(probs)
            loss = float(torch.nn.functional.nll_loss(torch.log(p.clamp_min(1e-12)), torch.from_numpy(va_y)))
            pred = p.argmax(1).numpy()
            return loss, float((pred == va_y).mean()), float(f1_score(va_y, pred, average="macro")), pred

        def colour_view(x: torch.Tensor) -> torch.Tensor:
            if aug:
                x = color_augment_batch(x, aug)
            if normalize_after_augment:
                x = reinhard_batch(x, reference=prep.reinhard_reference)
                if "sharpen" in prep.steps:
                    x = match_sharpness_batch(x, target=prep.sharpen_target, sigma=prep.sharpen_sigma,
                                              max_amount=prep.sharpen_max_amount)
            if aug and aug.gray_p:
                x = grayscale_batch(x, aug.gray_p)
            return x

        views = 2 if consistency else 1  # consistency: two colour draws of each batch's geometric view

        def batch_loss(x: torch.Tensor, yb: torch.Tensor, mixed: tuple[torch.Tensor, float] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
            """The training loss of one batch (all its colour views) and the first view's logits; ``mixed``: the
            other crops' labels and the weight of the batch's own (mixup)."""
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(x)
            per_view = out.float().chunk(views)
            if mixed is None:
                total = sum(criterion(v, yb) for v in per_view) / views
            else:
                other, lam = mixed
                total = sum(lam * criterion(v, yb) + (1 - lam) * criterion(v, other) for v in per_view) / views
            if views > 1:
                total = total + consistency * js_divergence(*per_view)
            return total, per_view[0]

        # on resume, minutes continue from the last finished epoch: history and wall time cover the whole run
        t_start = time.time() - 60 * (history[-1]["minutes"] if history else 0.0)
        stopped = "completed"
        for epoch in range(start_epoch, epochs):
            model.train()
            if freeze_features:
                model.features.eval()
            tot, correct, seen = 0.0, 0, 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, mininterval=10)
            for xb, yb in bar:
                x = xb.float().div(255)
                x = torch.cat([colour_view(x) for _ in range(views)])
                x = ((x.to(dev) - mean) / std).contiguous(memory_format=torch.channels_last)
                yb = yb.to(dev)
                mixed = None
                if mixup:  # each crop blended with another of the batch (Zhang et al. 2018); labels alike
                    lam = float(torch.distributions.Beta(mixup, mixup).sample())
                    perm = torch.randperm(len(yb)).to(dev)
                    x, mixed = lam * x + (1 - lam) * x[perm], (yb[perm], lam)
                loss, logits = batch_loss(x, yb, mixed)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if sam_rho:
                    _sam_second_gradient(model, params, sam_rho, functools.partial(batch_loss, x, yb, mixed))
                opt.step()
                sched.step()
                if averaged is not None:
                    averaged.update()
                tot += loss.item() * len(yb)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
            val_loss, val_acc, val_f1, _ = evaluate()
            row = {"epoch": epoch + 1, "train_loss": tot / seen, "train_acc": correct / seen, "val_loss": val_loss,
                   "val_acc": val_acc, "val_macro_f1": val_f1, "lr": float(sched.get_last_lr()[0]),
                   "minutes": (time.time() - t_start) / 60}
            history.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress, as tqdm's: stdout stays the caller's
            if val_f1 > best_f1:
                best_f1, best_epoch = val_f1, epoch + 1
                _save_atomic(torch, kept.state_dict(), run_dir / "best_state.pt")
            _save_atomic(torch, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                 "history": history, "best_f1": best_f1, "best_epoch": best_epoch, "epoch": epoch,
                                 "rng": torch.get_rng_state(), "sample_rng": sample_rng.get_state()}
                         | ({"ema": averaged.state_dict()} if averaged is not None else {})
                         | ({"cuda_rng": torch.cuda.get_rng_state(dev)} if dev.type == "cuda" else {}),
                         run_dir / "checkpoint.pt")
            (run_dir / "history.json").write_text(json.dumps(history, indent=1))
            if epoch + 1 - best_epoch >= patience:
                stopped = f"early stop: no better val macro-F1 for {patience} epochs"
                break
            if max_minutes is not None and (time.time() - t_start) / 60 > max_minutes:
                stopped = f"time limit {max_minutes} min reached"
                break

        torch.set_rng_state(caller_rng)
        if caller_cuda_rng is not None:
            torch.cuda.set_rng_state(caller_cuda_rng, dev)
        model.load_state_dict(torch.load(run_dir / "best_state.pt", map_location="cpu", weights_only=True))
        model = model.to("cpu", memory_format=torch.contiguous_format)
        rec = save_classifier(
            model,
            {
                "classes": classes, "input_size": input_size, "preprocessing": prep,
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_scale": crop_scale,
                "preprocess_resized": preprocess_resized, "framing": framing.to_dict(),
                "architecture": {"name": "vgg16_bn" if batch_norm else "vgg16", "batch_norm": batch_norm, "hidden": 256,
                                 "dropout": 0.3, "head": "global-avg-pool -> dropout -> 256 -> ReLU -> dropout -> N"},
                "training": {
                    "train": [s.to_dict() for s in train_sources], "val": [s.to_dict() for s in val_sources],
                    "train_counts": {c: int(n) for c, n in zip(classes, counts, strict=True)},
                    "epochs_planned": epochs, "epochs_run": len(history), "best_epoch": best_epoch, "stopped": stopped,
                    "batch_size": batch_size, "optimizer": f"AdamW(lr={lr}, weight_decay={weight_decay}) + OneCycle",
                    "label_smoothing": label_smoothing, "rebalance": rebalance,
                    "augment": aug.to_dict() if aug else None, "pretrained": str(pretrained) if pretrained else None,
                    "pretrained_sha256": start_sha256,
                    "freeze_features": freeze_features, "bf16_autocast": use_bf16, "device": str(dev), "seed": seed,
                    "normalize_after_augment": normalize_after_augment, "ema": ema, "consistency": consistency,
                    "sam_rho": sam_rho, "mixup": mixup, "wall_minutes": round((time.time() - t_start) / 60, 1),
                },
                "metrics": {"best_val_macro_f1": best_f1, "history": history},
            },
            run_dir, record_name or "classifier", overwrite=True,
        )
        return ClassifierTrainResult(run_dir=run_dir, weights=rec.path, record=rec.path.with_suffix(".json"),
                                     history=tuple(history), best_epoch=best_epoch, best_val_macro_f1=best_f1)
    except BaseException:
        if made and not (run_dir / "checkpoint.pt").exists():  # failed before its first epoch: nothing to resume
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
