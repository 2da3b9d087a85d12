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
def _decode_step_kernel(qi, qi_scale, ik, ik_b, ik_h, ik_l, ik_e, q, k, k_b, k_h, k_row, v, v_b, v_h, v_row, L, sinks,
                        window, n, scale, out):
    """``qi`` ``[B, HQ, 1, E]`` importance queries (any strides, scaled by ``qi_scale`` here); importance keys flat
    with batch / head / token / feature strides; ``q`` ``[B, HQ, 1, D]`` (any strides); K/V flat with batch / head /
    row strides; ``out`` ``[B, H, G, Dv]``."""
    B, H, G, Dv = out.shape
    E, D = qi.shape[3], q.shape[3]
    for bh in numba.prange(B * H):
        b, h = bh // H, bh % H
        qg, qd = np.empty((G, E), np.float32), np.empty((G, D), np.float32)  # this group's queries, contiguous
        for g in range(G):
            for e in range(E):
                qg[g, e] = qi[b, h * G + g, 0, e] * qi_scale
            for d in range(D):
                qd[g, d] = q[b, h * G + g, 0, d]
        idx = np.empty(n, np.int64)
        logits = np.empty((G, L), np.float32)
        select_one(qg, ik, b * ik_b + h * ik_h, ik_l, ik_e, L, sinks, window, idx, logits, np.empty(G, np.float32),
                   np.empty(L, np.float32))
        attend_one(qd, k, b * k_b + h * k_h, k_row, v, b * v_b + h * v_h, v_row, idx, np.ones(1, np.bool_), False, scale,
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
    B, HQ, T, _ = importance_queries.shape
    H, L = key.shape[1], key.shape[2]
    G, Dv = HQ // H, value.shape[3]
    if T != 1 or query.shape[2] != 1:
        raise ValueError(f"butler_decode_cpu serves one query row per sequence, got {T} and {query.shape[2]}")
    check_row_budget(n, sinks, window, L)
    out = torch.empty(B, H, G, Dv)  # [B, 1, HQ, Dv] memory
    # strided views all the way down: the per-tensor preparation here is the whole Python cost of a layer's step
    _decode_step_kernel(importance_queries.to(torch.float32).numpy(), np.float32(importance_scale),
                        *flat_view(importance_keys), query.numpy(), *flat_rows(key), *flat_rows(value), L, sinks, window,
                        n, np.float32(scale), out.numpy())
    return out.view(B, 1, HQ, Dv)
