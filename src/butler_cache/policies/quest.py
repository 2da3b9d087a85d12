"""Quest: query-aware page selection from per-page key bounds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoringInputs, SelectionPolicy, upcast


@dataclass
class QuestPolicy(SelectionPolicy):
    """Quest (Tang et al., 2024, arXiv 2406.10774).

    Keys are grouped into pages of ``page_size`` consecutive tokens; each page keeps the element-wise
    min and max of its keys, and its score for a query is ``sum_d max(q_d * min_d, q_d * max_d)``, an
    upper bound of the query's logit with any key of the page. Every token takes its page's score,
    so the top-k fills whole pages; under GQA the group takes the max over its query heads.
    """

    name = "quest"
    page_size: int = 16

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        q, k = upcast(inputs.query), upcast(inputs.key)
        B, HQ, T, D = q.shape
        H, L = k.shape[1], k.shape[2]
        P = -(-L // self.page_size)
        pad = P * self.page_size - L
        # pad with copies of the last key so that padding never widens a page's bounds
        k_padded = torch.cat([k, k[:, :, -1:].expand(B, H, pad, D)], dim=2) if pad else k
        pages = k_padded.view(B, H, P, self.page_size, D)
        kmin, kmax = pages.amin(dim=3), pages.amax(dim=3)  # [B, H, P, D]
        qg = q.view(B, H, HQ // H, T, 1, D)
        bound = torch.maximum(qg * kmin[:, :, None, None], qg * kmax[:, :, None, None]).sum(-1)  # [B, H, G, T, P]
        page_scores = bound.amax(dim=2)  # [B, H, T, P]
        return page_scores.repeat_interleave(self.page_size, dim=-1)[..., :L]
