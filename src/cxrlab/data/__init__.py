"""Data: sources -> split -> decoded, cached uint8 arrays -> batched augmentation; audit.

May import: config, models, errors; never the run folder or anything above it
(tests/test_layers.py).
"""

from cxrlab.data.audit import Summary, render_summary, summarize, write_grid
from cxrlab.data.cache import CacheInfo, default_cache_dir, load_images
from cxrlab.data.images import guess_channels, read_image
from cxrlab.data.sources import IMAGE_EXTENSIONS, Record, Source, load_source, require_trainable
from cxrlab.data.split import SplitResult, assign_splits, patient_key

__all__ = [
    "IMAGE_EXTENSIONS", "CacheInfo", "Record", "Source", "SplitResult", "Summary",
    "assign_splits", "default_cache_dir", "guess_channels", "load_images", "load_source",
    "patient_key", "read_image", "render_summary", "require_trainable", "summarize",
    "write_grid",
]
