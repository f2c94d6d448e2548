"""Training: the schedule driver (``driver``) and the single-process runner (``local``). The Ray Train
runner and its launcher live in :mod:`raycxr.ray`; validation and the supervised fine-tuning loop in
:mod:`raycxr.engine`."""
