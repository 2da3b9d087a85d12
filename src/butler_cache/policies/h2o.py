"""H2O: heavy hitters by accumulated attention plus a recent window; evicted tokens never return."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import Selection
from .base import ScoringInputs, SelectionPolicy, group_sum, true_probabilities


@dataclass
class H2OPolicy(SelectionPolicy):
    """H2O (Zhang et al., 2023, arXiv 2306.14048).

    Each key's score is the attention it has received, summed over all past queries (and over the
    query heads of its GQA group). As in the paper, ``recent_ratio`` of each row's budget goes to the
    most recent tokens and the rest to these heavy hitters. At every decode step the cache keeps sinks + window + the
    top-scored keys within the budget and evicts the rest for good: an evicted key is never attended
    again. The attention accumulated is the one actually computed (over the selected keys).

    Teacher-forced (``sparse_prefill``), row ``i`` ranks keys by the attention of rows ``< i`` of the
    same forward (dense probabilities) plus that of earlier forwards; eviction, being sequential, is
    applied only between decode steps.
    """

    name = "h2o"
    stateful = True
    recent_ratio: float = 0.5

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        layer, L, T = inputs.layer, inputs.key.shape[2], inputs.query.shape[2]
        accumulated = layer.token_state("h2o_accumulated", L)[..., 0]  # [B, H, L]
        evicted = layer.token_state("h2o_evicted", L)[..., 0] > 0
        scores = accumulated[:, :, None, :].expand(-1, -1, T, -1)
        if T > 1:
            probs = group_sum(true_probabilities(inputs), inputs.num_key_value_heads)  # [B, H, T, L]
            scores = scores + probs.cumsum(dim=2) - probs  # attention of the earlier rows of this forward
        valid = inputs.valid
        recent = torch.floor(layer.settings.budget.per_row(valid.sum(-1)).double() * self.recent_ratio).long()
        rank_from_end = valid.flip(-1).cumsum(-1).flip(-1)  # 1 for the newest valid key
        is_recent = valid & (rank_from_end <= recent[..., None])  # [B|1, 1, T, L]
        return scores.masked_fill(evicted[:, :, None, :], float("-inf")).masked_fill(is_recent, float("inf"))

    def observe(self, inputs: ScoringInputs, selection: Selection | None, block: int = 256) -> None:
        layer, L, T = inputs.layer, inputs.key.shape[2], inputs.query.shape[2]
        mask = inputs.valid if selection is None else selection.as_mask(L) & inputs.valid  # [B|1, H|1, T, L]
        received = 0.0
        for start in range(0, T, block):  # blocks of query rows: a long prefill never holds [HQ, T, L] at once
            rows = slice(start, start + block)
            part = ScoringInputs(inputs.query[:, :, rows], inputs.key, inputs.valid[:, :, rows], inputs.scaling, layer)
            probs = true_probabilities(part, mask[:, :, rows])  # [B, HQ, b, L]
            received = received + group_sum(probs, inputs.num_key_value_heads).sum(dim=2)  # [B, H, L]
        state = layer.token_state("h2o_accumulated", L)
        layer.policy_state["h2o_accumulated"] = state + received[..., None]
        if selection is not None and inputs.query.shape[2] == 1:
            evicted = layer.token_state("h2o_evicted", L)
            dropped = (inputs.valid & ~mask)[:, :, 0].expand(evicted.shape[:3])  # [B, H, L]
            layer.policy_state["h2o_evicted"] = torch.maximum(evicted, dropped[..., None].float())
