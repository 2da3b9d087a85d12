"""Triton token scoring for one decode step: importance queries against the cached importance keys.

Ranks keys for selection the way `group_max_probabilities` does, in one pass over the importance-key
cache: program ``(b * H + h, split)`` loads the ``G`` importance queries of KV group ``h`` once, walks
its share of the keys, writes the ``[G, L]`` logits and a per-split (max, sum) of each head's softmax;
a second kernel reads the logits back (``G`` floats per token, fewer bytes than the keys) and writes
``max_g (logit_g - logsumexp_g)``, the log of the group-max probability: the same order, hence the
same top-k. Reference: `reference.score_reference` (PyTorch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def score_logits_kernel(
    q, k, logits, part_m, part_l,
    scale, L, G, E, H, SPLIT,
    sq_b, sq_h, sk_b, sk_h, sk_l,
    BG: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr, NS: tl.constexpr,
):
    i_bh, i_sp = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_g, o_e = tl.arange(0, BG), tl.arange(0, BE)
    m_g, m_e = o_g < G, o_e < E
    p_q = q + i_b * sq_b + (i_h * G + o_g)[:, None] * sq_h + o_e[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_e[None, :], other=0.0).to(tl.float32)  # [BG, BE]
    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    start = i_sp * SPLIT
    end = tl.minimum(start + SPLIT, L)
    for l0 in range(start, end, BL):
        o_l = l0 + tl.arange(0, BL)
        m_l = o_l < end
        p_k = k + i_b * sk_b + i_h * sk_h + o_l[:, None] * sk_l + o_e[None, :]
        b_k = tl.load(p_k, mask=m_l[:, None] & m_e[None, :], other=0.0).to(tl.float32)  # [BL, BE]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * scale  # [BG, BL]
        b_s = tl.where(m_l[None, :], b_s, float("-inf"))
        p_out = logits + (i_bh * G + o_g)[:, None] * L + o_l[None, :]
        tl.store(p_out, b_s, mask=m_g[:, None] & m_l[None, :])
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_l = b_l * tl.exp(b_m - b_m_ref) + tl.sum(tl.exp(b_s - b_m_ref[:, None]), 1)
        b_m = b_m_new
    o_part = (i_bh * NS + i_sp) * BG + o_g
    tl.store(part_m + o_part, b_m)
    tl.store(part_l + o_part, b_l)


@triton.jit
def group_max_kernel(
    logits, part_m, part_l, out, L, G, SPLIT_L,
    BG: tl.constexpr, BL: tl.constexpr, NS: tl.constexpr,
):
    i_bh, i_l = tl.program_id(0), tl.program_id(1)
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    rows = (i_bh * NS + tl.arange(0, NS))[:, None] * BG + o_g[None, :]  # [NS, BG]
    b_m, b_l = tl.load(part_m + rows), tl.load(part_l + rows)
    m_all = tl.max(b_m, 0)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    lse = m_ref + tl.log(tl.sum(b_l * tl.exp(b_m - m_ref[None, :]), 0))  # [BG]
    for l0 in range(i_l * SPLIT_L, tl.minimum((i_l + 1) * SPLIT_L, L), BL):
        o_l = l0 + tl.arange(0, BL)
        m_l = o_l < L
        b_s = tl.load(logits + (i_bh * G + o_g)[:, None] * L + o_l[None, :], mask=m_g[:, None] & m_l[None, :],
                      other=float("-inf"))
        b_best = tl.max(b_s - lse[:, None], 0)  # [BL]
        tl.store(out + i_bh * L + o_l, b_best, mask=m_l)


def launch_config(rows: int, group: int, dim: int, length: int) -> dict[str, int]:
    """The block sizes of `score_logits_kernel` (and `group_max_kernel`: ``BG``, ``BL``, ``NS``) for ``rows = B * H``
    (sequence, KV head) pairs, ``group`` importance queries per KV head, importance dim ``dim`` and ``length`` keys."""
    BL = 128
    NS = max(1, min(triton.next_power_of_2(triton.cdiv(length, BL)), triton.next_power_of_2(triton.cdiv(256, rows)), 64))
    return dict(BG=max(16, triton.next_power_of_2(group)), BL=BL, BE=max(16, triton.next_power_of_2(dim)), NS=NS)


def score_decode(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton version of `score_reference` (one query row, all keys valid). Returns ``[B, H, 1, L]`` float32."""
    B, HQ, T, E = queries.shape
    H, L = keys.shape[1], keys.shape[2]
    if T != 1:
        raise ValueError(f"score_decode takes one query row, got {T}")
    if keys.stride(-1) != 1:
        raise ValueError("keys need a contiguous last dimension")
    G = HQ // H
    q = queries[:, :, 0].contiguous()  # [B, HQ, E]
    config = launch_config(B * H, G, E, L)
    BG, BL, NS = config["BG"], config["BL"], config["NS"]
    split = triton.cdiv(triton.cdiv(L, NS), BL) * BL
    logits = torch.empty(B * H * G * L, dtype=torch.float32, device=keys.device)
    part_m = torch.empty(B * H * NS * BG, dtype=torch.float32, device=keys.device)
    part_l = torch.empty_like(part_m)
    score_logits_kernel[(B * H, NS)](
        q, keys, logits, part_m, part_l, scale, L, G, E, H, split,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        **config,
    )
    out = torch.empty(B, H, 1, L, dtype=torch.float32, device=keys.device)
    group_max_kernel[(B * H, NS)](logits, part_m, part_l, out, L, G, split, BG=BG, BL=BL, NS=NS)
    return out
