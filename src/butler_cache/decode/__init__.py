"""Decode backends: how one sparse layer appends, scores, selects and attends.

Each `ButlerLayer` holds one backend, made by `make_backend` for its device and the cache's ``backend`` setting:
`TorchBackend` (any device, the reference paths), `TritonBackend` (CUDA, or the CPU under ``TRITON_INTERPRET=1``),
`NumbaBackend` (float32 CPU tensors; its kernel modules are imported, and compiled, on first use).
`PredictionReuse` is the prediction interval and neighbour fetching every backend goes through.
"""

from __future__ import annotations

import torch

from ..kernels import resolve_backend
from .reuse import FusedDecode, PredictionReuse
from .torch_backend import TorchBackend

DecodeBackend = TorchBackend  # the interface: every backend is a TorchBackend with some steps of its own


def make_backend(requested: str, device: torch.device) -> DecodeBackend:
    """The decode backend for tensors on ``device`` under the ``backend`` setting ``requested`` (see
    `kernels.resolve_backend`)."""
    resolved = resolve_backend(requested, device)
    if resolved == "numba":
        from .numba_backend import NumbaBackend

        return NumbaBackend(device, requested)
    if resolved == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend(device, requested)
    return TorchBackend(device, requested)


__all__ = ["DecodeBackend", "FusedDecode", "PredictionReuse", "TorchBackend", "make_backend"]
