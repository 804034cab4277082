"""Reading, validating and writing images.

smearpipe has one image convention everywhere: an RGB ``uint8`` array of shape
``(H, W, 3)``. This module is the only place where other layouts are converted
(OpenCV's BGR order is undone here, once).

Conversion rules applied by :func:`to_rgb_uint8`:

* ``(H, W)`` and ``(H, W, 1)`` grayscale: the channel is repeated three times.
* ``(H, W, 4)`` RGBA: composited over a white background (transparent pixels
  become white, like an empty, unstained field), then the alpha channel is dropped.
* ``uint8``: kept as is.
* ``uint16``: scaled to 0-255 from the camera's bit depth: ``round(v * 255 / (2**b - 1))`` with ``b`` the
  smallest of 8, 10, 12, 14, 16 whose range holds the image's largest sample (16-bit files from
  8-, 10-, 12- or 14-bit cameras keep their brightness; a full 16-bit image: 65535 -> 255). Pass
  ``bit_depth`` to :func:`to_rgb_uint8` / :func:`read_image` when the depth is known.
* ``float16/32/64``: must be finite and within ``[0, 1]``; scaled by 255 and rounded.
* anything else (bool, signed or 32/64-bit integers, complex, object, channel-first
  ``(3, H, W)``, empty arrays, NaN/inf) raises :class:`~smearpipe.errors.InvalidImageError`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageReadError, InvalidImageError

__all__ = ["ImageLike", "IMAGE_SUFFIXES", "read_image", "to_rgb_uint8", "load_image", "write_image", "replace_file",
           "require_image_list"]

ImageLike = str | os.PathLike | np.ndarray
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})  # read and written by OpenCV


def _describe(array: np.ndarray) -> str:
    return f"shape {tuple(array.shape)} and dtype {array.dtype}"


_UINT16_BIT_DEPTHS = (8, 10, 12, 14, 16)


def _check_bit_depth(bit_depth: object) -> None:
    if bit_depth is not None and (
        isinstance(bit_depth, bool) or not isinstance(bit_depth, (int, np.integer)) or not 8 <= bit_depth <= 16
    ):
        raise ValueError(f"bit_depth must be None or an integer in [8, 16], got {bit_depth!r}")


def _uint16_bit_depth(image: np.ndarray, bit_depth: int | None, name: str) -> int:
    """The bit depth a uint16 image is scaled from: the given one (checked) or the smallest that holds its maximum."""
    top = int(image.max())
    if bit_depth is None:
        return next(b for b in _UINT16_BIT_DEPTHS if top < 2**b)
    if top >= 2**bit_depth:
        raise InvalidImageError(f"{name} has a sample of {top}, above the {bit_depth}-bit range (0-{2**bit_depth - 1})")
    return int(bit_depth)


def to_rgb_uint8(image: np.ndarray, *, name: str = "image", bit_depth: int | None = None) -> np.ndarray:
    """Convert an array to the RGB uint8 ``(H, W, 3)`` convention or raise.

    Parameters
    ----------
    image : ndarray
        ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA array of dtype
        uint8, uint16 or float in ``[0, 1]`` (see the module docstring for the rules).
    name : str, optional
        Name used in error messages.
    bit_depth : int, optional
        For uint16 images only: the camera's bit depth (8-16) the samples are scaled from. ``None``
        (default): the smallest of 8, 10, 12, 14, 16 that holds the image's largest sample.

    Returns
    -------
    rgb : (H, W, 3) uint8 ndarray
        C-contiguous. The input itself is returned when it already follows the convention.

    Raises
    ------
    InvalidImageError
        If the array cannot be converted, or a uint16 sample exceeds ``bit_depth``; the message says
        what was expected and what came.
    ValueError
        If ``bit_depth`` is not an integer in [8, 16].

    Examples
    --------
    >>> import numpy as np
    >>> to_rgb_uint8(np.zeros((4, 5), np.uint8)).shape
    (4, 5, 3)
    """
    _check_bit_depth(bit_depth)
    if not isinstance(image, np.ndarray):
        hint = " (read a file with read_image)" if isinstance(image, (str, os.PathLike)) else ""
        raise InvalidImageError(f"{name} must be a numpy array, got {type(image).__name__}{hint}")
    expected = "an RGB uint8 array of shape (H, W, 3) (or grayscale (H, W), RGBA (H, W, 4); uint8, uint16 or float in [0, 1])"
    given = _describe(image)  # as passed, before a grayscale image gets its channel axis
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        pass
    elif image.ndim == 2:
        image = image[:, :, None]
    else:
        hint = ""
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] > 4:
            hint = "; channel-first arrays are not accepted, use np.moveaxis(image, 0, -1)"
        raise InvalidImageError(f"{name} must be {expected}, got {given}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidImageError(f"{name} must have at least one pixel, got {given}")

    dtype = image.dtype
    if dtype == np.uint8:
        rgb = image
    elif dtype == np.uint16:
        # the depth is the camera's, read from the colour samples: alpha, where there is one, spans 0-65535
        colour = image[:, :, :3]
        bits = _uint16_bit_depth(colour, bit_depth, name)
        rgb = np.empty(image.shape, np.uint8)
        rgb[:, :, :3] = np.rint(colour.astype(np.float32) * (255.0 / (2**bits - 1)))
        if image.shape[-1] == 4:
            rgb[:, :, 3] = np.rint(image[:, :, 3].astype(np.float32) * (255.0 / 65535.0))
    elif dtype.kind == "f":
        if not np.isfinite(image).all():
            raise InvalidImageError(f"{name} contains NaN or infinite values ({_describe(image)})")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidImageError(
                f"float {name} must have values in [0, 1], got range [{lo:g}, {hi:g}] "
                f"({_describe(image)}); convert 0-255 data with .astype(np.uint8)"
            )
        rgb = np.rint(image.astype(np.float32) * 255.0).astype(np.uint8)
    else:
        raise InvalidImageError(f"{name} must be {expected}, got {given}")

    channels = rgb.shape[-1]
    if channels == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    elif channels == 4:
        alpha = rgb[:, :, 3:4].astype(np.float32) / 255.0
        rgb = np.rint(rgb[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def read_image(path: str | os.PathLike, *, bit_depth: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 ``(H, W, 3)``.

    Any format OpenCV decodes (JPEG, PNG incl. 16-bit and RGBA, TIFF incl. float32/float64,
    BMP) is accepted and converted with the rules of :func:`to_rgb_uint8` (``bit_depth``: of a 16-bit
    file's camera, see there). An EXIF orientation tag is applied, as image viewers do: the array (and
    every box found on it) is the image as it is shown upright.

    Raises
    ------
    ImageReadError
        If the file does not exist, is not a file, cannot be decoded, or its samples do not follow
        the rules of :func:`to_rgb_uint8` (e.g. signed integers, float outside [0, 1]). The message
        names the path (and the sample type).
    """
    _check_bit_depth(bit_depth)
    if not isinstance(path, (str, os.PathLike)):
        hint = " (an array: load_image or to_rgb_uint8)" if isinstance(path, np.ndarray) else ""
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}{hint}")
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageReadError(f"not a file: {path}")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"cannot read image file {path}: {exc}") from exc
    try:
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as exc:  # e.g. more pixels than OpenCV decodes (2**30): a stitched slide, not a field
        hint = (" (an image larger than OpenCV reads, 2**30 pixels, must be split into fields or tiles first)"
                if "MAX_IMAGE_PIXELS" in str(exc) else "")
        raise ImageReadError(f"cannot decode image file {path}: {str(exc).strip().splitlines()[-1]}{hint}") from None
    if decoded is None:
        raise ImageReadError(f"cannot decode image file (corrupt or not an image): {path}")
    # IMREAD_UNCHANGED keeps 16-bit samples and alpha but ignores the EXIF orientation a camera (a phone
    # on the eyepiece) records: turn the pixels upright as viewers show them, so boxes match what users see.
    orientation = _exif_orientation(data)
    if orientation != 1:
        decoded = _EXIF_ORIENTATION[orientation](decoded)
    # BGR(A) -> RGB(A) by indexing: cv2.cvtColor refuses float64 and signed samples, which
    # to_rgb_uint8 converts or rejects with a clear message.
    if decoded.ndim == 3:
        if decoded.shape[2] == 3:
            decoded = decoded[:, :, ::-1]
        elif decoded.shape[2] == 4:
            decoded = decoded[:, :, [2, 1, 0, 3]]
    try:
        return to_rgb_uint8(decoded, name=f"image file {path}", bit_depth=bit_depth)
    except InvalidImageError as exc:
        raise ImageReadError(str(exc)) from exc


# EXIF orientation tag (0x0112) -> how the stored pixels are turned to show the image upright,
# as viewers (and cv2.imread without IMREAD_UNCHANGED) do: 2-8 per the EXIF 2.3 specification.
_EXIF_ORIENTATION = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # rotated 90 clockwise to show upright
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # transversed
    8: lambda a: np.rot90(a, 1),  # rotated 90 counter-clockwise to show upright
}


def _exif_orientation(data: np.ndarray) -> int:
    """The EXIF orientation tag of an encoded image (1, upright, when there is none or it cannot be read)."""
    from PIL import Image  # a dependency of torchvision; reads the header only

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - formats Pillow cannot parse carry no orientation we could honour
        return 1
    return value if value in _EXIF_ORIENTATION else 1


def require_image_list(images: object, *, caller: str, hint: str) -> None:
    """Raise TypeError when a single path or a single (H, W[, 3]) array, or no iterable at all, is passed where a
    list is expected.

    Iterating a path string or an image array would otherwise silently yield characters or rows.
    """
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        raise TypeError(f"{caller} takes a list of images or paths, not a single one; {hint}")
    if not isinstance(images, Iterable):
        raise TypeError(f"{caller} takes a list (or any iterable) of images or paths, got {type(images).__name__}")


def require_file_name(name: object, *, what: str = "name") -> None:
    """ValueError unless ``name`` is a plain file name: no folders in it (which would write outside the
    output folder), not empty, not ``.`` or ``..``."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name:
        raise ValueError(f"{what} must be a plain file name without folders (the files go in out_dir), got {name!r}")


def load_image(image: ImageLike, *, name: str = "image") -> np.ndarray:
    """Return ``image`` as RGB uint8 ``(H, W, 3)``: read it if it is a path, convert it if it is an array."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"{name} must be a numpy array or a path, got {type(image).__name__}")
    return to_rgb_uint8(image, name=name)


def write_image(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write an RGB uint8 image; refuses to replace an existing file unless ``overwrite=True``.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    ImageReadError
        If OpenCV cannot encode the image for the file's extension.
    """
    path = Path(path)
    rgb = to_rgb_uint8(image)
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing file {path} (pass overwrite=True)")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"unsupported image file extension {path.suffix!r} for {path} (use .png, .jpg, .tif, .bmp or .webp)")
    try:
        ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error:
        ok = False
    if not ok:
        raise ImageReadError(f"cannot encode image for file {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, buf.tobytes())
    return path


def replace_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all: a temporary file beside it, then renamed over it.

    A symbolic link at ``path`` is replaced by the file, never written through (an output must not change the
    file a link points to, an input perhaps). The file mode follows the umask, as ``open()`` would make it.
    """
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
