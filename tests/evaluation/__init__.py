"""Tests of cxrlab.evaluation (src/cxrlab/evaluation/)."""
