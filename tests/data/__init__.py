"""Tests of cxrlab.data (src/cxrlab/data/)."""
