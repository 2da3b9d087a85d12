"""`NumbaDecodeStep`: the state the numba backend of a `ButlerLayer` keeps between steps serves exactly while it may, and
gives what the PyTorch path gives."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from butler_cache import ButlerCache, ButlerConfig, ButlerLayer, ButlerPredictor
from butler_cache.compat import cache_argument
from butler_cache.kernels import NUMBA_AVAILABLE

from ..conftest import random_batch, tiny_model

pytestmark = pytest.mark.skipif(not NUMBA_AVAILABLE, reason="numba not installed")


def _setup(batch: int = 2):
    model = tiny_model("qwen2", seed=4, num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    predictor = ButlerPredictor(ButlerConfig.for_model(model))
    ids, _ = random_batch(batch, 30, seed=6)
    return model, predictor, ids


def _count_step_calls(monkeypatch) -> list[int]:
    """Calls of the fused kernel through a `NumbaDecodeStep` (the general path goes through butler_decode_cpu)."""
    from butler_cache.decode.numba_backend import NumbaDecodeStep

    calls = [0]
    attend = NumbaDecodeStep.attend

    def counted(self, *args):
        out = attend(self, *args)
        calls[0] += out is not None
        return out

    monkeypatch.setattr(NumbaDecodeStep, "attend", counted)
    return calls


@pytest.mark.parametrize(
    "settings, served",
    [
        (dict(prediction_interval=2), True),
        (dict(prediction_interval=3, neighbor_fetch=True), True),
        (dict(neighbor_fetch=True), True),
        (dict(record_stats=True), False),
    ],
    ids=["interval", "interval-neighbours", "neighbours", "stats"],
)
def test_step_gives_the_general_paths_results(settings, served, monkeypatch):
    """Reused predictions and neighbour fetching run in the step (recorded stats stay with the general path, where
    the step only makes the cache update); either way generation equals the PyTorch path's."""
    model, predictor, ids = _setup()
    calls = _count_step_calls(monkeypatch)
    gen = dict(input_ids=ids, max_new_tokens=7, do_sample=False, output_logits=True, return_dict_in_generate=True)
    runs = {}
    for backend in ("torch", "numba"):
        cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend=backend, **settings)
        runs[backend] = model.generate(**gen, **cache_argument(cache))
    sparse_layers = len(cache.sparse_layers)
    assert calls[0] == (6 * sparse_layers if served else 0)  # every decode step after the first of `generate`
    assert torch.equal(runs["torch"].sequences, runs["numba"].sequences)
    for a, b in zip(runs["torch"].logits, runs["numba"].logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_step_hands_a_prediction_over_to_the_general_path_and_back(monkeypatch):
    """A prediction kept by the step is reused by the general path, and the other way round (``last_scores`` is
    one state): a cache whose backend switches between steps generates what the PyTorch path generates."""
    model, predictor, ids = _setup()
    calls = _count_step_calls(monkeypatch)
    gen = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    runs = {}
    for switching in (False, True):
        cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend="torch",
                            prediction_interval=3)
        out = model.generate(input_ids=ids, max_new_tokens=1, **cache_argument(cache), **gen)
        tokens, logits = out.sequences, list(out.logits)
        for step in range(7):
            if switching:
                cache.settings.backend = ("numba", "torch")[step % 2]
            out = model.generate(input_ids=tokens, max_new_tokens=1, **cache_argument(cache), **gen)
            tokens = out.sequences
            logits += list(out.logits)
        runs[switching] = tokens, logits
    assert calls[0] > 0  # the switching run's numba steps went through the step
    assert torch.equal(runs[False][0], runs[True][0])
    for a, b in zip(runs[False][1], runs[True][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_step_serves_again_after_cache_operations(monkeypatch):
    """Crop, beam reordering and reset replace a layer's tensors: its step is dropped at once, a new one is made
    at the next decode step, and the second turn generates what the PyTorch path generates."""
    model, predictor, ids = _setup()
    calls = _count_step_calls(monkeypatch)
    caches, outputs = {}, {}
    for backend in ("torch", "numba"):
        cache = caches[backend] = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2,
                                              backend=backend)
        first = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **cache_argument(cache))
        cache.crop(-3)
        if backend == "numba":
            assert calls[0] > 0
            assert all((layer.backend.step_state is None) for layer in cache.layers if isinstance(layer, ButlerLayer))
            calls[0] = 0
        again = torch.cat([first[:, :-3], first[:, -3:].flip(1)], dim=1)
        second = model.generate(input_ids=again, max_new_tokens=4, do_sample=False, **cache_argument(cache))
        cache.reset()
        beams = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_beams=2, **cache_argument(cache))
        outputs[backend] = (first, second, beams)
    assert calls[0] > 0
    for a, b in zip(outputs["torch"], outputs["numba"], strict=True):
        assert torch.equal(a, b)


def test_dropped_numba_cache_frees_its_storages_without_the_garbage_collector():
    """The step holds views of the storages, not the layer: no reference cycle keeps a dropped cache's memory."""
    model, predictor, ids = _setup(batch=1)
    cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend="numba")
    model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **cache_argument(cache))
    layer = cache.layers[cache.sparse_layers[0]]
    assert layer.backend.step_state is not None
    storage = weakref.ref(layer._storage["keys"])
    gc.disable()
    try:
        del cache, layer
        assert storage() is None
    finally:
        gc.enable()



@pytest.mark.parametrize("settings", [dict(), dict(prediction_interval=3, neighbor_fetch=True)],
                         ids=["plain", "interval-neighbours"])
def test_step_hands_over_when_the_storages_fill_up(settings, monkeypatch):
    """With two spare rows per storage, the storages fill up every few decode steps: the PyTorch path then grows
    them, the general fused call serves that step's attention, and the next step makes a new `NumbaDecodeStep`.
    Generation through those hand-overs equals the PyTorch path's, also where the two fused calls hand a kept
    prediction to each other."""
    from butler_cache import growth
    from butler_cache.kernels.decode_step import cpu as decode_step_cpu

    monkeypatch.setattr(growth, "MIN_SPARE_ROWS", 2)
    monkeypatch.setattr(growth, "SPARE_FRACTION", 10**6)  # no proportional room either
    model, predictor, ids = _setup()
    calls = _count_step_calls(monkeypatch)
    general = []
    fused = decode_step_cpu.butler_decode_cpu
    monkeypatch.setattr(decode_step_cpu, "butler_decode_cpu", lambda *a, **k: general.append(1) or fused(*a, **k))
    gen = dict(input_ids=ids, max_new_tokens=9, do_sample=False, output_logits=True, return_dict_in_generate=True)
    runs = {}
    for backend in ("torch", "numba"):
        cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend=backend,
                            **settings)
        runs[backend] = model.generate(**gen, **cache_argument(cache))
    assert calls[0] > 0 and general  # both paths served decode steps
    assert torch.equal(runs["torch"].sequences, runs["numba"].sequences)
    for a, b in zip(runs["torch"].logits, runs["numba"].logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_step_stops_serving_when_the_backend_changes(monkeypatch):
    """A cache switched to the PyTorch backend between two generations no longer goes through its steps."""
    model, predictor, ids = _setup(batch=1)
    calls = _count_step_calls(monkeypatch)
    cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend="numba")
    first = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **cache_argument(cache))
    assert calls[0] > 0
    calls[0] = 0
    cache.settings.backend = "torch"
    model.generate(input_ids=first, max_new_tokens=3, do_sample=False, **cache_argument(cache))
    assert calls[0] == 0
