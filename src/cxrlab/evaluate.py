"""Deprecated alias of `cxrlab.evaluation.metrics`; removed in the next release.

`import cxrlab.evaluate` warns (DeprecationWarning) and gives the module
`cxrlab.evaluation.metrics` itself, so its names (and monkeypatches of them) are that module's.
"""

import sys
import warnings

import cxrlab.evaluation.metrics as _moved

# stacklevel 2: the importing line (warnings skips the import system's own frames)
warnings.warn("cxrlab.evaluate moved to cxrlab.evaluation.metrics; the old name goes in the next "
              "release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
