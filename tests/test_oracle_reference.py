"""Budget smaller than the context, oracle policy: equal to an independent loop-based reference."""

from __future__ import annotations

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache

from butler_cache import ButlerCache
from butler_cache.architecture import full_attention_layers
from butler_cache.compat import cache_argument

from .conftest import FAMILIES, random_batch, tiny_model
from .reference import install_reference

TIGHT = dict(rtol=1e-9, atol=1e-9)


@st.composite
def sparse_cases(draw):
    family = draw(st.sampled_from(FAMILIES))
    heads = draw(st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 2)]))
    batch = draw(st.integers(1, 2))
    length = draw(st.integers(12, 28))
    pads = [0] + [draw(st.integers(0, 6)) for _ in range(batch - 1)]
    sinks = draw(st.integers(0, 4))
    window = draw(st.integers(1, 6))
    if draw(st.booleans()):
        budget = {"token_budget": draw(st.integers(sinks + window, sinks + window + 6))}
    else:
        budget = {"budget_ratio": draw(st.sampled_from([0.25, 0.4, 0.5, 0.75]))}
    return family, heads, length, pads, dict(budget, sink_tokens=sinks, local_window=window), draw(st.integers(0, 999))


def _reference_model(model, budget, sparse_prefill):
    ref = copy.deepcopy(model)
    sparse = {i for i in full_attention_layers(model.config) if i >= 1}
    ref.set_attn_implementation(install_reference(sparse, budget, sparse_prefill))
    return ref


@given(sparse_cases())
def test_oracle_decode_matches_reference(case):
    family, (hq, hkv), length, pads, budget, seed = case
    model = tiny_model(family, seed=seed % 5, dtype=torch.float64, num_attention_heads=hq, num_key_value_heads=hkv)
    reference = _reference_model(model, budget, sparse_prefill=False)
    ids, mask = random_batch(len(pads), length, pads, seed=seed)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    ref = reference.generate(**kwargs, **cache_argument(DynamicCache(config=model.config)))
    got = model.generate(**kwargs, **cache_argument(ButlerCache(model, policy="oracle", **budget)))
    assert torch.equal(got.sequences, ref.sequences)
    for step_got, step_ref in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(step_got, step_ref, **TIGHT)


@given(sparse_cases())
def test_oracle_sparse_prefill_matches_reference(case):
    family, (hq, hkv), length, pads, budget, seed = case
    model = tiny_model(family, seed=seed % 5, dtype=torch.float64, num_attention_heads=hq, num_key_value_heads=hkv)
    reference = _reference_model(model, budget, sparse_prefill=True)
    ids, mask = random_batch(len(pads), length, pads, seed=seed)
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask).logits
        cache = ButlerCache(model, policy="oracle", sparse_prefill=True, **budget)
        got = model(input_ids=ids, attention_mask=mask, **cache_argument(cache)).logits
    valid = mask.bool()  # outputs at padding positions are not defined
    torch.testing.assert_close(got[valid], ref[valid], **TIGHT)


def test_sparse_budget_changes_the_output():
    """Guards the two tests above against a vacuous pass: a small budget really changes the logits."""
    model = tiny_model("llama", dtype=torch.float64)
    ids, mask = random_batch(1, 40)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        cache = ButlerCache(model, policy="oracle", token_budget=8, sink_tokens=2, local_window=2, sparse_prefill=True)
        sparse = model(input_ids=ids, attention_mask=mask, **cache_argument(cache)).logits
    assert (dense - sparse)[0, 10:].abs().max() > 1e-3


def _predicted_logits_fn(model, predictor):
    """Predicted logits recomputed from the predictor's raw parameters and captured hidden states."""
    hidden = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: hidden.__setitem__(i, args[0]))
    config = predictor.config

    def logits_fn(module, query, key):
        l = module.layer_idx
        g = next(j for j, group in enumerate(config.producer_groups) if l in group)
        group = config.producer_groups[g]
        producer = predictor.producers[g]
        h = hidden[group[0]][:, -query.shape[2]:]  # [B, T, D]
        x = torch.nn.functional.layer_norm(h, (h.shape[-1],), producer.norm.weight, producer.norm.bias)
        x = torch.nn.functional.silu(x @ producer.up.weight.T + producer.up.bias) @ producer.down.weight.T + producer.down.bias
        B, T, HQ, E = h.shape[0], h.shape[1], query.shape[1], config.importance_dim
        q_imp = x.view(B, T, len(group), HQ, E)[:, :, group.index(l)].transpose(1, 2)  # [B, HQ, T, E]
        w = predictor.key_projections[config.sparse_layers.index(l)]  # [H, D, E]
        pk = torch.einsum("bhld,hde->bhle", key, w).repeat_interleave(HQ // key.shape[1], 1)  # [B, HQ, L, E]
        return (q_imp @ pk.transpose(-1, -2)) * E**-0.5

    return logits_fn


@given(sparse_cases(), st.sampled_from([1, 2, 3]))
def test_butler_decode_matches_reference(case, stride):
    family, (hq, hkv), length, pads, budget, seed = case
    from butler_cache import ButlerConfig, ButlerPredictor

    model = tiny_model(family, seed=seed % 5, dtype=torch.float64, num_attention_heads=hq, num_key_value_heads=hkv)
    torch.manual_seed(seed)
    predictor = ButlerPredictor(ButlerConfig.for_model(model, layer_stride=stride, importance_dim=8)).double()
    reference = copy.deepcopy(model)
    sparse = set(predictor.config.sparse_layers)
    reference.set_attn_implementation(
        install_reference(sparse, budget, False, _predicted_logits_fn(reference, predictor))
    )
    ids, mask = random_batch(len(pads), length, pads, seed=seed)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    ref = reference.generate(**kwargs, **cache_argument(DynamicCache(config=model.config)))
    got = model.generate(**kwargs, **cache_argument(ButlerCache(model, predictor, **budget)))
    assert torch.equal(got.sequences, ref.sequences)
    for step_got, step_ref in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(step_got, step_ref, **TIGHT)
