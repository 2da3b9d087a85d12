"""Triton sparse decode attention: one query row per sequence against its selected K/V rows.

Flash-decoding over the budget: program ``(b * H + h, split)`` loads the ``G`` query heads of KV
head ``h`` once, walks its share of the selected positions in blocks of ``BS`` gathered K/V rows
(each row read once for the whole group) with an online softmax, and writes a partial
``(max, sum, accumulator)``; a second kernel merges the splits with the usual rescaling.
Reference: `sparse_attention_naive` (same signature, any number of query rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def sparse_decode_fwd_kernel(
    q, k, v, idx, keep, part_m, part_l, part_o,
    scale, S, G, K, V, H, SPLIT,
    sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, si_b, si_h,
    BG: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NS: tl.constexpr,
):
    i_bh, i_sp = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_g, o_k, o_v = tl.arange(0, BG), tl.arange(0, BK), tl.arange(0, BV)
    m_g, m_k, m_v = o_g < G, o_k < K, o_v < V

    p_q = q + i_b * sq_b + (i_h * G + o_g)[:, None] * sq_h + o_k[None, :]
    # fp32 throughout: decoding is bound by the bytes read, not by the dot products
    b_q = tl.load(p_q, mask=m_g[:, None] & m_k[None, :], other=0.0).to(tl.float32)  # [BG, BK]
    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_o = tl.zeros([BG, BV], dtype=tl.float32)

    start = i_sp * SPLIT
    end = tl.minimum(start + SPLIT, S)
    for s0 in range(start, end, BS):
        o_s = s0 + tl.arange(0, BS)
        m_s = o_s < end
        b_idx = tl.load(idx + i_b * si_b + i_h * si_h + o_s, mask=m_s, other=0)  # [BS]
        m_s = m_s & (tl.load(keep + i_b * si_b + i_h * si_h + o_s, mask=m_s, other=0) != 0)
        p_k = k + i_b * sk_b + i_h * sk_h + b_idx[:, None] * sk_l + o_k[None, :]
        b_k = tl.load(p_k, mask=m_s[:, None] & m_k[None, :], other=0.0).to(tl.float32)  # [BS, BK]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * scale  # [BG, BS]
        b_s = tl.where(m_s[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with nothing yet stay at zero
        b_p = tl.exp(b_s - b_m_ref[:, None])  # [BG, BS]
        b_alpha = tl.exp(b_m - b_m_ref)
        p_v = v + i_b * sv_b + i_h * sv_h + b_idx[:, None] * sv_l + o_v[None, :]
        b_v = tl.load(p_v, mask=m_s[:, None] & m_v[None, :], other=0.0).to(tl.float32)  # [BS, BV]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_o = b_o * b_alpha[:, None] + tl.dot(b_p, b_v, input_precision="ieee")
        b_m = b_m_new

    o_part = (i_bh * NS + i_sp) * BG + o_g  # [BG] rows of the partial buffers
    tl.store(part_m + o_part, b_m)
    tl.store(part_l + o_part, b_l)
    tl.store(part_o + o_part[:, None] * BV + o_v[None, :], b_o)


@triton.jit
def sparse_decode_merge_kernel(
    part_m, part_l, part_o, out, G, V, H, so_b, so_h,
    BG: tl.constexpr, BV: tl.constexpr, NS: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    o_g, o_v = tl.arange(0, BG), tl.arange(0, BV)
    o_rows = (i_bh * NS + tl.arange(0, NS))[:, None] * BG + o_g[None, :]  # [NS, BG]
    m_all = tl.max(tl.load(part_m + o_rows), 0)  # [BG]
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    b_den = tl.zeros([BG], dtype=tl.float32)
    b_num = tl.zeros([BG, BV], dtype=tl.float32)
    # one split at a time: loading all NS partial outputs at once ([NS, BG, BV]) spills registers
    for i_sp in range(NS):
        o_part = (i_bh * NS + i_sp) * BG + o_g  # [BG]
        b_w = tl.exp(tl.load(part_m + o_part) - m_ref)  # [BG]
        b_den += b_w * tl.load(part_l + o_part)
        b_num += tl.load(part_o + o_part[:, None] * BV + o_v[None, :]) * b_w[:, None]  # [BG, BV]
    b_out = b_num / tl.where(b_den > 0, b_den, 1.0)[:, None]  # nothing kept: zeros, like the reference
    m_g, m_v = o_g < G, o_v < V
    p_out = out + i_b * so_b + (i_h * G + o_g)[:, None] * so_h + o_v[None, :]
    tl.store(p_out, b_out.to(out.dtype.element_ty), mask=m_g[:, None] & m_v[None, :])


def _num_splits(rows: int, selected: int, block: int) -> int:
    """Enough programs to fill a GPU (about 256), never more splits than blocks of selected rows."""
    blocks = triton.next_power_of_2(triton.cdiv(selected, block))  # a power of two: the merge loads them at once
    return max(1, min(blocks, triton.next_power_of_2(triton.cdiv(256, rows)), 64))


def launch_config(rows: int, group: int, key_dim: int, value_dim: int, selected: int) -> dict[str, int]:
    """The block sizes of `sparse_decode_fwd_kernel` for ``rows = B * H`` (sequence, KV head) pairs, ``group``
    query heads per KV head and ``selected`` rows per pair (the ones `benchmarks/aot_compile.py` compiles)."""
    BG = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows
    BK, BV = max(16, triton.next_power_of_2(key_dim)), max(16, triton.next_power_of_2(value_dim))
    # the largest block of gathered rows that compiles without register spills for sm_80 and sm_90 (fp32
    # dot products over [BS, BK] gathered tiles; benchmarks/aot_compile.py checks every launch configuration)
    BS = 16 if max(BK, BV) >= 128 else 32
    return dict(BG=BG, BS=BS, BK=BK, BV=BV, NS=_num_splits(rows, selected, BS))


def sparse_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton sparse attention for one query row. Shapes as `sparse_attention_naive` with ``T == 1``.

    ``query`` ``[B, HQ, 1, K]``, ``key`` ``[B, H, L, K]``, ``value`` ``[B, H, L, V]``, ``indices`` and
    ``keep`` ``[B, H, 1, S]``. Returns ``[B, 1, HQ, V]`` in ``query.dtype``.
    """
    B, HQ, T, K = query.shape
    H, V, S = key.shape[1], value.shape[-1], indices.shape[-1]
    if T != 1:
        raise ValueError(f"sparse_decode_attention takes one query row, got {T}")
    if HQ % H:
        raise ValueError(f"{HQ} query heads are not a multiple of {H} KV heads")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a contiguous last dimension")
    G = HQ // H
    q = query[:, :, 0].contiguous()  # [B, HQ, K]
    idx = indices[:, :, 0].contiguous()  # [B, H, S]
    kp = keep[:, :, 0].to(torch.int8).contiguous()
    config = launch_config(B * H, G, K, V, S)
    BG, BS, BV, NS = config["BG"], config["BS"], config["BV"], config["NS"]
    split = triton.cdiv(triton.cdiv(S, NS), BS) * BS
    part_m = torch.empty(B * H * NS * BG, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    part_o = torch.empty(B * H * NS * BG * BV, dtype=torch.float32, device=query.device)
    out = torch.empty(B, 1, HQ, V, dtype=query.dtype, device=query.device)
    sparse_decode_fwd_kernel[(B * H, NS)](
        q, key, value, idx, kp, part_m, part_l, part_o,
        scale, S, G, K, V, H, split,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), idx.stride(0), idx.stride(1),
        **config,
    )
    sparse_decode_merge_kernel[(B * H,)](
        part_m, part_l, part_o, out, G, V, H, out.stride(0), out.stride(2), BG=BG, BV=BV, NS=NS,
    )
    return out
