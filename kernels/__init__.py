"""Compute kernels of butler_cache, each beside its plain PyTorch reference.

``backend`` everywhere means: ``"torch"`` the PyTorch paths (any device), ``"triton"`` the Triton
kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, which is how CI tests them),
``"numba"`` the compiled CPU kernels of the decode step (per sparse layer one call for the cache update and one
for scoring, top-k and sparse attention, and one per strided producer; float32 CPU tensors; compiled on first
use, with a one-line notice, then cached on disk for later processes),
``"auto"`` Triton on CUDA tensors when Triton is installed, numba on CPU tensors when numba is installed (a
regular dependency; tensors it does not take, such as bfloat16 ones, run the PyTorch paths), PyTorch otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .cpu_utils import NUMBA_AVAILABLE
from .sparse_attention import sparse_attention_naive, sparse_decode_attention_torch

BACKENDS = ("auto", "torch", "triton", "numba")
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> str:
    """Validate a ``backend`` argument and return it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; expected one of {BACKENDS}")
    if backend == "triton" and not TRITON_AVAILABLE:
        raise ValueError("backend='triton' needs the triton package (pip install triton, Linux only)")
    if backend == "numba" and not NUMBA_AVAILABLE:
        raise ValueError("backend='numba' needs the numba package (pip install numba)")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"``, ``"triton"`` or ``"numba"``) for tensors on ``device``.

    With ``"numba"`` each decode step falls back to the PyTorch path for tensors the CPU kernels do not
    take (not float32, rows not contiguous; see `numba_serves`) and for what they do not cover (padded
    rows, multi-row forwards).
    """
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if TRITON_AVAILABLE else "torch"
        return "numba" if NUMBA_AVAILABLE and device.type == "cpu" else "torch"
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"backend='numba' runs on CPU tensors, got {device.type} tensors (use 'auto' or 'triton')")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' with {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton (or use backend='torch')"
        )
    return backend


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Gathered sparse attention; see `sparse_attention_naive` for shapes. Returns ``[B, T, HQ, V]``.

    ``keep=None``: every slot is kept. One query row (decoding) runs the Triton kernel, the numba CPU
    kernel or the PyTorch decode path (`sparse_decode_attention_torch`); several rows run the reference.
    """
    decode, resolved = query.shape[2] == 1, resolve_backend(backend, query.device)
    if decode and resolved == "numba" and numba_serves(query, key, value):
        from .sparse_attention.cpu import sparse_decode_attention_cpu

        return sparse_decode_attention_cpu(query, key, value, indices, keep, scale)
    triton = resolved == "triton"
    if decode and not triton:
        return sparse_decode_attention_torch(query, key, value, indices, keep, scale)
    keep = torch.ones_like(indices, dtype=torch.bool) if keep is None else keep
    if decode:
        from .sparse_attention.decode import sparse_decode_attention

        return sparse_decode_attention(query, key, value, indices, keep, scale)
    return sparse_attention_naive(query, key, value, indices, keep, scale)


def numba_serves(*tensors: torch.Tensor) -> bool:
    """Whether the numba CPU kernels take these tensors: float32, on the CPU, rows contiguous."""
    return NUMBA_AVAILABLE and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and (t.stride(-1) == 1 or t.shape[-1] == 1) for t in tensors
    )


__all__ = [
    "BACKENDS", "NUMBA_AVAILABLE", "TRITON_AVAILABLE", "check_backend", "numba_serves", "resolve_backend",
    "sparse_attention", "sparse_attention_naive", "sparse_decode_attention_torch",
]
