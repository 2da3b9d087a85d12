"""TokenButler: scores from the learned predictor (importance queries x projected keys)."""

from __future__ import annotations

import torch

from ..kernels import resolve_backend
from .base import ScoringInputs, SelectionPolicy, group_max_probabilities


class ButlerPolicy(SelectionPolicy):
    """Predicted attention probabilities, reduced (max) over each GQA group.

    TokenButler (Akhauri et al., 2025, arXiv 2503.07518). The importance queries come from the
    producer that serves this layer; the importance keys are cached beside the real keys.
    """

    name = "butler"
    requires_predictor = True

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        layer = inputs.layer
        queries = layer.importance_queries  # [B, HQ, T, d']
        if queries is None:
            raise RuntimeError(
                f"layer {layer.layer_idx}: no importance queries were produced for this forward; "
                "is the model attached (butler_cache.attach) and the cache passed as past_key_values?"
            )
        keys = layer.importance_keys  # [B, H_k, L, d']
        T, L = inputs.query.shape[2], inputs.key.shape[2]
        if queries.shape[2] != T or keys is None or keys.shape[2] != L:
            raise RuntimeError(
                f"layer {layer.layer_idx}: predictor state out of sync with the cache (importance queries for "
                f"{queries.shape[2]} rows vs {T}; importance keys for {None if keys is None else keys.shape[2]} tokens vs {L})"
            )
        if T == 1 and inputs.valid.shape[0] == 1 and resolve_backend(layer.settings.backend, keys.device) == "triton":
            # one decode row, no padding: the fused kernel ranks in one pass over the importance keys
            from ..kernels.scoring.decode import score_decode

            return score_decode(queries, keys, layer.predictor.config.score_scale)  # log of the same scores
        logits = layer.predictor.score_logits(queries, keys)  # [B, HQ, T, L]
        valid = None if inputs.all_valid else inputs.valid
        return group_max_probabilities(logits, valid, inputs.num_key_value_heads)
