"""SnapKV: an observation window of the last prompt queries votes once which prompt tokens stay."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..selection import Selection
from .base import ScoringInputs, SelectionPolicy, group_sum, true_probabilities


@dataclass
class SnapKVPolicy(SelectionPolicy):
    """SnapKV (Li et al., 2024, arXiv 2404.14469).

    After the prefill, the last ``observation_window`` prompt queries vote: their attention to each
    prompt key is summed (over the window and the GQA group) and max-pooled along the keys
    (``kernel_size``) so that neighbours of important tokens stay too. The observation window itself
    and every token generated afterwards are always kept; the other prompt tokens keep their vote,
    so those outside the budget are dropped for good (votes never change).

    Teacher-forced (``sparse_prefill``), row ``i`` is scored by the window of the
    ``observation_window`` rows ending at ``i``.
    """

    name = "snapkv"
    stateful = True
    observation_window: int = 32
    kernel_size: int = 7

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        L, T = inputs.key.shape[2], inputs.query.shape[2]
        if T == 1:  # decoding: the votes of the prefill; later tokens were filled with +inf
            return inputs.layer.token_state("snapkv_votes", L, fill=float("inf"))[..., 0][:, :, None, :]
        probs = group_sum(true_probabilities(inputs), inputs.num_key_value_heads)  # [B, H, T, L]
        summed = probs.cumsum(dim=2)
        w = self.observation_window
        windowed = summed - F.pad(summed, (0, 0, w, 0))[:, :, :T]  # rows i-w+1 .. i
        votes = self._pool(windowed)
        rows = torch.arange(L - T, L, device=votes.device)[:, None]
        recent = torch.arange(L, device=votes.device)[None, :] > rows - w  # the row's observation window
        return votes.masked_fill(recent, float("inf"))

    def observe(self, inputs: ScoringInputs, selection: Selection | None) -> None:
        layer, L, T = inputs.layer, inputs.key.shape[2], inputs.query.shape[2]
        if "snapkv_votes" in layer.policy_state or T == 1:
            layer.token_state("snapkv_votes", L, fill=float("inf"))
            return
        w = min(self.observation_window, T)  # the prefill: vote once
        window = ScoringInputs(inputs.query[:, :, -w:], inputs.key, inputs.valid[:, :, -w:], inputs.scaling, layer)
        probs = group_sum(true_probabilities(window), inputs.num_key_value_heads)  # [B, H, w, L]
        votes = self._pool(probs.sum(dim=2, keepdim=True))[:, :, 0]  # [B, H, L]
        votes[..., L - w :] = float("inf")
        layer.policy_state["snapkv_votes"] = votes[..., None]

    def _pool(self, votes: torch.Tensor) -> torch.Tensor:
        """Max-pool ``[B, H, T, L]`` along the keys with ``kernel_size`` (same length)."""
        B, H, T, L = votes.shape
        pooled = F.max_pool1d(votes.reshape(B * H * T, 1, L), self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return pooled.view(B, H, T, L)
