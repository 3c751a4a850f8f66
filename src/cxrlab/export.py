"""Deprecated alias of `cxrlab.deploy.export`; removed in the next release.

`import cxrlab.export` warns (DeprecationWarning) and gives the module
`cxrlab.deploy.export` itself, so its names (and monkeypatches of them) are that module's.
"""

import sys
import warnings

import cxrlab.deploy.export as _moved

# stacklevel 2: the importing line (warnings skips the import system's own frames)
warnings.warn("cxrlab.export moved to cxrlab.deploy.export; the old name goes in the next "
              "release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
