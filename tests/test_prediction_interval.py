"""Prediction interval (reuse the last scores for N decode steps) and neighbour fetching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from butler_cache import ButlerCache, ButlerConfig, ButlerLayer, ButlerPredictor
from butler_cache.compat import cache_argument
from butler_cache.selection import Selection, with_neighbors

from .conftest import random_batch, tiny_model
from .reference import reference_neighbours


def test_with_neighbors_by_hand():
    # selected runs {2, 3} and {7}: neighbours 4 and 8; 9 is padding-invalid
    sel = Selection(indices=torch.tensor([[[[3, 2, 7, 0]]]]), keep=torch.tensor([[[[True, True, True, False]]]]))
    valid = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    out = with_neighbors(sel, valid, 10)
    assert sorted(out.indices[out.keep].tolist()) == [2, 3, 4, 7, 8]
    valid[..., 8] = False
    assert sorted(with_neighbors(sel, valid, 10).indices[with_neighbors(sel, valid, 10).keep].tolist()) == [2, 3, 4, 7]


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), q=st.integers(1, 3), L=st.integers(1, 40), K=st.integers(1, 12),
       padded=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_with_neighbors_matches_the_reference(B, H, q, L, K, padded, seed):
    """Random selections (slots past a row's budget hold arbitrary positions), with or without invalid keys: each
    row attends to its selection plus the valid successor of each run, each position once."""
    gen = torch.Generator().manual_seed(seed)
    K = min(K, L)
    indices = torch.rand(B, H, q, L, generator=gen).argsort(-1)[..., :K]  # distinct positions per row
    keep = torch.rand(B, H, q, K, generator=gen) < 0.7
    valid = torch.rand(B, 1, q, L, generator=gen) < (0.8 if padded else 1.1)
    keep &= valid.expand(B, H, q, L).gather(-1, indices)
    out = with_neighbors(Selection(indices, keep), valid, L)
    for b in range(B):
        for h in range(H):
            for t in range(q):
                got = out.indices[b, h, t][out.keep[b, h, t]].tolist()
                assert len(got) == len(set(got))
                selected = set(indices[b, h, t][keep[b, h, t]].tolist())
                valid_positions = set(valid[b, 0, t].nonzero().flatten().tolist())
                assert set(got) == reference_neighbours(selected, valid_positions)


@pytest.mark.parametrize("interval", [1, 3])
def test_scores_and_producers_run_once_per_interval(interval, monkeypatch):
    model = tiny_model("llama", seed=2)
    torch.manual_seed(0)
    predictor = ButlerPredictor(ButlerConfig.for_model(model, layer_stride=3))
    cache = ButlerCache(model, predictor, token_budget=8, sink_tokens=2, local_window=2, prediction_interval=interval,
                        backend="torch")  # counts the PyTorch path's calls; the numba step fuses them
    scored, produced = [], []
    score = cache.settings.policy.score
    monkeypatch.setattr(cache.settings.policy, "score", lambda inputs: scored.append(1) or score(inputs))
    produce = predictor.produce
    monkeypatch.setattr(predictor, "produce",
                        lambda *a, **k: produced.append((a[0], a[1].hidden_states.shape[1])) or produce(*a, **k))
    ids, mask = random_batch(1, 20, seed=1)
    model.generate(input_ids=ids, attention_mask=mask, **cache_argument(cache), max_new_tokens=10, do_sample=False)
    sparse_layers, decode_steps = 3, 9  # layers 1-3; the prefill is dense
    assert len(scored) == sparse_layers * -(-decode_steps // interval)
    # one producer (layer 1, stride 3); it is skipped on the steps that reuse the last prediction
    assert produced.count((1, 1)) == -(-decode_steps // interval)
    for layer in cache.layers:
        if isinstance(layer, ButlerLayer) and interval > 1:
            assert layer.last_scores is not None


def test_interval_and_neighbours_generate_and_reset_on_cache_operations():
    model = tiny_model("qwen2", seed=3, num_attention_heads=6, num_key_value_heads=2)
    ids, mask = random_batch(2, 24, [0, 3], seed=2)
    cache = ButlerCache(model, policy="oracle", token_budget=10, sink_tokens=2, local_window=3, prediction_interval=4,
                        neighbor_fetch=True, record_stats=True)
    model.generate(input_ids=ids, attention_mask=mask, **cache_argument(cache), max_new_tokens=8, do_sample=False,
                   num_beams=2)
    steps = [s for s in cache.stats if s.query_length == 1 and s.attended is not None]
    assert steps and all(10 <= s.attended <= 20 for s in steps)
    cache.reorder_cache(torch.tensor([1, 0, 3, 2]))
    assert all(layer.last_scores is None for layer in cache.layers if isinstance(layer, ButlerLayer))
    with pytest.raises(ValueError, match="prediction_interval=0"):
        ButlerCache(model, policy="oracle", token_budget=10, sink_tokens=2, local_window=3, prediction_interval=0)
