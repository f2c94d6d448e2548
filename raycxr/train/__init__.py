"""Training: plain PyTorch loops (``loops``), the single-process runner (``local``)."""
