"""The first-generation (attentive) predictor: its decode state gives exactly the teacher-forced result."""

from __future__ import annotations

import pytest
import torch

from butler_cache import (
    AttentivePredictor,
    ButlerCache,
    ButlerConfig,
    ButlerLayer,
    ButlerPredictor,
    capture_attention,
)
from butler_cache.compat import cache_argument

from .conftest import random_batch, tiny_model

CLOSE = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture
def setup():
    model = tiny_model("llama", seed=4, dtype=torch.float64, num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    config = ButlerConfig.for_model(model, predictor_type="attentive", attentive_hidden_size=16,
                                    attentive_num_heads=2, importance_dim=8, intermediate_size=24)
    return model, ButlerPredictor(config).double()


def teacher_forced_keys(model, predictor, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    with torch.no_grad(), capture_attention(model) as cap:
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        return {layer: imp.keys for layer, imp in predictor.teacher_forced(cap.inputs, cap.keys).items()}


def test_builds_the_attentive_class(setup):
    model, predictor = setup
    assert isinstance(predictor, AttentivePredictor) and predictor.key_heads == 6
    assert predictor.producer_layers == (0,)


@pytest.mark.parametrize("pads", [[0], [0, 3]])
def test_decode_state_equals_teacher_forced(setup, pads):
    model, predictor = setup
    ids, mask = random_batch(len(pads), 12, pads, seed=2)
    cache = ButlerCache(model, predictor, token_budget=8, sink_tokens=1, local_window=2)
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_argument(cache), max_new_tokens=6, do_sample=False)
    full_mask = torch.cat([mask, torch.ones(len(pads), 6, dtype=mask.dtype)], dim=1)
    # the cache holds every token but the last generated one
    expected = teacher_forced_keys(model, predictor, out[:, :-1], full_mask[:, :-1])
    for layer in cache.layers:
        if isinstance(layer, ButlerLayer):
            valid = full_mask[:, :-1].bool()  # importance keys of padding tokens are never used
            torch.testing.assert_close(layer.importance_keys.transpose(1, 2)[valid],
                                       expected[layer.layer_idx].transpose(1, 2)[valid], **CLOSE)
    assert cache.predictor_state.get_seq_length() == out.shape[1] - 1


def test_cache_operations_keep_the_predictor_state(setup):
    model, predictor = setup
    ids, mask = random_batch(3, 10, [0, 1, 2], seed=5)
    cache = ButlerCache(model, predictor, token_budget=8, sink_tokens=1, local_window=2)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              **cache_argument(cache))
    cache.crop(-2)
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.batch_repeat_interleave(2)
    cache.reorder_cache(torch.tensor([3, 2, 1, 0]))
    rows = torch.tensor([2, 2, 0, 0])[[3, 2, 1, 0]]  # select, repeat, then reorder
    expected = teacher_forced_keys(model, predictor, ids[rows, :-2], mask[rows, :-2])
    assert cache.predictor_state.keys.shape[0] == 4 and cache.predictor_state.get_seq_length() == 8
    valid = mask[rows, :-2].bool()  # importance keys of padding tokens are never used
    for layer in cache.layers:
        if isinstance(layer, ButlerLayer):
            torch.testing.assert_close(layer.importance_keys.transpose(1, 2)[valid],
                                       expected[layer.layer_idx].transpose(1, 2)[valid], **CLOSE)
    cache.reset()
    assert cache.predictor_state.get_seq_length() == 0
