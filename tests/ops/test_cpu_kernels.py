"""The numba CPU kernels (fused scoring + top-k, sparse decode attention) against their PyTorch references."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor
from butler_cache.budget import TokenBudget
from butler_cache.compat import cache_argument
from butler_cache.kernels import NUMBA_AVAILABLE
from butler_cache.kernels.cache_update import append_and_project_naive
from butler_cache.kernels.cpu_utils import flat_view
from butler_cache.kernels.decode_step import butler_decode_naive, group_scores
from butler_cache.kernels.scoring import score_reference
from butler_cache.kernels.sparse_attention import sparse_attention_naive
from butler_cache.selection import select_decode_tokens, with_neighbors

from ..conftest import random_batch, tiny_model

pytestmark = pytest.mark.skipif(not NUMBA_AVAILABLE, reason="numba not installed")


def _keys(B, H, L, E, spare, feature_major, gen):
    if feature_major:  # what ButlerLayer keeps with the numba backend: [B, H, E, capacity] memory
        return torch.randn(B, H, E, L + spare, generator=gen).transpose(-1, -2)[:, :, :L]
    return torch.randn(B, H, L + spare, E, generator=gen)[:, :, :L]


@settings(max_examples=20)
@given(B=st.integers(1, 2), H=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 8]), L=st.integers(2, 1500),
       E=st.sampled_from([4, 6, 16, 32]), sinks=st.integers(0, 4), window=st.integers(1, 16), frac=st.floats(0.0, 1.0),
       spare=st.integers(0, 9), feature_major=st.booleans(), per_query_head=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fused_scoring_selects_the_reference_top_k(B, H, G, L, E, sinks, window, frac, spare, feature_major,
                                                   per_query_head, seed):
    """Against the reference, importance keys per KV head or per query head (grouped by max)."""
    from butler_cache.kernels.scoring.cpu import score_select_decode_cpu

    forced = sinks + window
    if forced >= L:
        return
    n = forced + int(frac * (L - 1 - forced))  # forced <= n < L
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, 1, E, generator=gen)
    k = _keys(B, H * G if per_query_head else H, L, E, spare, feature_major, gen)
    got = score_select_decode_cpu(q, k, E**-0.5, sinks, window, n, kv_heads=H)  # [B, H, 1, n]
    assert got.shape == (B, H, 1, n)
    scores = group_scores(q, k, E**-0.5, H)  # [B, H, 1, L]
    ref = select_decode_tokens(scores, TokenBudget(n, None, sinks, window))
    for b in range(B):
        for h in range(H):
            chosen, expected = set(got[b, h, 0].tolist()), set(ref.indices[b, h, 0].tolist())
            assert len(chosen) == n  # no position twice
            if chosen != expected:  # only ties may differ: the scores at the cut must match
                s = scores[b, h, 0]
                diff = sorted(chosen ^ expected)
                torch.testing.assert_close(s[diff].min(), s[diff].max(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("L", [2048, 2049, 5000])
def test_fused_scoring_across_several_blocks(L):
    """Contexts longer than one block of the scoring loop: the running log-sum-exp carries across blocks."""
    from butler_cache.kernels.scoring.cpu import _BLOCK, score_select_decode_cpu

    assert L >= _BLOCK  # what this test is about
    gen = torch.Generator().manual_seed(L)
    q = torch.randn(1, 6, 1, 16, generator=gen) * 3  # peaky: the heads' normalisers differ
    k = _keys(1, 2, L, 16, 5, True, gen)
    n = 300
    got = score_select_decode_cpu(q, k, 0.25, 4, 16, n)
    scores = score_reference(q, k, 0.25)
    ref = select_decode_tokens(scores, TokenBudget(n, None, 4, 16))
    for h in range(2):
        chosen, expected = set(got[0, h, 0].tolist()), set(ref.indices[0, h, 0].tolist())
        diff = sorted(chosen ^ expected)
        assert len(diff) <= 2 and (not diff or (scores[0, h, 0, diff].max() - scores[0, h, 0, diff].min()) < 1e-5)


@settings(max_examples=40, deadline=None)
@example(n=4096, share=0.2, distinct=2**32, order="sampled", seed=0)  # too few pass the floor: the exact fallback
@example(n=4096, share=0.05, distinct=2**32, order="hidden", seed=0)  # all pass: the exact path on every key
@example(n=8192, share=0.06, distinct=2**32, order="random", seed=0)  # the sampled path, as at 8k, 1/16
@example(n=8192, share=0.06, distinct=3, order="random", seed=0)  # the threshold inside a run of equal keys
@given(n=st.integers(1, 20000), share=st.floats(0.0, 1.0), distinct=st.sampled_from([1, 3, 50, 2**32]),
       order=st.sampled_from(["random", "ascending", "descending", "hidden", "sampled"]), seed=st.integers(0, 2**31 - 1))
def test_top_positions_are_the_exact_top_m(n, share, distinct, order, seed):
    """The top-k of the selection kernel, on its sampled path (many keys, few chosen) and its exact fallback
    alike: the positions of the m largest keys, equal keys taken first-come, in position order."""
    import numpy as np

    from butler_cache.kernels.scoring.cpu import _top_positions

    rng = np.random.default_rng(seed)
    m = max(1, int(share * n))
    keys = rng.integers(0, distinct, n, dtype=np.uint64).astype(np.uint32)
    if distinct == 2**32:  # about log-probabilities: a narrow band of float bits
        keys = rng.normal(-9.0, 1.5, n).astype(np.float32).view(np.uint32) ^ np.uint32(0xFFFFFFFF)
    if order == "ascending":  # the strided sample sees a skewed picture of sorted keys
        keys.sort()
    elif order == "descending":
        keys = np.sort(keys)[::-1].copy()
    elif order in ("hidden", "sampled"):  # the sample stride sees the smallest keys only, or the largest only
        phase = np.arange(n) % 8 == 0
        keys[phase] = np.uint32(0) if order == "hidden" else np.uint32(2**32 - 1)
    out = np.full(m, -1, np.int64)
    _top_positions(keys, m, out)
    expected = np.sort(np.lexsort((np.arange(n), -keys.astype(np.int64)))[:m])  # largest first, then earliest
    np.testing.assert_array_equal(out, expected)


@settings(max_examples=20)
@given(B=st.integers(1, 2), H=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4, 8]), L=st.integers(1, 300),
       spare=st.integers(0, 20), frac=st.floats(0.05, 1.0), D=st.sampled_from([16, 64, 80, 128]),
       masked=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cpu_decode_attention_matches_reference(B, H, G, L, spare, frac, D, masked, seed):
    from butler_cache.kernels.sparse_attention.cpu import sparse_decode_attention_cpu

    gen = torch.Generator().manual_seed(seed)
    S = max(1, int(frac * L))
    q = torch.randn(B, H * G, 1, D, generator=gen)
    k = torch.randn(B, H, L + spare, D, generator=gen)[:, :, :L]
    v = torch.randn(B, H, L + spare, D, generator=gen)[:, :, :L]
    idx = torch.rand(B, H, 1, L, generator=gen).argsort(-1)[..., :S]
    keep = torch.rand(B, H, 1, S, generator=gen) < 0.7 if masked else torch.ones(B, H, 1, S, dtype=torch.bool)
    ref = sparse_attention_naive(q.double(), k.double(), v.double(), idx, keep, D**-0.5)
    got = sparse_decode_attention_cpu(q, k, v, idx, keep if masked else None, D**-0.5)
    assert got.shape == (B, 1, H * G, D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def _fused_step_case(B, H, G, L, E, D, n, spare, strided, seed, sinks=4, window=8, per_query_head=False):
    """Random inputs of one fused decode step and the reference output: sparse_attention_naive (float64) over the
    reference selection; None when a near-tie at the cut could fall either way. ``per_query_head``: importance
    keys per query head (the attentive predictor's)."""
    gen = torch.Generator().manual_seed(seed)
    if strided:  # [B, 1, HQ, 2X] memory seen as [B, HQ, 1, X]
        qi = torch.randn(B, 1, H * G, 2 * E, generator=gen)[..., :E].transpose(1, 2)
        q = torch.randn(B, 1, H * G, 2 * D, generator=gen)[..., :D].transpose(1, 2)
    else:
        qi = torch.randn(B, H * G, 1, E, generator=gen)
        q = torch.randn(B, H * G, 1, D, generator=gen)
    ik = _keys(B, H * G if per_query_head else H, L, E, spare, True, gen)
    k = torch.randn(B, H, L + spare, D, generator=gen)[:, :, :L]
    v = torch.randn(B, H, L + spare, D, generator=gen)[:, :, :L]
    scores = group_scores(qi, ik, E**-0.5, H)
    middle = scores[..., sinks : L - window].sort(-1, descending=True).values
    m = n - sinks - window
    if 0 < m < middle.shape[-1] and (middle[..., m - 1] - middle[..., m]).min() <= 1e-4:
        return None
    ref = butler_decode_naive(qi, ik, E**-0.5, q.double(), k.double(), v.double(), D**-0.5, sinks, window, n)
    return (qi, ik, E**-0.5, q, k, v, D**-0.5, sinks, window, n), ref


@settings(max_examples=25)
@given(B=st.integers(1, 2), H=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4]), L=st.integers(24, 900),
       E=st.sampled_from([8, 16]), D=st.sampled_from([16, 64]), frac=st.floats(0.0, 1.0), spare=st.integers(0, 9),
       strided=st.booleans(), splits=st.tuples(st.integers(1, 8), st.integers(1, 16)), per_query_head=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fused_decode_step_matches_the_separate_references(B, H, G, L, E, D, frac, spare, strided, splits,
                                                           per_query_head, seed):
    """score + select + attend in one call == sparse_attention_naive over the reference selection, however each
    (b, h) is split into parts (empty parts included); the queries may be strided views (as the model and the
    producers hand them over)."""
    from butler_cache.kernels.decode_step.cpu import butler_decode_cpu

    n = 12 + int(frac * (L - 13))
    case = _fused_step_case(B, H, G, L, E, D, n, spare, strided, seed, per_query_head=per_query_head)
    assume(case is not None)
    args, ref = case
    got = butler_decode_cpu(*args, splits=splits)
    assert got.shape == (B, 1, H * G, D)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B, H", [(1, 1), (1, 3), (2, 2)])
def test_fused_decode_step_with_the_default_splits(B, H):
    """At a context long enough for several parts per (b, h) on this machine's threads (`default_splits`)."""
    from butler_cache.kernels.decode_step.cpu import butler_decode_cpu

    L, n = 4100, 300
    for seed in range(5):
        case = _fused_step_case(B, H, 3, L, 16, 64, n, 7, False, seed)
        if case is not None:
            break
    args, ref = case
    torch.testing.assert_close(butler_decode_cpu(*args).double(), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=30)
@given(B=st.integers(1, 2), H=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), L=st.integers(24, 700),
       frac=st.floats(0.0, 1.0), back=st.floats(0.0, 1.0), neighbours=st.booleans(),
       splits=st.tuples(st.integers(1, 4), st.integers(1, 6)), seed=st.integers(0, 2**31 - 1))
def test_fused_decode_step_keeps_and_reuses_a_prediction(B, H, G, L, frac, back, neighbours, splits, seed):
    """The prediction interval and neighbour fetching in the fused step: ``return_scores`` gives `score_reference`'s
    scores (past the sinks), and a step reusing a prediction made ``L - L'`` tokens earlier attends to what
    `select_decode_tokens` selects from it (the tokens added since ranked first), with `with_neighbors` added."""
    from butler_cache.kernels.decode_step.cpu import butler_decode_cpu

    E, D, sinks, window = 16, 32, 4, 3
    n = sinks + window + 1 + int(frac * (L - sinks - window - 2))
    gen = torch.Generator().manual_seed(seed)
    qi, q = torch.randn(B, H * G, 1, E, generator=gen), torch.randn(B, H * G, 1, D, generator=gen)
    ik = _keys(B, H, L, E, 5, True, gen)
    k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, H, L, D, generator=gen)
    scores = score_reference(qi, ik, E**-0.5)  # [B, H, 1, L]
    budget = TokenBudget(n, None, sinks, window)
    valid = torch.ones(1, 1, 1, L, dtype=torch.bool)

    def reference(ranking: torch.Tensor) -> torch.Tensor:
        selection = select_decode_tokens(ranking, budget)
        if neighbours:
            selection = with_neighbors(selection, valid, L)
        return sparse_attention_naive(q.double(), k.double(), v.double(), selection.indices, selection.keep, D**-0.5)

    def clear_cut(ranking: torch.Tensor) -> bool:  # no near-tie (or tie among the newer tokens) at the top-k's cut
        middle = ranking[..., sinks : L - window].sort(-1, descending=True).values
        m = n - sinks - window
        if not 0 < m < middle.shape[-1]:
            return True
        above, below = middle[..., m - 1], middle[..., m]
        return not ((above == below) | ((above - below).abs() <= 1e-4)).any()

    assume(clear_cut(scores))
    out, kept = butler_decode_cpu(qi, ik, E**-0.5, q, k, v, D**-0.5, sinks, window, n, splits, return_scores=True,
                                  neighbours=neighbours)
    assert kept.shape == (B, H, 1, L)
    torch.testing.assert_close(kept[..., sinks:], scores[..., sinks:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), reference(scores), rtol=1e-5, atol=1e-5)

    then = max(1, L - int(back * min(L - 1, 2 * n)))  # a prediction made at L' = then tokens
    reused = torch.cat([scores[..., :then], scores.new_full((B, H, 1, L - then), float("inf"))], dim=-1)
    assume(clear_cut(reused))
    got = butler_decode_cpu(None, ik, E**-0.5, q, k, v, D**-0.5, sinks, window, n, splits,
                            reuse_scores=scores[..., :then].contiguous(), neighbours=neighbours)
    torch.testing.assert_close(got.double(), reference(reused), rtol=1e-5, atol=1e-5)


def test_fused_decode_step_refuses_a_prediction_of_another_shape():
    from butler_cache.kernels.decode_step.cpu import butler_decode_cpu

    qi, ik = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 40, 8)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 40, 16)
    for bad in (torch.zeros(1, 2, 1, 40), torch.zeros(1, 1, 1, 41), torch.zeros(1, 1, 1, 40, dtype=torch.float64)):
        with pytest.raises(ValueError, match="reuse_scores must be float32"):
            butler_decode_cpu(qi, ik, 1.0, q, k, k, 1.0, 2, 2, 10, reuse_scores=bad)
    with pytest.raises(ValueError, match="cannot be given reuse_scores"):
        butler_decode_cpu(qi, ik, 1.0, q, k, k, 1.0, 2, 2, 10, reuse_scores=torch.zeros(1, 1, 1, 40), return_scores=True)


@given(pairs=st.integers(1, 64), L=st.integers(1, 200_000), frac=st.floats(0.0, 1.0), threads=st.integers(1, 128))
def test_default_splits_keep_every_thread_busy_within_the_minimum_part_sizes(pairs, L, frac, threads):
    from butler_cache.kernels.decode_step.cpu import (
        MIN_ATTENDED_PER_PART,
        MIN_SCORED_PER_PART,
        default_splits,
    )

    n = int(frac * (L - 1))
    for parts, size, minimum in zip(default_splits(pairs, L, n, threads), (L, n), (MIN_SCORED_PER_PART, MIN_ATTENDED_PER_PART),
                                    strict=True):
        assert parts >= 1
        assert parts == 1 or size // parts >= minimum  # no part below the minimum size
        if threads > 1 and size // minimum >= 2 * threads:  # room for all: at least two tasks per thread
            assert pairs * parts >= 2 * threads
        if threads == 1:
            assert parts == 1


def test_cpu_kernels_refuse_importance_keys_for_another_head_count():
    """Importance keys must be per KV head or per query head; anything else is named in the error."""
    from butler_cache.kernels.decode_step.cpu import butler_decode_cpu
    from butler_cache.kernels.scoring.cpu import score_select_decode_cpu

    args, _ = _fused_step_case(1, 2, 3, 64, 8, 16, 20, 0, False, 0)  # 2 KV heads, 6 query heads
    wrong = torch.randn(1, 4, 64, 8)  # 4 importance-key heads
    with pytest.raises(ValueError, match="4 heads: expected 2 .* or 6"):
        butler_decode_cpu(args[0], wrong, *args[2:])
    with pytest.raises(ValueError, match="4 heads: expected 2 .* or 6"):
        score_select_decode_cpu(args[0], wrong, 8**-0.5, 4, 8, 20, kv_heads=2)


def test_fused_decode_step_refuses_empty_splits():
    from butler_cache.kernels.decode_step.cpu import butler_decode_cpu

    args, _ = _fused_step_case(1, 1, 2, 64, 8, 16, 20, 0, False, 0)
    with pytest.raises(ValueError, match="splits"):
        butler_decode_cpu(*args, splits=(0, 1))


FUSED_STEP, FLAT_STEP = "decode_step.cpu.butler_decode_cpu", "decode_step.cpu.decode_step_flat"
SCORING, ATTENTION = "scoring.cpu.score_select_decode_cpu", "sparse_attention.cpu.sparse_decode_attention_cpu"
UPDATE, PRODUCER = "cache_update.cpu.append_and_project_cpu", "producer.cpu.importance_queries_cpu"


@pytest.mark.parametrize(
    "kwargs, kernels",
    [
        (dict(), {FLAT_STEP, UPDATE, PRODUCER}),  # through the layer's NumbaDecodeStep, not butler_decode_cpu
        (dict(record_stats=True), {SCORING, ATTENTION, UPDATE, PRODUCER}),
        (dict(policy="oracle"), {ATTENTION}),
        (dict(predictor_type="attentive"), {FUSED_STEP, FLAT_STEP}),
        (dict(predictor_type="attentive", prediction_interval=3), {FUSED_STEP, FLAT_STEP}),
        (dict(predictor_type="attentive", prediction_interval=2, neighbor_fetch=True), {FUSED_STEP, FLAT_STEP}),
        (dict(predictor_type="attentive", record_stats=True), {SCORING, ATTENTION}),
    ],
    ids=["fused", "separate-kernels", "oracle", "attentive-predictor", "attentive-interval",
         "attentive-interval-neighbours", "attentive-separate-kernels"],
)
def test_numba_paths_through_generate_equal_torch(kwargs, kernels, monkeypatch):
    """The fused step (default: the layer's `NumbaDecodeStep` makes the cache update and the fused call; the
    strided predictor's producers run compiled at the decode steps), the
    separate scoring and attention kernels (stats recorded), and the attention kernel alone (oracle policy), with
    the strided predictor's importance keys (per KV head) and the attentive one's (per query head, appended by
    the producers: the general fused call, which also keeps and reuses predictions and fetches neighbours), all
    generate what the PyTorch paths generate."""
    kwargs = dict(kwargs)
    predictor_type = kwargs.pop("predictor_type", "strided")
    called = set()
    for name in (FUSED_STEP, FLAT_STEP, SCORING, ATTENTION, UPDATE, PRODUCER):
        module_name, fn_name = name.rsplit(".", 1)
        module = importlib.import_module(f"butler_cache.kernels.{module_name}")
        fn = getattr(module, fn_name)
        monkeypatch.setattr(module, fn_name, lambda *a, _fn=fn, _name=name, **kw: called.add(_name) or _fn(*a, **kw))
    model = tiny_model("qwen2", seed=5, num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    predictor = ButlerPredictor(ButlerConfig.for_model(model, predictor_type=predictor_type))
    ids, _ = random_batch(2, 30, seed=2)
    gen_kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    runs = {}
    for backend in ("torch", "numba"):
        cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend=backend, **kwargs)
        runs[backend] = model.generate(**gen_kwargs, **cache_argument(cache))
        if cache.predictor is not None and predictor_type == "strided":
            layer = cache.layers[cache.sparse_layers[0]]
            assert (layer.importance_keys.stride(-2) == 1) == (backend == "numba")  # feature-major under numba
    assert torch.equal(runs["torch"].sequences, runs["numba"].sequences)
    for a, b in zip(runs["torch"].logits, runs["numba"].logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert called == kernels  # the decode steps went through those kernels


def test_numba_backend_falls_back_to_torch_for_other_dtypes():
    model = tiny_model("llama", seed=2, dtype=torch.bfloat16, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    predictor = ButlerPredictor(ButlerConfig.for_model(model))
    ids, _ = random_batch(1, 30, seed=1)
    out = {}
    for backend in ("torch", "numba"):
        cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend=backend)
        out[backend] = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, **cache_argument(cache))
    assert torch.equal(out["torch"], out["numba"])


# one step of a layer's life: ("update", new tokens) | ("crop", tokens) | ("reorder",) (replaces the tensors)
layer_steps = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.sampled_from([1, 1, 1, 2, 7, 300])),
        st.tuples(st.just("crop"), st.integers(1, 5)),
        st.tuples(st.just("reorder"),),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(steps=layer_steps, B=st.integers(1, 2), kv_heads=st.sampled_from([1, 2]), prefill=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_fused_cache_update_keeps_what_the_separate_appends_keep(steps, B, kv_heads, prefill, seed):
    """`ButlerLayer.update` with the numba backend (K/V rows and importance keys written in one compiled call
    while the storages have room) holds what the PyTorch backend holds (three appends and the projection),
    through updates that fit, updates that outgrow the storages, crops and tensor-replacing operations."""
    from butler_cache import ButlerLayer, SparseAttentionSettings, TokenBudget
    from butler_cache.kernels.cache_update import cpu as cache_update_cpu
    from butler_cache.policies import make_policy

    model = tiny_model("llama", seed=1, num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads)
    torch.manual_seed(seed % 1000)
    predictor = ButlerPredictor(ButlerConfig.for_model(model))
    layers = {
        backend: ButlerLayer(predictor.config.sparse_layers[0],
                             SparseAttentionSettings(make_policy("butler"), TokenBudget(64), backend=backend), predictor)
        for backend in ("torch", "numba")
    }
    numba_layer = layers["numba"]
    gen = torch.Generator().manual_seed(seed)
    D = model.config.head_dim
    expected_fused = 0
    spy = mock.patch.object(cache_update_cpu, "append_and_project_cpu", wraps=cache_update_cpu.append_and_project_cpu)
    with spy as fused, torch.no_grad():  # as in generate (with autograd on, the torch path runs)
        for step in [("update", prefill), *steps]:
            if step[0] == "update":
                k = torch.randn(B, kv_heads, step[1], D, generator=gen)
                v = torch.randn(B, kv_heads, step[1], D, generator=gen)
                expected_fused += numba_layer.is_initialized and min(
                    numba_layer.spare_rows(name) for name in ("keys", "values", "importance_keys")) >= step[1]
                for layer in layers.values():
                    layer.update(k, v)
            elif step[0] == "crop":
                for layer in layers.values():
                    layer.crop(-min(step[1], layer.keys.shape[-2] - 1))
            else:
                for layer in layers.values():
                    layer.reorder_cache(torch.arange(B).flip(0))
            torch.testing.assert_close(numba_layer.keys, layers["torch"].keys, rtol=0, atol=0)
            torch.testing.assert_close(numba_layer.values, layers["torch"].values, rtol=0, atol=0)
            torch.testing.assert_close(numba_layer.importance_keys, layers["torch"].importance_keys)
    assert fused.call_count == expected_fused  # the compiled update ran exactly when the storages had room


@settings(max_examples=25)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 5), L=st.integers(0, 40), D=st.sampled_from([8, 16]),
       E=st.sampled_from([4, 8]), spare=st.integers(0, 6), seed=st.integers(0, 2**31 - 1))
def test_compiled_cache_update_matches_the_reference(B, H, T, L, D, E, spare, seed):
    """`append_and_project_cpu` writes into the storages' spare rows what `append_and_project_naive` appends."""
    from butler_cache.kernels.cache_update.cpu import append_and_project_cpu

    gen = torch.Generator().manual_seed(seed)
    storages = [torch.randn(B, H, L + T + spare, width, generator=gen) for width in (D, D, E)]
    new_k, new_v = torch.randn(B, H, T, D, generator=gen), torch.randn(B, H, T, D, generator=gen)
    weight = torch.randn(H, D, E, generator=gen)
    ref = append_and_project_naive(*(s[:, :, :L] for s in storages), new_k, new_v, weight)
    append_and_project_cpu(new_k, new_v, weight, *(flat_view(s) for s in storages), L)
    for got, want in zip(storages, ref, strict=True):
        torch.testing.assert_close(got[:, :, : L + T], want, rtol=1e-5, atol=1e-5)
