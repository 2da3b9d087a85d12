"""The gathered sparse attention and the masked path against a float64 dense reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from butler_cache.kernels import resolve_backend, sparse_attention, sparse_attention_naive
from butler_cache.kernels.sparse_attention import masked_attention

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def dense_reference(query, key, value, mask, scale):
    """float64 softmax attention with a per-KV-head boolean mask ``[B, H, T, L]``; returns ``[B, T, HQ, V]``."""
    G = query.shape[1] // key.shape[1]
    q, k, v = query.double(), key.double().repeat_interleave(G, 1), value.double().repeat_interleave(G, 1)
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask.repeat_interleave(G, 1), float("-inf"))
    return (torch.softmax(logits, -1) @ v).transpose(1, 2)


def rel_err(got, ref):
    assert not got.isnan().any()
    return ((got.double() - ref).norm() / ref.norm()).item()


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 3, 4, 8]))
    T = draw(st.integers(1, 4))
    L = draw(st.integers(1, 70))
    S = draw(st.integers(1, L))
    D = draw(st.sampled_from([8, 16, 64, 80]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    return B, H, G, T, L, S, D, dtype, draw(st.integers(0, 2**31 - 1))


@given(problems())
def test_gathered_equals_dense_masked(problem):
    B, H, G, T, L, S, D, dtype, seed = problem
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, H * G, T, D, generator=gen).to(dtype)
    key = torch.randn(B, H, L, D, generator=gen).to(dtype)
    value = torch.randn(B, H, L, D, generator=gen).to(dtype)
    indices = torch.rand(B, H, T, L, generator=gen).argsort(-1)[..., :S]  # distinct positions per row
    keep = torch.rand(B, H, T, S, generator=gen) < 0.8
    keep[..., 0] = True
    scale = D**-0.5
    mask = torch.zeros(B, H, T, L, dtype=torch.bool).scatter(-1, indices, keep)
    ref = dense_reference(query, key, value, mask, scale)
    got = sparse_attention_naive(query, key, value, indices, keep, scale)
    assert got.shape == (B, T, H * G, D) and got.dtype == dtype
    assert rel_err(got, ref) < TOL[dtype]
    got_masked = masked_attention(query, key, value, mask, scale)
    assert rel_err(got_masked, ref) < max(TOL[dtype], 1e-5 if dtype == torch.float32 else 0)
    assert torch.equal(sparse_attention(query, key, value, indices, keep, scale, backend="torch"), got)


def test_row_with_nothing_kept_is_zero_not_nan():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    out = sparse_attention_naive(q, k, v, torch.zeros(1, 1, 1, 2, dtype=torch.long), torch.zeros(1, 1, 1, 2, dtype=torch.bool), 0.3)
    assert torch.equal(out, torch.zeros_like(out))


def test_backend_resolution(monkeypatch):
    import butler_cache.kernels as kernels
    from butler_cache.kernels import NUMBA_AVAILABLE

    # the numba CPU kernels by default where numba is installed (a dependency), the PyTorch paths without it
    assert resolve_backend("auto", torch.device("cpu")) == ("numba" if NUMBA_AVAILABLE else "torch")
    monkeypatch.setattr(kernels, "NUMBA_AVAILABLE", False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("meta")) == "torch"
    monkeypatch.setattr(kernels, "NUMBA_AVAILABLE", NUMBA_AVAILABLE)
    if NUMBA_AVAILABLE:
        assert resolve_backend("numba", torch.device("cpu")) == "numba"
        with pytest.raises(ValueError, match="backend='numba' runs on CPU tensors"):
            resolve_backend("numba", torch.device("cuda"))
    with pytest.raises(ValueError, match="backend='gpu' is not known"):
        resolve_backend("gpu", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs the Triton interpreter"):
        resolve_backend("triton", torch.device("cpu"))


def test_numba_compile_notice_shows_once_where_kernels_are_not_cached(monkeypatch, caplog, tmp_path):
    """The numba backend announces, once per process, that it compiles kernels numba has not cached on disk."""
    from butler_cache.kernels import cpu_utils

    monkeypatch.setattr(cpu_utils, "__file__", str(tmp_path / "cpu_utils.py"))  # kernels looked up in tmp_path
    monkeypatch.setattr(cpu_utils, "NUMBA_MODULES", ("decode_step/cpu", "scoring/cpu"))
    (tmp_path / "decode_step" / "__pycache__").mkdir(parents=True)
    (tmp_path / "decode_step" / "__pycache__" / "cpu._kernel-1.py311.nbi").touch()  # one of the two cached
    monkeypatch.setattr(cpu_utils, "_notice_shown", False)
    with caplog.at_level("WARNING", logger="butler_cache"):
        cpu_utils.announce_compile()
        cpu_utils.announce_compile()
    notices = [r for r in caplog.records if "compiling the numba CPU decode kernels" in r.getMessage()]
    assert len(notices) == 1
    (tmp_path / "scoring" / "__pycache__").mkdir(parents=True)
    (tmp_path / "scoring" / "__pycache__" / "cpu._kernel-9.py311.nbi").touch()  # now both
    monkeypatch.setattr(cpu_utils, "_notice_shown", False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="butler_cache"):
        cpu_utils.announce_compile()
    assert not caplog.records
