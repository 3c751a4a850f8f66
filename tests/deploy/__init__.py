"""Tests of cxrlab.deploy (src/cxrlab/deploy/)."""
