"""Appending to a cache tensor along the token axis without copying the whole cache every step.

`DynamicLayer` grows its keys and values with ``torch.cat``, which reads and rewrites the whole cache
at every decode step: at 8k tokens that copy moves more bytes than a sparse step reads. `append_rows`
keeps a larger *storage* tensor and hands out a prefix view of it; a step writes only its new rows,
and the storage is reallocated (copied once) when it is full.

Views handed out earlier stay valid: rows are only ever written past the live length, except after a
`crop`, which (as in `DynamicLayer`) gives up the cropped rows.

`GrowingLayer` is a `DynamicLayer` whose keys and values grow this way; `ButlerCache` uses it for every
full-attention layer (its dense ones included).

A storage can also be *feature-major*: ``[..., D, capacity]`` memory seen as ``[..., capacity, D]`` (each
feature's values contiguous over the tokens). The views have the same shape and values; kernels that
stream over the tokens one feature at a time (the CPU scoring kernel) read them with unit stride.
"""

from __future__ import annotations

from typing import Any

import torch

from .compat import DynamicLayer

# spare rows allocated on top of what is needed: at least this many, and at least 1/8 of the length,
# so that reallocation copies amortise to a few rows per appended token.
MIN_SPARE_ROWS = 256
SPARE_FRACTION = 8


def _is_prefix_view(current: torch.Tensor, storage: torch.Tensor) -> bool:
    """Whether ``current`` is ``storage[..., :n, :]`` for its own ``n`` (same memory, same layout)."""
    return (
        current.data_ptr() == storage.data_ptr()
        and current.device == storage.device
        and current.dtype == storage.dtype
        and current.shape[:-2] == storage.shape[:-2]
        and current.shape[-1] == storage.shape[-1]
        and current.stride() == storage.stride()
    )


def append_rows(
    current: torch.Tensor | None, storage: torch.Tensor | None, new: torch.Tensor, feature_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``new`` ``[..., T, D]`` to ``current`` ``[..., L, D]`` along dim -2.

    Returns ``(view, storage)``: ``view`` is ``[..., L + T, D]``, equal to ``torch.cat([current, new], -2)``,
    and a prefix view of ``storage``, to pass back on the next call. ``current`` that is not a prefix view
    of ``storage`` (a cache operation replaced it) starts a new storage, feature-major if ``feature_major``.
    """
    if current is None or current.numel() == 0:  # DynamicLayer starts from an empty 1-D tensor
        current = new[..., :0, :]
    length, added = current.shape[-2], new.shape[-2]
    needed = length + added
    if storage is None or not _is_prefix_view(current, storage) or storage.shape[-2] < needed:
        capacity = needed + max(MIN_SPARE_ROWS, needed // SPARE_FRACTION)
        if feature_major:  # [..., D, capacity] memory, seen as [..., capacity, D]
            grown = new.new_empty((*new.shape[:-2], new.shape[-1], capacity)).transpose(-1, -2)
        else:
            grown = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
        grown[..., :length, :] = current
        storage = grown
    storage[..., length:needed, :] = new
    return storage[..., :needed, :], storage


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values grow in place (`append_rows`) instead of by ``torch.cat``.

    Holds the same tensors as `DynamicLayer` (prefix views of larger storages) and inherits its cache
    operations; the ones that replace the tensors also let go of the storages.
    """

    def __init__(self) -> None:
        super().__init__()
        # storages that the tensors of the same name are prefix views of
        self._storage: dict[str, torch.Tensor | None] = {"keys": None, "values": None}

    def _append(self, name: str, new: torch.Tensor, feature_major: bool = False) -> torch.Tensor:
        storage = self._storage[name]
        view, self._storage[name] = append_rows(getattr(self, name), storage, new, feature_major)
        setattr(self, name, view)
        return view

    def spare_rows(self, name: str) -> int:
        """Rows left in the storage past tensor ``name`` (0 when it is not a prefix view of its storage)."""
        current, storage = getattr(self, name), self._storage[name]
        if storage is None or current is None:
            return 0
        if current.dim() != storage.dim() or not _is_prefix_view(current, storage):
            return 0
        return storage.shape[-2] - current.shape[-2]

    def storage(self, name: str) -> torch.Tensor | None:
        """The storage behind tensor ``name`` (None before its first append and after an operation that let the
        storage go); `spare_rows` says whether the tensor is still a prefix view of it."""
        return self._storage[name]

    def _release_storage(self) -> None:
        self._storage = dict.fromkeys(self._storage)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append("keys", key_states), self._append("values", value_states)

    def reset(self) -> None:
        # Dropped rather than zeroed (transformers 5.17 zeroes a DynamicLayer's tensors in place and keeps their
        # length): an update after a reset starts from an empty layer on every supported release.
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()  # skips the zeroing now; resets what inheriting layers count
        self._release_storage()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._release_storage()  # the old storage no longer backs the cache

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._release_storage()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._release_storage()

    def offload(self) -> None:
        super().offload()
        self._release_storage()  # the device copies must not outlive the offload
