"""Sparse attention over selected K/V rows.

`naive.py` is the PyTorch reference (any number of query rows); `gathered.py` the PyTorch decode path
for CPUs (one row, rows copied whole); `decode.py` the Triton kernel. Both fast paths are tested
against the reference.
"""

from .gathered import gather_rows, sparse_decode_attention_torch
from .naive import masked_attention, sparse_attention_naive

__all__ = ["gather_rows", "masked_attention", "sparse_attention_naive", "sparse_decode_attention_torch"]
