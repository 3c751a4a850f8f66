"""Tests of cxrlab.models (src/cxrlab/models/)."""
