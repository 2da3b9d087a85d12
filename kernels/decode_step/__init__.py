"""The fused CPU decode step of a sparse layer (score, select, attend in one call).

`naive.py` is the PyTorch reference (the separate steps); `cpu.py` the numba kernel, tested against it.
"""

from .naive import butler_decode_naive, group_scores

__all__ = ["butler_decode_naive", "group_scores"]
