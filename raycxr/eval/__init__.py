"""Evaluation of pretrained encoders: scoring sites, metrics and the report (``raycxr eval``)."""
