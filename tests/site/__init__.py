"""Tests of cxrlab.site (src/cxrlab/site/)."""
