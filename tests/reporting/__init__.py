"""Tests of cxrlab.reporting (src/cxrlab/reporting/)."""
