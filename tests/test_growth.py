"""`append_rows` (the cache's copy-free growth) against `torch.cat`, through appends, crops and replacements, and
`GrowingLayer` against transformers' `DynamicLayer` through the cache operations."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.cache_utils import DynamicLayer

from butler_cache.growth import MIN_SPARE_ROWS, GrowingLayer, append_rows

# one operation: ("append", rows) | ("crop", rows) | ("replace",) (a cache op that swaps the tensor)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 300)),
        st.tuples(st.just("crop"), st.integers(1, 40)),
        st.tuples(st.just("replace")),
    ),
    min_size=1,
    max_size=25,
)


@given(ops=operations, batch=st.integers(1, 3), heads=st.integers(1, 3), dim=st.sampled_from([1, 4, 16]),
       feature_major=st.booleans())
def test_append_rows_equals_cat(ops, batch, heads, dim, feature_major):
    gen = torch.Generator().manual_seed(len(ops))
    expected = torch.empty(0)  # DynamicLayer starts from an empty 1-D tensor
    view, storage = torch.empty(0), None
    earlier = []  # (view handed out, its values then): appends must never change them
    for op in ops:
        if op[0] == "append":
            new = torch.randn(batch, heads, op[1], dim, generator=gen)
            expected = new if expected.numel() == 0 else torch.cat([expected, new], dim=-2)
            view, storage = append_rows(view, storage, new, feature_major)
            earlier.append((view, view.clone()))
            if feature_major and dim > 1 and view.shape[-2] > 1:
                assert view.stride(-2) == 1  # each feature's values contiguous over the tokens
        elif op[0] == "crop" and expected.numel() and op[1] < expected.shape[-2]:
            expected, view = expected[..., : -op[1], :], view[..., : -op[1], :]
            earlier.clear()  # cropping gives up the cropped rows, as DynamicLayer's crop does
        elif op[0] == "replace" and expected.numel():
            view = view.index_select(0, torch.arange(view.shape[0]))  # like reorder_cache
        if expected.numel():
            assert torch.equal(view, expected)
            assert storage.shape[-2] >= view.shape[-2]
        for handed_out, values in earlier:
            assert torch.equal(handed_out, values)


def test_append_rows_reuses_storage_until_full():
    first = torch.randn(1, 2, 10, 4)
    view, storage = append_rows(None, None, first)
    capacity = storage.shape[-2]
    assert capacity == 10 + MIN_SPARE_ROWS
    for step in range(capacity - 10):
        view, again = append_rows(view, storage, torch.randn(1, 2, 1, 4))
        assert again is storage, f"reallocated at step {step} with spare rows left"
    assert view.data_ptr() == storage.data_ptr()
    view, grown = append_rows(view, storage, torch.randn(1, 2, 1, 4))
    assert grown is not storage and grown.shape[-2] > capacity
    assert torch.equal(view[..., :10, :], first)


def test_append_rows_starts_over_when_the_view_was_replaced():
    view, storage = append_rows(None, None, torch.randn(2, 1, 5, 3))
    replaced = view.flip(0).contiguous()  # what batch_select / reorder leave behind
    new = torch.randn(2, 1, 1, 3)
    out, fresh = append_rows(replaced, storage, new)
    assert fresh is not storage
    assert torch.equal(out, torch.cat([replaced, new], dim=-2))


layer_operations = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(1, 300)),
        st.tuples(st.just("crop"), st.integers(1, 40)),
        st.tuples(st.just("reorder_cache"),),
        st.tuples(st.just("batch_repeat_interleave"),),
        st.tuples(st.just("batch_select_indices"),),
        st.tuples(st.just("reset"),),
    ),
    min_size=1,
    max_size=20,
)


@given(ops=layer_operations, heads=st.integers(1, 3), dim=st.sampled_from([1, 8]))
def test_growing_layer_equals_dynamic_layer(ops, heads, dim):
    """Same tensors as `DynamicLayer` after any sequence of updates and cache operations; no re-copy per update."""
    gen = torch.Generator().manual_seed(len(ops))
    grown, plain, batch = GrowingLayer(), DynamicLayer(), 2
    for op in ops:
        length = plain.get_seq_length()
        if op[0] == "update":
            k, v = (torch.randn(batch, heads, op[1], dim, generator=gen) for _ in range(2))
            storage = grown._storage["keys"]
            got, expected = grown.update(k, v), plain.update(k, v)
            for a, b in zip(got, expected, strict=True):
                assert torch.equal(a, b)
            if storage is not None and length and storage.shape[-2] >= length + op[1]:
                assert grown._storage["keys"] is storage  # written in place, not re-copied
        elif op[0] == "crop" and op[1] < length:
            grown.crop(-op[1]), plain.crop(-op[1])
        elif op[0] == "reorder_cache" and length:
            beam = torch.randperm(batch, generator=gen)
            grown.reorder_cache(beam), plain.reorder_cache(beam)
        elif op[0] == "batch_repeat_interleave" and length and batch < 4:
            grown.batch_repeat_interleave(2), plain.batch_repeat_interleave(2)
            batch *= 2
        elif op[0] == "batch_select_indices" and length and batch > 1:
            keep = torch.arange(0, batch, 2)
            grown.batch_select_indices(keep), plain.batch_select_indices(keep)
            batch = len(keep)
        elif op[0] == "reset":
            # a reset layer is an empty one (transformers 5.25 drops the tensors; 5.17 zeroed them in place and kept
            # their length, which GrowingLayer does not follow on any release)
            grown.reset(), plain.reset()
            if plain.get_seq_length():
                plain = DynamicLayer()
            batch = 2
        assert grown.get_seq_length() == plain.get_seq_length()
        if plain.get_seq_length():
            assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)
