"""TokenButler: scores from the learned predictor (importance queries x projected keys)."""

from __future__ import annotations

import torch

from .base import ScoringInputs, SelectionPolicy, group_max_probabilities


class ButlerPolicy(SelectionPolicy):
    """Predicted attention probabilities, reduced (max) over each GQA group.

    TokenButler (Akhauri et al., 2025, arXiv 2503.07518). The importance queries come from the
    producer that serves this layer; the importance keys are cached beside the real keys. The decode backends
    (`butler_cache.decode`) have fused kernels for these scores.
    """

    name = "butler"
    requires_predictor = True

    def importance(self, inputs: ScoringInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's importance queries ``[B, HQ, T, d']`` and keys ``[B, H_k, L, d']``, checked in sync with the
        forward (a clear error where the model is not attached or the cache was not passed)."""
        layer = inputs.layer
        queries = layer.importance_queries  # [B, HQ, T, d']
        if queries is None:
            raise RuntimeError(
                f"layer {layer.layer_idx}: no importance queries were produced for this forward; "
                "is the model attached (butler_cache.attach) and the cache passed as past_key_values (cache= on "
                "transformers >= 5.24)?"
            )
        keys = layer.importance_keys  # [B, H_k, L, d']
        T, L = inputs.query.shape[2], inputs.key.shape[2]
        if queries.shape[2] != T or keys is None or keys.shape[2] != L:
            raise RuntimeError(
                f"layer {layer.layer_idx}: predictor state out of sync with the cache (importance queries for "
                f"{queries.shape[2]} rows vs {T}; importance keys for {None if keys is None else keys.shape[2]} tokens vs {L})"
            )
        return queries, keys

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        queries, keys = self.importance(inputs)
        logits = inputs.layer.predictor.score_logits(queries, keys)  # [B, HQ, T, L]
        valid = None if inputs.all_valid else inputs.valid
        return group_max_probabilities(logits, valid, inputs.num_key_value_heads)
