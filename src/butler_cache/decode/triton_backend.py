"""`TritonBackend`: a sparse layer's decode step on CUDA tensors (or on the CPU under ``TRITON_INTERPRET=1``).

The butler policy's one-row scoring runs the fused Triton scoring kernel (`kernels/scoring/decode.py`) and the
attention the split-K sparse decode kernel (`kernels/sparse_attention/decode.py`); the rest is the PyTorch path.
"""

from __future__ import annotations

import torch

from ..policies import ButlerPolicy, ScoringInputs
from ..selection import Selection
from .torch_backend import TorchBackend


class TritonBackend(TorchBackend):
    """The Triton decode paths of one `ButlerLayer` (see the module docstring)."""

    name = "triton"

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        layer = inputs.layer
        policy = layer.settings.policy
        one_unpadded_row = inputs.query.shape[2] == 1 and inputs.valid.shape[0] == 1
        if not (one_unpadded_row and type(policy).score is ButlerPolicy.score):
            return super().score(inputs)
        from ..kernels.scoring.decode import score_decode

        queries, keys = policy.importance(inputs)  # [B, HQ, 1, d'], [B, H_k, L, d'] (checked in sync)
        scores = score_decode(queries, keys, layer.predictor.config.score_scale)  # [B, H_k, 1, L] log-probabilities
        B, H_k, _, L = scores.shape
        H = inputs.num_key_value_heads
        if H_k != H:  # importance keys per query head (attentive predictor): the max over each KV group
            scores = scores.view(B, H, H_k // H, 1, L).amax(dim=2)
        return scores  # [B, H_kv, 1, L]: the log of the PyTorch path's scores

    def attend(self, inputs: ScoringInputs, value: torch.Tensor, selection: Selection) -> torch.Tensor:
        from ..kernels.sparse_attention.decode import sparse_decode_attention

        return sparse_decode_attention(inputs.query, inputs.key, value, selection.indices, selection.keep,
                                       inputs.scaling)  # [B, 1, HQ, Dv]
