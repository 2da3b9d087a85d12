"""Sparse decode attention in PyTorch, for CPUs: one query row per sequence, K/V rows gathered once.

The reference (`naive.py`) gathers with `torch.gather` over an index expanded to every element and
runs 5-D einsums; on one decode row per layer those generic paths cost more than the attention.
Here each selected row is copied whole (`index_select` over a row view of the cache, which works on
the prefix views `ButlerLayer` keeps) and the group's query heads share one matmul per KV head.
"""

from __future__ import annotations

import torch


def _row_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """``x`` ``[B, H, L, D]`` as a 2-D ``[rows, D]`` view over its memory, with the rows (of that view) between
    consecutive batch entries and between consecutive heads; None when its rows are not whole, evenly placed
    rows of one tensor."""
    B, H, L, D = x.shape
    s_b, s_h, s_l, s_d = x.stride()
    if s_d != 1 or s_l < D or s_b % s_l or s_h % s_l:
        return None
    rows = ((B - 1) * s_b + (H - 1) * s_h) // s_l + L  # rows of the view that the indices can reach
    return torch.as_strided(x, (rows, D), (s_l, 1)), s_b // s_l, s_h // s_l  # row r starts at x's offset + r * s_l


def _first_rows(B: int, H: int, row_b: int, row_h: int, device: torch.device) -> torch.Tensor:
    """Row of the 2-D view where each (b, h) starts, ``[B, H, 1]``: one ``arange`` in the usual layouts."""
    step = row_h if H > 1 else row_b
    if (B == 1 or H == 1 or row_b == H * row_h) and step > 0:  # (b, h) evenly spaced in b-major order
        return torch.arange(0, B * H * step, step, device=device).view(B, H, 1)
    return (torch.arange(B, device=device)[:, None] * row_b + torch.arange(H, device=device) * row_h)[..., None]


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[b, h, indices[b, h, s], :]`` for ``x`` ``[B, H, L, D]`` and ``indices`` ``[B, H, S]`` -> ``[B, H, S, D]``.

    Equal to ``x.gather(2, indices[..., None].expand(..., D))``; copies whole rows when ``x``'s rows
    are contiguous and its batch/head strides are whole rows (any prefix view of a contiguous tensor).
    """
    return _gather_rows_of((x,), indices)[0]


def _gather_rows_of(tensors: tuple[torch.Tensor, ...], indices: torch.Tensor) -> list[torch.Tensor]:
    """`gather_rows` of several ``[B, H, L, *]`` tensors; the row index is computed once when they share a layout."""
    B, H, _, _ = tensors[0].shape
    S = indices.shape[-1]
    views = [_row_view(x) for x in tensors]
    if any(v is None for v in views) or len({x.stride() for x in tensors}) > 1:
        if len(tensors) > 1:
            return [gather_rows(x, indices) for x in tensors]
        x = tensors[0]
        return [x.gather(2, indices[..., None].expand(B, H, S, x.shape[-1]))]
    _, row_b, row_h = views[0]
    flat = (indices + _first_rows(B, H, row_b, row_h, indices.device)).reshape(-1)  # [B * H * S] rows of the views
    return [rows.index_select(0, flat).view(B, H, S, x.shape[-1]) for (rows, _, _), x in zip(views, tensors, strict=True)]


def sparse_decode_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """`sparse_attention_naive` for one query row (``T == 1``); same shapes, same result up to rounding.

    ``keep=None`` means every slot is kept (the common decode case, which skips the masking).
    """
    B, HQ, T, K = query.shape
    if T != 1:
        raise ValueError(f"sparse_decode_attention_torch serves one query row per sequence, got {T}")
    H, V = key.shape[1], value.shape[-1]
    G, S = HQ // H, indices.shape[-1]
    acc = torch.promote_types(query.dtype, torch.float32)
    idx = indices.reshape(B, H, S)
    k_sel, v_sel = (t.to(acc) for t in _gather_rows_of((key, value), idx))  # [B, H, S, K], [B, H, S, V]
    q = query.reshape(B, H, G, K).to(acc)
    logits = torch.matmul(q, k_sel.transpose(-1, -2)) * scale  # [B, H, G, S]
    if keep is not None:
        logits = logits.masked_fill(~keep.reshape(B, H, 1, S), float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    else:
        probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, v_sel)  # [B, H, G, V]
    return out.reshape(B, 1, HQ, V).to(query.dtype)
