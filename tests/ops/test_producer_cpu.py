"""The compiled importance-query producer (`kernels/producer/cpu.py`) against the PyTorch module it stands for."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from butler_cache.kernels import NUMBA_AVAILABLE
from butler_cache.strided import ImportanceQueryProducer

pytestmark = pytest.mark.skipif(not NUMBA_AVAILABLE, reason="numba not installed")


def _producer(D: int, I: int, layers: int, heads: int, E: int, seed: int) -> ImportanceQueryProducer:
    torch.manual_seed(seed)
    producer = ImportanceQueryProducer(D, I, layers, heads, E)
    with torch.no_grad():  # LayerNorm starts at weight 1, bias 0: draw them so that the affine part is tested
        producer.norm.weight.normal_(1.0, 0.3)
        producer.norm.bias.normal_(0.0, 0.3)
    return producer


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 4), D=st.sampled_from([8, 64, 576]), I=st.sampled_from([4, 33, 128]),
       layers=st.integers(1, 4), heads=st.sampled_from([1, 3, 9]), E=st.sampled_from([4, 16]),
       offset=st.floats(-3.0, 3.0), seed=st.integers(0, 2**16))
def test_compiled_producer_matches_the_module(B, T, D, I, layers, heads, E, offset, seed):
    """Any batch of a few rows, widths and an offset in the hidden states (LayerNorm's statistics): the compiled
    call gives the module's importance queries, in the module's ``[num_layers, B, HQ, T, d']`` layout."""
    from butler_cache.kernels.producer import cpu as producer_cpu

    producer = _producer(D, I, layers, heads, E, seed)
    hidden = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed)) * 2 + offset
    with torch.no_grad():
        assert producer_cpu.serves(producer.norm, producer.up, producer.down, hidden)
        expected = producer(hidden)
        got = producer(hidden, backend="numba")
    assert got.shape == expected.shape == (layers, B, heads, T, E)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compiled_producer_serves_only_what_it_computes_alike(monkeypatch):
    """Autograd, prefill-sized row counts, other dtypes and modules that are not plain LayerNorm / Linear (a LoRA
    wrapper, say) stay with the module's operators."""
    from butler_cache.kernels.producer import cpu as producer_cpu

    producer = _producer(16, 8, 2, 3, 4, seed=0)
    hidden = torch.randn(2, 1, 16)
    served = lambda h, p=producer: producer_cpu.serves(p.norm, p.up, p.down, h)  # noqa: E731
    with torch.no_grad():
        assert served(hidden)
        assert not served(torch.randn(2, producer_cpu.MAX_ROWS, 16))
        assert not served(hidden.double())

    class Wrapped(nn.Linear):
        pass

    wrapped = _producer(16, 8, 2, 3, 4, seed=0)
    wrapped.up = Wrapped(16, 8)
    with torch.no_grad():
        assert not served(hidden, wrapped)
    assert not served(hidden)  # autograd on, the producer's weights require grad: the module runs
    calls = []
    original = producer_cpu.importance_queries_cpu
    monkeypatch.setattr(producer_cpu, "importance_queries_cpu", lambda *a: calls.append(a) or original(*a))
    with torch.no_grad():
        producer(hidden, backend="torch")
        assert not calls  # the PyTorch backend always runs the module
        producer(hidden, backend="numba")
    assert len(calls) == 1
