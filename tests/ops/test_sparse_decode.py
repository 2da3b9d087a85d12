"""The Triton sparse decode kernel against its PyTorch reference (interpreter mode on CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor
from butler_cache.compat import cache_argument
from butler_cache.kernels import sparse_attention
from butler_cache.kernels.sparse_attention import gather_rows, sparse_attention_naive

from ..conftest import random_batch, tiny_model

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _rel(got, ref):
    assert got.isfinite().all()
    return ((got.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@settings(max_examples=20)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4, 8]), L=st.integers(1, 300),
    frac=st.floats(0.05, 1.0), D=st.sampled_from([16, 64, 80, 128]), dtype=st.sampled_from(list(TOL)),
    seed=st.integers(0, 2**31 - 1),
)
def test_decode_kernel_matches_reference(B, H, G, L, frac, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    S = max(1, int(frac * L))
    q = torch.randn(B, H * G, 1, D, generator=gen).to(dtype)
    k, v = torch.randn(B, H, L, D, generator=gen).to(dtype), torch.randn(B, H, L, D, generator=gen).to(dtype)
    idx = torch.rand(B, H, 1, L, generator=gen).argsort(-1)[..., :S]
    keep = torch.rand(B, H, 1, S, generator=gen) < 0.9
    keep[..., 0] = True
    ref = sparse_attention_naive(q.double(), k.double(), v.double(), idx, keep, D**-0.5)
    got = sparse_attention(q, k, v, idx, keep, D**-0.5, backend="triton")
    assert got.shape == (B, 1, H * G, D) and got.dtype == dtype
    assert _rel(got, ref) < TOL[dtype]


def test_row_with_nothing_kept_gives_zeros():
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16)
    idx, keep = torch.zeros(1, 1, 1, 4, dtype=torch.long), torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    assert torch.equal(sparse_attention(q, k, v, idx, keep, 0.25, backend="triton"), torch.zeros(1, 1, 2, 16))


@pytest.mark.parametrize("options", [dict(), dict(prediction_interval=3, neighbor_fetch=True)], ids=["plain", "interval-neighbours"])
def test_generate_with_triton_equals_torch_backend(options):
    """Left-padded batch: with neighbour fetching, padded keys are never fetched."""
    model = tiny_model("qwen2", seed=5, num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    predictor = ButlerPredictor(ButlerConfig.for_model(model))
    ids, mask = random_batch(2, 30, [0, 4], seed=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    runs = {}
    for backend in ("torch", "triton"):
        cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend=backend, **options)
        runs[backend] = model.generate(**kwargs, **cache_argument(cache))
    assert torch.equal(runs["torch"].sequences, runs["triton"].sequences)
    for a, b in zip(runs["torch"].logits, runs["triton"].logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@settings(max_examples=25)
@given(
    B=st.integers(1, 3), H=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4, 8]), L=st.integers(1, 300),
    spare=st.integers(0, 40), frac=st.floats(0.05, 1.0), D=st.sampled_from([16, 64, 80, 128]),
    dtype=st.sampled_from(list(TOL)), masked=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_torch_decode_path_matches_reference(B, H, G, L, spare, frac, D, dtype, masked, seed):
    """The PyTorch decode path (row gathers on prefix views of a larger storage) against the reference."""
    gen = torch.Generator().manual_seed(seed)
    S = max(1, int(frac * L))
    q = torch.randn(B, H * G, 1, D, generator=gen).to(dtype)
    # the cache hands out prefix views of a storage with spare rows (butler_cache.growth)
    k = torch.randn(B, H, L + spare, D, generator=gen).to(dtype)[:, :, :L]
    v = torch.randn(B, H, L + spare, D, generator=gen).to(dtype)[:, :, :L]
    idx = torch.rand(B, H, 1, L, generator=gen).argsort(-1)[..., :S]
    keep = torch.rand(B, H, 1, S, generator=gen) < 0.9 if masked else torch.ones(B, H, 1, S, dtype=torch.bool)
    ref = sparse_attention_naive(q.double(), k.double(), v.double(), idx, keep, D**-0.5)
    got = sparse_attention(q, k, v, idx, keep if masked else None, D**-0.5, backend="torch")
    assert got.shape == (B, 1, H * G, D) and got.dtype == dtype
    assert torch.equal(got, torch.zeros_like(got)) if not keep.any() else _rel(got, ref) < TOL[dtype]


@given(B=st.integers(1, 3), H=st.integers(1, 4), L=st.integers(1, 64), D=st.integers(1, 20), S=st.integers(1, 30),
       layout=st.sampled_from(["contiguous", "prefix", "transposed", "expanded"]))
def test_gather_rows_equals_gather(B, H, L, D, S, layout):
    gen = torch.Generator().manual_seed(B * 1000 + L * 10 + D)
    if layout == "prefix":
        x = torch.randn(B, H, L + 7, D, generator=gen)[:, :, :L]
    elif layout == "transposed":  # [B, L, H, D] storage seen as [B, H, L, D]
        x = torch.randn(B, L, H, D, generator=gen).transpose(1, 2)
    elif layout == "expanded":
        x = torch.randn(1, 1, L, D, generator=gen).expand(B, H, L, D)
    else:
        x = torch.randn(B, H, L, D, generator=gen)
    idx = torch.randint(0, L, (B, H, S), generator=gen)
    assert torch.equal(gather_rows(x, idx), x.gather(2, idx[..., None].expand(B, H, S, D)))
