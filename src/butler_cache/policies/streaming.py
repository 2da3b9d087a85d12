"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

import torch

from .base import ScoringInputs, SelectionPolicy


class StreamingPolicy(SelectionPolicy):
    """StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): the first tokens (sinks) and a recent window.

    Scores each key by its position, so the budget left after the sinks goes to the most recent
    tokens: the window is ``budget - sink_tokens`` long, whatever ``local_window`` says.
    """

    name = "streaming"

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        B, H, L = inputs.key.shape[0], inputs.num_key_value_heads, inputs.key.shape[2]
        T = inputs.query.shape[2]
        return torch.arange(L, device=inputs.key.device, dtype=torch.float32).expand(B, H, T, L)
