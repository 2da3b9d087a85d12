"""Reference sparse attention in plain PyTorch: every query row attends to its own gathered K/V rows.

The Triton kernel (issue "Triton kernels") is tested against this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_attention_naive(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of each query row over the K/V rows its KV head selected.

    Parameters
    ----------
    query : ``[B, HQ, T, K]``; the ``G = HQ // H`` query heads of a group share a KV head.
    key : ``[B, H, L, K]``.
    value : ``[B, H, L, V]``.
    indices : ``[B, H, T, S]`` int64 positions into ``L`` selected for each query row.
    keep : ``[B, H, T, S]`` bool, False for slots that must not be attended (budget padding).
    scale : softmax scale, usually ``K ** -0.5``.

    Returns
    -------
    ``[B, T, HQ, V]`` in ``query.dtype``, computed in float32 (float64 for float64 inputs). A row with
    no kept slot returns zeros.
    """
    B, HQ, T, K = query.shape
    H, V = key.shape[1], value.shape[-1]
    S = indices.shape[-1]
    G = HQ // H
    acc = torch.promote_types(query.dtype, torch.float32)
    idx = indices.reshape(B, H, T * S, 1)
    k_sel = key.gather(2, idx.expand(B, H, T * S, K)).view(B, H, T, S, K).to(acc)
    v_sel = value.gather(2, idx.expand(B, H, T * S, V)).view(B, H, T, S, V).to(acc)
    q = query.view(B, H, G, T, K).to(acc)
    logits = torch.einsum("bhgtk,bhtsk->bhgts", q, k_sel) * scale  # [B, H, G, T, S]
    logits = logits.masked_fill(~keep[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    out = torch.einsum("bhgts,bhtsv->bhgtv", probs, v_sel)  # [B, H, G, T, V]
    return out.reshape(B, HQ, T, V).transpose(1, 2).contiguous().to(query.dtype)


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense attention restricted by a per-KV-head boolean mask ``[B, H_kv, T, L]``; returns ``[B, T, HQ, D]``.

    The multi-row sparse forwards (``sparse_prefill``) run this. Rows with nothing to attend (left-padding
    queries) attend to everything, so that they stay finite; their outputs are never read by valid tokens.
    """
    groups = query.shape[1] // key.shape[1]
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    mask = mask.repeat_interleave(groups, dim=1)  # [B, HQ, T, L]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()
