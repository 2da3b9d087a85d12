"""Fused distillation loss: `fused.py` (Triton); the PyTorch reference is `butler_cache.training.losses`."""
