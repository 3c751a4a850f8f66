"""Tests of cxrlab.training (src/cxrlab/training/)."""
