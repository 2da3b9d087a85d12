"""The Triton decode kernels as operators (`kernels/ops.py`): equal to their launchers and to the references,
checked by `torch.library.opcheck`, traced by torch.compile without a graph break, and serving the compiled
`ButlerStaticCache` step (interpreter mode on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from butler_cache.kernels import ops  # noqa: F401  (registers torch.ops.butler_cache)
from butler_cache.kernels.scoring.decode import score_decode
from butler_cache.kernels.scoring.naive import score_reference
from butler_cache.kernels.sparse_attention import sparse_attention_naive
from butler_cache.kernels.sparse_attention.decode import sparse_decode_attention
from butler_cache.static import ButlerStaticCache

from ..conftest import random_batch, tiny_model
from ..test_static_cache import SMALL_BUDGET, decode, predictor_for

SHAPES = [(1, 1, 1, 17, 16, 5), (2, 2, 4, 70, 64, 33), (1, 3, 3, 40, 80, 40)]  # B, H_kv, G, L, D, selected


def _attention_inputs(B, H, G, L, D, S, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, 1, D, generator=gen).to(dtype)
    k, v = torch.randn(B, H, L, D, generator=gen).to(dtype), torch.randn(B, H, L, D, generator=gen).to(dtype)
    idx = torch.rand(B, H, 1, L, generator=gen).argsort(-1)[..., :S]
    keep = torch.rand(B, H, 1, S, generator=gen) < 0.8
    keep[..., 0] = True
    return q, k, v, idx, keep, D**-0.5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_operator_eager_and_compiled(shape, dtype):
    args = _attention_inputs(*shape, dtype=dtype)
    ref = sparse_attention_naive(*[a.double() if a.is_floating_point() else a for a in args[:3]], *args[3:])
    eager = torch.ops.butler_cache.sparse_decode_attention(*args)
    assert torch.equal(eager, sparse_decode_attention(*args))
    torch.testing.assert_close(eager.double(), ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda *a: torch.ops.butler_cache.sparse_decode_attention(*a) * 2, fullgraph=True,
                             backend=counter)
    torch.testing.assert_close(compiled(*args), eager * 2, rtol=0, atol=0)
    assert counter.frame_count == 1


@pytest.mark.parametrize("shape", [(1, 2, 2, 300, 16), (2, 1, 4, 33, 32)])  # B, H_kv, G, L, d'
def test_score_operator_eager_and_compiled(shape):
    B, H, G, L, E = shape
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, H * G, 1, E, generator=gen), torch.randn(B, H, L, E, generator=gen)
    eager = torch.ops.butler_cache.score_decode(q, k, E**-0.5)
    assert torch.equal(eager, score_decode(q, k, E**-0.5))
    torch.testing.assert_close(eager, score_reference(q, k, E**-0.5), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(torch.ops.butler_cache.score_decode, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, E**-0.5), eager, rtol=0, atol=0)


def test_opcheck():
    """Schema, fake-tensor (shape) implementation and dispatch of both operators, as torch.library checks them."""
    torch.library.opcheck(torch.ops.butler_cache.sparse_decode_attention, _attention_inputs(2, 2, 2, 40, 16, 9),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 50, 16)
    torch.library.opcheck(torch.ops.butler_cache.score_decode, (q, k, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiled_static_cache_with_triton_equals_torch():
    model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2)
    predictor = predictor_for(model)
    ids, mask = random_batch(2, 12, pads=[0, 2])
    steps = 6

    def make(backend):
        return ButlerStaticCache(model, predictor, max_cache_len=ids.shape[1] + steps + 1, backend=backend,
                                 **SMALL_BUDGET)

    want_tokens, want = decode(model, model, make("torch"), ids, mask, steps)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.forward, fullgraph=True, backend=counter)
    tokens, got = decode(compiled, model, make("triton"), ids, mask, steps)
    assert counter.frame_count == 1
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
