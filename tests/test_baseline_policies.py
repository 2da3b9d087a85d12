"""Baseline policies (StreamingLLM, random, Quest, H2O, SnapKV) against hand-computed cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from butler_cache import (
    ButlerCache,
    ButlerConfig,
    ButlerLayer,
    ButlerPredictor,
    SparseAttentionSettings,
    TokenBudget,
)
from butler_cache.compat import cache_argument
from butler_cache.kernels import NUMBA_AVAILABLE
from butler_cache.policies import (
    POLICIES,
    H2OPolicy,
    QuestPolicy,
    RandomPolicy,
    ScoringInputs,
    SnapKVPolicy,
    make_policy,
)
from butler_cache.selection import key_validity, select_tokens

from .conftest import random_batch, tiny_model


def _layer(keys, policy="oracle", **budget):
    settings = SparseAttentionSettings(make_policy(policy), TokenBudget(**(budget or {"token_budget": 64})))
    layer = ButlerLayer(1, settings)
    layer.update(keys, keys.clone())
    return layer


def _inputs(layer, query):
    T, L = query.shape[2], layer.keys.shape[2]
    return ScoringInputs(query, layer.keys, key_validity(None, T, L, query.device), query.shape[-1] ** -0.5, layer)


def _selected(policy, layer, query, budget):
    inputs = _inputs(layer, query)
    sel = select_tokens(policy.score(inputs), inputs.valid, budget)
    return sel, sorted(sel.indices[0, 0, -1][sel.keep[0, 0, -1]].tolist())


def test_streaming_keeps_sinks_and_the_most_recent():
    keys = torch.randn(1, 1, 10, 4)
    budget = TokenBudget(token_budget=6, sink_tokens=2, local_window=1)
    layer = _layer(keys, "streaming", token_budget=6, sink_tokens=2, local_window=1)
    _, chosen = _selected(make_policy("streaming"), layer, torch.randn(1, 2, 1, 4), budget)
    assert chosen == [0, 1, 6, 7, 8, 9]


def test_random_is_seeded_and_redraws():
    layer = _layer(torch.randn(1, 1, 50, 4))
    q = torch.randn(1, 1, 1, 4)
    a, b = RandomPolicy(seed=3), RandomPolicy(seed=3)
    first = a.score(_inputs(layer, q))
    assert torch.equal(first, b.score(_inputs(layer, q)))
    assert not torch.equal(first, a.score(_inputs(layer, q)))


def test_quest_page_score_by_hand_and_upper_bound():
    keys = torch.tensor([[1.0, -2.0], [3.0, 0.5], [0.0, 1.0], [-1.0, -1.0], [2.0, 2.0]]).view(1, 1, 5, 2)
    layer = _layer(keys)
    q = torch.tensor([2.0, -1.0]).view(1, 1, 1, 2)
    scores = QuestPolicy(page_size=2).score(_inputs(layer, q))[0, 0, 0]
    # page 0: min (1, -2), max (3, 0.5) -> max(2*1, 2*3) + max(-1*-2, -1*0.5) = 6 + 2 = 8
    # page 1: min (-1, -1), max (0, 1) -> max(-2, 0) + max(1, -1) = 0 + 1 = 1; page 2 (key 4 alone): 4 - 2 = 2
    assert scores.tolist() == [8.0, 8.0, 1.0, 1.0, 2.0]
    gen = torch.Generator().manual_seed(0)
    keys, q = torch.randn(2, 2, 45, 8, generator=gen), torch.randn(2, 4, 3, 8, generator=gen)
    layer = _layer(keys)
    bound = QuestPolicy().score(_inputs(layer, q))  # [B, H, T, L]
    logits = (q.view(2, 2, 2, 3, 8) @ keys[:, :, None].transpose(-1, -2)).amax(2)  # [B, H, T, L]
    assert (bound >= logits - 1e-5).all()


def test_h2o_accumulates_selected_attention_and_never_brings_back_evicted_tokens():
    torch.manual_seed(0)
    budget = TokenBudget(token_budget=5, sink_tokens=1, local_window=1)
    layer = _layer(torch.randn(1, 1, 6, 4) * 3, "h2o", token_budget=5, sink_tokens=1, local_window=1)
    policy = H2OPolicy()
    policy.observe(_inputs(layer, torch.randn(1, 2, 6, 4)), None)  # a dense prefill of 6 queries
    expected = layer.policy_state["h2o_accumulated"][0, 0, :, 0].clone()
    evicted_so_far: set[int] = set()
    for _ in range(8):
        new = torch.randn(1, 1, 1, 4) * 3
        layer.update(new, new)
        q = torch.randn(1, 2, 1, 4)
        sel, chosen = _selected(policy, layer, q, budget)
        assert not evicted_so_far & set(chosen) and len(chosen) == 5
        policy.observe(_inputs(layer, q), sel)
        logits = (q[0, :, 0] @ layer.keys[0, 0, chosen].T) * 0.5  # [2 heads, 5]
        expected = torch.cat([expected, torch.zeros(1)])
        expected[chosen] += torch.softmax(logits, -1).sum(0)
        torch.testing.assert_close(layer.policy_state["h2o_accumulated"][0, 0, :, 0], expected)
        evicted_so_far |= set(range(layer.keys.shape[2])) - set(chosen)


def test_snapkv_votes_from_the_observation_window():
    torch.manual_seed(1)
    keys, queries = torch.randn(1, 1, 20, 4), torch.randn(1, 2, 20, 4)
    layer = _layer(keys, "snapkv", token_budget=8, sink_tokens=1, local_window=1)
    policy = SnapKVPolicy(observation_window=4, kernel_size=3)
    policy.observe(_inputs(layer, queries), None)
    logits = (queries[0, :, -4:] @ keys[0, 0].T) * 0.5  # [2, 4, 20]
    causal = torch.arange(20)[None, :] <= torch.arange(16, 20)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).sum((0, 1))
    votes = F.max_pool1d(probs.view(1, 1, 20), 3, stride=1, padding=1).view(20)
    votes[-4:] = float("inf")
    torch.testing.assert_close(layer.policy_state["snapkv_votes"][0, 0, :, 0], votes)
    new = torch.randn(1, 1, 1, 4)
    layer.update(new, new)
    policy.observe(_inputs(layer, torch.randn(1, 2, 1, 4)), None)
    scores = policy.score(_inputs(layer, torch.randn(1, 2, 1, 4)))[0, 0, 0]
    assert scores[-1] == float("inf")
    torch.testing.assert_close(scores[:20], votes)


def _cache(model, policy, **kwargs):
    """A cache for any registered policy: the ones that need a predictor get an untrained one."""
    if make_policy(policy).requires_predictor:
        torch.manual_seed(0)
        return ButlerCache(model, ButlerPredictor(ButlerConfig.for_model(model)), policy=policy, **kwargs)
    return ButlerCache(model, policy=policy, **kwargs)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_registered_policy_through_generate(policy):
    """One matrix over every registered policy, butler and oracle included: dense at a budget that covers the
    context, exactly the budget attended at each sparse decode step, the same tokens from the PyTorch and the numba
    backends (each policy only scores; the backends select and attend), finite teacher-forced sparse forwards."""
    model = tiny_model("qwen2", seed=2, num_attention_heads=6, num_key_value_heads=2)
    ids, mask = random_batch(2, 24, [0, 3], seed=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    dense = model.generate(**kwargs, **cache_argument(DynamicCache(config=model.config)))
    assert torch.equal(model.generate(**kwargs, **cache_argument(_cache(model, policy, token_budget=64))), dense)
    generated = {}
    for backend in ("torch", "numba") if NUMBA_AVAILABLE else ("torch",):
        cache = _cache(model, policy, token_budget=12, sink_tokens=2, local_window=2, record_stats=True, backend=backend)
        generated[backend] = model.generate(**kwargs, **cache_argument(cache))
        steps = [s for s in cache.stats if s.query_length == 1]
        assert steps and all(s.attended == 12 for s in steps)
    assert all(torch.equal(out, generated["torch"]) for out in generated.values())
    sparse_prefill = _cache(model, policy, budget_ratio=0.5, sink_tokens=2, local_window=1, sparse_prefill=True)
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, **cache_argument(sparse_prefill)).logits.isfinite().all()


def test_h2o_gives_half_the_budget_to_the_most_recent_tokens():
    budget = TokenBudget(token_budget=8, sink_tokens=1, local_window=1)
    layer = _layer(torch.randn(1, 1, 30, 4), "h2o", token_budget=8, sink_tokens=1, local_window=1)
    layer.policy_state["h2o_accumulated"] = torch.linspace(1, 0, 30).view(1, 1, 30, 1)  # old tokens are heavy
    _, chosen = _selected(H2OPolicy(), layer, torch.randn(1, 2, 1, 4), budget)
    assert chosen == [0, 1, 2, 3, 26, 27, 28, 29]  # sink + 3 heaviest, 4 most recent
