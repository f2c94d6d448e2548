"""Evaluation of pretrained encoders: scoring sites, the report (``raycxr eval``); the metrics live in
:mod:`raycxr.engine.metrics`."""
