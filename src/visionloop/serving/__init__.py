"""Serve the registered champion over HTTP: /predict, the V2 Open Inference Protocol, health, metrics.

Nothing in this package imports torch, scikit-learn or kfp: the serving image runs the exported ONNX model
on ONNX Runtime, and prepares uploads with ``data/transform.py`` (numpy and Pillow only).
"""
