"""How well a scorer finds the tokens the model attends to: top-k overlap, token hits, recall@k."""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, valid: torch.Tensor, k_rows: torch.Tensor) -> torch.Tensor:
    """Boolean mask of each row's ``k_rows`` best valid keys. ``scores`` ``[..., L]``, ``k_rows`` ``[...]``."""
    k = max(int(k_rows.max().item()), 1)
    priority = scores.masked_fill(~valid, float("-inf"))
    idx = priority.topk(min(k, scores.shape[-1]), dim=-1).indices
    keep = torch.arange(idx.shape[-1], device=scores.device) < k_rows[..., None]
    return torch.zeros_like(valid).scatter_(-1, idx, keep) & valid


def topk_overlap(
    true_scores: torch.Tensor,
    predicted_scores: torch.Tensor,
    valid: torch.Tensor,
    *,
    k: int | None = None,
    fraction: float | None = None,
) -> torch.Tensor:
    """Per row, the share of the true top keys that the predicted top keys contain.

    ``true_scores``, ``predicted_scores``: ``[..., L]``; ``valid``: broadcastable bool. Give ``k`` (a
    count, capped by the row's valid keys: recall@k) or ``fraction`` (``ceil(fraction * n)`` of the
    row's ``n`` valid keys: the paper's token-hit accuracy uses 0.5). Returns ``[...]`` in [0, 1].
    """
    if (k is None) == (fraction is None):
        raise ValueError("give exactly one of k and fraction")
    valid = valid.expand_as(true_scores)
    n = valid.sum(-1)
    k_rows = torch.clamp(n, max=k) if k is not None else torch.ceil(n.double() * fraction - 1e-9).long()
    k_rows = k_rows.clamp(min=1)
    hits = (topk_mask(true_scores, valid, k_rows) & topk_mask(predicted_scores, valid, k_rows)).sum(-1)
    return hits.double() / k_rows.double()


def token_hit_accuracy(true_scores: torch.Tensor, predicted_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Overlap of the predicted and true top-50% keys of each row (TokenButler's token-hit accuracy)."""
    return topk_overlap(true_scores, predicted_scores, valid, fraction=0.5)


def recall_at_k(true_scores: torch.Tensor, predicted_scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the true top-``k`` keys among the predicted top-``k`` (``k`` capped by the context)."""
    return topk_overlap(true_scores, predicted_scores, valid, k=k)

