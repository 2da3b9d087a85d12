"""The strided predictor's importance-query producer for a few rows on the CPU in one compiled call (numba).

`importance_queries_cpu` computes what `ImportanceQueryProducer.forward` computes (LayerNorm, linear, SiLU,
linear) for the one new token of each sequence at a decode step. The PyTorch module spends five operator
calls, each with its dispatch and thread hand-off, on about 0.6 MB of weights (SmolLM2's producers): at a decode
step, after a decoder layer's weights have gone through the caches, that measured 125 us a producer against 36
us for this kernel (scratch script, cold weights). Each weight row is read once for all the rows. Reference: the
module itself; equal up to float rounding.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import nn

from ..numba_math import FASTMATH

# more rows than this (prefill) go through the PyTorch module: its matrix products beat these row loops there
MAX_ROWS = 16


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def _linear_rows(w, b, x, out):
    """``out[r, o] = w[o] . x[r] + b[o]`` for ``w`` ``[O, I]``, ``x`` ``[R, I]``: each weight row is read once for all
    the rows."""
    for o in range(w.shape[0]):
        weights = w[o]
        for r in range(x.shape[0]):
            row = x[r]
            acc = np.float32(0.0)
            for i in range(row.shape[0]):
                acc += weights[i] * row[i]
            out[r, o] = acc + b[o]


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def _producer_kernel(x, norm_w, norm_b, eps, up_w, up_b, down_w, down_b, out):
    """``x`` ``[R, D]``; LayerNorm ``norm_w``, ``norm_b`` ``[D]``; ``up_w`` ``[I, D]``, ``up_b`` ``[I]``; ``down_w``
    ``[O, I]``, ``down_b`` ``[O]``; writes ``out`` ``[R, O]``."""
    R, D = x.shape
    normed = np.empty((R, D), np.float32)
    for r in range(R):
        mean = 0.0  # float64 statistics, as LayerNorm's accuracy needs over a few hundred features
        for d in range(D):
            mean += x[r, d]
        mean /= D
        var = 0.0
        for d in range(D):
            centred = x[r, d] - mean
            var += centred * centred
        inv = np.float32(1.0 / np.sqrt(var / D + eps))
        shift = np.float32(mean)
        for d in range(D):
            normed[r, d] = (x[r, d] - shift) * inv * norm_w[d] + norm_b[d]
    hidden = np.empty((R, up_w.shape[0]), np.float32)
    _linear_rows(up_w, up_b, normed, hidden)
    for r in range(R):
        for i in range(hidden.shape[1]):
            a = hidden[r, i]
            hidden[r, i] = a / (np.float32(1.0) + np.exp(-a))  # SiLU
    _linear_rows(down_w, down_b, hidden, out)


def serves(norm: nn.Module, up: nn.Module, down: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether `importance_queries_cpu` computes these modules' output for ``hidden_states`` ``[B, T, D]``: plain
    LayerNorm and Linear modules with biases, float32 CPU tensors, at most `MAX_ROWS` rows, no autograd."""
    return (
        type(norm) is nn.LayerNorm and type(up) is nn.Linear and type(down) is nn.Linear
        and norm.normalized_shape == hidden_states.shape[-1:]
        and norm.weight is not None and norm.bias is not None and up.bias is not None and down.bias is not None
        and hidden_states.dtype is torch.float32 and hidden_states.device.type == "cpu"
        and up.weight.dtype is torch.float32 and hidden_states.shape[0] * hidden_states.shape[1] <= MAX_ROWS
        and not (torch.is_grad_enabled() and (hidden_states.requires_grad or up.weight.requires_grad))
    )


def importance_queries_cpu(norm: nn.LayerNorm, up: nn.Linear, down: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """``down(silu(up(norm(hidden_states))))`` for ``hidden_states`` ``[B, T, D]`` (checked by `serves`), as
    ``[B, T, O]`` float32."""
    B, T, D = hidden_states.shape
    out = np.empty((B * T, down.weight.shape[0]), np.float32)
    _producer_kernel(hidden_states.reshape(B * T, D).numpy(force=True), norm.weight.numpy(force=True),
                     norm.bias.numpy(force=True), norm.eps, up.weight.numpy(force=True), up.bias.numpy(force=True),
                     down.weight.numpy(force=True), down.bias.numpy(force=True), out)
    return torch.from_numpy(out).view(B, T, -1)
