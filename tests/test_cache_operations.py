"""Every cache operation transformers uses keeps K/V and the predictor's importance keys in sync."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from butler_cache import ButlerCache, ButlerConfig, ButlerLayer, ButlerPredictor
from butler_cache.compat import cache_argument
from butler_cache.kernels import NUMBA_AVAILABLE

from .conftest import random_batch, tiny_model

# "numba" keeps the importance keys feature-major (growth.append_rows; an operation that replaces them leaves
# them row-major until the next append): the same operations must hold there
BACKENDS = ["torch"] + (["numba"] if NUMBA_AVAILABLE else [])

CLOSE = dict(rtol=1e-10, atol=1e-10)  # float64 throughout


@pytest.fixture(params=BACKENDS)
def setup(request):
    model = tiny_model("qwen2", seed=1, dtype=torch.float64, num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    predictor = ButlerPredictor(ButlerConfig.for_model(model, layer_stride=2)).double()
    predictor.backend = request.param  # read by `prefill` and the tests that build their own cache
    ids, mask = random_batch(3, 18, [0, 2, 5], seed=3)
    return model, predictor, ids, mask


def prefill(model, predictor, ids, mask, **kwargs):
    cache = ButlerCache(model, predictor, token_budget=10, local_window=4, backend=predictor.backend, **kwargs)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_argument(cache))
    return cache


def butler_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, ButlerLayer)]


def assert_in_sync(cache, predictor):
    layers = butler_layers(cache)
    assert layers, "the cache has no sparse layer"
    for layer in layers:
        assert layer.importance_keys.shape[:3] == layer.keys.shape[:3]
        torch.testing.assert_close(layer.importance_keys, predictor.keys_from_cache(layer.layer_idx, layer.keys), **CLOSE)


def assert_same_cache(got, expected):
    assert got.get_seq_length() == expected.get_seq_length()
    for a, b in zip(got.layers, expected.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, **CLOSE)
        torch.testing.assert_close(a.values, b.values, **CLOSE)
        if isinstance(a, ButlerLayer):
            torch.testing.assert_close(a.importance_keys, b.importance_keys, **CLOSE)


def test_layers_are_swapped_only_where_sparse(setup):
    model, predictor, ids, mask = setup
    cache = prefill(model, predictor, ids, mask)
    assert [type(layer).__name__ for layer in cache.layers] == ["GrowingLayer"] + ["ButlerLayer"] * 3
    gemma = tiny_model("gemma3")
    cache = ButlerCache(gemma, policy="oracle", token_budget=32)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "DynamicSlidingWindowLayer", "ButlerLayer", "DynamicSlidingWindowLayer", "ButlerLayer"]


def test_crop(setup):
    model, predictor, ids, mask = setup
    cache = prefill(model, predictor, ids, mask)
    cache.crop(-5)
    assert_in_sync(cache, predictor)
    assert_same_cache(cache, prefill(model, predictor, ids[:, :-5], mask[:, :-5]))


def test_reorder_cache(setup):
    model, predictor, ids, mask = setup
    cache = prefill(model, predictor, ids, mask)
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    assert_in_sync(cache, predictor)
    assert_same_cache(cache, prefill(model, predictor, ids[beam_idx], mask[beam_idx]))


def test_batch_select_and_repeat(setup):
    model, predictor, ids, mask = setup
    cache = prefill(model, predictor, ids, mask)
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert_same_cache(cache, prefill(model, predictor, ids[1:], mask[1:]))
    cache.batch_repeat_interleave(2)
    assert_in_sync(cache, predictor)
    rep = torch.tensor([1, 1, 2, 2])
    assert_same_cache(cache, prefill(model, predictor, ids[rep], mask[rep]))


def test_reset_then_reuse(setup):
    model, predictor, ids, mask = setup
    cache = prefill(model, predictor, ids, mask)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert all(layer.importance_keys is None and layer.importance_queries is None for layer in butler_layers(cache))
    with torch.no_grad():
        model(input_ids=ids[:, :9], attention_mask=mask[:, :9], **cache_argument(cache))
    assert_same_cache(cache, prefill(model, predictor, ids[:, :9], mask[:, :9]))


def test_second_turn_full_budget_equals_fresh_run(setup):
    model, predictor, ids, mask = setup
    cache = ButlerCache(model, predictor, token_budget=128)
    turn1 = model.generate(input_ids=ids, attention_mask=mask, **cache_argument(cache), max_new_tokens=4, do_sample=False)
    follow = torch.randint(2, 99, (3, 5), generator=torch.Generator().manual_seed(9))
    ids2 = torch.cat([turn1, follow], dim=1)
    mask2 = torch.cat([mask, torch.ones(3, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    turn2 = model.generate(input_ids=ids2, attention_mask=mask2, **cache_argument(cache), max_new_tokens=4, do_sample=False)
    fresh = model.generate(input_ids=ids2, attention_mask=mask2, **cache_argument(DynamicCache(config=model.config)),
                           max_new_tokens=4, do_sample=False)
    assert torch.equal(turn2, fresh)
    assert_in_sync(cache, predictor)


def test_second_turn_sparse_keeps_state_in_sync(setup):
    model, predictor, ids, mask = setup
    cache = ButlerCache(model, predictor, token_budget=10, local_window=4, backend=predictor.backend)
    turn1 = model.generate(input_ids=ids, attention_mask=mask, **cache_argument(cache), max_new_tokens=6, do_sample=False)
    assert cache.get_seq_length() == turn1.shape[1] - 1
    ids2 = torch.cat([turn1, turn1[:, -3:]], dim=1)
    mask2 = torch.cat([mask, torch.ones(3, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    turn2 = model.generate(input_ids=ids2, attention_mask=mask2, **cache_argument(cache), max_new_tokens=6, do_sample=False)
    assert cache.get_seq_length() == turn2.shape[1] - 1
    assert_in_sync(cache, predictor)


def test_beam_search_sparse_keeps_state_in_sync(setup):
    model, predictor, ids, mask = setup
    cache = ButlerCache(model, predictor, token_budget=10, local_window=4, backend=predictor.backend)
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_argument(cache), max_new_tokens=6, num_beams=2,
                         num_return_sequences=2, do_sample=False)
    assert out.shape == (6, 24)
    assert_in_sync(cache, predictor)


def test_offload_and_prefetch_move_predictor_state_with_kv(setup):
    model, predictor, ids, mask = setup
    cache = prefill(model, predictor, ids, mask)
    layer = butler_layers(cache)[0]
    layer.offload()
    assert layer.importance_keys.device.type == layer.keys.device.type == "cpu"
    layer.device = torch.device("meta")  # pretend the layer lives on an accelerator
    layer.prefetch()
    assert layer.keys.device.type == layer.importance_keys.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers' cache offloading needs CUDA streams")
def test_offloading_matches_resident_cache(setup):
    model, predictor, ids, mask = setup
    model, predictor, ids, mask = model.cuda(), predictor.cuda(), ids.cuda(), mask.cuda()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    resident = model.generate(**kwargs, **cache_argument(ButlerCache(model, predictor, token_budget=10, local_window=4)))
    offloaded_cache = ButlerCache(model, predictor, token_budget=10, local_window=4, offloading=True)
    offloaded = model.generate(**kwargs, **cache_argument(offloaded_cache))
    assert torch.equal(resident, offloaded)
