"""smearpipe: automated peripheral blood smear analysis (detect, count and type blood cells)."""

from .errors import SmearpipeError

__version__ = "0.1.0"
__all__ = ["SmearpipeError", "__version__"]
