"""cxrlab: reproducible chest X-ray (and any folder-of-images) classifiers.

From Python or a notebook: `cxrlab.train(...)`, `cxrlab.load(run_dir)`, `cxrlab.compare(a, b)`,
`cxrlab.ablate(spec, out)`, `cxrlab.data_summary(data)` (see `cxrlab.api`). The API is imported
on first use (PEP 562), so `import cxrlab.errors` and the `cxrlab` command stay fast.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from cxrlab.errors import CxrlabError

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
        compare,
        data_summary,
        load,
        train,
    )

__version__ = "0.1.0"

__all__ = ["Comparison", "CrossVal", "CxrlabError", "DataSummary", "History", "Metrics", "Run",
           "Sweep", "__version__", "ablate", "compare", "data_summary", "load", "train"]
_API = frozenset(__all__) - {"CxrlabError", "__version__"}


# `train`, `compare` and `ablate` are also submodules (cxrlab/train.py, ...), which Python's
# import system binds on the package whenever they are imported, replacing the functions. So
# those three names stay the submodules, made callable: `cxrlab.train(...)` calls
# `cxrlab.api.train(...)`, and `from cxrlab import ablate; ablate.load_spec(...)` still works.
_CALLABLE_MODULES = frozenset({"train", "compare", "ablate"})


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)

    @property
    def _function(self) -> Any:
        from cxrlab import api

        return getattr(api, self.__name__.rpartition(".")[2])

    @property
    def __signature__(self) -> Any:  # inspect.signature / IDEs see the function's
        import inspect

        return inspect.signature(self._function)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CALLABLE_MODULES and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"cxrlab.{name}")  # bound (callable) by _Package
    if name in _API:
        from cxrlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'cxrlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
