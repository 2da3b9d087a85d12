"""Sparse attention over selected K/V rows: `naive.py` is the PyTorch reference, `decode.py` the Triton kernel."""

from .naive import sparse_attention_naive

__all__ = ["sparse_attention_naive"]
