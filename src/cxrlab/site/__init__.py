"""A new intake (another hospital, scanner, export): assessing a run on its data (assess: the
metrics, the intake check, the stress test), the intake check itself (intake), the stress test
under synthetic shifts (shift) and site calibration (calibration).

May import: reporting, evaluation, deploy, run, data, config, models, errors; never training
or the faces (tests/test_layers.py).
"""
