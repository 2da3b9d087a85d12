"""`ButlerStaticCache`: a fixed-shape sparse decode step that torch.compile captures whole.

Compiled (fullgraph) decoding gives eager's tokens with no recompilation over 50 steps; eager, the static step
selects and attends as `ButlerCache` does (same logits), is dense attention when the budget covers the context,
and is invariant to left padding; what cannot have fixed shapes is refused by name.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import StaticCache

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor
from butler_cache.compat import cache_argument
from butler_cache.static import ButlerStaticCache, ButlerStaticLayer

from .conftest import random_batch, tiny_model

SMALL_BUDGET = dict(token_budget=10, sink_tokens=2, local_window=4)


def predictor_for(model, predictor_type: str = "strided") -> ButlerPredictor:
    config = ButlerConfig.for_model(model, predictor_type=predictor_type, attentive_hidden_size=16)
    return ButlerPredictor(config).to(model.dtype)


@torch.no_grad()
def decode(forward, model, cache, ids, mask, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill eagerly, then ``steps`` greedy steps through ``forward``: (tokens ``[B, steps]``, logits
    ``[B, steps, V]``). Positions count each row's real tokens, as in `generate` (the predictor's importance keys come
    from post-RoPE keys, so a left-padded row must keep its positions). The 2-D attention mask gains one real token
    per step; for a static cache it spans the whole ``max_cache_len`` from the start (zeros past the tokens written),
    so that its shape, too, stays fixed."""
    B, P = ids.shape
    if isinstance(cache, StaticCache):
        width = max(layer.max_cache_len for layer in cache.layers)  # sliding layers hold less
        mask = torch.cat([mask, mask.new_zeros(B, width - P)], dim=1)  # [B, max_cache_len]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P or max_cache_len]: as `generate` counts them
    logits = model(input_ids=ids, attention_mask=mask[:, :P], position_ids=positions[:, :P],
                   **cache_argument(cache)).logits
    position_ids = positions[:, P - 1 : P]  # [B, 1]
    token, tokens, out = logits[:, -1:].argmax(-1), [], []
    for i in range(steps):
        if isinstance(cache, StaticCache):
            mask = mask.clone()
            mask[:, P + i] = 1
        else:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        position, position_ids = torch.tensor([P + i]), position_ids + 1
        logits = forward(input_ids=token, attention_mask=mask, position_ids=position_ids, **cache_argument(cache),
                         cache_position=position).logits
        token = logits[:, -1:].argmax(-1)
        tokens.append(token[:, 0])
        out.append(logits[:, -1])
    return torch.stack(tokens, 1), torch.stack(out, 1)


def test_compiled_decode_equals_eager_without_graph_breaks_or_recompiles():
    model = tiny_model("llama")
    predictor = predictor_for(model)
    ids, mask = random_batch(2, 8, pads=[0, 3])
    steps = 50  # the context passes the budget (10) at step 3: one graph serves the dense and the sparse regime

    def make():
        return ButlerStaticCache(model, predictor, max_cache_len=ids.shape[1] + steps + 1, backend="torch",
                                 **SMALL_BUDGET)

    eager_tokens, eager_logits = decode(model, model, make(), ids, mask, steps)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # functionalises the in-place cache writes, as inductor does
    compiled = torch.compile(model.forward, fullgraph=True, backend=counter)  # fullgraph: any graph break fails
    tokens, logits = decode(compiled, model, make(), ids, mask, steps)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations over {steps} decode steps"
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    # the compiled step is the sparse one: a dense static cache decodes the same tokens to other logits
    _, dense = decode(model, model, StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1),
                      ids, mask, steps)
    assert not torch.allclose(dense[:, 10:], eager_logits[:, 10:], atol=1e-3)


def test_explain_reports_no_graph_break():
    model = tiny_model("llama")
    ids, mask = random_batch(1, 12)
    cache = ButlerStaticCache(model, predictor_for(model), max_cache_len=16, backend="torch", **SMALL_BUDGET)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_argument(cache))
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.forward)(
            input_ids=ids[:, -1:], attention_mask=torch.ones(1, 13, dtype=torch.long), **cache_argument(cache),
            cache_position=torch.tensor([12]),
        )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("policy", ["butler", "oracle"])
@pytest.mark.parametrize("pads", [[0], [0, 3]])
def test_static_step_equals_butler_cache(family, policy, pads):
    """Same selection, same attention: the static step's logits are `ButlerCache`'s (padding included)."""
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=2)
    predictor = predictor_for(model) if policy == "butler" else None
    ids, mask = random_batch(len(pads), 20, pads=pads, seed=3)
    steps = 8
    dynamic = ButlerCache(model, predictor, policy=policy, backend="torch", **SMALL_BUDGET)
    static = ButlerStaticCache(model, predictor, policy=policy, max_cache_len=32, backend="torch", **SMALL_BUDGET)
    want_tokens, want = decode(model, model, dynamic, ids, mask, steps)
    got_tokens, got = decode(model, model, static, ids, mask, steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)


@given(
    family=st.sampled_from(["llama", "qwen3", "mistral", "gemma3"]),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 2)]),
    pads=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    length=st.integers(7, 16),
    policy=st.sampled_from(["butler", "oracle", "quest", "streaming", "random"]),
    seed=st.integers(0, 2**16),
)
def test_budget_covering_the_context_is_dense_static_attention(family, heads, pads, length, policy, seed):
    hq, hkv = heads
    model = tiny_model(family, seed=seed % 5, num_attention_heads=hq, num_key_value_heads=hkv)
    predictor = predictor_for(model) if policy == "butler" else None
    ids, mask = random_batch(len(pads), length, pads=[0, *pads[1:]], seed=seed)
    steps, capacity = 4, length + 5
    want_tokens, want = decode(model, model, StaticCache(config=model.config, max_cache_len=capacity), ids, mask, steps)
    cache = ButlerStaticCache(model, predictor, policy=policy, max_cache_len=capacity, token_budget=capacity,
                              sink_tokens=1, local_window=2, backend="torch")
    got_tokens, got = decode(model, model, cache, ids, mask, steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)


def test_left_padding_does_not_change_a_sequence():
    model = tiny_model("qwen2")
    predictor = predictor_for(model)
    ids, mask = random_batch(2, 18, pads=[0, 5], seed=1)
    padded_tokens, padded = decode(model, model, ButlerStaticCache(model, predictor, max_cache_len=30, **SMALL_BUDGET),
                                   ids, mask, 8)
    alone_tokens, alone = decode(model, model, ButlerStaticCache(model, predictor, max_cache_len=25, **SMALL_BUDGET),
                                 ids[1:, 5:], mask[1:, 5:], 8)
    torch.testing.assert_close(padded[1:], alone, rtol=1e-4, atol=1e-4)
    assert torch.equal(padded_tokens[1:], alone_tokens)


def test_reset_then_reuse_decodes_as_a_fresh_cache():
    model = tiny_model("llama")
    predictor = predictor_for(model)
    ids, mask = random_batch(1, 14, seed=2)
    cache = ButlerStaticCache(model, predictor, max_cache_len=24, **SMALL_BUDGET)
    _, first = decode(model, model, cache, ids, mask, 6)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert all(not layer.importance_keys.any() for layer in cache.layers if isinstance(layer, ButlerStaticLayer))
    other, _ = random_batch(1, 14, seed=5)
    decode(model, model, cache, other, mask, 3)  # something else in between
    cache.reset()
    _, again = decode(model, model, cache, ids, mask, 6)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_layers_and_buffers():
    model = tiny_model("gemma3")  # sliding-window layers keep transformers' own static layers
    cache = ButlerStaticCache(model, predictor_for(model), max_cache_len=40, **SMALL_BUDGET)
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, ButlerStaticLayer) == (i in cache.sparse_layers)
    ids, mask = random_batch(1, 12)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_argument(cache))
    layer = cache.layers[cache.sparse_layers[0]]
    assert layer.importance_keys.shape[2] == 40 and layer.keys.shape[2] == 40
    assert layer.importance_keys[:, :, :12].abs().sum() > 0 and not layer.importance_keys[:, :, 12:].any()
    assert "max_cache_len=40" in repr(cache)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy="h2o"), "policy 'h2o' keeps per-token state"),
        (dict(policy="snapkv"), "policy 'snapkv' keeps per-token state"),
        (dict(predictor="attentive"), "'attentive' predictor keeps its own growing decode state"),
        (dict(token_budget=None), "needs token_budget"),
        (dict(token_budget=3), "token_budget=3 cannot hold sink_tokens=2 + local_window=4"),
        (dict(max_cache_len=0), "max_cache_len=0 must be a positive integer"),
        (dict(backend="numba"), "backend='numba' cannot be traced"),
        (dict(policy="butler", predictor=None), "policy 'butler' needs a predictor"),
    ],
)
def test_refuses_what_cannot_have_fixed_shapes(kwargs, message):
    model = tiny_model("llama")
    predictor = kwargs.pop("predictor", "strided")
    predictor = predictor_for(model, predictor) if predictor else None
    args = dict(max_cache_len=32, **SMALL_BUDGET) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        ButlerStaticCache(model, predictor, **args)


def test_refuses_a_predictor_of_another_model():
    predictor = predictor_for(tiny_model("llama", num_layers=4))
    with pytest.raises(ValueError, match="this predictor was trained for"):
        ButlerStaticCache(tiny_model("llama", num_layers=6), predictor, max_cache_len=32, **SMALL_BUDGET)


@pytest.mark.parametrize("pads", [[0], [0, 4]])
def test_generate_with_a_static_butler_cache_equals_butler_cache(pads):
    """`generate(past_key_values=ButlerStaticCache(...))` decodes what `ButlerCache` decodes (left padding included)."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    predictor = predictor_for(model)
    ids, mask = random_batch(len(pads), 16, pads=pads, seed=4)
    new = 12
    settings = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, **settings,
                              **cache_argument(ButlerCache(model, predictor, backend="torch", **SMALL_BUDGET)))
        got = model.generate(input_ids=ids, attention_mask=mask, **settings,
                             **cache_argument(ButlerStaticCache(model, predictor, max_cache_len=16 + new,
                                                               backend="torch", **SMALL_BUDGET)))
    assert torch.equal(got, want)


def test_generate_compiles_the_static_butler_step():
    """`generate`'s own compilation (what it does on a GPU for any `StaticCache`; forced here on the CPU) serves a
    `ButlerStaticCache` with one graph for every decode step, and gives the eager tokens."""
    from transformers import CompileConfig

    model = tiny_model("llama")
    predictor = predictor_for(model)
    ids, mask = random_batch(1, 12, seed=6)
    new = 20
    settings = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    def cache():
        return ButlerStaticCache(model, predictor, max_cache_len=12 + new, backend="torch", **SMALL_BUDGET)

    with torch.no_grad():
        eager = model.generate(input_ids=ids, attention_mask=mask, **settings, **cache_argument(cache()),
                               disable_compile=True)
        torch._dynamo.reset()
        graphs = []
        aot_eager = torch._dynamo.lookup_backend("aot_eager")

        def backend(graph, example_inputs):  # a function: generate deep-copies its config, a counter object with it
            graphs.append(graph)
            return aot_eager(graph, example_inputs)

        compile_config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
        compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
        compiled = model.generate(input_ids=ids, attention_mask=mask, **settings, **cache_argument(cache()),
                                  compile_config=compile_config)
    assert len(graphs) == 1, f"{len(graphs)} compilations over {new} decode steps"
    assert torch.equal(compiled, eager)
