"""The training engine every command shares, below the methods: the device and mixed precision
(:mod:`~raycxr.engine.device`), the optimiser and its schedule (:mod:`~raycxr.engine.schedule`), the
supervised fine-tuning loop (:mod:`~raycxr.engine.supervised`), validation
(:mod:`~raycxr.engine.validation`) and the classification metrics (:mod:`~raycxr.engine.metrics`).

It imports the data plane and the models only: never :mod:`raycxr.methods`, the Ray runtime or the commands.
"""
