"""Reporting: the one-page HTML report (report), figures (plots), the table of runs
(run_table) and experiment trackers (tracking).

May import: evaluation, deploy, run, data, config, models, errors; never site, training or
the faces (tests/test_layers.py).
"""
