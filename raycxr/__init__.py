"""raycxr: federated-ready multi-site chest X-ray pretraining on Ray."""

__version__ = "0.1.0"
