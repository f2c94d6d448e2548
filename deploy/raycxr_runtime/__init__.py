"""raycxr_runtime: chest X-ray inference with an exported raycxr ONNX model (onnxruntime, numpy, pydicom; no torch)."""

__version__ = "0.1.0"
