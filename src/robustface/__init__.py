"""robustface: face recognition on noisy data."""

__version__ = "0.1.0"

__all__ = ["__version__"]
