"""Oracle top-k: the true attention of the current queries (an upper bound for any predictor)."""

from __future__ import annotations

import torch

from .base import ScoringInputs, SelectionPolicy, group_max_probabilities, upcast


class OraclePolicy(SelectionPolicy):
    """Per KV head, the max over the group's query heads of the true attention probabilities.

    Needs the full ``Q K^T`` of the current queries, so it saves no computation: it is the bound
    that budgeted selection with one selection per KV head can reach.
    """

    name = "oracle"

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        q, k = inputs.query, inputs.key
        B, HQ, T, D = q.shape
        H = inputs.num_key_value_heads
        logits = torch.einsum("bhgtd,bhld->bhgtl", upcast(q.view(B, H, HQ // H, T, D)), upcast(k))
        logits = logits.reshape(B, HQ, T, -1) * inputs.scaling
        return group_max_probabilities(logits, inputs.valid, H)
