"""Reference of the fused CPU decode step in plain PyTorch: score, select, attend as separate steps.

`cpu.butler_decode_cpu` is tested against `butler_decode_naive`; they agree up to ties in the selection and
float rounding.
"""

from __future__ import annotations

import torch

from ...budget import TokenBudget
from ...selection import select_decode_tokens, with_neighbors
from ..scoring.naive import score_reference
from ..sparse_attention.naive import sparse_attention_naive


def group_scores(importance_queries: torch.Tensor, importance_keys: torch.Tensor, importance_scale: float,
                 kv_heads: int) -> torch.Tensor:
    """`score_reference` for importance keys per KV head or per query head (the attentive predictor's: each query
    head ranked by its own keys, then the max over each KV head's group) -> ``[B, H_kv, 1, L]``."""
    scores = score_reference(importance_queries, importance_keys, importance_scale)  # [B, H_k, 1, L]
    B, H_k, _, L = scores.shape
    return scores.view(B, kv_heads, H_k // kv_heads, 1, L).amax(2)


def butler_decode_naive(
    importance_queries: torch.Tensor, importance_keys: torch.Tensor, importance_scale: float,
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, sinks: int, window: int, n: int,
    *, neighbours: bool = False,
) -> torch.Tensor:
    """``[B, 1, HQ, Dv]``: `sparse_attention_naive` over sinks + window + the top ``n`` of the butler scores.

    Shapes as `cpu.butler_decode_cpu`: ``importance_queries`` ``[B, HQ, 1, d']``, ``importance_keys``
    ``[B, H_kv | HQ, L, d']``, ``query`` ``[B, HQ, 1, D]``, ``key``/``value`` ``[B, H_kv, L, D|Dv]``.
    """
    H, L = key.shape[1], key.shape[2]
    scores = group_scores(importance_queries, importance_keys, importance_scale, H)  # [B, H, 1, L]
    selection = select_decode_tokens(scores, TokenBudget(n, None, sinks, window))
    if neighbours:
        selection = with_neighbors(selection, torch.ones(1, 1, 1, L, dtype=torch.bool), L)
    return sparse_attention_naive(query, key, value, selection.indices, selection.keep, scale)
