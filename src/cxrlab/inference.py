"""Deprecated alias of `cxrlab.deploy.inference`; removed in the next release.

`import cxrlab.inference` warns (DeprecationWarning) and gives the module
`cxrlab.deploy.inference` itself, so its names (and monkeypatches of them) are that module's.
"""

import sys
import warnings

import cxrlab.deploy.inference as _moved

# stacklevel 2: the importing line (warnings skips the import system's own frames)
warnings.warn("cxrlab.inference moved to cxrlab.deploy.inference; the old name goes in the next "
              "release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
