"""Exception and warning types raised by smearpipe.

Every error that smearpipe raises on purpose derives from :class:`SmearpipeError`,
so callers can catch the whole family with one ``except`` clause.
"""

from __future__ import annotations

__all__ = [
    "SmearpipeError",
    "ImageReadError",
    "InvalidImageError",
    "StainEstimationError",
    "NotFittedError",
    "DatasetError",
    "WeightsError",
    "SlideWarning",
]


class SmearpipeError(Exception):
    """Base class of all smearpipe errors."""


class ImageReadError(SmearpipeError, OSError):
    """A file could not be found or decoded as an image."""


class InvalidImageError(SmearpipeError, ValueError):
    """An array does not follow (and cannot be converted to) the RGB uint8 (H, W, 3) convention."""


class StainEstimationError(SmearpipeError, ValueError):
    """Too few stained pixels to estimate stain vectors (e.g. a blank field)."""


class NotFittedError(SmearpipeError, RuntimeError):
    """A fitted object (e.g. a Macenko normaliser) was used before ``fit``."""


class DatasetError(SmearpipeError, ValueError):
    """An annotated dataset is missing, malformed or inconsistent."""


class WeightsError(SmearpipeError, ValueError):
    """Model weights are unknown, missing, corrupt or do not match their record."""


class SlideWarning(UserWarning):
    """A warning about a whole slide (every field of an :func:`~smearpipe.analyze_fields` call), not one field."""
