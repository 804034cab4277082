"""The two-stage pipeline: :func:`analyze_smear` on one field, :func:`analyze_fields` on a slide.

Flow: validate the image -> detector (with its recorded preprocessing) -> square crop around each
WBC (the classifier's recorded crop scale, clipped and padded) -> classifier (with its recorded
preprocessing, batched) -> frozen result records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .datasets import DETECTION_CLASSES, normalize_detection_class, square_crop
from .detect import counting_threshold, suppress_nested
from .errors import InvalidImageError, SlideWarning, SmearpipeError, WeightsError
from .framing import nucleus_box
from .io import ImageLike, load_image, require_image_list

__all__ = [
    "PipelineConfig",
    "AUTO_RESCALE_TOLERANCE",
    "Pipeline",
    "load_pipeline",
    "CellResult",
    "SmearResult",
    "SlideSummary",
    "SlideResult",
    "analyze_smear",
    "iter_fields",
    "analyze_fields",
    "summarize",
    "clopper_pearson",
    "draw",
    "write_field_outputs",
]


@dataclass(frozen=True)
class PipelineConfig:
    """Options of the pipeline.

    Attributes
    ----------
    det_conf, det_iou : float, optional
        Detector score threshold in [0, 1] and NMS overlap threshold in (0, 1] (None: the detector record's
        defaults).
    wbc_max_overlap : float, optional
        A WBC box whose intersection with a higher-scoring WBC box covers more than this fraction of the
        smaller box is dropped as a duplicate (:func:`~smearpipe.detect.suppress_nested`); None keeps
        every box the detector returns.
    review_probability : float
        A WBC whose top type probability is below this is flagged ``needs_review`` (so is one whose box
        touches the image border, or whose crop shows no violet nucleus, :func:`~smearpipe.framing.nucleus_box`).
    border_margin : float
        A WBC box within this many pixels of the image edge is flagged (the cell may be cut; red cells and
        platelets are counted as they are).
    crop_scale : float, optional
        Crop side relative to the WBC box, 0.5 to 8 (None: the classifier record's ``crop_scale``).
    rescale : {"auto", True, False}
        Show each field to the detector at its training scale, so that fields of another magnification
        or camera are seen like the training fields: red cells (~7.5 um everywhere, :mod:`smearpipe.scale`)
        are the ruler, and the network input size is set from their size. Boxes are always reported in
        the original image's pixels.

        - ``"auto"`` (default): the detector's own red-cell boxes measure the field
          (:func:`~smearpipe.scale.rbc_box_diameter`, at least 3 boxes clear of the border). A field whose
          scale is within a factor of 1.25 of the training fields' (BCCD val fields: 0.93-1.07) keeps the first
          detection and its ``scale_factor`` is 1.0; another one is detected again at the input size of
          its measured scale, measured again, and at most once more detected (at most three passes; the
          third is not measured again). Boxes count from the record's red-cell threshold, whatever
          ``det_conf`` is.
          Where the first detection has too few red-cell boxes (at 2.5x lower magnification the detector misses
          most red cells), :func:`~smearpipe.scale.estimate_rbc_diameter` against the record's
          ``rbc_diameter_px`` decides whether to look again; a field without either is kept as it is, and so is
          one whose measurement puts the red cells outside :data:`RESCALE_RANGE` (0.2-5x) of the training size
          and would move the detector's view by more than that range too (a warning says so). A rescaled view
          with too few red-cell boxes to confirm it that has lost every WBC the first detection found (at the
          record's WBC threshold) is taken for a wrong scale: the first detection stays (at a higher
          magnification, granulometry may read a WBC filling the field as the red-cell size).
          Needs ``rbc_box_px`` and ``train_long_side_px`` in the detector record; without them fields are
          seen as they are (``load_pipeline`` warns).
        - ``True``: the red-cell diameter comes from ``rbc_diameter_px`` / ``pixel_size_um`` or else from
          :func:`~smearpipe.scale.estimate_rbc_diameter` on the image alone (no detector; ~50-100 ms per
          640x480 field; single-field estimates scatter, see ``slide_scale_fields``), and every field is
          detected once at that scale. Needs ``rbc_diameter_px`` and ``train_long_side_px`` in the record. A
          measured scale outside :data:`RESCALE_RANGE` on both counts (as above) raises
          ``ScaleEstimationError`` (a slide's median leaves such fields out); a given diameter or pixel size is
          always followed.
        - ``False``: every field is letterboxed to the detector's input size as it is.
    rbc_diameter_px, pixel_size_um : float, optional
        The field's known red-cell diameter in pixels, or pixel size in micrometres (7.5 um red cells);
        implies ``rescale=True`` (``rescale=False`` with either is refused); otherwise the diameter is estimated from the field. A value that puts a
        red cell outside 2-4000 px (:data:`~smearpipe.scale.KNOWN_RBC_DIAMETER_PX`) is refused: most likely
        a wrong unit (metres or nanometres per pixel).
    slide_scale_fields : int
        With ``rescale=True`` and neither of the above, :func:`analyze_fields` / :func:`iter_fields` measure
        the red cells of the first this-many fields of the slide whose red cells can be measured (looking
        at most 4x as many) and use their median for every field, including blank ones (one microscope
        per slide): estimates from single fields scatter (BCCD test fields: median 86 px, 5-95 % range
        75-154 px, extremes 21 and 201 px), their median does not. Each result's ``scale_factor`` says
        what was applied. If no field can be measured, each field is measured on its own (a warning
        says so). 0: each field is measured on its own, as :func:`analyze_smear` does.
    """

    det_conf: float | None = None
    det_iou: float | None = None
    wbc_max_overlap: float | None = 0.5
    review_probability: float = 0.7
    border_margin: float = 2.0
    crop_scale: float | None = None
    rescale: bool | Literal["auto"] = "auto"
    rbc_diameter_px: float | None = None
    pixel_size_um: float | None = None
    slide_scale_fields: int = 8

    def __post_init__(self) -> None:
        if not (self.rescale is True or self.rescale is False or self.rescale == "auto"):
            raise ValueError(f"rescale must be 'auto', True or False, got {self.rescale!r}")
        if self.rbc_diameter_px is not None and self.pixel_size_um is not None:
            raise ValueError("give rbc_diameter_px or pixel_size_um, not both")
        if self.rescale is False and (self.rbc_diameter_px is not None or self.pixel_size_um is not None):
            raise ValueError("rescale=False contradicts a known rbc_diameter_px / pixel_size_um, which rescales the "
                             "field: leave rescale at its default, or drop the known scale")
        from .scale import check_known_scale

        check_known_scale(rbc_diameter_px=self.rbc_diameter_px, pixel_size_um=self.pixel_size_um)
        if self.wbc_max_overlap is not None and not (_is_real(self.wbc_max_overlap) and 0.0 < self.wbc_max_overlap <= 1.0):
            raise ValueError(f"wbc_max_overlap must be a number in (0, 1] or None, got {self.wbc_max_overlap!r}")
        if not (_is_real(self.review_probability) and 0.0 <= self.review_probability <= 1.0):
            raise ValueError(f"review_probability must be a number in [0, 1], got {self.review_probability!r}")
        if self.det_conf is not None and not (_is_real(self.det_conf) and 0.0 <= self.det_conf <= 1.0):
            raise ValueError(f"det_conf must be a number in [0, 1] or None, got {self.det_conf!r}")
        if self.det_iou is not None and not (_is_real(self.det_iou) and 0.0 < self.det_iou <= 1.0):
            raise ValueError(f"det_iou must be a number in (0, 1] or None, got {self.det_iou!r}")
        if not (_is_real(self.border_margin) and 0 <= self.border_margin < math.inf):
            raise ValueError(f"border_margin must be a finite number >= 0, got {self.border_margin!r}")
        if isinstance(self.slide_scale_fields, bool) or not isinstance(self.slide_scale_fields, numbers.Integral) \
                or self.slide_scale_fields < 0:
            raise ValueError(f"slide_scale_fields must be an integer >= 0, got {self.slide_scale_fields!r}")
        if self.crop_scale is not None and not (_is_real(self.crop_scale) and 0.5 <= self.crop_scale <= 8):
            raise ValueError(f"crop_scale must be a number from 0.5 to 8 (crop side / WBC box side), got {self.crop_scale!r}")


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_pipeline_args(pipeline: Any, config: Any) -> None:
    """TypeError unless ``pipeline`` is a :class:`Pipeline` (or None) and ``config`` a :class:`PipelineConfig` (or None)."""
    if pipeline is not None and not isinstance(pipeline, Pipeline):
        raise TypeError(f"pipeline must be a Pipeline from load_pipeline() or None, got {type(pipeline).__name__}")
    if config is not None and not isinstance(config, PipelineConfig):
        raise TypeError(f"config must be a PipelineConfig or None, got {type(config).__name__} "
                        "(e.g. PipelineConfig(**options) for a dict)")


@dataclass(frozen=True)
class Pipeline:
    """A loaded detector + classifier (see :func:`load_pipeline`)."""

    detector: Any
    classifier: Any
    config: PipelineConfig = field(default_factory=PipelineConfig)

    @property
    def models(self) -> dict[str, dict[str, str]]:
        return {
            "detector": {"name": self.detector.record.name, "sha256": self.detector.record.sha256},
            "classifier": {"name": self.classifier.record.name, "sha256": self.classifier.record.sha256},
        }


def load_pipeline(
    detector: Any = None, classifier: Any = None, *, device: str = "cpu", config: PipelineConfig | None = None
) -> Pipeline:
    """Load the models once; pass the result to :func:`analyze_smear` / :func:`analyze_fields`.

    Parameters
    ----------
    detector, classifier : name, path, loaded model or None
        None: the shipped defaults. Names/paths go to ``Detector.load`` / ``Classifier.load``.
    device : str
        Only ``"cpu"`` is supported for inference.
    config : PipelineConfig, optional
    """
    from .classify import Classifier
    from .detect import Detector

    if device != "cpu":
        raise ValueError(f"only device='cpu' is supported for inference, got {device!r}")
    _check_pipeline_args(None, config)
    det = detector if isinstance(detector, Detector) else Detector.load(detector)
    clf = classifier if isinstance(classifier, Classifier) else Classifier.load(classifier)
    config = config or PipelineConfig()
    if _rescaling(config):
        _scale_metadata(det)  # fail at load time, not on every field
    elif config.rescale == "auto" and _auto_metadata(det) is None:
        meta = det.record.metadata
        missing = [k for k in ("rbc_box_px", "train_long_side_px") if meta.get(k) is None]
        why = f" ({meta['rbc_box_missing']})" if meta.get("rbc_box_missing") and "rbc_box_px" in missing else ""
        warnings.warn(f"detector {det.record.name!r} records no {' / '.join(missing)}{why}: rescale='auto' sees "
                      "every field as it is (add them to its record, see smearpipe.scale.measure_rbc_box_px, or pass "
                      "rescale=False)", stacklevel=2)
    return Pipeline(det, clf, config)


def _rescaling(cfg: PipelineConfig) -> bool:
    """Whether the red-cell ruler of ``rescale=True`` (or a known scale) sets the detector input."""
    return cfg.rescale is True or cfg.rbc_diameter_px is not None or cfg.pixel_size_um is not None


#: ``rescale="auto"``: a field whose red-cell boxes put it within this factor of the training scale is kept
#: as detected (BCCD val fields at their native scale: 0.89-1.12, ``reports/scale/ruler_spread.json``).
AUTO_RESCALE_TOLERANCE = 1.25
#: Smallest field side analysed: a 5x5 image letterboxed to the network input is a blur the detector calls a WBC.
MIN_FIELD_SIDE = 32
#: How far a measured ruler may put a field's red cells from the training fields' size, or move the detector's
#: view of the field from the view it gets as it is (letterboxed to the input size): magnification differs 2-4x
#: between labs. A measurement outside on both counts is taken for noise or texture (random noise reads as red
#: cells of ~10 px: 8.6x on a 640x480 field, more on a larger one) and not followed; a known ``rbc_diameter_px`` /
#: ``pixel_size_um`` always is. Either count alone would refuse real fields: a photo of the same field with 6x
#: the pixels has red cells 6x larger and needs no change of view; a 3840x2880 camera image at the training
#: magnification has red cells of the training size and needs its view enlarged 6x.
RESCALE_RANGE = (0.2, 5.0)
_AUTO_PASSES = 2  # detections after the first, at most


def _implausible_ruler(factor: float, shape: tuple[int, ...], train_long_side: float) -> str | None:
    """What is implausible about a measured ``factor`` (training red-cell size / the field's) on a field of
    ``shape``, for a message: both it and the change of the detector's view it asks for are outside
    :data:`RESCALE_RANGE`; else None."""
    view = factor * max(shape[:2]) / train_long_side
    lo, hi = RESCALE_RANGE
    if lo <= factor <= hi or lo <= view <= hi:
        return None
    size = f"{factor:.2f}x smaller" if factor >= 1 else f"{1 / factor:.2f}x larger"
    return (f"red cells measured {size} than in training and a {view:.2f}x change of the detector's view of the "
            f"field: both outside the {lo}-{hi}x")


def _found_wbc(dets: list, meta: dict[str, float]) -> bool:
    """Whether ``dets`` hold a WBC box at the record's counting threshold."""
    return any(d.label == "WBC" and d.score >= meta["wbc_score"] for d in dets)


def _auto_metadata(detector: Any) -> dict[str, float] | None:
    """What ``rescale="auto"`` needs from the detector record (None: it cannot measure fields), and the scores
    a red-cell box needs to count, as when ``rbc_box_px`` was measured, and a WBC box (the record's counting
    thresholds)."""
    meta = detector.record.metadata
    if meta.get("rbc_box_px") is None or meta.get("train_long_side_px") is None:
        return None
    out = {k: float(meta[k]) for k in ("rbc_box_px", "train_long_side_px", "rbc_diameter_px") if meta.get(k) is not None}
    out["rbc_score"] = counting_threshold(meta, "RBC")
    out["wbc_score"] = counting_threshold(meta, "WBC")
    return out


def _auto_rescale(detector: Any, rgb: np.ndarray, dets: list, cfg: PipelineConfig) -> tuple[float, int | None, list]:
    """``rescale="auto"``: (scale factor, input size, detections); ``(1.0, None, dets)`` when the field is kept."""
    from .scale import ScaleEstimationError, detector_input_size, estimate_rbc_diameter, rbc_box_diameter

    meta = _auto_metadata(detector)
    if meta is None:
        return 1.0, None, dets
    # the scale the detector's own input size showed this field at (1 for a field as large as the training ones)
    seen = meta["train_long_side_px"] / max(rgb.shape[:2])
    factor, imgsz, first = 1.0, None, dets
    for k in range(_AUTO_PASSES):
        # measured at the record's threshold whatever the caller's det_conf: low-score fragments would read small
        diameter = rbc_box_diameter([d for d in dets if d.score >= meta["rbc_score"]], rgb.shape)
        if diameter is None and imgsz is not None and _found_wbc(first, meta) and not _found_wbc(dets, meta):
            # a rescaled view that no red-cell box confirms and that lost every WBC the first view found is taken
            # for a wrong scale; the first detection stays. Mostly the image ruler's view at a high magnification:
            # a WBC filling the field and a few cut red cells, the WBC read as the red-cell size by granulometry
            return 1.0, None, first
        if diameter is not None:
            need = meta["rbc_box_px"] / diameter
        elif k == 0 and meta.get("rbc_diameter_px"):
            # too few red-cell boxes to measure: at a much lower magnification the detector misses most red
            # cells, so the image's own ruler decides whether to look again (a blank field stays as it is)
            try:
                need = meta["rbc_diameter_px"] / estimate_rbc_diameter(rgb)
            except ScaleEstimationError:
                break
        else:
            break
        implausible = _implausible_ruler(need, rgb.shape, meta["train_long_side_px"])
        if implausible:
            kept = "not rescaled" if imgsz is None else f"kept at the scale of its previous look ({factor:.2f}x)"
            warnings.warn(f"{implausible} that rescale='auto' follows: {kept} (pass rbc_diameter_px or pixel_size_um "
                          "if the field's scale is known)", stacklevel=3)
            break
        if abs(np.log(need / seen)) <= np.log(AUTO_RESCALE_TOLERANCE):
            break
        size = detector_input_size(rgb.shape, factor=need, input_size=detector.record.input_size,
                                   train_long_side=meta["train_long_side_px"])
        if size == imgsz:
            break
        if size == detector.record.input_size:
            return 1.0, None, first  # back at the first detection's input size
        factor, imgsz, seen = need, size, need
        dets = detector.predict(rgb, conf=cfg.det_conf, iou=cfg.det_iou, imgsz=size)
    return factor, imgsz, dets


def _is_grey(rgb: np.ndarray, tolerance: int = 2) -> bool:
    """True when 99 % of the pixels have channels within ``tolerance`` levels (a grey image stored as RGB; a
    coloured scale bar or label burnt into it is under 1 %)."""
    small = rgb[::8, ::8].astype(np.int16)  # one pixel in 64: a stained smear has colour everywhere
    return float(np.mean(np.ptp(small, axis=2) <= tolerance)) >= 0.99


def _detection_labels(detector: Any) -> set[str]:
    """The canonical labels (WBC/RBC/Platelets) the detector's record lists."""
    return {normalize_detection_class(c) for c in detector.record.classes} - {None}


def _scale_metadata(detector: Any) -> dict[str, float]:
    """The detector's training red-cell diameter and field size, which rescaling needs."""
    meta = detector.record.metadata
    missing = [k for k in ("rbc_diameter_px", "train_long_side_px") if meta.get(k) is None]
    if missing:
        raise WeightsError(f"detector {detector.record.name!r} records no {' / '.join(missing)} (its training red-cell "
                           "diameter and field size in pixels): rescaling is not possible with it")
    return {k: float(meta[k]) for k in ("rbc_diameter_px", "train_long_side_px")}


_LIST_HINT = "for a folder use sorted(Path(folder).glob('*.jpg')), for one image use analyze_smear"


@lru_cache(maxsize=1)
def _default_pipeline() -> Pipeline:
    # Loaded once on first use; the shipped weights are immutable, so the cache changes no behaviour.
    return load_pipeline()


_MAX_COORDINATE = 1_000_000  # pixels; a saved result beyond this is not one of a field (and OpenCV cannot draw it)


@dataclass(frozen=True)
class CellResult:
    """One detected cell; WBC fields are None for RBCs and platelets."""

    box: tuple[float, float, float, float]
    label: str
    score: float
    wbc_type: str | None = None
    wbc_probability: float | None = None
    probabilities: dict[str, float] | None = None
    needs_review: bool = False
    review_reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [float(v) for v in self.box], "label": self.label, "score": self.score, "wbc_type": self.wbc_type,
            "wbc_probability": self.wbc_probability, "probabilities": self.probabilities,
            "needs_review": self.needs_review, "review_reasons": list(self.review_reasons),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellResult:
        box = tuple(float(v) for v in d["box"])
        if len(box) != 4 or not all(math.isfinite(v) and abs(v) <= _MAX_COORDINATE for v in box):
            raise ValueError(f"a box is 4 finite pixel coordinates (x1, y1, x2, y2), got {d['box']!r}")
        p = d.get("wbc_probability")
        if p is not None and not (_is_real(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"wbc_probability must be a number in [0, 1] or null, got {p!r}")
        if not (_is_real(d["score"]) and 0.0 <= d["score"] <= 1.0):
            raise ValueError(f"score must be a number in [0, 1], got {d['score']!r}")
        if not (box[2] > box[0] and box[3] > box[1]):
            raise ValueError(f"a box has x2 > x1 and y2 > y1, got {d['box']!r}")
        if d["label"] not in DETECTION_CLASSES:
            raise ValueError(f"label must be one of {list(DETECTION_CLASSES)}, got {d['label']!r}")
        if d.get("probabilities") is not None and not isinstance(d["probabilities"], Mapping):
            raise ValueError(f"probabilities must be a mapping of type -> probability, got {d['probabilities']!r}")
        if (d.get("wbc_type") is not None) != (d["label"] == "WBC" and d.get("probabilities") is not None) \
                or (d.get("wbc_type") is not None and d["wbc_type"] not in d["probabilities"]):
            raise ValueError(f"a typed cell is a WBC whose wbc_type is one of its probabilities' classes, got label "
                             f"{d['label']!r}, wbc_type {d.get('wbc_type')!r}")
        return cls(box=box, label=d["label"], score=d["score"], wbc_type=d.get("wbc_type"),  # type: ignore[arg-type]
                   wbc_probability=p, probabilities=d.get("probabilities"),
                   needs_review=d.get("needs_review", False), review_reasons=tuple(d.get("review_reasons", ())))


@dataclass(frozen=True)
class SmearResult:
    """Result of :func:`analyze_smear` on one field."""

    detections: tuple[CellResult, ...]
    counts: dict[str, int]
    differential: dict[str, int]
    image_size: tuple[int, int]  # (width, height)
    models: dict[str, dict[str, str]]
    timings_ms: dict[str, float]
    source: str | None = None
    scale_factor: float = 1.0  # red-cell ratio training / this field (1.0: seen as it is, also when "auto" kept it)
    detector_imgsz: int | None = None  # network input size rescaling chose (None: the detector's default)

    @property
    def differential_percent(self) -> dict[str, float]:
        n = sum(self.differential.values())
        return {k: (100.0 * v / n if n else 0.0) for k, v in self.differential.items()}

    @property
    def wbcs(self) -> tuple[CellResult, ...]:
        return tuple(d for d in self.detections if d.label == "WBC")

    @property
    def n_review(self) -> int:
        return sum(d.needs_review for d in self.detections)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "image_size": list(self.image_size), "counts": dict(self.counts),
            "differential": dict(self.differential), "differential_percent": self.differential_percent,
            "detections": [d.to_dict() for d in self.detections], "models": self.models,
            "timings_ms": dict(self.timings_ms), "scale_factor": self.scale_factor,
            "detector_imgsz": self.detector_imgsz,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SmearResult:
        """Inverse of :meth:`to_dict`; ValueError naming what is missing or malformed, also when the counts and
        differential are not those of the boxes (a result edited by hand, or written by something else)."""
        if not isinstance(d, dict):
            raise ValueError(f"not a smearpipe field result: expected a JSON object, got {type(d).__name__}")
        size = d.get("image_size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 < v <= _MAX_COORDINATE
                        for v in size)):
            raise ValueError(f"not a smearpipe field result: image_size must be [width, height] in pixels, got {size!r}")
        try:
            result = cls(detections=tuple(CellResult.from_dict(x) for x in d["detections"]), counts=dict(d["counts"]),
                         differential=dict(d["differential"]), image_size=tuple(d["image_size"]),  # type: ignore[arg-type]
                         models=d["models"], timings_ms=dict(d["timings_ms"]), source=d.get("source"),
                         scale_factor=float(d.get("scale_factor", 1.0)), detector_imgsz=d.get("detector_imgsz"))
            if set(result.counts) != set(DETECTION_CLASSES) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in [*result.counts.values(),
                                                                             *result.differential.values()]):
                raise ValueError(f"counts are whole numbers of {list(DETECTION_CLASSES)} (and the differential's of "
                                 f"WBC types), got {result.counts} / {result.differential}")
            boxes = {c: sum(x.label == c for x in result.detections) for c in DETECTION_CLASSES}
            types = {c: sum(x.wbc_type == c for x in result.detections) for c in result.differential}
            if {c: result.counts.get(c, 0) for c in DETECTION_CLASSES} != boxes or types != result.differential \
                    or sum(types.values()) != sum(x.wbc_type is not None for x in result.detections):
                raise ValueError(f"its counts {result.counts} / differential {result.differential} are not those of "
                                 f"its boxes ({boxes} / {types})")
            return result
        except KeyError as exc:
            raise ValueError(f"not a smearpipe field result: no {exc} entry") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a smearpipe field result: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> SmearResult:
        """Read :meth:`to_json` output; ValueError for text that is not such a result."""
        return cls.from_dict(json.loads(text))


def type_review_reasons(proba: np.ndarray, crop: np.ndarray, *, review_probability: float) -> list[str]:
    """Why a typed WBC crop needs review: its most probable type below ``review_probability``, or no nucleus.

    A WBC crop shows a nucleus (all 351 BCCD crops and 206 PBC val images do: tests/test_framing.py); a blank or
    red-cell crop is typed all the same, so it is flagged instead (~1 ms per crop; the classifier's framing looks
    for the same nucleus, but threading its answer out of ``predict_proba`` would cost more than it saves).
    Used by :func:`analyze_smear` and ``smearpipe classify``.

    Parameters
    ----------
    proba : (n_classes,) float ndarray
        The crop's row of :meth:`~smearpipe.classify.Classifier.predict_proba`.
    crop : (H, W, 3) uint8 ndarray
        The RGB crop that was typed.
    review_probability : float
        As :attr:`PipelineConfig.review_probability`.

    Returns
    -------
    list of str
        Empty when nothing calls for review.
    """
    top = float(np.max(proba))
    reasons = [f"low type probability {top:.2f}"] if top < review_probability else []
    if nucleus_box(crop) is None:
        reasons.append("no nucleus found")
    return reasons


def analyze_smear(image: ImageLike, *, pipeline: Pipeline | None = None, config: PipelineConfig | None = None,
                  source: str | None = None) -> SmearResult:
    """Detect, count and type the cells of one blood smear field.

    Parameters
    ----------
    image : path or (H, W, 3) uint8 ndarray
        RGB field (see :mod:`smearpipe.io` for the accepted inputs and conversions).
    pipeline : Pipeline, optional
        From :func:`load_pipeline`; None uses the shipped default weights (loaded once).
    config : PipelineConfig, optional
        Overrides ``pipeline.config`` for this call.
    source : str, optional
        The field's name in the result (``SmearResult.source``), in the warnings about the field's colour and
        red cells and in errors about its array; default: the path, or None for an array (:func:`iter_fields`
        names arrays ``array[i]``).

    Returns
    -------
    SmearResult

    Raises
    ------
    SmearpipeError
        Unreadable or invalid image (``ImageReadError`` / ``InvalidImageError``, also for a field under
        :data:`MIN_FIELD_SIDE` px per side), missing weights (``WeightsError``, also for rescaling with a
        detector whose record lacks the training scale), and, with ``rescale=True`` measured on the field
        itself, a field without measurable red cells or whose measured scale is outside :data:`RESCALE_RANGE`
        on both counts (red-cell size and view; ``ScaleEstimationError``: give ``rbc_diameter_px`` or
        ``pixel_size_um`` instead).

    Warns
    -----
    UserWarning
        A field without colour (grey: 99 % of its pixels' channels within 2 levels of each other): the models
        tell cells apart by their stain, so counts and types of a grey field are not to be trusted (the six
        bundled BCCD fields made grey: no WBC found on any). A coloured field on which the detector finds no red
        cell: it may not be a blood smear, though any picture gets boxes and types (README, "Pipeline"). Also for
        scales ``rescale="auto"`` does not follow.

    Examples
    --------
    >>> r = analyze_smear("datasets/bccd_samples/BloodImage_00007.jpg")   # doctest: +SKIP
    >>> r.counts, r.differential                                          # doctest: +SKIP
    """
    _check_pipeline_args(pipeline, config)
    if source is not None and not isinstance(source, str):
        raise TypeError(f"source must be a str (the field's name), got {type(source).__name__}")
    p = pipeline or _default_pipeline()
    cfg = config or p.config
    t0 = time.perf_counter()
    rgb = load_image(image, name=source or "image")
    if source is None and isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_FIELD_SIDE:
        raise InvalidImageError(f"{source or 'image'}: {w}x{h} px; a field needs at least {MIN_FIELD_SIDE} px per side "
                                "(the detector would see noise enlarged as cells)")
    grey = _is_grey(rgb)
    if grey:
        warnings.warn(f"{source or 'image'} has no colour: the detector and classifier tell cells apart by their "
                      "stain, so the counts and types of a grey field are not to be trusted", stacklevel=2)
    factor, imgsz = 1.0, None
    if _rescaling(cfg):
        from .scale import detector_input_size, rescale_factor

        meta = _scale_metadata(p.detector)
        # no snapping to 1.0: changing the input size costs nothing, unlike resampling the field
        factor = rescale_factor(rgb, target_rbc_diameter=meta["rbc_diameter_px"], rbc_diameter_px=cfg.rbc_diameter_px,
                                pixel_size_um=cfg.pixel_size_um, tolerance=0.0)
        implausible = _implausible_ruler(factor, rgb.shape, meta["train_long_side_px"])
        if cfg.rbc_diameter_px is None and cfg.pixel_size_um is None and implausible:
            from .scale import ScaleEstimationError

            raise ScaleEstimationError(
                f"{implausible} a measured ruler is followed over (the field's red cells read "
                f"{meta['rbc_diameter_px'] / factor:.1f} px: noise or texture?): pass rbc_diameter_px or pixel_size_um "
                "if the scale is known")
        imgsz = detector_input_size(rgb.shape, factor=factor, input_size=p.detector.record.input_size,
                                    train_long_side=meta["train_long_side_px"])
    t1 = time.perf_counter()
    # the field is letterboxed to imgsz (its training scale; None: the detector's own); boxes come back in its pixels
    dets = p.detector.predict(rgb, conf=cfg.det_conf, iou=cfg.det_iou, imgsz=imgsz)
    if cfg.rescale == "auto" and not _rescaling(cfg):
        factor, imgsz, dets = _auto_rescale(p.detector, rgb, dets, cfg)
    # boxes without area (a detector of the user's own may return them clipped at the border) show no cell
    dets = [d for d in dets if d.box[2] > d.box[0] and d.box[3] > d.box[1]]
    if cfg.wbc_max_overlap is not None:
        dets = suppress_nested(dets, label="WBC", max_overlap=cfg.wbc_max_overlap)
    t2 = time.perf_counter()
    wbc_idx = [i for i, d in enumerate(dets) if d.label == "WBC"]
    scale = cfg.crop_scale or p.classifier.crop_scale
    crops = [square_crop(rgb, dets[i].box, scale=scale) for i in wbc_idx]
    t3 = time.perf_counter()
    proba = p.classifier.predict_proba(crops) if crops else np.zeros((0, len(p.classifier.classes)))
    t4 = time.perf_counter()
    classes = p.classifier.classes
    typed = {i: row for i, row in zip(wbc_idx, proba, strict=True)}
    type_reasons = {i: type_review_reasons(row, crop, review_probability=cfg.review_probability)
                    for i, row, crop in zip(wbc_idx, proba, crops, strict=True)}
    cells = []
    for i, d in enumerate(dets):
        x1, y1, x2, y2 = d.box
        reasons = []
        if min(x1, y1) <= cfg.border_margin or x2 >= w - cfg.border_margin or y2 >= h - cfg.border_margin:
            reasons.append("touches image border")
        if i in typed:
            row = typed[i]
            k = int(row.argmax())
            reasons += type_reasons[i]
            cells.append(CellResult(d.box, d.label, d.score, classes[k], float(row[k]),
                                    {c: float(v) for c, v in zip(classes, row, strict=True)}, bool(reasons), tuple(reasons)))
        else:
            # border flags matter for WBC typing and counting; RBC/platelets are counted as is
            cells.append(CellResult(d.box, d.label, d.score))
    counts = {c: 0 for c in DETECTION_CLASSES}
    for c in cells:
        counts[c.label] = counts.get(c.label, 0) + 1
    if not counts["RBC"] and not grey and "RBC" in _detection_labels(p.detector):
        warnings.warn(f"{source or 'image'}: no red cells found. A blood smear field has more red cells than any other "
                      "cell, so this may not be one (any picture gets boxes and WBC types; they mean nothing there). "
                      "A crop of one white cell is typed with Classifier.predict_proba or `smearpipe classify`",
                      stacklevel=2)
    differential = {c: 0 for c in classes}
    for c in cells:
        if c.wbc_type is not None:
            differential[c.wbc_type] += 1
    t5 = time.perf_counter()
    timings = {"read_and_scale": (t1 - t0) * 1e3, "detect": (t2 - t1) * 1e3, "crop": (t3 - t2) * 1e3,
               "classify": (t4 - t3) * 1e3, "assemble": (t5 - t4) * 1e3, "total": (t5 - t0) * 1e3}
    return SmearResult(tuple(cells), counts, differential, (w, h), p.models, timings, source, factor, imgsz)


# ----------------------------------------------------------------------------- slides

def clopper_pearson(k: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) binomial confidence interval for ``k`` successes of ``n``, as proportions."""
    from scipy.stats import binomtest

    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name} must be a count (an integer >= 0), got {v!r}")
    if k > n:
        raise ValueError(f"k ({k}) must be at most n ({n})")
    if not (_is_real(confidence) and 0 < confidence < 1):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return (float(ci.low), float(ci.high))


@dataclass(frozen=True)
class SlideSummary:
    """Totals over the fields of a slide, with exact 95 % CIs of the WBC differential."""

    fields: int
    failed: int
    counts: dict[str, int]
    differential: dict[str, int]
    differential_percent: dict[str, float]
    differential_ci95: dict[str, tuple[float, float]]  # percent
    flagged_for_review: int

    def to_dict(self) -> dict[str, Any]:
        return {"fields": self.fields, "failed": self.failed, "counts": self.counts, "differential": self.differential,
                "differential_percent": self.differential_percent,
                "differential_ci95": {k: list(v) for k, v in self.differential_ci95.items()},
                "flagged_for_review": self.flagged_for_review}

    def table(self) -> str:
        n = sum(self.differential.values())
        lines = [f"fields {self.fields} (failed {self.failed}); cells: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()),
                 f"{'WBC type':<12}{'n':>6}{'%':>8}   95% CI (exact)"]
        for k, v in self.differential.items():
            lo, hi = self.differential_ci95[k]
            lines.append(f"{k:<12}{v:>6}{self.differential_percent[k]:>8.1f}   {lo:5.1f} - {hi:5.1f}")
        lines.append(f"{'total':<12}{n:>6}   flagged for review: {self.flagged_for_review}")
        return "\n".join(lines)


def summarize(results: Iterable[SmearResult], *, failed: int = 0, classes: Sequence[str] | None = None) -> SlideSummary:
    """Slide summary of per-field results (totals, differential %, Clopper-Pearson 95 % CIs)."""
    counts: dict[str, int] = {c: 0 for c in DETECTION_CLASSES}
    diff: dict[str, int] = {c: 0 for c in (classes or ())}
    fields = flagged = 0
    for r in results:
        fields += 1
        flagged += r.n_review
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
        for k, v in r.differential.items():
            diff[k] = diff.get(k, 0) + v
    n = sum(diff.values())
    pct = {k: (100.0 * v / n if n else 0.0) for k, v in diff.items()}
    ci = {k: tuple(100.0 * x for x in clopper_pearson(v, n)) for k, v in diff.items()}
    return SlideSummary(fields, failed, counts, diff, pct, ci, flagged)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SlideResult:
    """Per-field results, the fields that failed (source, reason) and the slide summary."""

    fields: tuple[SmearResult, ...]
    errors: tuple[tuple[str, str], ...]
    summary: SlideSummary

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary.to_dict(), "errors": [list(e) for e in self.errors],
                "fields": [f.to_dict() for f in self.fields]}


def iter_fields(
    images: Iterable[ImageLike], *, pipeline: Pipeline | None = None, config: PipelineConfig | None = None,
    progress: bool = True,
) -> Iterator[tuple[str, SmearResult | SmearpipeError]]:
    """Analyse fields one at a time, yielding ``(source, result or error)``; memory stays constant.

    Parameters
    ----------
    images : iterable of paths or arrays
        The fields of one slide (a list, or any iterable; not a single path or array).
    pipeline : Pipeline, optional
        From :func:`load_pipeline`; None uses the shipped default weights.
    config : PipelineConfig, optional
        Overrides ``pipeline.config``. With ``rescale=True`` and no known diameter or pixel size, the slide's
        red-cell diameter is the median over its first ``slide_scale_fields`` measurable fields (read
        twice; at most ``4 * slide_scale_fields`` fields are held back for it, as paths or arrays).
    progress : bool
        tqdm progress bar.

    Yields
    ------
    (str, SmearResult or SmearpipeError)
        The source (path, or ``array[i]``) and its result, in input order. Errors of our own types
        (unreadable or invalid images, fields without measurable red cells when measured alone) are
        yielded, not raised, so one bad file does not stop a slide.

    Warns
    -----
    SlideWarning
        (a ``UserWarning``) With ``rescale=True``, when none of the fields read for the slide's ruler has
        measurable red cells; it comes while the first field is analysed, and is about the whole slide.
    UserWarning
        Per field, as :func:`analyze_smear`.
    """
    from tqdm.auto import tqdm

    require_image_list(images, caller="iter_fields", hint=_LIST_HINT)
    _check_pipeline_args(pipeline, config)
    p = pipeline or _default_pipeline()
    cfg = config or p.config
    total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    fields = enumerate(tqdm(images, total=total, disable=not progress, desc="fields", unit="field"))

    def one(i: int, image: ImageLike, cfg: PipelineConfig) -> tuple[str, SmearResult | SmearpipeError]:
        source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"array[{i}]"
        try:
            return source, analyze_smear(image, pipeline=p, config=cfg, source=source)
        except SmearpipeError as exc:
            return source, exc

    try:
        meta = _scale_metadata(p.detector) if cfg.rescale is True else None
    except WeightsError:
        meta = None  # a detector without the training scale: each field yields the error below
    if meta and cfg.rbc_diameter_px is None and cfg.pixel_size_um is None and cfg.slide_scale_fields:
        from .scale import ScaleEstimationError, estimate_rbc_diameter

        first: list[tuple[int, ImageLike]] = []
        diameters: list[float] = []
        for i, image in fields:
            first.append((i, image))
            try:
                rgb = load_image(image)
                d = estimate_rbc_diameter(rgb)
                if _implausible_ruler(meta["rbc_diameter_px"] / d, rgb.shape, meta["train_long_side_px"]) is None:
                    diameters.append(d)  # else noise or texture, not red cells
            except ScaleEstimationError:
                pass  # blank: analysed at the slide's scale below
            except SmearpipeError:
                pass  # unreadable or invalid: analyze_smear reports it below
            if len(diameters) == cfg.slide_scale_fields or len(first) == 4 * cfg.slide_scale_fields:
                break
        if diameters:
            cfg = dataclasses.replace(cfg, rbc_diameter_px=float(np.median(diameters)))
        else:
            warnings.warn(f"no red cells measurable on the first {len(first)} fields: each field is measured on its "
                          "own (pass rbc_diameter_px or pixel_size_um if you know the scale)", SlideWarning, stacklevel=2)
        for i, image in first:
            yield one(i, image, cfg)
    for i, image in fields:
        yield one(i, image, cfg)


def analyze_fields(
    images: Iterable[ImageLike], *, pipeline: Pipeline | None = None, config: PipelineConfig | None = None,
    progress: bool = True,
) -> SlideResult:
    """Analyse the fields of one slide: per-field results plus a slide summary with exact CIs.

    Images are read one at a time (pass paths for constant memory over thousands of fields); a field
    that cannot be read is listed in ``errors`` and the rest are processed.
    """
    require_image_list(images, caller="analyze_fields", hint=_LIST_HINT)
    _check_pipeline_args(pipeline, config)  # before the default models load: a wrong value is not replaced by them
    p = pipeline or _default_pipeline()
    results, errors = [], []
    for source, out in iter_fields(images, pipeline=p, config=config, progress=progress):
        if isinstance(out, SmearResult):
            results.append(out)
        else:
            errors.append((source, str(out)))
    return SlideResult(tuple(results), tuple(errors), summarize(results, failed=len(errors), classes=p.classifier.classes))


# ----------------------------------------------------------------------------- drawing

_COLOURS = {"WBC": (128, 0, 160), "RBC": (220, 40, 40), "Platelets": (0, 150, 220)}


def draw(result: SmearResult, image: ImageLike, *, thickness: int = 2) -> np.ndarray:
    """Annotated copy of ``image``: boxes coloured by class, WBC type + probability, legend with counts.

    Returns
    -------
    (H, W, 3) uint8 ndarray
    """
    import cv2

    if not isinstance(result, SmearResult):
        hint = " (a saved result: SmearResult.from_dict(d))" if isinstance(result, Mapping) else ""
        raise TypeError(f"result must be a SmearResult from analyze_smear, got {type(result).__name__}{hint}")
    if isinstance(thickness, bool) or not isinstance(thickness, numbers.Integral) or not 1 <= thickness <= 100:
        raise ValueError(f"thickness must be an integer from 1 to 100 px, got {thickness!r}")
    rgb = load_image(image).copy()
    h, w = rgb.shape[:2]
    if (w, h) != tuple(result.image_size):
        raise ValueError(f"image size {(w, h)} differs from the result's {tuple(result.image_size)}")
    font = cv2.FONT_HERSHEY_SIMPLEX
    fs = max(0.35, min(w, h) / 1000)
    for c in sorted(result.detections, key=lambda d: d.label == "WBC"):
        x1, y1, x2, y2 = (int(round(v)) for v in c.box)
        colour = _COLOURS.get(c.label, (0, 0, 0))
        cv2.rectangle(rgb, (x1, y1), (x2, y2), colour, thickness if c.label == "WBC" else 1)
        if c.wbc_type is not None:
            text = f"{c.wbc_type} {c.wbc_probability:.2f}" + (" ?" if c.needs_review else "")
            (tw, th), _ = cv2.getTextSize(text, font, fs * 1.2, 1)
            ty = y1 - 4 if y1 - th - 6 >= 0 else min(h - 2, y2 + th + 4)
            cv2.rectangle(rgb, (x1, ty - th - 3), (x1 + tw + 4, ty + 3), colour, -1)
            cv2.putText(rgb, text, (x1 + 2, ty), font, fs * 1.2, (255, 255, 255), 1, cv2.LINE_AA)
    legend = [f"{k}: {v}" for k, v in result.counts.items()]
    legend += [f"  {k}: {v}" for k, v in result.differential.items() if v]
    lh = int(22 * fs / 0.5)
    box_h = lh * len(legend) + 8
    overlay = rgb.copy()
    cv2.rectangle(overlay, (4, 4), (int(190 * fs / 0.5), 4 + box_h), (255, 255, 255), -1)
    rgb = cv2.addWeighted(overlay, 0.75, rgb, 0.25, 0)
    for i, line in enumerate(legend):
        key = line.split(":")[0].strip()
        colour = _COLOURS.get(key, (30, 30, 30))
        cv2.putText(rgb, line, (10, 4 + lh * (i + 1)), font, fs, colour, 1, cv2.LINE_AA)
    return rgb


def write_field_outputs(result: SmearResult, image: ImageLike, out_dir: str | os.PathLike, stem: str,
                        *, overwrite: bool = False, messages: Iterable[str] = ()) -> tuple[Path, Path]:
    """Write ``<stem>.png`` (annotated) and ``<stem>.json``; never overwrite unless asked.

    ``messages`` (the warnings given while the field was analysed) go into the JSON as its ``"warnings"`` list,
    so that a result read back later still says that a field had no colour or no red cells, say
    (:meth:`SmearResult.from_dict` reads the JSON without them).
    """
    from .io import replace_file, require_file_name, write_image

    if isinstance(messages, str):
        raise TypeError(f"messages must be an iterable of str, not one str: {messages!r}")
    messages = list(messages)
    if not all(isinstance(m, str) for m in messages):
        raise TypeError(f"messages must be str, got {messages!r}")
    require_file_name(stem, what="stem")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} is a file, not a folder")
    png, js = out_dir / f"{stem}.png", out_dir / f"{stem}.json"
    if not overwrite:
        for p in (png, js):
            if p.exists():
                raise FileExistsError(f"refusing to overwrite {p} (use --overwrite / overwrite=True)")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_image(png, draw(result, image), overwrite=overwrite)
    replace_file(js, (json.dumps({**result.to_dict(), "warnings": messages}, indent=1) + "\n").encode())
    return png, js
