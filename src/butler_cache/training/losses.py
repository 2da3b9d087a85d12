"""Distillation losses: the predictor's attention against the frozen model's, over the causal past.

``distillation_loss`` streams over blocks of query rows (each block's matrices are recomputed in the
backward pass), so no ``L x L`` matrix of more than one block is alive at once;
``distillation_loss_naive`` is the full-matrix reference the tests compare it with.

- ``"kl"`` (default): ``KL(p_teacher || p_student)`` per query head and row, where both are softmax
  distributions over the row's causal, non-padding past. The predictor's per-head distributions
  are what the per-KV-head selection reduces (max over the group), so each head is matched.
- ``"mse"``: the first paper's mean squared error between pre-softmax logits, causally masked.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..kernels import resolve_backend

LOSSES = ("kl", "mse")


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def _block_sums(
    teacher_q: torch.Tensor,  # [B, HQ, b, D] rows start..start+b
    teacher_k: torch.Tensor,  # [B, H_kv, n, D] keys 0..n (n = start + b)
    student_q: torch.Tensor,  # [B, HQ, b, E]
    student_k: torch.Tensor,  # [B, H_s, n, E]
    key_padding: torch.Tensor | None,  # [B, n] bool
    start: int,
    teacher_scale: float,
    student_scale: float,
    loss: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the loss over the block's terms, number of terms)."""
    HQ, b, n = teacher_q.shape[1], teacher_q.shape[2], teacher_k.shape[2]
    t_logits = (teacher_q.float() @ _expand_heads(teacher_k, HQ).float().transpose(-1, -2)) * teacher_scale
    s_logits = (student_q.float() @ _expand_heads(student_k, HQ).float().transpose(-1, -2)) * student_scale
    positions = torch.arange(start, start + b, device=teacher_q.device)[:, None]
    valid = (torch.arange(n, device=teacher_q.device)[None, :] <= positions)[None, None]  # [1, 1, b, n]
    if key_padding is not None:
        valid = valid & key_padding[:, None, None, :n]
    if loss == "mse":
        diff = (s_logits - t_logits).masked_fill(~valid, 0.0)
        return diff.pow(2).sum(), valid.expand_as(diff).sum()
    row_ok = valid.any(dim=-1, keepdim=True)  # [B|1, 1, b, 1]; rows of left padding see nothing
    softmax_keys = valid | ~row_ok  # such rows softmax over everything, to stay finite, and count for nothing
    t_logp = torch.log_softmax(t_logits.masked_fill(~softmax_keys, float("-inf")), dim=-1)
    s_logp = torch.log_softmax(s_logits.masked_fill(~softmax_keys, float("-inf")), dim=-1)
    terms = t_logp.exp() * (t_logp - s_logp).masked_fill(~valid, 0.0)  # [B, HQ, b, n]
    rows = row_ok[..., 0].expand(terms.shape[:-1])  # [B, HQ, b]
    if key_padding is not None:
        rows = rows & key_padding[:, None, start : start + b]
    return terms.sum(dim=-1).masked_fill(~rows, 0.0).sum(), rows.sum()


def _check(loss: str, teacher_q, teacher_k, student_q, student_k) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not known; expected one of {LOSSES}")
    HQ = teacher_q.shape[1]
    for name, t in (("teacher_k", teacher_k), ("student_k", student_k)):
        if HQ % t.shape[1]:
            raise ValueError(f"{name} has {t.shape[1]} heads, which do not divide the {HQ} query heads")
    if student_q.shape[:3] != teacher_q.shape[:3]:
        raise ValueError(f"student_q {tuple(student_q.shape)} and teacher_q {tuple(teacher_q.shape)} differ in [B, HQ, T]")


def distillation_loss(
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    *,
    teacher_scale: float,
    student_scale: float,
    key_padding: torch.Tensor | None = None,
    loss: str = "kl",
    block_size: int = 128,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the loss terms and their count for one layer, streaming over blocks of query rows.

    Shapes: ``teacher_q [B, HQ, T, D]``, ``teacher_k [B, H_kv, T, D]``, ``student_q [B, HQ, T, E]``,
    ``student_k [B, H_s, T, E]`` (``H_kv`` and ``H_s`` divide ``HQ``), ``key_padding [B, T]`` (True = real
    token). Returns ``(sum, count)`` so that layers and processes can be averaged exactly; the mean is
    ``sum / count``. Gradients flow into the student tensors only. ``backend="triton"`` (or ``"auto"``
    on CUDA) runs the fused kernel of `butler_cache.kernels.distill_loss`.
    """
    _check(loss, teacher_q, teacher_k, student_q, student_k)
    if resolve_backend(backend, teacher_q.device) == "triton":
        from ..kernels.distill_loss.fused import fused_distillation_loss

        return fused_distillation_loss(teacher_q, teacher_k, student_q, student_k, teacher_scale=teacher_scale,
                                       student_scale=student_scale, key_padding=key_padding, loss=loss)
    teacher_q, teacher_k = teacher_q.detach(), teacher_k.detach()
    T = teacher_q.shape[2]
    total = teacher_q.new_zeros((), dtype=torch.float32)
    count = torch.zeros((), dtype=torch.long, device=teacher_q.device)
    use_checkpoint = torch.is_grad_enabled() and (student_q.requires_grad or student_k.requires_grad)
    for start in range(0, T, block_size):
        end = min(start + block_size, T)
        args = (
            teacher_q[:, :, start:end], teacher_k[:, :, :end], student_q[:, :, start:end], student_k[:, :, :end],
            key_padding, start, teacher_scale, student_scale, loss,
        )
        if use_checkpoint:
            block_sum, block_count = checkpoint(_block_sums, *args, use_reentrant=False)
        else:
            block_sum, block_count = _block_sums(*args)
        total = total + block_sum
        count = count + block_count
    return total, count


def distillation_loss_naive(
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    *,
    teacher_scale: float,
    student_scale: float,
    key_padding: torch.Tensor | None = None,
    loss: str = "kl",
) -> torch.Tensor:
    """Full-matrix reference of `distillation_loss` (mean over terms), written out plainly."""
    _check(loss, teacher_q, teacher_k, student_q, student_k)
    B, HQ, T, _ = teacher_q.shape
    tk = teacher_k.repeat_interleave(HQ // teacher_k.shape[1], dim=1)
    sk = student_k.repeat_interleave(HQ // student_k.shape[1], dim=1)
    t_logits = teacher_q.double() @ tk.double().transpose(-1, -2) * teacher_scale  # [B, HQ, T, T]
    s_logits = student_q.double() @ sk.double().transpose(-1, -2) * student_scale
    causal = torch.ones(T, T, dtype=torch.bool, device=teacher_q.device).tril()
    pad = key_padding if key_padding is not None else torch.ones(B, T, dtype=torch.bool, device=teacher_q.device)
    valid = causal[None, None] & pad[:, None, None, :]  # [B, 1, T, T]
    if loss == "mse":
        return ((s_logits - t_logits)[valid.expand(B, HQ, T, T)] ** 2).mean()
    kls = []
    for b in range(B):
        for h in range(HQ):
            for t in range(T):
                if not pad[b, t]:
                    continue
                keys = valid[b, 0, t]
                p = torch.softmax(t_logits[b, h, t][keys], dim=0)
                log_q = torch.log_softmax(s_logits[b, h, t][keys], dim=0)
                kls.append((p * (p.log() - log_q)).sum())
    return torch.stack(kls).mean()
