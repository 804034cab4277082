"""Cell-centred framing of WBC crops, so that crops from any lab look alike to the classifier.

Labs frame their WBC images differently: PBC's CellaVision images show the cell at about a third
of the image width among many red cells; BCCD's crops are cut tightly around the cell. A
classifier trained on one framing reads the other as a change of cell size (a tightly cropped
lymphocyte looks as large as a monocyte). :func:`frame_cell` removes most of the difference: it
finds the WBC's nucleus (the largest blue-violet region near the centre; lobes of one nucleus are
merged) and cuts a square around it whose side is ``context`` times the nucleus's larger extent, but
at most ``max_growth`` times the crop's own longer side: a crop cut tighter than that is only
re-centred, not padded out to the full context. Where the square leaves the image it is padded with
the background colour (of the brightest pixels).

Padding tight crops out to the full context cost accuracy on another lab: on the crops of BCCD
train/val fields (a PBC-only model, ``scripts/cross_lab_protocol.py``) 70.0 % with the square allowed
to grow to 1.3x the crop, 76.1 % with 1.0x; PBC crops are framed wider and never reach the limit.
A 4-epoch fine-tune on PBC crops cut tight and padded likewise did not help: 63.6 % with 2.0x, against 72.1 %
for the same fine-tune without such crops (docs/cross_lab_experiments.md, "tight cuts").

A classifier records its :class:`Framing` (``framing`` in its weights record) and applies it to every
crop, in training and at inference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from .io import to_rgb_uint8
from .preprocess import estimate_background

__all__ = ["FRAMINGS", "Framing", "frame_cell", "nucleus_box", "apply_framing"]

FRAMINGS = ("as_given", "cell")
_WORK_SIZE = 96  # the nucleus is found on a copy of this size (long side): cheap, and enough for a box
_MIN_AREA = 0.005  # smaller blue regions (platelets, noise) are not taken for a nucleus
_MIN_BLUE = 15  # Otsu threshold on blue - green below this: no violet nucleus in the crop
_MAX_MASK_RADIUS = 1.4  # Framing.mask_radius, in half-sides of the square: sqrt(2) reaches its corners


@dataclass(frozen=True)
class Framing:
    """How crops are reframed before resizing; recorded with a classifier's weights.

    Attributes
    ----------
    name : {"cell", "as_given"}
        ``"cell"``: :func:`frame_cell` with the parameters below; ``"as_given"``: crops unchanged.
    context : float
        Side of the square relative to the nucleus's larger extent (1.8 keeps the cytoplasm of
        monocytes and eosinophils, whose nucleus spans about two thirds of the cell).
    max_growth : float
        Largest side of the square relative to the crop's longer side.
    mask_radius : float or None
        None (the default, as every record before it): the square is shown whole. A number ``k`` in (0, 1.4]:
        a disk centred in the square (on the nucleus) is kept, of radius ``k`` half-sides of the square; beyond
        ``1.1 k`` half-sides the square takes the background colour, and in between the two are blended. The
        neighbouring red cells and whatever else surrounds the cell, which differ from lab to lab, are then
        mostly hidden from the classifier. ``k = 1`` keeps the inscribed disk. With ``context`` 1.8 the radius
        is ``0.9 k`` nucleus extents (0.68 for ``k = 0.75``; the rim of a cell whose nucleus spans two thirds
        of it lies at about 0.75), and less where ``max_growth`` limits the square (a crop cut tightly around
        the cell): there the disk can cut into the cell's rim.
    """

    name: str = "cell"
    context: float = 1.8
    max_growth: float = 1.0
    mask_radius: float | None = None

    def __post_init__(self) -> None:
        if self.name not in FRAMINGS:
            raise ValueError(f"unknown framing {self.name!r}; known: {list(FRAMINGS)}")
        for key in ("context", "max_growth"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"framing {key} must be a finite number > 0, got {v!r}")
        v = self.mask_radius
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= _MAX_MASK_RADIUS):
            # beyond about 1.29 only the corners are touched, and from sqrt(2) on nothing: a record that does nothing
            raise ValueError(f"framing mask_radius must be None or a number in (0, {_MAX_MASK_RADIUS}], got {v!r}")
        if v is not None and self.name != "cell":
            raise ValueError(f"framing mask_radius needs the 'cell' framing (it masks around the nucleus), not {self.name!r}")

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if self.name == "as_given":
            return rgb
        return frame_cell(rgb, context=self.context, max_growth=self.max_growth, mask_radius=self.mask_radius)

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "work_size": _WORK_SIZE, "min_blue": _MIN_BLUE, "min_area": _MIN_AREA}
        if self.mask_radius is None:  # records written before the option existed read the same
            del out["mask_radius"]
        return out

    @classmethod
    def from_value(cls, value: Framing | str | dict | None) -> Framing:
        """A :class:`Framing` from itself, a name, or a record's dict (None: crops as given, as records before v5)."""
        if isinstance(value, Framing):
            return value
        if value is None:
            return cls("as_given")
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict):
            fixed = {"work_size": _WORK_SIZE, "min_blue": _MIN_BLUE, "min_area": _MIN_AREA}
            unknown = sorted(set(value) - set(fixed) - {"name", "context", "max_growth", "mask_radius"})
            if unknown:
                raise ValueError(f"framing recorded with settings {unknown} that this version of smearpipe does not know")
            differs = {k: value[k] for k in fixed if k in value and value[k] != fixed[k]}
            if differs:
                raise ValueError(f"framing recorded with nucleus-detection settings {differs} that this version of "
                                 f"smearpipe does not use ({fixed})")
            return cls(**{k: value[k] for k in ("name", "context", "max_growth", "mask_radius") if k in value})
        raise ValueError(f"framing must be a Framing, one of {list(FRAMINGS)} or a dict, got {value!r}")


def nucleus_box(rgb: np.ndarray) -> tuple[float, float, float, float] | None:
    """Box ``(x0, y0, x1, y1)`` of the WBC nucleus in ``rgb`` (crop pixels), or None when none is found.

    The nucleus is where blue exceeds green most (haematoxylin/azure stains the nucleus violet;
    red cells and background have blue close to green); an Otsu threshold separates it, and a
    threshold under 15 (of 255) means the crop has no violet region at all. Regions less than about
    8 % of the crop size apart (a closing with a disk of radius 4 on a 96 px copy) are merged, so
    the lobes of one nucleus count as one; of the regions left, the largest one near the centre wins
    (area divided by ``(1 + 4 d)^2``, ``d`` the distance from the centre in crop sizes).

    Raises
    ------
    InvalidImageError
        ``rgb`` is not an image (see :func:`~smearpipe.io.to_rgb_uint8` for what converts).
    """
    rgb = to_rgb_uint8(rgb, name="crop")
    h, w = rgb.shape[:2]
    f = _WORK_SIZE / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    blue = np.clip(small[..., 2].astype(np.int16) - small[..., 1].astype(np.int16), 0, 255).astype(np.uint8)
    t, mask = cv2.threshold(blue, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if t < _MIN_BLUE:  # nothing violet: no nucleus (red cells and background have blue within ~10 of green)
        return None
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    r = max(1, round(0.04 * _WORK_SIZE))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    n, _, stats, centroids = cv2.connectedComponentsWithStats(mask)
    if n <= 1:
        return None
    hh, ww = mask.shape
    area = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    dist = np.linalg.norm(centroids[1:] - [ww / 2, hh / 2], axis=1) / max(hh, ww)
    i = int(np.argmax(area / (1 + 4 * dist) ** 2))
    if area[i] < _MIN_AREA * hh * ww:
        return None
    x, y, bw, bh = (float(v) for v in stats[i + 1, :4])
    return x / f, y / f, (x + bw) / f, (y + bh) / f


def frame_cell(rgb: np.ndarray, *, context: float = 1.8, max_growth: float = 1.0,
               mask_radius: float | None = None) -> np.ndarray:
    """Square crop centred on the WBC nucleus; ``rgb`` itself (any shape) if no nucleus is found.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        A crop showing one WBC (any framing, any size; other dtypes and channel counts are converted
        as by :func:`~smearpipe.io.to_rgb_uint8`).
    context : float
        Side of the square relative to the nucleus's larger extent.
    max_growth : float
        The side is at most this times the crop's longer side (a crop clipped at a field's edge, or
        cut tighter than ``context``, is re-centred but not padded out).
    mask_radius : float or None
        If given, the disk of this many half-sides around the square's centre (the nucleus's) is kept, beyond
        1.1 times that radius the square takes the background colour, blended in between; see :class:`Framing`.

    Returns
    -------
    (S, S, 3) uint8 ndarray
        Outside ``rgb`` (and beyond ``mask_radius``), pixels take the median colour of its brightest tenth (the
        background between cells).

    Raises
    ------
    InvalidImageError
        ``rgb`` is not an image.

    Examples
    --------
    >>> import numpy as np, cv2
    >>> crop = np.full((300, 300, 3), (235, 215, 205), np.uint8)
    >>> _ = cv2.circle(crop, (150, 150), 30, (95, 60, 160), -1)    # a violet nucleus, 60 px wide
    >>> frame_cell(crop).shape
    (110, 110, 3)
    """
    Framing("cell", context, max_growth, mask_radius)  # validates the numbers
    rgb = to_rgb_uint8(rgb, name="crop")
    box = nucleus_box(rgb)
    if box is None:
        return rgb
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box
    side = max(1, int(round(min(context * max(x1 - x0, y1 - y0), max_growth * max(h, w)))))
    left, top = int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2))
    pad = max(0, -left, -top, left + side - w, top + side - h)
    fill = None
    if pad or mask_radius is not None:
        fill = estimate_background(rgb, percentile=90.0)
    if pad:
        rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=[float(v) for v in fill])
    out = np.ascontiguousarray(rgb[top + pad: top + pad + side, left + pad: left + pad + side])
    if mask_radius is None:
        return out
    yy, xx = np.mgrid[:side, :side]
    radius = mask_radius * side / 2
    keep = np.clip((1.1 * radius - np.hypot(xx - (side - 1) / 2, yy - (side - 1) / 2)) / (0.1 * radius), 0.0, 1.0)[..., None]
    return (out * keep + np.asarray(fill, np.float64) * (1.0 - keep)).round().astype(np.uint8)


def apply_framing(rgb: np.ndarray, framing: Framing | str | dict) -> np.ndarray:
    """``rgb`` reframed as a model was trained (a :class:`Framing`, its name, or its record dict)."""
    return Framing.from_value(framing)(rgb)
