"""Evaluation: metrics and thresholds (metrics), scoring a run on labelled data (scoring),
bootstrap and t statistics (stats), calibration metrics (calibration), comparing two runs
(comparison), and an ablation's spec, plan and paired results (ablation).

May import: deploy, run, data, config, models, errors; never site, reporting, training or the
faces (tests/test_layers.py).
"""
