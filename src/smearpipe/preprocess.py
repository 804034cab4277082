"""Preprocessing of smear images: median filtering, CLAHE, Macenko and Reinhard colour normalisation,
sharpness matching.

All functions take and return RGB uint8 ``(H, W, 3)`` arrays (see :mod:`smearpipe.io`).
:class:`Preprocessing` is a frozen, serialisable record of which steps run in which order
with which parameters; shipped weights store one so that inference always uses the
preprocessing the model was trained with.

References
----------
.. [1] M. Macenko et al., "A method for normalizing histology slides for quantitative
   analysis", IEEE ISBI 2009, pp. 1107-1110. doi:10.1109/ISBI.2009.5193250
.. [2] K. Zuiderveld, "Contrast limited adaptive histogram equalization",
   Graphics Gems IV, 1994.
.. [3] E. Reinhard, M. Ashikhmin, B. Gooch and P. Shirley, "Color transfer between images",
   IEEE Computer Graphics and Applications 21(5), 2001, pp. 34-41. doi:10.1109/38.946629
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from importlib import resources
from typing import Any, Literal

import cv2
import numpy as np

from .errors import NotFittedError, StainEstimationError
from .io import to_rgb_uint8

__all__ = [
    "median_filter",
    "clahe",
    "estimate_background",
    "MacenkoReference",
    "MacenkoNormalizer",
    "ReinhardReference",
    "reinhard_normalize",
    "field_reinhard_reference",
    "lab_statistics",
    "stained_mask",
    "sharpness",
    "match_sharpness",
    "Preprocessing",
    "STEPS",
]

STEPS = ("median", "clahe", "macenko", "reinhard", "sharpen")

# OpenCV's median filter of uint8 images counts window pixels in 16 bits: larger windows fail or are wrong
_MAX_MEDIAN_KSIZE = 255
# CLAHE tiles per side; OpenCV pads the image to a multiple of the grid and keeps a table per tile
_MAX_CLAHE_TILES = 256


def _check_ksize(ksize: Any, name: str = "ksize") -> int:
    """An odd integer median window in [1, 255] (:func:`median_filter`, ``Preprocessing.median_ksize``)."""
    if (isinstance(ksize, bool) or not isinstance(ksize, (int, np.integer)) or ksize < 1 or ksize % 2 == 0
            or ksize > _MAX_MEDIAN_KSIZE):
        raise ValueError(f"{name} must be an odd integer in [1, {_MAX_MEDIAN_KSIZE}], got {ksize!r}")
    return int(ksize)


def _check_tile_grid(tile_grid: Any, name: str = "tile_grid") -> tuple[int, int]:
    """Two integers in [1, 256] (:func:`clahe`, ``Preprocessing.clahe_tile_grid``)."""
    message = f"{name} must be two integers in [1, {_MAX_CLAHE_TILES}], got {tile_grid!r}"
    try:
        grid = tuple(int(t) for t in tile_grid)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(message) from None
    if len(grid) != 2 or min(grid) < 1 or max(grid) > _MAX_CLAHE_TILES:
        raise ValueError(message)
    return grid  # type: ignore[return-value]


def _check_image(image: np.ndarray) -> np.ndarray:
    # Fast path: the public functions accept exactly the smearpipe convention (with at least one
    # pixel), anything else goes through the converter, which raises InvalidImageError when it must.
    if (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.size):
        return image
    return to_rgb_uint8(image)


def median_filter(image: np.ndarray, *, ksize: int = 3) -> np.ndarray:
    """Median-filter each channel with a square ``ksize`` x ``ksize`` window (OpenCV ``medianBlur``).

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB image.
    ksize : int, optional
        Odd window size from 1 (returns a copy) to 255 (OpenCV's limit for uint8 images).

    Returns
    -------
    filtered : (H, W, 3) uint8 ndarray

    Raises
    ------
    ValueError
        If ``ksize`` is not an odd integer in [1, 255].
    InvalidImageError
        If ``image`` is not RGB uint8 ``(H, W, 3)`` (or convertible, see :mod:`smearpipe.io`).

    Examples
    --------
    >>> import numpy as np
    >>> median_filter(np.zeros((8, 8, 3), np.uint8), ksize=5).shape
    (8, 8, 3)
    """
    ksize = _check_ksize(ksize)
    image = _check_image(image)
    if ksize == 1:
        return image.copy()
    return cv2.medianBlur(image, int(ksize))


def clahe(
    image: np.ndarray, *, clip_limit: float = 2.0, tile_grid: tuple[int, int] = (8, 8)
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the lightness channel.

    The image is converted to CIE L*a*b*, CLAHE is applied to L* only and the result is
    converted back, so hues (the stain colours) are preserved.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB image.
    clip_limit : float, optional
        Contrast limit (OpenCV ``clipLimit``), > 0.
    tile_grid : (int, int), optional
        Number of tiles (rows, columns), each from 1 to 256 (more tiles than pixels are allowed:
        OpenCV pads the image).

    Returns
    -------
    enhanced : (H, W, 3) uint8 ndarray

    Raises
    ------
    ValueError
        For a non-positive ``clip_limit`` or a malformed ``tile_grid``.

    Examples
    --------
    >>> import numpy as np
    >>> clahe(np.full((16, 16, 3), 128, np.uint8)).dtype
    dtype('uint8')
    """
    try:
        clip = float(clip_limit)
    except (TypeError, ValueError):
        raise ValueError(f"clip_limit must be a positive number, got {clip_limit!r}") from None
    if not np.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip_limit must be a positive number, got {clip_limit!r}")
    grid = _check_tile_grid(tile_grid)
    image = _check_image(image)
    op = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid[1], grid[0]))  # per call: cv2.CLAHE is stateful
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = op.apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


# ----------------------------------------------------------------------------- Macenko

_MAX_FIT_PIXELS = 20_000  # pixels used for estimating stain vectors / concentrations
_MIN_STAINED_PIXELS = 50
_MIN_BACKGROUND = 60.0  # an image whose brightest pixels are darker than this has no usable background


def _subsample(image: np.ndarray, max_pixels: int = _MAX_FIT_PIXELS) -> np.ndarray:
    flat = image.reshape(-1, 3)
    step = max(1, flat.shape[0] // max_pixels)
    return flat[::step]


def estimate_background(image: np.ndarray, *, percentile: float = 95.0) -> np.ndarray:
    """Estimate the per-channel intensity of unstained background (plasma / glass).

    Blood smears, unlike H&E tissue, show a lot of light background; its colour depends on
    the lamp, the camera's white balance and the stain. The estimate is the per-channel
    median of the pixels whose mean intensity is at or above the given percentile.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
    percentile : float, optional
        Brightness percentile defining "background" pixels.

    Returns
    -------
    background : (3,) float64 ndarray
        RGB intensities in ``[0, 255]``.
    """
    image = _check_image(image)
    pixels = _subsample(image, _MAX_FIT_PIXELS)
    lum = pixels.sum(axis=1, dtype=np.int32)
    bright = pixels[lum >= np.percentile(lum, percentile)]
    return np.median(bright, axis=0).astype(np.float64)


def _od_lut(background: np.ndarray) -> np.ndarray:
    """(3, 256) table: optical density of each uint8 value for each channel, >= 0."""
    values = np.arange(256, dtype=np.float64)[None, :]
    od = -np.log((values + 1.0) / (np.asarray(background, np.float64)[:, None] + 1.0))
    return np.maximum(od, 0.0)


def _optical_density(pixels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return np.stack([lut[c][pixels[:, c]] for c in range(3)], axis=1)


@dataclass(frozen=True)
class MacenkoReference:
    """Fitted Macenko parameters of a reference (target) appearance.

    Attributes
    ----------
    stain_matrix : ((float, float, float), (float, float, float))
        Unit optical-density vectors (R, G, B) of the two stains; row 0 is the basophilic
        (azure / methylene blue, nuclear) stain, row 1 the acidophilic (eosin) stain.
    max_concentrations : (float, float)
        99th percentile of each stain's concentration over stained pixels.
    background : (float, float, float)
        RGB intensity of unstained background.
    source : str
        How the reference was made.
    """

    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_concentrations: tuple[float, float]
    background: tuple[float, float, float]
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MacenkoReference:
        try:
            sm = tuple(tuple(float(v) for v in row) for row in data["stain_matrix"])
            mc = tuple(float(v) for v in data["max_concentrations"])
            bg = tuple(float(v) for v in data["background"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed Macenko reference: {exc!r}") from None
        if len(sm) != 2 or any(len(r) != 3 for r in sm) or len(mc) != 2 or len(bg) != 3:
            raise ValueError("malformed Macenko reference: expected a 2x3 stain_matrix, 2 max_concentrations, 3 background values")
        return cls(sm, mc, bg, str(data.get("source", "")))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _StainEstimate:
    background: np.ndarray  # (3,)
    stain_matrix: np.ndarray  # (2, 3)
    max_concentrations: np.ndarray  # (2,)


def _estimate_stains(
    images: Sequence[np.ndarray], *, beta: float, alpha: float, background: Any
) -> _StainEstimate:
    ods, backgrounds = [], []
    for image in images:
        bg = estimate_background(image) if background is None else np.broadcast_to(
            np.asarray(background, np.float64), (3,)
        )
        if bg.mean() < _MIN_BACKGROUND:
            raise StainEstimationError(
                f"no bright background found (estimated background RGB {np.round(bg, 1).tolist()}); "
                "Macenko normalisation needs unstained background pixels"
            )
        od = _optical_density(_subsample(image), _od_lut(bg))
        ods.append(od[np.linalg.norm(od, axis=1) > beta])
        backgrounds.append(bg)
    od = np.concatenate(ods)
    if od.shape[0] < _MIN_STAINED_PIXELS:
        raise StainEstimationError(
            f"too few stained pixels to estimate stain vectors: {od.shape[0]} with optical density > {beta} "
            f"(need at least {_MIN_STAINED_PIXELS}); is the image blank?"
        )
    # Plane of the two largest principal directions of the optical densities (Macenko step 3-4).
    cov = np.cov(od, rowvar=False)
    if not np.all(np.isfinite(cov)):
        raise StainEstimationError("optical densities are not finite")
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, [2, 1]]
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # eigenvector signs are arbitrary
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2])
    stains *= np.where(stains.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    # Deterministic order for Romanowsky stains (Wright, Giemsa, May-Grunwald-Giemsa). The hue
    # of the dyes differs between labs and cameras (BCCD nuclei are blue-violet, PBC nuclei
    # purple-magenta), so no fixed colour rule orders them; what holds everywhere is that
    # nuclei are the densest stained structure of a smear. Nuclear stain first: the extreme
    # vector closest in angle to the darkest 2 % of stained pixels.
    density = np.linalg.norm(od, axis=1)
    dark_phi = np.median(phi[density >= np.percentile(density, 98)])
    order = [0, 1] if abs(dark_phi - lo) <= abs(dark_phi - hi) else [1, 0]
    stains = stains[order]
    cos_angle = float(np.clip(stains[0] @ stains[1], -1.0, 1.0))
    if np.degrees(np.arccos(cos_angle)) < 1.0:
        raise StainEstimationError(
            "stain vectors are (nearly) collinear: the image shows a single colour, two stains cannot be separated"
        )
    conc = od @ np.linalg.pinv(stains)
    max_conc = np.percentile(conc, 99, axis=0)
    if not np.all(np.isfinite(max_conc)) or np.any(max_conc <= 1e-6):
        raise StainEstimationError(f"degenerate stain concentrations (99th percentiles {max_conc.tolist()})")
    return _StainEstimate(np.median(np.stack(backgrounds), axis=0), stains, max_conc)


class MacenkoNormalizer:
    """Macenko stain normalisation adapted to Romanowsky-stained blood smears.

    Differences from the H&E formulation of [1]_ (and from torchstain / StainTools):

    * the background intensity is estimated per image and per channel
      (:func:`estimate_background`) instead of assuming 240 for all channels, so a
      differently white-balanced camera maps background to background;
    * stained pixels are selected by the norm of their optical density, which keeps the
      pale, eosin-only red cells that a per-channel threshold discards;
    * the two stain vectors are ordered deterministically: nuclear (the extreme closest to
      the densest stained pixels, which are nuclei in a smear) first, eosin second;
    * images without enough stained pixels raise :class:`StainEstimationError`
      (or are returned unchanged with ``on_failure="passthrough"``).

    The transform is computed with per-channel 256-entry lookup tables, so it costs a few
    gathers and multiplies per pixel.

    Parameters
    ----------
    beta : float, optional
        Optical-density norm above which a pixel counts as stained.
    alpha : float, optional
        Percentile (in %) of the angle distribution used for the robust extreme stain vectors.

    References
    ----------
    .. [1] M. Macenko et al., "A method for normalizing histology slides for quantitative
       analysis", IEEE ISBI 2009.

    Examples
    --------
    >>> from smearpipe.io import read_image                     # doctest: +SKIP
    >>> norm = MacenkoNormalizer.default()                      # doctest: +SKIP
    >>> out = norm.transform(read_image("field.jpg"))           # doctest: +SKIP
    """

    def __init__(self, *, beta: float = 0.15, alpha: float = 1.0) -> None:
        if not (beta > 0):
            raise ValueError(f"beta must be > 0, got {beta!r}")
        if not (0 <= alpha < 50):
            raise ValueError(f"alpha must be in [0, 50), got {alpha!r}")
        self.beta = float(beta)
        self.alpha = float(alpha)
        self._reference: MacenkoReference | None = None

    def __repr__(self) -> str:
        state = "fitted" if self._reference is not None else "not fitted"
        return f"MacenkoNormalizer(beta={self.beta}, alpha={self.alpha}; {state})"

    # -- fitting ------------------------------------------------------------------------
    def fit(
        self,
        image_or_list: np.ndarray | Iterable[np.ndarray],
        *,
        background: Sequence[float] | float | None = None,
        source: str = "",
    ) -> MacenkoNormalizer:
        """Fit the target appearance to one image or to several images together.

        Parameters
        ----------
        image_or_list : (H, W, 3) uint8 ndarray or iterable of them
        background : float or (3,) floats, optional
            Known background intensity; estimated per image when None.
        source : str, optional
            Free-text provenance stored in :attr:`reference`.

        Returns
        -------
        self

        Raises
        ------
        StainEstimationError
            If the images have too few stained pixels or no bright background.
        """
        if isinstance(image_or_list, np.ndarray) and image_or_list.ndim <= 3:
            images = [_check_image(image_or_list)]  # one image (invalid layouts raise InvalidImageError)
        else:
            images = [_check_image(im) for im in image_or_list]
        if not images:
            raise ValueError("fit() needs at least one image")
        est = _estimate_stains(images, beta=self.beta, alpha=self.alpha, background=background)
        self._reference = MacenkoReference(
            stain_matrix=tuple(tuple(float(v) for v in row) for row in est.stain_matrix),  # type: ignore[arg-type]
            max_concentrations=tuple(float(v) for v in est.max_concentrations),  # type: ignore[arg-type]
            background=tuple(float(v) for v in est.background),  # type: ignore[arg-type]
            source=source or f"fitted on {len(images)} image(s)",
        )
        return self

    @classmethod
    def from_reference(cls, reference: MacenkoReference | Mapping[str, Any], **kwargs: Any) -> MacenkoNormalizer:
        """A normaliser with a previously fitted (e.g. stored) reference."""
        self = cls(**kwargs)
        self._reference = reference if isinstance(reference, MacenkoReference) else MacenkoReference.from_dict(reference)
        return self

    @classmethod
    def default(cls) -> MacenkoNormalizer:
        """The normaliser fitted to the shipped PBC reference.

        The reference was fitted by ``scripts/fit_macenko_reference.py`` on images of the
        PBC ``train`` split (CellaVision DM96, May-Grunwald-Giemsa); its ``source`` field
        says exactly which.
        """
        return cls.from_reference(default_reference())

    @property
    def reference(self) -> MacenkoReference:
        """The fitted target parameters."""
        if self._reference is None:
            raise NotFittedError("MacenkoNormalizer is not fitted; call fit() or use MacenkoNormalizer.default()")
        return self._reference

    # -- transforming -------------------------------------------------------------------
    def transform(
        self, image: np.ndarray, *, on_failure: Literal["raise", "passthrough"] = "raise"
    ) -> np.ndarray:
        """Map ``image`` to the reference stain appearance.

        Parameters
        ----------
        image : (H, W, 3) uint8 ndarray
        on_failure : {"raise", "passthrough"}
            What to do when the stains of ``image`` cannot be estimated (blank, single-colour
            or background-free images): raise :class:`StainEstimationError`, or return an
            unchanged copy.

        Returns
        -------
        normalised : (H, W, 3) uint8 ndarray
        """
        if on_failure not in ("raise", "passthrough"):
            raise ValueError(f"on_failure must be 'raise' or 'passthrough', got {on_failure!r}")
        ref = self.reference
        image = _check_image(image)
        try:
            src = _estimate_stains([image], beta=self.beta, alpha=self.alpha, background=None)
        except StainEstimationError:
            if on_failure == "passthrough":
                return image.copy()
            raise
        # OD_out = OD_src @ pinv(S_src) @ diag(scale) @ S_ref is one 3x3 matrix M applied per
        # pixel; with the background in the log domain the whole transform is
        # out = exp(log(I_ref) - OD_lut[v] @ M): a table lookup, an affine 3x3 map and an exp,
        # each a single multithreaded OpenCV call on float32.
        ref_stains = np.asarray(ref.stain_matrix, np.float64)
        scale = np.asarray(ref.max_concentrations, np.float64) / src.max_concentrations
        m = np.linalg.pinv(src.stain_matrix) @ (scale[:, None] * ref_stains)  # (3 in, 3 out)
        affine = np.concatenate([-m.T, np.log(np.asarray(ref.background, np.float64) + 1.0)[:, None]], axis=1)
        lut = _od_lut(src.background).T.astype(np.float32).reshape(1, 256, 3)
        od = cv2.LUT(image, lut)
        log_out = cv2.transform(od, affine.astype(np.float32))
        np.clip(log_out, -60.0, 30.0, out=log_out)  # degenerate estimates saturate, never overflow
        out = cv2.exp(log_out)
        out -= 1.0  # inverse of the +1 in the optical density
        return cv2.convertScaleAbs(out)  # rounds and saturates to uint8; values are >= -1

    def fit_transform(self, image: np.ndarray) -> np.ndarray:
        """Fit on ``image`` and transform it (mostly useful for testing)."""
        return self.fit(image).transform(image)


_DEFAULT_REFERENCE_FILE = "macenko_reference_pbc.json"


def default_reference() -> MacenkoReference:
    """The shipped PBC Macenko reference (see :meth:`MacenkoNormalizer.default`)."""
    text = resources.files("smearpipe").joinpath("data", _DEFAULT_REFERENCE_FILE).read_text()
    return MacenkoReference.from_dict(json.loads(text)["reference"])


# ----------------------------------------------------------------------------- Reinhard

@dataclass(frozen=True)
class ReinhardReference:
    """Target colour statistics of :func:`reinhard_normalize`: per-channel mean and standard deviation in CIE L*a*b*.

    ``mean`` and ``std`` are in L* (0-100), a*, b* units: the average over reference images of each
    image's own statistics. ``source`` says how they were obtained. ``region`` says over which pixels
    the statistics are taken, of the reference images and of every image normalised onto them:
    ``"all"`` (every pixel of the lit field), or ``"stained"`` (cells only: pixels that differ from the image's
    own background colour, :func:`estimate_background`, by a colour distance of at least 10 and are not
    black; see :func:`stained_mask`). With ``"stained"``, how much bare glass or padding a field shows
    (a sparse area of the smear, a shrunk field on a canvas) no longer changes the mapping. In both, black
    reaching the image's edge (outside the lit field: a photo's eyepiece circle, black padding) is left out
    where it is more than 1 % of the image (:func:`reinhard_normalize`). An image with fewer than 1 % of its lit
    field stained (a blank one) uses the statistics of its whole lit field.

    ``min_stained_fraction`` (with ``region="all"`` only) keeps the statistics of all pixels for images
    like the reference images, but caps how much bare background can weigh: where stained pixels
    (:func:`stained_mask`) make up less than this fraction of an image's lit field, its background pixels are
    down-weighted so that they do (the pooled mean and variance of the two groups at that share). A field
    from a sparse area of the smear, or a shrunk field on a canvas, is then mapped as a field with the
    reference's least stained share would be, while every image at or above it keeps the plain statistics.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = ""
    region: str = "all"
    min_stained_fraction: float | None = None

    def __post_init__(self) -> None:
        try:
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std)
        except (TypeError, ValueError):
            raise ValueError(f"malformed Reinhard reference: mean={self.mean!r}, std={self.std!r}") from None
        if len(mean) != 3 or len(std) != 3 or not all(np.isfinite(mean + std)) or min(std) <= 0:
            raise ValueError(f"Reinhard reference needs 3 finite means and 3 positive stds, got mean={mean}, std={std}")
        if self.region not in _REINHARD_REGIONS:
            raise ValueError(f"Reinhard reference region must be one of {_REINHARD_REGIONS}, got {self.region!r}")
        if self.min_stained_fraction is not None:
            f = self.min_stained_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float, np.floating)) or not _STAINED_MIN_FRACTION < f < 1:
                raise ValueError(f"min_stained_fraction must be a number in ({_STAINED_MIN_FRACTION}, 1), got {f!r}")
            if self.region != "all":
                raise ValueError(f"min_stained_fraction is for region 'all', not {self.region!r}")
            object.__setattr__(self, "min_stained_fraction", float(f))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        d = {"mean": list(self.mean), "std": list(self.std), "source": self.source}
        if self.region != "all":  # records written before regions existed stay byte-identical
            d["region"] = self.region
        if self.min_stained_fraction is not None:
            d["min_stained_fraction"] = self.min_stained_fraction
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReinhardReference:
        unknown = set(data) - {"mean", "std", "source", "region", "min_stained_fraction"}
        if unknown or not {"mean", "std"} <= set(data):
            raise ValueError("a Reinhard reference has keys mean, std (and source, region, min_stained_fraction), "
                             f"got {sorted(data)}")
        return cls(mean=data["mean"], std=data["std"], source=str(data.get("source", "")),
                   region=str(data.get("region", "all")), min_stained_fraction=data.get("min_stained_fraction"))


_REINHARD_REGIONS = ("all", "stained")
# "stained" pixels: at least this CIE76 colour distance from the background colour, and not black (L* >= this)
_STAINED_MIN_DELTA_E = 10.0
_STAINED_MIN_L = 15.0
_STAINED_MIN_DIST2 = np.nextafter(np.float32(_STAINED_MIN_DELTA_E ** 2), np.float32(0))  # see _far_from
# fewer stained pixels than this fraction (a blank image): statistics of all pixels instead
_STAINED_MIN_FRACTION = 0.01
# Black outside the lit field (the surround of an eyepiece's circle in a photo through it, a dark frame, black
# padding): pixels darker than _UNLIT_MAX_L connected to the image's edge, left out of the statistics where they
# are more than _UNLIT_MAX_SHARE of the image, their median is under _UNLIT_BLACK_L (black, also a noisy surround of
# RGB 12 +- 3 at L* 3.3; not the dark nuclei of an underexposed field: 5.0 or more on 46 BCCD fields at 0.1x brightness) and at least _UNLIT_MIN_LIT of the image stays lit. None of the 364 BCCD fields, the 351
# BCCD crops and every fifth PBC image (2,060) has more than 0.001 % of pixels under L* 10 at all.
_UNLIT_MAX_L = 10.0
_UNLIT_BLACK_L = 4.5
_UNLIT_MAX_SHARE = 0.01
_UNLIT_MIN_LIT = 0.05


def _lit_mask(lightness: np.ndarray) -> np.ndarray | None:
    """(H, W) bool: the pixels Reinhard statistics use, from an L* channel; None for all of them.

    Left out: pixels darker than ``_UNLIT_MAX_L`` connected (8-neighbourhood) to the image's edge, where they are
    more than ``_UNLIT_MAX_SHARE`` of the image, black (median L* under ``_UNLIT_BLACK_L``) and at most
    ``1 - _UNLIT_MIN_LIT`` of it, in an image at least 3 px on each side. Dark pixels of the field itself (the
    nuclei of an underexposed field, even where a cell is cut by the edge; a field dark all over) stay."""
    if min(lightness.shape) < 3:
        return None  # every pixel of a strip touches its edge
    dark = lightness < _UNLIT_MAX_L
    n_dark = int(np.count_nonzero(dark))
    if n_dark <= _UNLIT_MAX_SHARE * dark.size:
        return None
    _, labels = cv2.connectedComponents(dark.view(np.uint8), connectivity=8)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    unlit = np.isin(labels, edge[edge > 0])
    n_unlit = int(np.count_nonzero(unlit))
    if not _UNLIT_MAX_SHARE * dark.size < n_unlit <= (1 - _UNLIT_MIN_LIT) * dark.size:
        return None
    if float(np.median(lightness[unlit])) >= _UNLIT_BLACK_L:
        return None
    return ~unlit


_REINHARD_REFERENCE_FILE = "reinhard_reference_pbc.json"

# An image whose channel barely varies (a blank crop) is shifted, not stretched: noise is not amplified.
_REINHARD_MIN_STD = 1.0


@lru_cache(maxsize=4)
def _packaged_reinhard_reference(filename: str) -> ReinhardReference:
    text = resources.files("smearpipe").joinpath("data", filename).read_text()
    return ReinhardReference.from_dict(json.loads(text)["reference"])


@lru_cache(maxsize=1)
def default_reinhard_reference() -> ReinhardReference:
    """The shipped PBC reference of :func:`reinhard_normalize` (fitted by ``scripts/fit_reinhard_reference.py``)."""
    return _packaged_reinhard_reference(_REINHARD_REFERENCE_FILE)


_FIELD_REFERENCE_FILES = {"all": "reinhard_reference_bccd_fields.json",
                          "stained": "reinhard_reference_bccd_fields_stained.json"}


def field_reinhard_reference(region: str = "all") -> ReinhardReference:
    """The average BCCD training field (whole 640x480 fields, not crops), the detector's reference.

    Fitted by ``scripts/fit_reinhard_reference.py --bccd-fields [--region stained]`` on the 292 BCCD
    trainval fields. A detector whose record has the ``"reinhard"`` step with this reference sees every
    field, from any lab, with BCCD's colour statistics.

    Parameters
    ----------
    region : {"all", "stained"}
        Statistics of whole fields, or of their stained pixels only (:class:`ReinhardReference`).

    Returns
    -------
    ReinhardReference

    Raises
    ------
    ValueError
        For another ``region``.

    Examples
    --------
    >>> ref = field_reinhard_reference()
    >>> field = np.full((48, 64, 3), (200, 170, 190), np.uint8)
    >>> field[10:30, 20:40] = (90, 60, 140)                       # a dark purple cell on pale background
    >>> out = reinhard_normalize(field, reference=ref)
    >>> bool(np.allclose(lab_statistics(out)[0], ref.mean, atol=2))
    True
    """
    if region not in _FIELD_REFERENCE_FILES:
        raise ValueError(f"region must be one of {tuple(_FIELD_REFERENCE_FILES)}, got {region!r}")
    return _packaged_reinhard_reference(_FIELD_REFERENCE_FILES[region])


def lab_statistics(image: np.ndarray, *, region: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of an RGB uint8 image in CIE L*a*b* (L* 0-100).

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB.
    region : {"all", "stained"}
        All pixels of the lit field, or the stained ones only (:func:`stained_mask`; the whole lit field when
        fewer than 1 % of it are stained), as :class:`ReinhardReference` ``region`` defines them.

    Returns
    -------
    mean, std : (3,) float64 ndarray

    Raises
    ------
    ValueError
        For another ``region``.
    """
    if region not in _REINHARD_REGIONS:
        raise ValueError(f"region must be one of {_REINHARD_REGIONS}, got {region!r}")
    _, mean, std = _lab_with_statistics(_check_image(image), region=region)
    return mean, std


def stained_mask(image: np.ndarray) -> np.ndarray:
    """Pixels of stained cells: unlike the image's background colour and not black.

    A pixel counts when its CIE76 colour distance (L*a*b*) from :func:`estimate_background` is at
    least 10 and its L* is at least 15 (so black borders, such as a field stop's, are left out).

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB.

    Returns
    -------
    (H, W) bool ndarray

    Examples
    --------
    >>> field = np.full((40, 40, 3), (225, 220, 230), np.uint8)   # pale glass
    >>> field[10:20, 10:20] = (200, 120, 130)                     # a red cell
    >>> field[:, :5] = 0                                          # black border
    >>> int(stained_mask(field).sum())
    100
    """
    image = _check_image(image)
    return _stained(image, _to_lab(image))


def _to_lab(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 CIE L*a*b* (L* 0-100) of an RGB uint8 image."""
    return cv2.cvtColor(np.multiply(image, np.float32(1 / 255), dtype=np.float32), cv2.COLOR_RGB2LAB)


def _stained(image: np.ndarray, lab: np.ndarray) -> np.ndarray:
    bg = np.multiply(estimate_background(image), 1 / 255).astype(np.float32).reshape(1, 1, 3)
    bg_lab = cv2.cvtColor(bg, cv2.COLOR_RGB2LAB).reshape(3)
    return _far_from(lab, bg_lab) & (lab[..., 0] >= _STAINED_MIN_L)


def _far_from(lab: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """(H, W) bool: CIE76 distance of each float32 L*a*b* pixel from ``colour`` >= ``_STAINED_MIN_DELTA_E``.

    The mask ``np.linalg.norm(lab - colour, axis=2) >= delta`` gives, in OpenCV (several times faster on a field)
    with the same float32 steps: squares summed in channel order, and float32 sqrt(s) >= delta written as s >= the
    float32 just below delta ** 2, which float32 sqrt rounds up to delta (tests/test_preprocess.py).
    """
    diff = cv2.subtract(lab, _scalar(colour))
    sq = cv2.split(cv2.multiply(diff, diff))
    return cv2.add(cv2.add(sq[0], sq[1]), sq[2]) >= _STAINED_MIN_DIST2


def _lab_with_statistics(image: np.ndarray, *, region: str = "all", min_stained_fraction: float | None = None,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) float32 L*a*b* of an RGB uint8 image, and its per-channel mean and standard deviation
    over ``region`` (all pixels, or the stained ones when there are enough), with the background's weight
    capped by ``min_stained_fraction`` (:class:`ReinhardReference`). The black outside the lit field is left out
    (:func:`_lit_mask`): the black around a photo's eyepiece circle would otherwise darken and stretch every colour
    of the field."""
    lab = _to_lab(image)
    lit = _lit_mask(lab[..., 0])
    n_lit = lab.shape[0] * lab.shape[1] if lit is None else int(np.count_nonzero(lit))
    mask = None if lit is None else lit.view(np.uint8)
    if region == "stained" or min_stained_fraction is not None:
        stained = _stained(image, lab)  # never black (L* >= _STAINED_MIN_L)
        share = np.count_nonzero(stained) / n_lit
        background = ~stained if lit is None else lit & ~stained
        if region == "stained" and share >= _STAINED_MIN_FRACTION:
            mask = stained.view(np.uint8)
        elif region == "all" and min_stained_fraction is not None and _STAINED_MIN_FRACTION <= share < min_stained_fraction:
            m_s, s_s = (v.ravel() for v in cv2.meanStdDev(lab, mask=stained.view(np.uint8)))
            m_b, s_b = (v.ravel() for v in cv2.meanStdDev(lab, mask=background.view(np.uint8)))
            p = min_stained_fraction  # pooled statistics with the stained pixels at this share
            mean = p * m_s + (1 - p) * m_b
            std = np.sqrt(p * (s_s ** 2 + (m_s - mean) ** 2) + (1 - p) * (s_b ** 2 + (m_b - mean) ** 2))
            return lab, mean, std
    mean, std = cv2.meanStdDev(lab, mask=mask)  # float64 accumulation like numpy's, several times faster
    return lab, mean.ravel(), std.ravel()


def _scalar(values: Any) -> tuple[float, float, float, float]:
    """Three per-channel values as an OpenCV scalar, each first rounded to float32 (as numpy's float32 arithmetic
    would use them)."""
    a, b, c = (float(v) for v in np.asarray(values, np.float64).astype(np.float32))
    return a, b, c, 0.0


def reinhard_normalize(image: np.ndarray, *, reference: ReinhardReference | Mapping[str, Any] | None = None
                       ) -> np.ndarray:
    """Map an image's colour statistics onto a reference's (Reinhard et al. 2001 [3]_).

    Each L*a*b* channel is shifted and scaled so that the image's mean and standard deviation become
    the reference's. Unlike Macenko, nothing is estimated that can fail: it removes global differences
    of brightness, contrast and colour cast between labs and cameras, which is what makes a classifier
    trained in one lab call every cell of another lab the same type (see ``reports/cross_lab``).
    Applied to each WBC crop (the ``"reinhard"`` step of :class:`Preprocessing`), the result does not
    depend on the crop's lab-wide brightness or contrast. Black outside the lit field (pixels darker than
    L* 10 connected to the image's edge, black as a whole, more than 1 % and at most 95 % of the image: the
    surround of a photo's eyepiece circle, black padding) is left out of the statistics; the dark nuclei of an
    underexposed image are not, even where a cell is cut by the edge.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB.
    reference : ReinhardReference or mapping, optional
        Target statistics (a mapping as :meth:`ReinhardReference.to_dict` writes it is read with
        :meth:`ReinhardReference.from_dict`); the shipped PBC reference by default.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        RGB, same shape.

    Raises
    ------
    InvalidImageError
        ``image`` is not an RGB uint8 array.
    TypeError
        ``reference`` is neither a ReinhardReference, a mapping nor None.
    ValueError
        ``reference`` is a malformed mapping.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.integers(60, 200, (32, 32, 3), dtype=np.uint8)
    >>> darker = (img * 0.7).astype(np.uint8)
    >>> a, b = reinhard_normalize(img), reinhard_normalize(darker)
    >>> bool(np.abs(a.astype(int) - b.astype(int)).mean() < 3)
    True
    """
    if isinstance(reference, Mapping):
        reference = ReinhardReference.from_dict(reference)
    elif reference is not None and not isinstance(reference, ReinhardReference):
        raise TypeError(f"reference must be a ReinhardReference, a mapping with its fields or None, "
                        f"got {type(reference).__name__}")
    image = _check_image(image)
    ref = reference if reference is not None else default_reinhard_reference()
    lab, mean, std = _lab_with_statistics(image, region=ref.region, min_stained_fraction=ref.min_stained_fraction)
    scale = np.asarray(ref.std) / np.maximum(std, _REINHARD_MIN_STD)
    # (lab - mean) * scale + reference mean, each step rounded to float32 as numpy would, but per channel by
    # OpenCV: 4x faster on a 640x480 field, the same values (tests/test_preprocess.py)
    out = cv2.add(cv2.multiply(cv2.subtract(lab, _scalar(mean)), _scalar(scale)), _scalar(ref.mean))
    np.clip(out[..., 0], 0.0, 100.0, out=out[..., 0])
    rgb = cv2.cvtColor(out, cv2.COLOR_LAB2RGB)
    np.maximum(rgb, 0.0, out=rgb)  # then x 255, rounded half to even and saturated at 255 (as np.rint + clip)
    return cv2.convertScaleAbs(rgb, alpha=255.0)


# ----------------------------------------------------------------------------- sharpness

_MAX_SHARPEN_AMOUNT = 20.0
_MAX_SHARPEN_SIGMA = 100.0  # px; the Gaussian has 8 * sigma + 1 taps
_AMOUNT_STEP = 0.05


def _check_sharpen_args(target: Any, sigma: Any, max_amount: Any) -> tuple[float, float, float]:
    """Validate the parameters of :func:`match_sharpness` (and its torch twin); returns them as floats.

    Raises TypeError for non-numbers, ValueError for values that are not finite and > 0 (``sigma`` at
    most 100, ``max_amount`` at most 20).
    """
    out = []
    for name, value in (("target", target), ("sigma", sigma), ("max_amount", max_amount)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"sharpening {name} must be a real number, got {type(value).__name__}")
        value = float(value)
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"sharpening {name} must be finite and > 0, got {value!r}")
        out.append(value)
    if out[1] > _MAX_SHARPEN_SIGMA:
        raise ValueError(f"sharpening sigma must be at most {_MAX_SHARPEN_SIGMA} px, got {out[1]!r}")
    if out[2] > _MAX_SHARPEN_AMOUNT:
        raise ValueError(f"sharpening max_amount must be at most {_MAX_SHARPEN_AMOUNT}, got {out[2]!r}")
    return out[0], out[1], out[2]


def _gaussian_ksize(sigma: float) -> int:
    """Side of the Gaussian kernel of the sharpening step: OpenCV's choice for float images, made explicit so
    that :func:`match_sharpness` and its torch twin use the same kernel."""
    return int(round(sigma * 8 + 1)) | 1


def _sharpness_of_grey(grey: np.ndarray, lap: np.ndarray | None = None) -> float:
    """:func:`sharpness` of a float32 grey image (``lap``: its Laplacian, if already computed)."""
    spread = float(grey.std())
    if spread < 1e-6:
        return 0.0
    return float((cv2.Laplacian(grey, cv2.CV_32F) if lap is None else lap).std()) / spread


def sharpness(image: np.ndarray) -> float:
    """How sharp an image is, independent of its contrast.

    The standard deviation of the Laplacian of the grey levels (mean of R, G, B) divided by their standard
    deviation. It depends on the image size: compare images of one size (e.g. crops resized to a
    classifier's input, where :func:`match_sharpness` runs).

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB image.

    Returns
    -------
    float
        >= 0; 0 for a flat image.

    Raises
    ------
    InvalidImageError
        ``image`` is not an RGB uint8 array.

    Examples
    --------
    >>> import cv2, numpy as np
    >>> crisp = np.zeros((64, 64, 3), np.uint8); crisp[16:48, 16:48] = 200
    >>> sharpness(cv2.GaussianBlur(crisp, (0, 0), 2.0)) < sharpness(crisp)
    True
    """
    return _sharpness_of_grey(_check_image(image).astype(np.float32).mean(axis=2))


def _second_moments(u: np.ndarray, v: np.ndarray) -> list[float]:
    """``(var(u), cov(u, v), var(v))`` over all pixels."""
    u, v = (u - u.mean()).astype(np.float64), (v - v.mean()).astype(np.float64)
    return [float((u * u).mean()), float((u * v).mean()), float((v * v).mean())]


def _sharpening_amounts(lap_moments: np.ndarray, grey_moments: np.ndarray, *, target: float,
                        max_amount: float) -> np.ndarray:
    """The amounts :func:`match_sharpness` chooses, from second moments (shared with its torch twin).

    The sharpened grey image is ``grey + a * detail`` and, the Laplacian being linear, its Laplacian
    ``lap + a * lap_detail``: the sharpness of every candidate amount follows from the moments
    ``(var(lap), cov(lap, lap_detail), var(lap_detail))`` and ``(var(grey), cov(grey, detail), var(detail))``,
    each ``(N, 3)``, without sharpening an image once per amount. Returns ``(N,)`` amounts: the smallest
    multiple of 0.05 that reaches ``target`` (0 for images already as sharp, and flat ones), else ``max_amount``.
    """
    amounts = np.append(np.arange(0.0, max_amount, _AMOUNT_STEP), max_amount)[None]
    (l0, l1, l2), (g0, g1, g2) = (np.asarray(m, np.float64).T[:, :, None] for m in (lap_moments, grey_moments))
    reached = l0 + 2 * amounts * l1 + amounts**2 * l2 >= target**2 * (g0 + 2 * amounts * g1 + amounts**2 * g2)
    return np.where(reached.any(axis=1), amounts[0, reached.argmax(axis=1)], max_amount)


def match_sharpness(image: np.ndarray, *, target: float = 0.45, sigma: float = 2.0,
                    max_amount: float = 4.0) -> np.ndarray:
    """Sharpen an image that is blurrier than ``target`` until it is not; sharper images are returned unchanged.

    Cameras and optics differ between labs: at a classifier's 64 px input, BCCD's WBC crops have a median
    :func:`sharpness` of 0.38, PBC's 0.58. A network trained on one lab's sharp crops then reads another
    lab's soft ones as different cells (BCCD lymphocytes, blurred into even discs, were called monocytes).
    This step evens that out the way Reinhard normalisation evens out colour: an unsharp mask
    ``image + a * (image - gaussian(image, sigma))`` with the smallest amount ``a`` (in steps of 0.05,
    at most ``max_amount``) that brings the sharpness (before rounding to uint8) to at least ``target``.
    It never blurs: where rounding to 0-255 would leave the result less sharp than the image (tiny or
    nearly black images), the image is returned unchanged. The torch twin
    (:func:`~smearpipe.augment.match_sharpness_batch`, no rounding) does not need that check.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB image; the parameters are in its pixels (for a classifier, its input size).
    target : float
        Sharpness to reach; the default 0.45 lies between BCCD's and PBC's medians at 64 px
        (chosen on BCCD train/val-field crops, see the README).
    sigma : float
        Standard deviation of the Gaussian of the unsharp mask, in pixels (at most 100).
    max_amount : float
        Largest amount applied (at most 20); images that even this leaves blurrier than ``target`` get it.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        A new array (also when nothing needed sharpening).

    Raises
    ------
    InvalidImageError
        ``image`` is not an RGB uint8 array.
    TypeError, ValueError
        A parameter is not a number, or not finite and > 0, or above its limit.

    Examples
    --------
    >>> import cv2, numpy as np
    >>> rng = np.random.default_rng(0)
    >>> sharp = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    >>> soft = cv2.GaussianBlur(sharp, (0, 0), 2.5)
    >>> sharpness(soft) < 0.45 <= sharpness(match_sharpness(soft))
    True
    >>> bool((match_sharpness(sharp) == sharp).all())
    True
    """
    target, sigma, max_amount = _check_sharpen_args(target, sigma, max_amount)
    img = _check_image(image)
    x = img.astype(np.float32)
    grey = x.mean(axis=2)
    lap = cv2.Laplacian(grey, cv2.CV_32F)
    before = _sharpness_of_grey(grey, lap)
    if before >= target:
        return img.copy()
    k = _gaussian_ksize(sigma)
    detail = x - cv2.GaussianBlur(x, (k, k), sigma)
    grey_detail = detail.mean(axis=2)
    lap_detail = cv2.Laplacian(grey_detail, cv2.CV_32F)
    amount = float(_sharpening_amounts(np.array([_second_moments(lap, lap_detail)]),
                                       np.array([_second_moments(grey, grey_detail)]), target=target,
                                       max_amount=max_amount)[0])
    out = np.clip(np.rint(x + amount * detail), 0, 255).astype(np.uint8)
    # rounding to 0-255 can undo a small amount on a tiny or nearly black image: never return it less sharp
    return out if _sharpness_of_grey(out.astype(np.float32).mean(axis=2)) >= before else img.copy()


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Preprocessing:
    """Which preprocessing steps run, in which order, with which parameters.

    A frozen, JSON-serialisable record. Model weights store one; calling it applies it.

    Parameters
    ----------
    steps : tuple of {"median", "clahe", "macenko", "reinhard", "sharpen"}
        Steps in the order they are applied; each at most once. Empty: identity.
    median_ksize : int
        Window of :func:`median_filter`.
    clahe_clip_limit, clahe_tile_grid :
        Parameters of :func:`clahe`.
    macenko_reference : MacenkoReference or None
        Target appearance for the ``"macenko"`` step; None means the shipped PBC default
        (resolved and stored explicitly by :meth:`resolved`, which weights records use).
    macenko_on_failure : {"raise", "passthrough"}
        Passed to :meth:`MacenkoNormalizer.transform`.
    reinhard_reference : ReinhardReference or None
        Target statistics of the ``"reinhard"`` step (:func:`reinhard_normalize`); None means the
        shipped PBC default (stored explicitly by :meth:`resolved`).
    sharpen_target, sharpen_sigma, sharpen_max_amount : float
        Parameters of the ``"sharpen"`` step (:func:`match_sharpness`), in pixels of the image it sees.

    Examples
    --------
    >>> p = Preprocessing(steps=("median", "clahe"))
    >>> Preprocessing.from_dict(p.to_dict()) == p
    True
    """

    steps: tuple[str, ...] = ()
    median_ksize: int = 3
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: tuple[int, int] = (8, 8)
    macenko_reference: MacenkoReference | None = None
    macenko_on_failure: str = "raise"
    reinhard_reference: ReinhardReference | None = None
    sharpen_target: float = 0.45
    sharpen_sigma: float = 2.0
    sharpen_max_amount: float = 4.0

    def __post_init__(self) -> None:
        steps = tuple(self.steps) if not isinstance(self.steps, str) else (self.steps,)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "clahe_tile_grid", _check_tile_grid(self.clahe_tile_grid, "clahe_tile_grid"))
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise ValueError(f"unknown preprocessing step(s) {unknown}; known steps are {list(STEPS)}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"each preprocessing step may appear once, got {list(steps)}")
        _check_ksize(self.median_ksize, "median_ksize")
        clip = self.clahe_clip_limit
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (clip > 0 and np.isfinite(clip)):
            raise ValueError(f"clahe_clip_limit must be a finite number > 0, got {clip!r}")
        if self.macenko_on_failure not in ("raise", "passthrough"):
            raise ValueError(f"macenko_on_failure must be 'raise' or 'passthrough', got {self.macenko_on_failure!r}")
        checked = _check_sharpen_args(self.sharpen_target, self.sharpen_sigma, self.sharpen_max_amount)
        for name, value in zip(("sharpen_target", "sharpen_sigma", "sharpen_max_amount"), checked, strict=True):
            object.__setattr__(self, name, value)
        if isinstance(self.macenko_reference, Mapping):
            object.__setattr__(self, "macenko_reference", MacenkoReference.from_dict(self.macenko_reference))
        if isinstance(self.reinhard_reference, Mapping):
            object.__setattr__(self, "reinhard_reference", ReinhardReference.from_dict(self.reinhard_reference))

    def resolved(self) -> Preprocessing:
        """A copy whose Macenko and Reinhard references are explicit (the defaults are looked up and stored)."""
        fields = self._fields()
        if "macenko" in self.steps and self.macenko_reference is None:
            fields["macenko_reference"] = default_reference()
        if "reinhard" in self.steps and self.reinhard_reference is None:
            fields["reinhard_reference"] = default_reinhard_reference()
        return self if fields == self._fields() else Preprocessing(**fields)

    @cached_property
    def _normalizer(self) -> MacenkoNormalizer:
        ref = self.macenko_reference if self.macenko_reference is not None else default_reference()
        return MacenkoNormalizer.from_reference(ref)

    @cached_property
    def _reinhard_reference(self) -> ReinhardReference:
        return self.reinhard_reference if self.reinhard_reference is not None else default_reinhard_reference()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Apply the steps in order to an RGB uint8 image."""
        out = _check_image(image)
        for step in self.steps:
            if step == "median":
                out = median_filter(out, ksize=self.median_ksize)
            elif step == "clahe":
                out = clahe(out, clip_limit=self.clahe_clip_limit, tile_grid=self.clahe_tile_grid)
            elif step == "reinhard":
                out = reinhard_normalize(out, reference=self._reinhard_reference)
            elif step == "sharpen":
                out = match_sharpness(out, target=self.sharpen_target, sigma=self.sharpen_sigma,
                                      max_amount=self.sharpen_max_amount)
            else:
                out = self._normalizer.transform(out, on_failure=self.macenko_on_failure)  # type: ignore[arg-type]
        return out

    def _fields(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "median_ksize": self.median_ksize,
            "clahe_clip_limit": self.clahe_clip_limit,
            "clahe_tile_grid": self.clahe_tile_grid,
            "macenko_reference": self.macenko_reference,
            "macenko_on_failure": self.macenko_on_failure,
            "reinhard_reference": self.reinhard_reference,
            "sharpen_target": self.sharpen_target,
            "sharpen_sigma": self.sharpen_sigma,
            "sharpen_max_amount": self.sharpen_max_amount,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (lists instead of tuples)."""
        d = self._fields()
        d["steps"] = list(self.steps)
        d["clahe_tile_grid"] = list(self.clahe_tile_grid)
        d["macenko_reference"] = None if self.macenko_reference is None else self.macenko_reference.to_dict()
        d["reinhard_reference"] = None if self.reinhard_reference is None else self.reinhard_reference.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        known = {"steps", "median_ksize", "clahe_clip_limit", "clahe_tile_grid", "macenko_reference", "macenko_on_failure",
                 "reinhard_reference", "sharpen_target", "sharpen_sigma", "sharpen_max_amount"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Preprocessing field(s) {sorted(unknown)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        return cls.from_dict(json.loads(text))
