"""The Triton decode kernels as PyTorch operators, so that ``torch.compile`` traces them (no graph break).

``torch.ops.butler_cache.sparse_decode_attention`` and ``torch.ops.butler_cache.score_decode`` are
`torch.library.custom_op`s around the launchers of `sparse_attention/decode.py` and `scoring/decode.py`, with fake
(shape) implementations: torch.compile keeps each as one opaque node of the graph (CUDA graphs capture its
launches). `torch.library.triton_op` would let inductor see the kernels themselves, but it cannot trace them under
``TRITON_INTERPRET=1`` (wrap_triton hands back the interpreted kernel), which is how CI runs them on the CPU.
Importing this module registers the operators (once per process).
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from .scoring.decode import score_decode
from .sparse_attention.decode import sparse_decode_attention


@custom_op("butler_cache::sparse_decode_attention", mutates_args=())
def sparse_decode_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`sparse_decode_attention` as an operator: ``[B, HQ, 1, K]`` query, ``[B, H, L, K|V]`` key/value, ``[B, H, 1, S]``
    indices and keep -> ``[B, 1, HQ, V]``."""
    return sparse_decode_attention(query, key, value, indices, keep, scale)


@sparse_decode_attention_op.register_fake
def _(query, key, value, indices, keep, scale):
    B, HQ = query.shape[:2]
    return query.new_empty((B, 1, HQ, value.shape[-1]))


@custom_op("butler_cache::score_decode", mutates_args=())
def score_decode_op(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """`score_decode` as an operator: ``[B, HQ, 1, d']`` x ``[B, H, L, d']`` -> ``[B, H, 1, L]`` float32."""
    return score_decode(queries, keys, scale)


@score_decode_op.register_fake
def _(queries, keys, scale):
    B, H, L = keys.shape[0], keys.shape[1], keys.shape[2]
    return keys.new_empty((B, H, 1, L), dtype=torch.float32)


__all__ = ["score_decode_op", "sparse_decode_attention_op"]
