"""Magnification: red blood cells as a ruler.

Normal red cells are ~7.5 um wide in every lab, so their median diameter in pixels tells a field's
magnification. :func:`estimate_rbc_diameter` measures it without a detector (so it also works at
magnifications the detector never saw), :func:`rescale_factor` says by how much a field's scale differs
from the detector's training scale, and :func:`detector_input_size` turns that into the detector input
size at which the field is seen at training scale (the pipeline's ``rescale`` option).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from .errors import SmearpipeError
from .preprocess import estimate_background

__all__ = ["detector_input_size", "ScaleEstimationError", "estimate_rbc_diameter", "rescale_factor", "RBC_DIAMETER_UM",
           "rbc_box_diameter", "measure_rbc_box_px"]

#: Typical diameter of a normal red blood cell (micrometres).
RBC_DIAMETER_UM = 7.5


class ScaleEstimationError(SmearpipeError, ValueError):
    """No usable red cells to measure (blank field, or no round cell outlines)."""


def _cell_mask(image: np.ndarray) -> np.ndarray:
    bg = estimate_background(image)
    od = -np.log((image.astype(np.float32) + 1.0) / (bg.astype(np.float32) + 1.0))
    density = np.clip(od, 0, None).sum(axis=2)
    if float(density.max()) < 0.15:
        raise ScaleEstimationError("no stained cells found (blank field?)")
    d8 = np.clip(density / max(float(np.percentile(density, 99.5)), 1e-6) * 255, 0, 255).astype(np.uint8)
    thr, mask = cv2.threshold(cv2.GaussianBlur(d8, (5, 5), 0), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = ndimage.binary_fill_holes(mask > 0)  # central pallor of red cells
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0


def _opening_areas(mask: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Area of the morphological opening of ``mask`` by a disk of each radius (via distance transforms)."""
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    areas = np.empty(len(radii))
    for k, r in enumerate(radii):
        eroded = inside > r
        if not eroded.any():
            areas[k:] = 0
            break
        outside = cv2.distanceTransform((~eroded).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        areas[k] = np.count_nonzero(outside <= r)
    return areas


def estimate_rbc_diameter(image: np.ndarray, *, min_diameter: float = 6.0, max_pixels: int = 160_000) -> float:
    """Median-like red-cell diameter of a field, in pixels, by granulometry.

    Cells are segmented by optical density (Otsu threshold, central pallor filled). The area that
    survives a morphological opening with a disk of radius r stays nearly constant while the disk
    fits inside the cells and drops when r passes their radius; the radius with the largest drop
    (the peak of the pattern spectrum, Matheron/Serra) is the dominant cell radius. Touching or
    overlapping red cells still each contain their disk, so clumps are measured correctly; the few,
    larger WBCs and the small platelets contribute little area at other radii.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
    min_diameter : float
        Smallest diameter considered (pixels of ``image``).
    max_pixels : int
        Large fields are measured on a downscaled copy (the result is in ``image`` pixels).

    Returns
    -------
    float

    Raises
    ------
    ScaleEstimationError
        Blank field or no measurable cells.
    ValueError
        ``min_diameter`` below 2 px or not finite, ``max_pixels`` below 1024.
    """
    from .io import to_rgb_uint8

    if not (isinstance(max_pixels, numbers.Integral) and max_pixels >= 1024):
        raise ValueError(f"max_pixels must be an integer >= 1024, got {max_pixels!r}")
    if not (isinstance(min_diameter, numbers.Real) and 2 <= min_diameter < np.inf):
        raise ValueError(f"min_diameter must be a number >= 2 (pixels), got {min_diameter!r}")
    image = to_rgb_uint8(image)
    h, w = image.shape[:2]
    f = min(1.0, float(np.sqrt(max_pixels / (h * w))))
    small = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else image
    mask = _cell_mask(small)
    if mask.mean() < 0.01:
        raise ScaleEstimationError("too few cell pixels to measure red cells")
    r_min = max(1.0, min_diameter * f / 2)
    r_max = max(r_min + 2, min(mask.shape) / 2)
    radii = np.arange(r_min, r_max, 0.5 if r_max < 40 else 1.0)
    areas = _opening_areas(mask, radii)
    spectrum = areas[:-1] - areas[1:]
    if spectrum.size == 0 or spectrum.max() <= 0:
        raise ScaleEstimationError("no cell-sized structures found")
    k = int(np.argmax(np.convolve(spectrum, np.ones(3) / 3, mode="same")))
    radius = float((radii[k] + radii[k + 1]) / 2)
    return 2.0 * radius / f


def rbc_box_diameter(detections: Sequence[Any], image_shape: tuple[int, ...], *, margin: float = 3.0,
                     min_cells: int = 3) -> float | None:
    """Median red-cell diameter of a field from a detector's red-cell boxes, in pixels.

    Each ``"RBC"`` box that keeps ``margin`` pixels from the image border (cells cut by the border look
    smaller) counts with the mean of its width and height. Used by the pipeline's ``rescale="auto"``,
    against the same measure on the detector's training fields (:func:`measure_rbc_box_px`). A detector
    finds and boxes red cells well over a range of scales around its training scale; far from it, it
    finds few and boxes them a little larger than they are (BCCD fields shrunk 2.5x read as 2.15x:
    ``reports/scale/ruler_spread.json``), so the pipeline measures again after rescaling.

    Parameters
    ----------
    detections : sequence of objects with ``label`` and ``box`` (x1, y1, x2, y2)
        E.g. :class:`~smearpipe.detect.Detection`, in the pixels of the image of ``image_shape``.
    image_shape : tuple
        ``(H, W, ...)`` of that image.
    margin : float
        Boxes closer than this to the border are left out, and so are boxes without area.
    min_cells : int
        Fewer usable boxes than this give None.

    Returns
    -------
    float or None
        The median diameter, or None when there are too few red-cell boxes to measure.

    Raises
    ------
    ValueError
        ``min_cells`` < 1, or ``image_shape`` without a positive height and width.

    Examples
    --------
    >>> from types import SimpleNamespace as D
    >>> cells = [D(label="RBC", box=(10 + 40 * k, 50, 40 + 40 * k, 82)) for k in range(3)]
    >>> rbc_box_diameter(cells, (200, 200, 3))
    31.0
    >>> rbc_box_diameter(cells[:2], (200, 200, 3)) is None
    True
    """
    if min_cells < 1:
        raise ValueError(f"min_cells must be >= 1, got {min_cells}")
    if len(image_shape) < 2 or min(image_shape[:2]) < 1:
        raise ValueError(f"image_shape must start with a positive height and width, got {image_shape!r}")
    h, w = image_shape[:2]
    sizes = [((x2 - x1) + (y2 - y1)) / 2 for d in detections if d.label == "RBC"
             for x1, y1, x2, y2 in [d.box]
             if x2 > x1 and y2 > y1 and x1 > margin and y1 > margin and x2 < w - margin and y2 < h - margin]
    return float(np.median(sizes)) if len(sizes) >= min_cells else None


def measure_rbc_box_px(detector: Any, fields: Iterable[Any], *, min_fraction: float = 0.5) -> float:
    """A detector's training red-cell box diameter (``rbc_box_px`` in its record), in pixels.

    Record the result as ``rbc_box_px`` in the detector's weights record (with ``train_long_side_px``) to
    enable the pipeline's ``rescale="auto"`` for it; :func:`~smearpipe.train.train_detector` does so.

    Parameters
    ----------
    detector : object with ``predict(image)``
        E.g. :class:`~smearpipe.detect.Detector`; it predicts at its own input size and thresholds.
    fields : iterable of paths or RGB uint8 arrays
        Its training fields at their native scale; read one at a time. Unreadable files are skipped.
    min_fraction : float
        At least this fraction of the fields must have enough red-cell boxes (:func:`rbc_box_diameter`),
        else the detector is not trusted to measure (e.g. one barely trained).

    Returns
    -------
    float
        The median over the measurable fields of their :func:`rbc_box_diameter`.

    Raises
    ------
    ScaleEstimationError
        Too few fields could be measured.
    ValueError
        ``min_fraction`` outside [0, 1].
    InvalidImageError
        An array that is not an image.

    Examples
    --------
    >>> from smearpipe.detect import Detector                              # doctest: +SKIP
    >>> measure_rbc_box_px(Detector.load(), training_field_paths)          # doctest: +SKIP
    105.4
    """
    from .errors import ImageReadError
    from .io import load_image

    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    per_field, n = [], 0
    for f in fields:
        try:
            image = load_image(f)
        except ImageReadError:
            continue
        n += 1
        d = rbc_box_diameter(detector.predict(image), image.shape)
        if d is not None:
            per_field.append(d)
    if not per_field or len(per_field) < min_fraction * n:
        raise ScaleEstimationError(f"only {len(per_field)} of {n} fields had enough red-cell boxes to measure")
    return float(np.median(per_field))


KNOWN_RBC_DIAMETER_PX = (2.0, 4000.0)
"""Red-cell diameters (pixels) a known scale may imply; outside, the unit is more likely wrong than the field."""


def check_known_scale(*, rbc_diameter_px: float | None = None, pixel_size_um: float | None = None) -> None:
    """ValueError unless a scale a user gives puts a red cell (7.5 um) at a size a field can show.

    A pixel size given in metres or nanometres, or a diameter in micrometres, would otherwise shrink or
    blow up every field silently (2.5e-7 "um" per pixel: each red cell 30 million pixels wide).
    """
    for name, v in (("rbc_diameter_px", rbc_diameter_px), ("pixel_size_um", pixel_size_um)):
        if v is not None and not (isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < np.inf):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    lo, hi = KNOWN_RBC_DIAMETER_PX
    if pixel_size_um is not None and not lo <= RBC_DIAMETER_UM / pixel_size_um <= hi:
        raise ValueError(f"pixel_size_um={pixel_size_um!r} puts a red cell ({RBC_DIAMETER_UM} um) at "
                         f"{RBC_DIAMETER_UM / pixel_size_um:.3g} px, outside {lo:g}-{hi:g} px: give the size of one "
                         f"pixel in micrometres ({RBC_DIAMETER_UM / hi:.4g}-{RBC_DIAMETER_UM / lo:.4g})")
    if rbc_diameter_px is not None and not lo <= rbc_diameter_px <= hi:
        raise ValueError(f"rbc_diameter_px={rbc_diameter_px!r} is outside {lo:g}-{hi:g} px: give a red cell's "
                         "diameter in pixels of the image")


def rescale_factor(
    image: np.ndarray,
    *,
    target_rbc_diameter: float,
    rbc_diameter_px: float | None = None,
    pixel_size_um: float | None = None,
    tolerance: float = 0.15,
) -> float:
    """Factor by which ``image`` must be scaled so that its red cells measure ``target_rbc_diameter`` pixels.

    The field's red-cell diameter comes from ``rbc_diameter_px`` if given, else from ``pixel_size_um``
    (7.5 um / pixel size), else from :func:`estimate_rbc_diameter`. Returns 1.0 when the scales agree
    within ``tolerance`` (for callers that resample the image and want to skip small changes; the
    pipeline passes 0 because it only changes the detector's input size).
    """
    if rbc_diameter_px is not None and pixel_size_um is not None:
        raise ValueError("give rbc_diameter_px or pixel_size_um, not both")
    v = target_rbc_diameter
    if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < np.inf):
        raise ValueError(f"target_rbc_diameter must be a finite number > 0, got {v!r}")
    check_known_scale(rbc_diameter_px=rbc_diameter_px, pixel_size_um=pixel_size_um)
    if pixel_size_um is not None:
        rbc_diameter_px = RBC_DIAMETER_UM / pixel_size_um
    if rbc_diameter_px is None:
        rbc_diameter_px = estimate_rbc_diameter(image)
    factor = float(target_rbc_diameter) / float(rbc_diameter_px)
    return 1.0 if abs(factor - 1.0) <= tolerance else factor


def detector_input_size(
    image_shape: tuple[int, ...],
    *,
    factor: float,
    input_size: int,
    train_long_side: float,
    stride: int = 32,
    max_size: int = 4096,
) -> int:
    """Network input size (``imgsz``) that shows a field at the detector's training scale.

    A YOLO detector letterboxes every image to ``imgsz`` on its long side, so the image's own pixel
    size does not decide the scale the cells are seen at: ``imgsz`` does. The detector was trained on
    fields with a long side of ``train_long_side`` pixels letterboxed to ``input_size``; a field whose
    red cells must be scaled by ``factor`` (:func:`rescale_factor`) to match the training fields is
    therefore seen at training scale at ``max(h, w) * factor * input_size / train_long_side``, rounded
    to the network stride. Boxes still come back in the field's own pixels (the detector undoes the
    letterbox).

    Parameters
    ----------
    image_shape : tuple
        ``(H, W, ...)`` of the field.
    factor : float
        Red-cell diameter at training / in this field.
    input_size, train_long_side : float
        The detector's training input size and its training fields' long side (record keys
        ``input_size``, ``train_long_side_px``).
    stride, max_size : int
        Result rounded to ``stride`` and at most ``max_size`` (memory): a larger need is clipped with
        a warning; split such a field into tiles.

    Returns
    -------
    int

    Examples
    --------
    >>> detector_input_size((480, 640), factor=2.5, input_size=512, train_long_side=640)
    1280
    """
    import warnings

    values = (factor, input_size, train_long_side)
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"factor, input_size and train_long_side must be finite and > 0, got {values}")
    if len(image_shape) < 2 or min(image_shape[:2]) < 1:
        raise ValueError(f"image_shape must start with a positive height and width, got {image_shape!r}")
    if stride < 1 or max_size < stride:
        raise ValueError(f"need 1 <= stride <= max_size, got stride={stride}, max_size={max_size}")
    long_side = max(image_shape[:2]) * factor * input_size / train_long_side
    if not np.isfinite(long_side):
        raise ValueError(f"the field would need a detector input of {long_side} px (factor {factor!r})")
    size = stride * round(long_side / stride)
    if size < stride:
        warnings.warn(f"the field would need a detector input of {long_side:.3g} px to be seen at training scale; "
                      f"raised to {stride} px, so its cells are seen {stride / max(long_side, 1e-300):.3g}x larger",
                      stacklevel=2)
        size = stride
    limit = max_size // stride * stride
    if size > limit:
        warnings.warn(f"the field would need a detector input of {size} px to be seen at training scale; clipped to "
                      f"{limit} px, so its cells are seen {limit / size:.2f}x smaller (split the field into tiles)",
                      stacklevel=2)
        size = limit
    return int(size)
