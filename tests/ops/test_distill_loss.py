"""The fused Triton distillation loss (forward and backward) against the full-matrix reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from butler_cache.training.losses import distillation_loss, distillation_loss_naive


@settings(max_examples=12)
@given(B=st.integers(1, 2), H=st.integers(1, 2), G=st.sampled_from([1, 2, 3]), T=st.integers(1, 70),
       student_heads=st.sampled_from(["kv", "query"]), loss=st.sampled_from(["kl", "mse"]), pad=st.integers(0, 5),
       D=st.sampled_from([8, 64]), seed=st.integers(0, 9999))
def test_fused_loss_matches_reference(B, H, G, T, student_heads, loss, pad, D, seed):
    gen = torch.Generator().manual_seed(seed)
    HQ, HS = H * G, (H if student_heads == "kv" else H * G)
    tq, tk = torch.randn(B, HQ, T, D, generator=gen), torch.randn(B, H, T, D, generator=gen)
    sq = torch.randn(B, HQ, T, 16, generator=gen, requires_grad=True)
    sk = torch.randn(B, HS, T, 16, generator=gen, requires_grad=True)
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[-1, : min(pad, T - 1)] = False
    kwargs = dict(teacher_scale=D**-0.5, student_scale=0.25, key_padding=padding, loss=loss)
    total, count = distillation_loss(tq, tk, sq, sk, backend="triton", **kwargs)
    got = total / count
    got_grads = torch.autograd.grad(got, (sq, sk))
    ref = distillation_loss_naive(tq, tk, sq, sk, **kwargs)
    ref_grads = torch.autograd.grad(ref, (sq, sk))
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)
