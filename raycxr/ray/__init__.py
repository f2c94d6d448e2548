"""The Ray runtime: site actors and their replicas (:mod:`~raycxr.ray.actor`), replica autoscaling
(:mod:`~raycxr.ray.autoscale`), launching a cluster, site actors and a ``TorchTrainer``
(:mod:`~raycxr.ray.launch`), the Ray Train runner and its actor stream (:mod:`~raycxr.ray.runner`) and
gradient sync across workers (:mod:`~raycxr.ray.grad_sync`). The site declarations it serves live in
:mod:`raycxr.sites`.

``import ray`` inside this package is the Ray library (absolute imports), not this package.
"""
