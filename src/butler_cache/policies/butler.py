"""TokenButler: scores from the learned predictor (importance queries x projected keys)."""

from __future__ import annotations

import torch

from ..budget import TokenBudget
from ..kernels import numba_module, numba_serves, resolve_backend
from ..selection import Selection
from .base import ScoringInputs, SelectionPolicy, group_max_probabilities


class ButlerPolicy(SelectionPolicy):
    """Predicted attention probabilities, reduced (max) over each GQA group.

    TokenButler (Akhauri et al., 2025, arXiv 2503.07518). The importance queries come from the
    producer that serves this layer; the importance keys are cached beside the real keys.
    """

    name = "butler"
    requires_predictor = True

    def _numba_budget(self, inputs: ScoringInputs, budget: TokenBudget) -> int | None:
        """The row budget when the numba CPU kernels can serve this decode step (numba backend, no padding, a
        budget below the context), else None (the PyTorch path runs)."""
        if resolve_backend(inputs.layer.settings.backend, inputs.key.device) != "numba":
            return None  # checked first: the default paths pay one call per layer
        L = inputs.key.shape[2]
        n = budget.max_selected(L)
        return n if inputs.all_valid and n < L else None

    @staticmethod
    def _numba_scorable(inputs: ScoringInputs) -> bool:
        """Whether the importance queries and keys are in the numba kernels' form (else the PyTorch path runs, and
        `score` raises on out-of-sync predictor state)."""
        queries, keys = inputs.layer.importance_queries, inputs.layer.importance_keys
        return (
            queries is not None
            and keys is not None
            and keys.shape[2] == inputs.key.shape[2]
            and keys.dtype == torch.float32
            # importance keys per KV head (strided predictor) or per query head (attentive)
            and keys.shape[1] in (inputs.num_key_value_heads, queries.shape[1])
        )

    def attend_decode(self, inputs: ScoringInputs, value: torch.Tensor, budget: TokenBudget) -> torch.Tensor | None:
        """On CPUs with the numba backend: the whole decode step of the layer in one compiled call, with the
        cache's prediction interval (`ButlerLayer.fused_decode`) and neighbour fetching."""
        n = self._numba_budget(inputs, budget)
        if n is None or not numba_serves(inputs.query, inputs.key, value):
            return None
        layer = inputs.layer

        def run(kept: torch.Tensor | None, keep: bool):
            if kept is None and not self._numba_scorable(inputs):  # a reusing step reads no importance state
                return None
            result = numba_module("decode_step_cpu").butler_decode_cpu(
                layer.importance_queries, layer.importance_keys, layer.predictor.config.score_scale,
                inputs.query, inputs.key, value, inputs.scaling, budget.sink_tokens, budget.local_window, n,
                reuse_scores=kept, return_scores=keep, neighbours=layer.settings.neighbor_fetch,
            )  # [B, 1, HQ, Dv], with this step's prediction [B, H_kv, 1, L] where `keep`
            return result if keep else (result, None)

        return layer.fused_decode(inputs.num_key_value_heads, inputs.key.shape[2], run)

    def select_decode(self, inputs: ScoringInputs, budget: TokenBudget) -> Selection | None:
        """On CPUs with the numba backend: scoring and top-k in one compiled pass per KV head."""
        n = self._numba_budget(inputs, budget)
        if n is None or not self._numba_scorable(inputs):
            return None
        layer = inputs.layer
        indices = numba_module("scoring.cpu").score_select_decode_cpu(
            layer.importance_queries, layer.importance_keys, layer.predictor.config.score_scale, budget.sink_tokens,
            budget.local_window, n, kv_heads=inputs.num_key_value_heads,
        )
        return Selection(indices, torch.ones_like(indices, dtype=torch.bool), all_kept=True)  # [B, H_kv, 1, n]

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
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
        if T == 1 and inputs.valid.shape[0] == 1 and resolve_backend(layer.settings.backend, keys.device) == "triton":
            # one decode row, no padding: the fused kernel ranks in one pass over the importance keys
            from ..kernels.scoring.decode import score_decode

            scores = score_decode(queries, keys, layer.predictor.config.score_scale)  # [B, H_k, 1, L], log-probabilities
            B, H_k, _, L = scores.shape
            H = inputs.num_key_value_heads
            if H_k != H:  # importance keys per query head (attentive predictor): the max over each KV group
                scores = scores.view(B, H, H_k // H, 1, L).amax(dim=2)
            return scores  # [B, H_kv, 1, L]: the log of the same scores
        logits = layer.predictor.score_logits(queries, keys)  # [B, HQ, T, L]
        valid = None if inputs.all_valid else inputs.valid
        return group_max_probabilities(logits, valid, inputs.num_key_value_heads)
