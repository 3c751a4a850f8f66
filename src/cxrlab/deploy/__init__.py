"""Deployment: a model's probabilities under one precision rule (inference), predictions on
files (predict), ONNX export (export) and int8 (quantize), the HTTP server and its page
(serve, serve_page.html), Grad-CAM (cam).

May import: run, data, config, models, errors; never evaluation or anything above it
(tests/test_layers.py).
"""
