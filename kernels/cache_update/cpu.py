"""The cache update of a sparse layer's decode step on the CPU in one compiled call (numba).

`append_and_project_cpu` writes the new tokens' keys and values into the spare rows of their storages
and their importance keys (the strided predictor's per-head projection of the new keys) into the
importance-key storage, where `ButlerLayer.update` otherwise spends three `append_rows` and a batched
matmul (the whole update of an 8k SmolLM2 layer at one token, warm: 35 us that way, 26 us with this). Reference: `growth.append_rows`
of the keys, the values and ``predictor.keys_from_cache(layer, keys)``; equal up to float rounding of the
projection.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..cpu_utils import FlatView
from ..numba_math import FASTMATH


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def _append_project_kernel(new_k, new_v, weight, k, k_b, k_h, k_l, v, v_b, v_h, v_l, ik, ik_b, ik_h, ik_l, ik_e, at):
    """``new_k`` ``[B, H, T, D]``, ``new_v`` ``[B, H, T, Dv]``, ``weight`` ``[H, D, E]`` (any strides); the storages
    flat with batch / head / token strides (and feature stride ``ik_e``); rows ``at .. at + T`` are written."""
    B, H, T, D = new_k.shape
    Dv, E = new_v.shape[3], weight.shape[2]
    projected = np.empty(E, np.float32)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                k_row = b * k_b + h * k_h + (at + t) * k_l
                v_row = b * v_b + h * v_h + (at + t) * v_l
                for d in range(D):
                    k[k_row + d] = new_k[b, h, t, d]
                for d in range(Dv):
                    v[v_row + d] = new_v[b, h, t, d]
                projected[:] = 0.0
                for d in range(D):
                    x = new_k[b, h, t, d]
                    for e in range(E):
                        projected[e] += x * weight[h, d, e]
                ik_row = b * ik_b + h * ik_h + (at + t) * ik_l
                for e in range(E):
                    ik[ik_row + e * ik_e] = projected[e]


def append_and_project_cpu(
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    weight: torch.Tensor,
    keys: FlatView,
    values: FlatView,
    importance_keys: FlatView,
    at: int,
) -> None:
    """Write rows ``at .. at + T`` of the three storages (float32 CPU, given as `cpu_utils.flat_view`s).

    ``key_states`` ``[B, H, T, D]``, ``value_states`` ``[B, H, T, Dv]``, ``weight`` ``[H, D, d']``: keys and values
    are copied, importance keys set to ``key_states[b, h, t] @ weight[h]``. The caller checks that the storages
    have the rows (this writes without bounds checks).
    """
    if keys[4] != 1 or values[4] != 1:
        raise ValueError(f"the K/V storages need contiguous rows, got feature strides {keys[4]} and {values[4]}")
    _append_project_kernel(key_states.numpy(), value_states.numpy(), weight.detach().numpy(), *keys[:4], *values[:4],
                           *importance_keys, at)
