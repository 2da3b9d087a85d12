"""The Triton decode scoring kernel against its PyTorch reference (interpreter mode on CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor
from butler_cache.compat import cache_argument
from butler_cache.kernels.scoring.decode import score_decode
from butler_cache.kernels.scoring.naive import score_reference
from butler_cache.policies import group_max_probabilities

from ..conftest import random_batch, tiny_model


@settings(max_examples=15)
@given(B=st.integers(1, 2), H=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 8]), L=st.integers(1, 700),
       E=st.sampled_from([8, 16, 32]), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 9999))
def test_scoring_kernel_matches_reference(B, H, G, L, E, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, 1, E, generator=gen).to(dtype)
    k = torch.randn(B, H, L, E, generator=gen).to(dtype)
    got, ref = score_decode(q, k, E**-0.5), score_reference(q, k, E**-0.5)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the reference ranks exactly as the cache's group-max probabilities do
    logits = torch.einsum("bhgte,bhle->bhgtl", q.float().view(B, H, G, 1, E), k.float()).reshape(B, H * G, 1, L)
    probs = group_max_probabilities(logits * E**-0.5, torch.ones(1, 1, 1, L, dtype=torch.bool), H)
    torch.testing.assert_close(ref.exp(), probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("predictor_type", ["strided", "attentive"])
def test_unpadded_generate_uses_the_kernel_and_matches_torch(monkeypatch, predictor_type):
    """Also with importance keys per query head (attentive predictor): the kernel's per-key-head scores are then
    reduced over each KV group."""
    import butler_cache.kernels.scoring.decode as decode

    calls = []
    monkeypatch.setattr(decode, "score_decode", lambda *a: calls.append(1) or score_decode(*a))
    model = tiny_model("llama", seed=6, num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    predictor = ButlerPredictor(ButlerConfig.for_model(model, predictor_type=predictor_type))
    ids, mask = random_batch(2, 40, seed=3)
    out = {}
    for backend in ("torch", "triton"):
        cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend=backend)
        out[backend] = model.generate(input_ids=ids, attention_mask=mask, **cache_argument(cache), max_new_tokens=6,
                                      do_sample=False)
    assert torch.equal(out["torch"], out["triton"])
    assert calls  # the sparse decode steps went through the kernel
