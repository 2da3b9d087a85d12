"""Compute kernels of butler_cache, each beside its plain PyTorch reference.

``backend`` everywhere means: ``"torch"`` the references (any device), ``"triton"`` the Triton
kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, which is how CI tests them),
``"auto"`` Triton on CUDA tensors when Triton is installed and PyTorch otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .sparse_attention import sparse_attention_naive, sparse_decode_attention_torch

BACKENDS = ("auto", "torch", "triton")
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> str:
    """Validate a ``backend`` argument and return it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; expected one of {BACKENDS}")
    if backend == "triton" and not TRITON_AVAILABLE:
        raise ValueError("backend='triton' needs the triton package (pip install triton, Linux only)")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) for tensors on ``device``."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if TRITON_AVAILABLE and device.type == "cuda" else "torch"
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

    ``keep=None``: every slot is kept. One query row (decoding) runs the Triton kernel or the PyTorch
    decode path (`sparse_decode_attention_torch`); several rows run the reference.
    """
    decode, triton = query.shape[2] == 1, resolve_backend(backend, query.device) == "triton"
    if decode and not triton:
        return sparse_decode_attention_torch(query, key, value, indices, keep, scale)
    keep = torch.ones_like(indices, dtype=torch.bool) if keep is None else keep
    if decode:
        from .sparse_attention.decode import sparse_decode_attention

        return sparse_decode_attention(query, key, value, indices, keep, scale)
    return sparse_attention_naive(query, key, value, indices, keep, scale)


__all__ = [
    "BACKENDS", "check_backend", "resolve_backend", "sparse_attention", "sparse_attention_naive",
    "sparse_decode_attention_torch",
]
