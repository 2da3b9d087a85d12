"""Compute kernels of butler_cache, each beside its plain PyTorch reference.

``backend`` everywhere means: ``"torch"`` the references (CPU and GPU), ``"triton"`` the Triton
kernels, ``"auto"`` Triton on CUDA tensors and PyTorch otherwise. The Triton kernels land with the
"Triton kernels" issue; until then ``"auto"`` resolves to ``"torch"`` and ``"triton"`` is refused
with an error rather than silently falling back.
"""

from __future__ import annotations

import torch

from .sparse_attention import sparse_attention_naive

BACKENDS = ("auto", "torch", "triton")
TRITON_KERNELS_AVAILABLE = False


def check_backend(backend: str) -> str:
    """Validate a ``backend`` argument and return it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; expected one of {BACKENDS}")
    if backend == "triton" and not TRITON_KERNELS_AVAILABLE:
        raise NotImplementedError(
            "backend='triton': the Triton kernels are not part of this release yet; use backend='torch' or 'auto'"
        )
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) for tensors on ``device``."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if TRITON_KERNELS_AVAILABLE and device.type == "cuda" else "torch"
    return backend


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Gathered sparse attention; see `sparse_attention_naive` for shapes. Returns ``[B, T, HQ, V]``."""
    resolve_backend(backend, query.device)
    return sparse_attention_naive(query, key, value, indices, keep, scale)


__all__ = ["BACKENDS", "check_backend", "resolve_backend", "sparse_attention", "sparse_attention_naive"]
