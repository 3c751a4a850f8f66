"""cxrlab: reproducible chest X-ray (and any folder-of-images) classifiers."""

__version__ = "0.1.0"
