"""When the budget covers the context, a ButlerCache is exactly dense SDPA attention."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor, detach
from butler_cache.compat import cache_argument

from .conftest import FAMILIES, random_batch, tiny_model

EXACT = dict(rtol=0.0, atol=0.0)


def make_cache(model, policy: str, **budget):
    """``policy``: "oracle", or "butler" / "attentive" with an untrained predictor of that generation."""
    if policy in ("butler", "attentive"):
        predictor_type = "strided" if policy == "butler" else "attentive"
        predictor = ButlerPredictor(ButlerConfig.for_model(model, predictor_type=predictor_type, attentive_hidden_size=16))
        return ButlerCache(model, predictor.to(model.dtype), **budget)
    return ButlerCache(model, policy=policy, **budget)


@st.composite
def cases(draw):
    family = draw(st.sampled_from(FAMILIES))
    heads = draw(st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 2)]))  # (query heads, KV heads): GQA 1, 2, 4, 3
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 24))
    pads = [draw(st.integers(0, max(0, length - 1))) for _ in range(batch)]
    pads[0] = 0
    policy = draw(st.sampled_from(["butler", "attentive", "oracle", "streaming", "random", "quest", "h2o", "snapkv"]))
    budget = draw(
        st.one_of(
            st.builds(lambda extra: {"token_budget": 64 + extra}, st.integers(0, 64)),
            st.just({"budget_ratio": 1.0}),
        )
    )
    return family, heads, batch, length, pads, policy, budget, draw(st.integers(0, 2**16))


@given(cases())
def test_forward_logits_equal_dynamic_cache(case):
    family, (hq, hkv), batch, length, pads, policy, budget, seed = case
    model = tiny_model(family, seed=seed % 7, num_attention_heads=hq, num_key_value_heads=hkv)
    ids, mask = random_batch(batch, length, pads, seed=seed)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, **cache_argument(DynamicCache(config=model.config))).logits
        cache = make_cache(model, policy, **budget)
        got = model(input_ids=ids, attention_mask=mask, **cache_argument(cache)).logits
    torch.testing.assert_close(got, ref, **EXACT)
    assert cache.get_seq_length() == length


@given(cases(), st.booleans())
def test_generate_tokens_equal_dynamic_cache(case, sample):
    family, (hq, hkv), batch, length, pads, policy, budget, seed = case
    model = tiny_model(family, seed=seed % 5, num_attention_heads=hq, num_key_value_heads=hkv)
    ids, mask = random_batch(batch, max(length, 2), pads, seed=seed)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=sample, top_k=None, top_p=None)
    torch.manual_seed(seed)
    ref = model.generate(**kwargs)
    cache = make_cache(model, policy, **budget)
    torch.manual_seed(seed)
    got = model.generate(**kwargs, **cache_argument(cache))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_and_return_sequences_equal_dense(family):
    model = tiny_model(family, seed=3)
    ids, mask = random_batch(2, 10, [0, 3], seed=1)
    beam = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    ref = model.generate(**beam)
    got = model.generate(**beam, **cache_argument(make_cache(model, "butler", token_budget=64)))
    assert torch.equal(got, ref)
    sampled = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_return_sequences=3, do_sample=True)
    torch.manual_seed(0)
    ref = model.generate(**sampled)
    torch.manual_seed(0)
    got = model.generate(**sampled, **cache_argument(make_cache(model, "oracle", token_budget=64)))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("chunk", [3, 7])
def test_chunked_prefill_equal_dense(chunk):
    model = tiny_model("qwen2", seed=2)
    ids, mask = random_batch(1, 20, seed=4)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    cache = make_cache(model, "butler", token_budget=64)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         **cache_argument(cache), prefill_chunk_size=chunk)
    assert torch.equal(got, ref)


def test_detach_restores_sdpa():
    model = tiny_model("llama")
    ids, mask = random_batch(1, 8)
    make_cache(model, "oracle", token_budget=32)
    assert model.config._attn_implementation == "butler_cache"
    detach(model)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert model(input_ids=ids).logits.isfinite().all()
