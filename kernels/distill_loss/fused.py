"""Fused distillation loss in Triton: teacher and student logits streamed over key blocks, no ``T x T`` matrix.

Forward: program ``(row block, b * HQ + h)`` walks the causal key blocks once, recomputing the
teacher logits ``t = q_t k_t^T * scale_t`` and the student logits ``s = q_s k_s^T * scale_s``, and keeps
per row an online log-sum-exp of both and, for KL, ``sum_j exp(t_j - m) (t_j - s_j)``, so that
``KL = acc / l_t - lse_t + lse_s``; for MSE the sum of ``(s - t)^2``. Backward: ``dS = g (softmax(s) -
softmax(t)) * scale_s`` (KL) or ``2 g (s - t) * scale_s`` (MSE), recomputed block by block; one kernel
accumulates the student-query gradient over key blocks, another the student-key gradient over row
blocks and the query heads sharing the key head. Reference: `butler_cache.training.losses`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logits(tq, tk, sq, sk, i_b, i_h, o_t, o_s, m_t, m_s, T, D, E, HQ, GT, GS, ts, ss,
            BD: tl.constexpr, BE: tl.constexpr):
    """Teacher and student logits of rows ``o_t`` against keys ``o_s``: two ``[BT, BS]`` blocks."""
    o_d, o_e = tl.arange(0, BD), tl.arange(0, BE)
    b_tq = tl.load(tq + ((i_b * HQ + i_h) * T + o_t)[:, None] * D + o_d[None, :], mask=m_t[:, None] & (o_d < D)[None, :], other=0.0)
    b_tk = tl.load(tk + ((i_b * (HQ // GT) + i_h // GT) * T + o_s)[:, None] * D + o_d[None, :],
                   mask=m_s[:, None] & (o_d < D)[None, :], other=0.0)
    b_sq = tl.load(sq + ((i_b * HQ + i_h) * T + o_t)[:, None] * E + o_e[None, :], mask=m_t[:, None] & (o_e < E)[None, :], other=0.0)
    b_sk = tl.load(sk + ((i_b * (HQ // GS) + i_h // GS) * T + o_s)[:, None] * E + o_e[None, :],
                   mask=m_s[:, None] & (o_e < E)[None, :], other=0.0)
    b_t = tl.dot(b_tq.to(tl.float32), tl.trans(b_tk.to(tl.float32)), input_precision="ieee") * ts
    b_s = tl.dot(b_sq.to(tl.float32), tl.trans(b_sk.to(tl.float32)), input_precision="ieee") * ss
    return b_t, b_s, b_sq, b_sk


@triton.jit
def _valid(pad, i_b, o_t, o_s, m_t, m_s, T, HAS_PAD: tl.constexpr):
    ok = m_t[:, None] & m_s[None, :] & (o_s[None, :] <= o_t[:, None])
    if HAS_PAD:
        ok = ok & (tl.load(pad + i_b * T + o_s, mask=m_s, other=0) != 0)[None, :]
    return ok


@triton.jit
def distill_fwd_kernel(
    tq, tk, sq, sk, pad, loss, lse_t, lse_s, count,
    ts, ss, T, D, E, HQ, GT, GS,
    KL: tl.constexpr, HAS_PAD: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_mt = tl.full([BT], float("-inf"), dtype=tl.float32)
    b_lt = tl.zeros([BT], dtype=tl.float32)
    b_ms = tl.full([BT], float("-inf"), dtype=tl.float32)
    b_ls = tl.zeros([BT], dtype=tl.float32)
    b_acc = tl.zeros([BT], dtype=tl.float32)
    b_n = tl.zeros([BT], dtype=tl.float32)
    for s0 in range(0, tl.minimum((i_t + 1) * BT, T), BS):
        o_s = s0 + tl.arange(0, BS)
        m_s = o_s < T
        b_t, b_s, _, _ = _logits(tq, tk, sq, sk, i_b, i_h, o_t, o_s, m_t, m_s, T, D, E, HQ, GT, GS, ts, ss, BD, BE)
        ok = _valid(pad, i_b, o_t, o_s, m_t, m_s, T, HAS_PAD)
        b_n += tl.sum(ok.to(tl.float32), 1)
        if KL:
            b_d = tl.where(ok, b_t - b_s, 0.0)  # before masking: -inf - -inf would be NaN in the masked lanes
            b_t = tl.where(ok, b_t, float("-inf"))
            b_s = tl.where(ok, b_s, float("-inf"))
            mt_new = tl.maximum(b_mt, tl.max(b_t, 1))
            mt_ref = tl.where(mt_new == float("-inf"), 0.0, mt_new)
            alpha = tl.exp(b_mt - mt_ref)
            b_p = tl.exp(b_t - mt_ref[:, None])
            b_lt = b_lt * alpha + tl.sum(b_p, 1)
            b_acc = b_acc * alpha + tl.sum(b_p * b_d, 1)
            b_mt = mt_new
            ms_new = tl.maximum(b_ms, tl.max(b_s, 1))
            ms_ref = tl.where(ms_new == float("-inf"), 0.0, ms_new)
            b_ls = b_ls * tl.exp(b_ms - ms_ref) + tl.sum(tl.exp(b_s - ms_ref[:, None]), 1)
            b_ms = ms_new
        else:
            b_acc += tl.sum(tl.where(ok, (b_s - b_t) * (b_s - b_t), 0.0), 1)
    row_ok = m_t & (b_n > 0)
    if HAS_PAD:
        row_ok = row_ok & (tl.load(pad + i_b * T + o_t, mask=m_t, other=0) != 0)
    if KL:
        l_t = tl.where(row_ok, b_lt, 1.0)
        l_s = tl.where(row_ok, b_ls, 1.0)
        lt = tl.where(row_ok, b_mt, 0.0) + tl.log(l_t)
        ls = tl.where(row_ok, b_ms, 0.0) + tl.log(l_s)
        row_loss = tl.where(row_ok, b_acc / l_t - lt + ls, 0.0)
        tl.store(lse_t + i_bh * T + o_t, lt, mask=m_t)
        tl.store(lse_s + i_bh * T + o_t, ls, mask=m_t)
        tl.store(count + i_bh * T + o_t, row_ok.to(tl.float32), mask=m_t)
    else:
        row_loss = b_acc
        tl.store(count + i_bh * T + o_t, b_n, mask=m_t)
    tl.store(loss + i_bh * T + o_t, row_loss, mask=m_t)


@triton.jit
def _dlogits(b_t, b_s, ok, lt, ls, g, ss, KL: tl.constexpr):
    if KL:
        d = tl.exp(b_s - ls[:, None]) - tl.exp(b_t - lt[:, None])
    else:
        d = 2.0 * (b_s - b_t)
    return tl.where(ok, d * g * ss, 0.0)


@triton.jit
def distill_bwd_dq_kernel(
    tq, tk, sq, sk, pad, lse_t, lse_s, rows_ok, dsq, g,
    ts, ss, T, D, E, HQ, GT, GS,
    KL: tl.constexpr, HAS_PAD: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_e = tl.arange(0, BE)
    lt = tl.load(lse_t + i_bh * T + o_t, mask=m_t, other=0.0)
    ls = tl.load(lse_s + i_bh * T + o_t, mask=m_t, other=0.0)
    r_ok = tl.load(rows_ok + i_bh * T + o_t, mask=m_t, other=0.0) > 0
    b_dq = tl.zeros([BT, BE], dtype=tl.float32)
    for s0 in range(0, tl.minimum((i_t + 1) * BT, T), BS):
        o_s = s0 + tl.arange(0, BS)
        m_s = o_s < T
        b_t, b_s, _, b_sk = _logits(tq, tk, sq, sk, i_b, i_h, o_t, o_s, m_t, m_s, T, D, E, HQ, GT, GS, ts, ss, BD, BE)
        ok = _valid(pad, i_b, o_t, o_s, m_t, m_s, T, HAS_PAD) & r_ok[:, None]
        b_ds = _dlogits(b_t, b_s, ok, lt, ls, g, ss, KL)
        b_dq += tl.dot(b_ds, b_sk.to(tl.float32), input_precision="ieee")
    tl.store(dsq + (i_bh * T + o_t)[:, None] * E + o_e[None, :], b_dq, mask=m_t[:, None] & (o_e < E)[None, :])


@triton.jit
def distill_bwd_dk_kernel(
    tq, tk, sq, sk, pad, lse_t, lse_s, rows_ok, dsk, g,
    ts, ss, T, D, E, HQ, GT, GS,
    KL: tl.constexpr, HAS_PAD: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):
    i_s, i_bk = tl.program_id(0), tl.program_id(1)  # key block, (batch, student key head)
    HS = HQ // GS
    i_b, i_k = i_bk // HS, i_bk % HS
    o_s = i_s * BS + tl.arange(0, BS)
    m_s = o_s < T
    o_e = tl.arange(0, BE)
    b_dk = tl.zeros([BS, BE], dtype=tl.float32)
    for g_i in range(0, GS):
        i_h = i_k * GS + g_i
        i_bh = i_b * HQ + i_h
        for t0 in range((i_s * BS) // BT * BT, T, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < T
            lt = tl.load(lse_t + i_bh * T + o_t, mask=m_t, other=0.0)
            ls = tl.load(lse_s + i_bh * T + o_t, mask=m_t, other=0.0)
            r_ok = tl.load(rows_ok + i_bh * T + o_t, mask=m_t, other=0.0) > 0
            b_t, b_s, b_sq, _ = _logits(tq, tk, sq, sk, i_b, i_h, o_t, o_s, m_t, m_s, T, D, E, HQ, GT, GS, ts, ss, BD, BE)
            ok = _valid(pad, i_b, o_t, o_s, m_t, m_s, T, HAS_PAD) & r_ok[:, None]
            b_ds = _dlogits(b_t, b_s, ok, lt, ls, g, ss, KL)  # [BT, BS]
            b_dk += tl.dot(tl.trans(b_ds), b_sq.to(tl.float32), input_precision="ieee")
    tl.store(dsk + (i_bk * T + o_s)[:, None] * E + o_e[None, :], b_dk, mask=m_s[:, None] & (o_e < E)[None, :])


def launch_config(D: int, E: int) -> dict[str, int]:
    """Block sizes of the three kernels for teacher head dim ``D`` and importance dim ``E``: 16 key rows per block,
    which compiles without register spills for D = 64 on sm_80 and sm_90 (benchmarks/aot_compile.py; 32 spilled)."""
    return dict(BT=32, BS=16, BD=max(16, triton.next_power_of_2(D)), BE=max(16, triton.next_power_of_2(E)))


class FusedDistillationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tq, tk, sq, sk, pad, ts, ss, kl):
        B, HQ, T, D = tq.shape
        E = sq.shape[-1]
        GT, GS = HQ // tk.shape[1], HQ // sk.shape[1]
        tq, tk, sq, sk = (x.contiguous() for x in (tq, tk, sq, sk))
        pad_arg = pad.to(torch.int8).contiguous() if pad is not None else tq
        f32 = dict(dtype=torch.float32, device=tq.device)
        loss, lse_t, lse_s, count = (torch.empty(B * HQ * T, **f32) for _ in range(4))
        blocks = launch_config(D, E)
        grid = (triton.cdiv(T, blocks["BT"]), B * HQ)
        distill_fwd_kernel[grid](tq, tk, sq, sk, pad_arg, loss, lse_t, lse_s, count, ts, ss, T, D, E, HQ, GT, GS,
                                 KL=kl, HAS_PAD=pad is not None, **blocks)
        ctx.save_for_backward(tq, tk, sq, sk, pad_arg, lse_t, lse_s, count)
        ctx.args = (ts, ss, T, D, E, HQ, GT, GS, kl, pad is not None, B)
        return loss.sum(), count.sum()

    @staticmethod
    def backward(ctx, grad_sum, _grad_count):
        tq, tk, sq, sk, pad_arg, lse_t, lse_s, count = ctx.saved_tensors
        ts, ss, T, D, E, HQ, GT, GS, kl, has_pad, B = ctx.args
        rows_ok = count if kl else torch.ones_like(count)
        blocks = launch_config(D, E)
        dsq = torch.empty(B * HQ * T * E, dtype=torch.float32, device=sq.device)
        dsk = torch.empty(B * (HQ // GS) * T * E, dtype=torch.float32, device=sq.device)
        common = (ts, ss, T, D, E, HQ, GT, GS)
        g = grad_sum.item()
        distill_bwd_dq_kernel[(triton.cdiv(T, blocks["BT"]), B * HQ)](
            tq, tk, sq, sk, pad_arg, lse_t, lse_s, rows_ok, dsq, g, *common, KL=kl, HAS_PAD=has_pad, **blocks)
        distill_bwd_dk_kernel[(triton.cdiv(T, blocks["BS"]), B * (HQ // GS))](
            tq, tk, sq, sk, pad_arg, lse_t, lse_s, rows_ok, dsk, g, *common, KL=kl, HAS_PAD=has_pad, **blocks)
        return (None, None, dsq.view(sq.shape).to(sq.dtype), dsk.view(sk.shape).to(sk.dtype), None, None, None, None)


def fused_distillation_loss(teacher_q, teacher_k, student_q, student_k, *, teacher_scale: float, student_scale: float,
                            key_padding: torch.Tensor | None = None, loss: str = "kl") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `butler_cache.training.losses.distillation_loss`: ``(sum, count)``."""
    return FusedDistillationLoss.apply(teacher_q.detach(), teacher_k.detach(), student_q, student_k, key_padding,
                                       float(teacher_scale), float(student_scale), loss == "kl")
