"""cxrlab: reproducible chest X-ray (and any folder-of-images) classifiers.

From Python or a notebook: `cxrlab.train(...)`, `cxrlab.load(run_dir)`, `cxrlab.compare(a, b)`,
`cxrlab.ablate(spec, out)`, `cxrlab.data_summary(data)` (see `cxrlab.api`); `cxrlab.demo_data()`
is the folder of chest X-rays shipped with the package. The API is imported
on first use (PEP 562), so `import cxrlab.errors` and the `cxrlab` command stay fast.
Importing cxrlab keeps freed tensor memory in the process (`cxrlab.training.allocator`: up to 2.2x
faster CPU steps; `CXRLAB_MALLOC=system` opts out).
"""

from typing import TYPE_CHECKING, Any

from cxrlab._version import __version__
from cxrlab.demo import demo_data
from cxrlab.errors import CxrlabError
from cxrlab.training.allocator import keep_freed_memory

keep_freed_memory()

if TYPE_CHECKING:
    from cxrlab.api import (
        Comparison,
        CrossVal,
        DataSummary,
        History,
        Metrics,
        Run,
        Sweep,
        ablate,
        adapt,
        calibrate,
        compare,
        data_summary,
        load,
        lr_find,
        register_model,
        runs,
        train,
    )


__all__ = ["Comparison", "CrossVal", "CxrlabError", "DataSummary", "History", "Metrics", "Run",
           "Sweep", "__version__", "ablate", "adapt", "calibrate", "compare", "data_summary",
           "demo_data", "load", "lr_find", "register_model", "runs", "train"]
_API = frozenset(__all__) - {"CxrlabError", "__version__", "demo_data"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from cxrlab import api

        value = getattr(api, name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'cxrlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
