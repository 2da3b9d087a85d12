"""One decode step of a sparse layer on the CPU in one compiled call (numba): score, select, attend.

`butler_decode_cpu` runs, per (batch, KV head), `scoring.cpu.select_one` (importance logits, each
head's log-sum-exp, group max, radix top-k) and `sparse_attention.cpu.attend_one` (the selected K/V
rows read in place) back to back, the (b, h) pairs spread over numba's threads. Equal to
``sparse_attention(query, key, value, select_decode_tokens(score_reference(...)).indices, ...)`` up to
ties in the selection and float rounding.

numba's on-disk cache is keyed on each function's own source file: the compiled helpers inlined here
from `scoring/cpu.py`, `sparse_attention/cpu.py` and `numba_math.py` do not invalidate it. After
editing those files, delete ``kernels/**/__pycache__/*.nb[ic]`` (an installed release updates all
files together, so users never see a stale mix).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .cpu_utils import check_row_budget, flat_rows, flat_view
from .numba_math import FASTMATH
from .scoring.cpu import select_one
from .sparse_attention.cpu import attend_one


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy", parallel=True)
def _decode_step_kernel(qi, ik, ik_off, ik_sl, ik_se, q, k, k_off, k_row, v, v_off, v_row, L, sinks, window, n, scale, out):
    """``qi`` ``[B, H, G, E]`` importance queries (scale folded in), importance keys flat from ``ik_off`` ``[B, H]``
    with token / feature strides; ``q`` ``[B, H, G, D]``; K/V flat with offsets ``[B, H]`` and row strides;
    ``out`` ``[B, H, G, Dv]``."""
    B, H, G, E = qi.shape
    Dv = out.shape[3]
    for bh in numba.prange(B * H):
        b, h = bh // H, bh % H
        idx = np.empty(n, np.int64)
        logits = np.empty((G, L), np.float32)
        select_one(qi[b, h], ik, ik_off[b, h], ik_sl, ik_se, L, sinks, window, idx, logits, np.empty(G, np.float32),
                   np.empty(L, np.float32))
        attend_one(q[b, h], k, k_off[b, h], k_row, v, v_off[b, h], v_row, idx, np.ones(1, np.bool_), False, scale,
                   out[b, h], logits, np.empty(n, np.int32), np.empty((G, Dv), np.float32))



def butler_decode_cpu(
    importance_queries: torch.Tensor,
    importance_keys: torch.Tensor,
    importance_scale: float,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    sinks: int,
    window: int,
    n: int,
) -> torch.Tensor:
    """Sparse attention output ``[B, 1, HQ, Dv]`` of one unpadded decode step (float32 CPU tensors).

    ``importance_queries`` ``[B, HQ, 1, d']``, ``importance_keys`` ``[B, H, L, d']`` (any strides),
    ``query`` ``[B, HQ, 1, D]``, ``key``/``value`` ``[B, H, L, D|Dv]`` with contiguous rows; ``n`` the row
    budget, ``sinks + window <= n < L``.
    """
    B, HQ, T, E = importance_queries.shape
    H, L, D = key.shape[1], key.shape[2], key.shape[3]
    G, Dv = HQ // H, value.shape[3]
    if T != 1 or query.shape[2] != 1:
        raise ValueError(f"butler_decode_cpu serves one query row per sequence, got {T} and {query.shape[2]}")
    check_row_budget(n, sinks, window, L)
    qi = (importance_queries.reshape(B, H, G, E).to(torch.float32) * importance_scale).numpy()  # [B, H, G, d']
    q = query.reshape(B, H, G, D).contiguous().numpy()  # [B, H, G, D]
    ik, ik_off, s_l, s_e = flat_view(importance_keys)
    k_flat, k_off, k_row = flat_rows(key)
    v_flat, v_off, v_row = flat_rows(value)
    out = torch.empty(B, H, G, Dv)
    _decode_step_kernel(qi, ik, ik_off, s_l, s_e, q, k_flat, k_off, k_row, v_flat, v_off, v_row, L, sinks, window, n,
                        np.float32(scale), out.numpy())
    return out.view(B, 1, HQ, Dv)
