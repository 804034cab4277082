"""smearpipe: automated peripheral blood smear analysis (detect, count and type blood cells).

Importing smearpipe is cheap and side-effect free: torch and ultralytics are imported only when a
model is loaded.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    DatasetError,
    ImageReadError,
    InvalidImageError,
    NotFittedError,
    SlideWarning,
    SmearpipeError,
    StainEstimationError,
    WeightsError,
)

__version__ = "0.1.0"

_LAZY = {
    "analyze_smear": "pipeline",
    "analyze_fields": "pipeline",
    "iter_fields": "pipeline",
    "load_pipeline": "pipeline",
    "draw": "pipeline",
    "write_field_outputs": "pipeline",
    "SmearResult": "pipeline",
    "SlideResult": "pipeline",
    "PipelineConfig": "pipeline",
    "ScaleEstimationError": "scale",
    "train_detector": "train",
    "train_classifier": "train",
    "evaluate_detector": "evaluate",
    "evaluate_classifier": "evaluate",
}

__all__ = ["SmearpipeError", "ImageReadError", "InvalidImageError", "StainEstimationError", "NotFittedError",
           "DatasetError", "WeightsError", "SlideWarning", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'smearpipe' has no attribute {name!r}")
