"""PyTorch reference of decode-step token scoring."""

from __future__ import annotations

import torch


def score_reference(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """PyTorch reference: ``[B, HQ, 1, E]`` x ``[B, H, L, E]`` -> ``[B, H, 1, L]`` log group-max probabilities."""
    B, HQ, _, E = queries.shape
    H = keys.shape[1]
    logits = torch.einsum("bhge,bhle->bhgl", queries[:, :, 0].view(B, H, HQ // H, E).float(), keys.float()) * scale
    return torch.log_softmax(logits, dim=-1).amax(dim=2)[:, :, None]
