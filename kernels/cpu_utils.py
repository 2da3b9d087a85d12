"""Shared pieces of the numba CPU kernels: availability and flat views of cache tensors.

The CPU kernels are compiled by numba (``pip install butler-cache[cpu]``); without numba the PyTorch
paths serve CPUs. They read the caches in place: a ``[B, H, L, D]`` tensor whose rows are contiguous
(any prefix view of the storages `ButlerLayer` keeps) is handed over as one flat float32 array plus
the element offsets of its (b, h) row blocks and its row stride.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

NUMBA_AVAILABLE = importlib.util.find_spec("numba") is not None


def flat_view(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``x`` ``[B, H, L, D]`` (CPU, non-negative strides) as ``(flat, offsets, token_stride, feature_stride)``.

    ``flat`` is a 1-D numpy view over the memory ``x`` spans (no copy); ``offsets`` ``[B, H]`` int64 the element
    of ``flat`` where ``x[b, h, 0, 0]`` lies; ``x[b, h, l, d]`` is ``flat[offsets[b, h] + l * token_stride +
    d * feature_stride]``.
    """
    B, H, L, D = x.shape
    s_b, s_h, s_l, s_d = x.stride()
    span = 1 + (B - 1) * s_b + (H - 1) * s_h + (L - 1) * s_l + (D - 1) * s_d
    flat = torch.as_strided(x, (span,), (1,)).numpy()
    offsets = np.arange(B, dtype=np.int64)[:, None] * s_b + np.arange(H, dtype=np.int64)[None, :] * s_h
    return flat, np.ascontiguousarray(offsets), int(s_l), int(s_d)


def flat_rows(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """`flat_view` of a tensor whose rows are contiguous: ``(flat, offsets, row_stride)``, row ``l`` of (b, h)
    being ``flat[offsets[b, h] + l * row_stride :][:D]``."""
    flat, offsets, s_l, s_d = flat_view(x)
    if s_d != 1 and x.shape[-1] > 1:
        raise ValueError(f"flat_rows needs contiguous rows (last stride 1), got strides {x.stride()}")
    return flat, offsets, s_l


def check_row_budget(n: int, sinks: int, window: int, L: int) -> None:
    """The CPU selection kernels take a row budget that holds the sinks and the window and leaves tokens out."""
    if not sinks + window <= n < L:
        raise ValueError(f"budget n={n} must hold sinks + window = {sinks + window} and be below the context L={L}")
