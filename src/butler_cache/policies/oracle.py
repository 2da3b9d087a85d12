"""Oracle top-k: the true attention of the current queries (an upper bound for any predictor)."""

from __future__ import annotations

import torch

from .base import ScoringInputs, SelectionPolicy, true_probabilities


class OraclePolicy(SelectionPolicy):
    """Per KV head, the max over the group's query heads of the true attention probabilities.

    Needs the full ``Q K^T`` of the current queries, so it saves no computation: it is the bound
    that budgeted selection with one selection per KV head can reach.
    """

    name = "oracle"

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        probs = true_probabilities(inputs)  # [B, HQ, T, L]
        B, HQ, T, L = probs.shape
        H = inputs.num_key_value_heads
        return probs.view(B, H, HQ // H, T, L).amax(dim=2)
