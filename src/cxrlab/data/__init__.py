"""Data: sources -> split -> decoded, cached uint8 arrays -> batched augmentation."""

from cxrlab.data.cache import load_images
from cxrlab.data.images import guess_channels, read_image
from cxrlab.data.sources import Record, Source, load_source, require_trainable
from cxrlab.data.split import assign_splits, patient_key

__all__ = ["Record", "Source", "assign_splits", "guess_channels", "load_images", "load_source",
           "patient_key", "read_image", "require_trainable"]
