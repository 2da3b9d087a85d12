"""Shared pieces of the numba CPU kernels: availability and flat views of cache tensors.

The CPU kernels are compiled by numba (a dependency; ``backend="auto"`` uses them for float32 CPU
tensors); where numba is missing the PyTorch paths serve CPUs. They read the caches in place: a
``[B, H, L, D]`` tensor whose rows are contiguous (any prefix view of the storages `ButlerLayer` keeps) is handed over as one flat float32 array plus
its strides (the kernels find ``x[b, h, l, d]`` at ``b * s_b + h * s_h + l * s_l + d * s_d``).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch

NUMBA_AVAILABLE = importlib.util.find_spec("numba") is not None

# the numba kernel modules, as paths below this folder (their compiled code lies in numba's on-disk cache,
# ``__pycache__/<module>.*.nbi``, written by ``cache=True``)
NUMBA_MODULES = ("cache_update/cpu", "decode_step/cpu", "producer/cpu", "scoring/cpu", "sparse_attention/cpu")
_notice_shown = False
logger = logging.getLogger("butler_cache")


def announce_compile() -> None:
    """Say once per process, before the numba kernel modules are first imported, that compiling them takes tens of
    seconds, unless numba's on-disk cache already holds every one of them."""
    global _notice_shown
    if _notice_shown:
        return
    _notice_shown = True
    here = Path(__file__).parent
    if not all(any((here / name).parent.joinpath("__pycache__").glob(f"{Path(name).name}.*.nbi"))
               for name in NUMBA_MODULES):
        logger.warning("butler_cache: compiling the numba CPU decode kernels (first use; cached on disk for later "
                       "runs; backend='torch' skips them)")

FlatView = tuple[np.ndarray, int, int, int, int]  # `flat_view`: (flat, s_b, s_h, s_l, s_d)
FlatRows = tuple[np.ndarray, int, int, int]  # `flat_rows`: (flat, s_b, s_h, row stride)
FlatImportanceKeys = tuple[np.ndarray, int, int, int, int, int]  # `importance_key_strides`: (flat, s_b, s_h, s_l, s_e, s_g)


def flat_view(x: torch.Tensor) -> FlatView:
    """``x`` ``[B, H, L, D]`` (CPU, non-negative strides) as ``(flat, s_b, s_h, s_l, s_d)``.

    ``flat`` is a 1-D numpy view over the memory ``x`` spans (no copy); ``x[b, h, l, d]`` is
    ``flat[b * s_b + h * s_h + l * s_l + d * s_d]``.
    """
    B, H, L, D = x.shape
    s_b, s_h, s_l, s_d = x.stride()
    span = 1 + (B - 1) * s_b + (H - 1) * s_h + (L - 1) * s_l + (D - 1) * s_d
    return torch.as_strided(x.detach(), (span,), (1,)).numpy(), s_b, s_h, s_l, s_d


def flat_rows(x: torch.Tensor) -> FlatRows:
    """`flat_view` of a tensor whose rows are contiguous: ``(flat, s_b, s_h, row_stride)``, row ``l`` of (b, h)
    being ``flat[b * s_b + h * s_h + l * row_stride :][:D]``."""
    flat, s_b, s_h, s_l, s_d = flat_view(x)
    if s_d != 1 and x.shape[-1] > 1:
        raise ValueError(f"flat_rows needs contiguous rows (last stride 1), got strides {x.stride()}")
    return flat, s_b, s_h, s_l


def importance_key_strides(
    keys: torch.Tensor, kv_heads: int, query_heads: int
) -> FlatImportanceKeys:
    """Importance keys ``[B, H_k, L, d']`` as ``(flat, s_b, s_h, s_l, s_e, s_g)`` for kernels that work per KV head:
    ``s_h`` the stride between KV heads, ``s_g`` between the query heads of a group. Keys per KV head (``H_k ==
    kv_heads``, the strided predictor's) give ``s_g = 0``; keys per query head (``H_k == query_heads``, the
    attentive predictor's) the head stride."""
    H_k = keys.shape[1]
    if H_k not in (kv_heads, query_heads):
        raise ValueError(
            f"importance keys for {H_k} heads: expected {kv_heads} (KV heads) or {query_heads} (query heads)"
        )
    flat, s_b, s_k, s_l, s_e = flat_view(keys)
    group = H_k // kv_heads
    return flat, s_b, s_k * group, s_l, s_e, s_k if group > 1 else 0


def check_row_budget(n: int, sinks: int, window: int, L: int) -> None:
    """The CPU selection kernels take a row budget that holds the sinks and the window and leaves tokens out."""
    if not sinks + window <= n < L:
        raise ValueError(f"budget n={n} must hold sinks + window = {sinks + window} and be below the context L={L}")
