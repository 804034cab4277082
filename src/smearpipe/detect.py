"""Detector stage: YOLO (ultralytics) detection of WBCs, RBCs and platelets on a field.

ultralytics is imported lazily, only here: importing smearpipe never imports it. Before the first
import, ``YOLO_OFFLINE=1`` is set unless the caller set it, so ultralytics makes no connectivity
checks (smearpipe never downloads anything for detection).
"""

from __future__ import annotations

import numbers
import os
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .datasets import DETECTION_CLASSES, normalize_detection_class
from .errors import WeightsError
from .io import ImageLike, load_image, require_image_list
from .preprocess import Preprocessing
from .weights import DEFAULT_DETECTOR, WeightsRecord, resolve, sha256_file

__all__ = ["Detection", "Detector", "counting_threshold", "import_ultralytics", "suppress_nested"]


_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """The lock of one ultralytics model, whichever :class:`Detector` wraps it.

    ultralytics keeps one predictor per model and sets its thresholds (conf, iou, imgsz) on every call, and
    validation may fuse the model's layers in place: calls from several threads would otherwise run with each
    other's settings (22 of 24 calls with two thresholds in two threads came back wrong without it).
    """
    with _LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.Lock()
        return lock


def import_ultralytics() -> Any:
    """Import ultralytics with its network checks disabled and the global settings it changes restored.

    ultralytics' import sets numpy/torch print options, ``cv2.setNumThreads(0)``, environment variables
    (``OMP_NUM_THREADS=1`` and log levels, which child processes would inherit) and warning filters, and replaces
    ``PIL.Image.open`` and ``torch.save`` with its own; all are put back as they were, so loading a detector
    does not change the rest of the user's program. ``YOLO_OFFLINE=1`` is set for the process unless the
    caller set it (no connectivity checks).
    """
    import sys
    import warnings

    os.environ.setdefault("YOLO_OFFLINE", "1")
    if "ultralytics" in sys.modules:
        return sys.modules["ultralytics"]
    import PIL.Image
    import torch

    np_opts, cv_threads = np.get_printoptions(), cv2.getNumThreads()
    torch_opts = torch._tensor_str.PRINT_OPTS.__dict__.copy()
    environ = dict(os.environ)
    patched = [(m, name, getattr(m, name)) for m, names in ((PIL.Image, ("open",)), (torch, ("save", "load")),
                                                            (cv2, ("imread", "imwrite", "imshow")))
               for name in names]
    try:
        with warnings.catch_warnings():  # its filters (ignoring some warnings everywhere) end with the import
            import ultralytics
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise ImportError("the detector needs ultralytics: pip install ultralytics") from exc
    finally:
        np.set_printoptions(**np_opts)
        cv2.setNumThreads(cv_threads)
        torch._tensor_str.PRINT_OPTS.__dict__.update(torch_opts)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        for module, name, original in patched:
            setattr(module, name, original)
    return ultralytics


@dataclass(frozen=True)
class Detection:
    """One detected cell.

    Attributes
    ----------
    box : (float, float, float, float)
        ``(x1, y1, x2, y2)`` in pixels of the input image.
    label : str
        ``"WBC"``, ``"RBC"`` or ``"Platelets"``.
    score : float
        Detector confidence in [0, 1].
    """

    box: tuple[float, float, float, float]
    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "label": self.label, "score": self.score}


#: The most boxes one image returns (ultralytics' ``max_det``); a field holds a few hundred cells at most.
MAX_DETECTIONS = 1000


def counting_threshold(metadata: Mapping[str, Any], label: str) -> float:
    """The score a box of ``label`` needs to be kept by :meth:`Detector.predict` at its default thresholds.

    From a detector record's metadata: its ``class_conf`` entry for the label, else the smallest ``class_conf``,
    else ``default_conf`` (0.25 when the record has none).
    """
    class_conf = metadata.get("class_conf") or {}
    if label in class_conf:
        return float(class_conf[label])
    return float(min(class_conf.values())) if class_conf else float(metadata.get("default_conf", 0.25))


class Detector:
    """A loaded YOLO detector with its weights record.

    Use :meth:`load`; the constructor takes an already loaded ultralytics model.

    Examples
    --------
    >>> det = Detector.load()                                   # doctest: +SKIP
    >>> cells = det.predict("datasets/bccd_samples/BloodImage_00007.jpg")  # doctest: +SKIP
    >>> [c.label for c in cells if c.score > 0.5]               # doctest: +SKIP
    """

    def __init__(self, model: Any, record: WeightsRecord, *, conf: float = 0.25, iou: float = 0.7,
                 class_conf: dict[str, float] | None = None) -> None:
        self.model = model
        self.record = record

        self.conf = float(conf)
        self.iou = float(iou)
        self.class_conf = {str(k): float(v) for k, v in (class_conf or {}).items()}
        names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
        self._labels: dict[int, str] = {}
        unknown = []
        for idx, name in names.items():
            canonical = normalize_detection_class(name)
            if canonical is None:
                unknown.append(name)
            else:
                self._labels[int(idx)] = canonical
        if unknown:
            raise WeightsError(f"detector classes {unknown} are not WBC/RBC/Platelets spellings; known: {list(DETECTION_CLASSES)}")

    def __repr__(self) -> str:
        return f"Detector({self.record.name!r}, classes={self.record.classes}, imgsz={self.record.input_size})"

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def preprocessing(self) -> Preprocessing:
        return self.record.preprocessing

    @classmethod
    def load(cls, name_or_path: str | os.PathLike | None = None, *, preprocessing: Preprocessing | None = None) -> Detector:
        """Load the shipped default (None), a registered name, or a user ``.pt`` file.

        Parameters
        ----------
        name_or_path : str or path, optional
            None for :data:`~smearpipe.weights.DEFAULT_DETECTOR`; a registered name (see
            :func:`smearpipe.weights.available`); or a path to ultralytics ``.pt`` weights. A ``.pt``
            with a record ``<stem>.json`` beside it (as written by :func:`train_detector`) is checked
            against it. A file without a record needs ``preprocessing=`` (what its training images
            went through; ``Preprocessing()`` for none): nothing is assumed silently.
        preprocessing : Preprocessing, optional
            Only for weight files without a record.

        Raises
        ------
        WeightsError
            Unknown name, missing or corrupt file, sha256 mismatch, unexpected classes.
        """
        found = resolve(DEFAULT_DETECTOR if name_or_path is None else name_or_path, kind="detector")
        if isinstance(found, WeightsRecord) and preprocessing is not None:
            raise ValueError("preprocessing= is only for weight files without a record; this one has a record")
        if not isinstance(found, WeightsRecord) and preprocessing is None:
            run_record = found.parent.parent / "detector.json"
            hint = f" (this looks like a train_detector run: load {run_record.with_suffix('.pt')} instead)" if run_record.is_file() else ""
            raise WeightsError(
                f"{found} has no record ({found.with_suffix('.json').name}), so its preprocessing is unknown{hint}; "
                "pass preprocessing=Preprocessing(...) (Preprocessing() if its training images were not preprocessed; "
                "CLI: --detector-preprocess STEPS, '' for none)"
            )
        ultralytics = import_ultralytics()
        path = found.path if isinstance(found, WeightsRecord) else found
        try:
            model = ultralytics.YOLO(str(path), task="detect")
        except Exception as exc:  # ultralytics raises many types for bad files
            raise WeightsError(f"cannot load YOLO weights {path}: {exc}") from exc
        if isinstance(found, WeightsRecord):
            record = found
            meta = record.metadata
            conf, iou = meta.get("default_conf", 0.25), meta.get("default_iou", 0.7)
            class_conf = meta.get("class_conf")
        else:
            names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
            imgsz = (getattr(model, "overrides", None) or {}).get("imgsz", 640)
            if isinstance(imgsz, (list, tuple)):
                imgsz = max(imgsz)
            record = WeightsRecord(
                name=path.stem, kind="detector", file=path.name, sha256=sha256_file(path),
                classes=tuple(names[i] for i in sorted(names)), input_size=int(imgsz),
                preprocessing=preprocessing or Preprocessing(), metadata={"note": "user file without a record"},
                folder=str(path.parent),
            )
            conf, iou, class_conf = 0.25, 0.7, None
        return cls(model, record, conf=conf, iou=iou, class_conf=class_conf)

    def predict(self, image: ImageLike, *, conf: float | None = None, iou: float | None = None,
                imgsz: int | None = None) -> list[Detection]:
        """Detect cells on one field.

        Parameters
        ----------
        image : path or (H, W, 3) uint8 ndarray
            RGB field (see :mod:`smearpipe.io` for accepted inputs).
        conf : float, optional
            Minimum score for all classes. Default: the record's per-class counting thresholds
            (``class_conf``, chosen on training data) or its ``default_conf``. Use 0.001 for mAP.
        iou : float, optional
            NMS IoU threshold (default: the record's ``default_iou``).
        imgsz : int, optional
            Network input size (long side, a multiple of 32; default: the record's ``input_size``).
            The field is letterboxed to it, so it sets the scale the cells are seen at:
            :func:`smearpipe.scale.detector_input_size` picks it from the red-cell size.

        Returns
        -------
        list of Detection
            Sorted by descending score; boxes in pixels of ``image``.
        """
        return self.predict_batch([image], conf=conf, iou=iou, imgsz=imgsz)[0]

    def predict_batch(
        self, images: Sequence[ImageLike], *, conf: float | None = None, iou: float | None = None,
        imgsz: int | None = None,
    ) -> list[list[Detection]]:
        """:meth:`predict` for several fields at once."""
        require_image_list(images, caller="predict_batch", hint="use predict() for one image")
        for name, v in (("conf", conf), ("iou", iou)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise TypeError(f"{name} must be a number, got {v!r}")
        per_class = self.class_conf if conf is None else {}
        conf = (min(per_class.values()) if per_class else self.conf) if conf is None else float(conf)
        iou = self.iou if iou is None else float(iou)
        if not (0.0 <= conf <= 1.0) or not (0.0 < iou <= 1.0):
            raise ValueError(f"conf must be in [0, 1] and iou in (0, 1], got conf={conf}, iou={iou}")
        if imgsz is None:
            imgsz = self.record.input_size
        elif isinstance(imgsz, bool) or not isinstance(imgsz, (int, np.integer)) or not 32 <= imgsz <= 8192 or imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32 in [32, 8192], got {imgsz!r}")
        rgbs = [load_image(im) for im in images]
        bgrs = [cv2.cvtColor(self.preprocessing(rgb), cv2.COLOR_RGB2BGR) for rgb in rgbs]
        if not bgrs:
            return []
        with model_lock(self.model):
            results = self.model.predict(
                source=bgrs, imgsz=int(imgsz), conf=conf, iou=iou, device="cpu", verbose=False, max_det=MAX_DETECTIONS
            )
        out = []
        for res, rgb in zip(results, rgbs, strict=True):
            h, w = rgb.shape[:2]
            boxes = res.boxes
            if len(boxes) >= MAX_DETECTIONS:
                warnings.warn(f"{MAX_DETECTIONS} boxes, the most one image returns: boxes of lower scores were dropped "
                              "(raise conf, or split a large image into tiles)", stacklevel=2)
            xyxy = boxes.xyxy.cpu().numpy().astype(np.float64)
            xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
            xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
            cls = boxes.cls.cpu().numpy().astype(int)
            scores = boxes.conf.cpu().numpy().astype(np.float64)
            order = np.argsort(-scores, kind="stable")
            # a box predicted past the border is clipped to it; one left without area shows nothing of the image
            order = [i for i in order if xyxy[i, 2] > xyxy[i, 0] and xyxy[i, 3] > xyxy[i, 1]]
            dets = [Detection(tuple(float(v) for v in xyxy[i]), self._labels[int(cls[i])], float(scores[i])) for i in order]  # type: ignore[arg-type]
            if per_class:
                dets = [d for d in dets if d.score >= per_class.get(d.label, conf)]
            out.append(dets)
        return out


def suppress_nested(detections: Sequence[Detection], *, label: str = "WBC", max_overlap: float = 0.5) -> list[Detection]:
    """Drop ``label`` boxes that mostly lie on a higher-scoring box of the same label.

    NMS compares IoU, so a box around one lobe or the nucleus of a large cell survives next to the
    box of the whole cell (seen on fields of other labs, where the cell looks larger than in training).
    White cells seldom overlap on a smear: a box whose intersection with an already kept box covers
    more than ``max_overlap`` of the smaller of the two is a duplicate. As in NMS, the higher score
    wins, whichever box is larger: where the detector is surer of the nucleus than of the whole cell,
    the nucleus box is kept (the classifier's crop margin and cell framing still show the cell around
    it). Boxes without area never suppress others. Other labels pass unchanged; the order is kept.

    Parameters
    ----------
    detections : sequence of Detection
    label : str
        The class to deduplicate.
    max_overlap : float in (0, 1]
        Largest accepted intersection over the smaller box's area (1.0: nothing is dropped).

    Returns
    -------
    list of Detection
        ``detections`` without the dropped boxes, in their original order.

    Examples
    --------
    >>> cell = Detection((0, 0, 100, 100), "WBC", 0.9)
    >>> lobe = Detection((10, 10, 50, 50), "WBC", 0.6)
    >>> other = Detection((120, 0, 200, 80), "WBC", 0.8)
    >>> [d.box for d in suppress_nested([cell, lobe, other])]
    [(0, 0, 100, 100), (120, 0, 200, 80)]
    """
    if not 0.0 < max_overlap <= 1.0:
        raise ValueError(f"max_overlap must be in (0, 1], got {max_overlap!r}")

    def area(b: tuple[float, float, float, float]) -> float:
        return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)

    kept: list[tuple[float, float, float, float]] = []
    drop = set()
    for i in sorted((i for i, d in enumerate(detections) if d.label == label), key=lambda i: -detections[i].score):
        box = detections[i].box
        x1, y1, x2, y2 = box
        for k in kept:
            inter = max(min(x2, k[2]) - max(x1, k[0]), 0.0) * max(min(y2, k[3]) - max(y1, k[1]), 0.0)
            if inter > max_overlap * min(area(box), area(k)):
                drop.add(i)
                break
        else:
            if area(box) > 0:
                kept.append(box)
    return [d for i, d in enumerate(detections) if i not in drop]
