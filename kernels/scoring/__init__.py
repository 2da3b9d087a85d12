"""Token scoring for selection: `score_reference` (PyTorch) and, in `decode.py`, its Triton kernel."""

from .naive import score_reference

__all__ = ["score_reference"]
