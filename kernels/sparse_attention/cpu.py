"""Sparse decode attention on the CPU (numba): one query row per sequence, selected K/V rows read in place.

Per (batch, KV head) one compiled loop reads each selected key row once for all ``G`` query heads of the
group (``G`` dot products), takes the softmax over the kept slots, and accumulates the value rows, read
once each, into the ``G`` outputs. Nothing is gathered into a copy: the rows are read where the cache
keeps them (`ButlerLayer`'s prefix views of a larger storage included), prefetched a few rows ahead
(scattered rows defeat the hardware prefetchers; at 8k tokens, 1/16 budget, with the rows in DRAM, this
took the attention of a layer from about 240 to 210 us on the 2-core test machine). Reference:
`naive.sparse_attention_naive`; the PyTorch CPU path is `gathered.sparse_decode_attention_torch`.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..cpu_utils import flat_rows
from ..numba_intrinsics import fmax, prefetch
from ..numba_math import FASTMATH, exp_inplace

# selected rows prefetched ahead of the one being read (its K and V rows, one cache line in 16 floats)
PREFETCH_ROWS = 16


@numba.njit(nogil=True, cache=True, inline="always")
def _prefetch_row(flat, start, width):
    for c in range(0, width, 16):
        prefetch(flat, start + c)
    prefetch(flat, start + width - 1)  # rows that straddle one more line


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def attend_partial(q, k, k_off, k_row, v, v_off, v_row, idx, keep, masked, scale, peak, total, acc, logits, bits):
    """Unnormalised attention of one (b, h) over the rows ``idx`` ``[S]``: per query head ``g``, ``peak[g]`` the
    largest logit, ``total[g]`` the sum of ``exp(logit - peak)`` and ``acc[g]`` ``[Dv]`` the values weighted by
    those terms (the output is ``acc / total``; parts over disjoint rows merge with `merge_partials`).

    ``q`` ``[G, D]``; rows ``idx`` of the flat ``k``/``v`` (from ``k_off``/``v_off``, row strides ``k_row``/``v_row``);
    ``keep`` ``[S]`` read when ``masked`` (no slot kept: peak -inf, total and acc 0). Scratch: ``logits``
    ``[G, >= S]``, ``bits`` ``[>= S]`` int32.
    """
    G, D = q.shape
    Dv, S = acc.shape[1], idx.shape[0]
    kept = 0
    for s in range(min(PREFETCH_ROWS, S)):
        _prefetch_row(k, k_off + idx[s] * k_row, D)
        _prefetch_row(v, v_off + idx[s] * v_row, Dv)
    for s in range(S):
        if s + PREFETCH_ROWS < S:  # the V rows too: read after the softmax, they wait in L2 until then
            _prefetch_row(k, k_off + idx[s + PREFETCH_ROWS] * k_row, D)
            _prefetch_row(v, v_off + idx[s + PREFETCH_ROWS] * v_row, Dv)
        if masked and not keep[s]:
            for g in range(G):
                logits[g, s] = -np.inf
            continue
        kept += 1
        row = k[k_off + idx[s] * k_row :][:D]
        for g in range(G):
            dot = np.float32(0.0)
            for d in range(D):
                dot += q[g, d] * row[d]
            logits[g, s] = dot * scale
    acc[:] = 0.0
    peak[:] = -np.inf
    total[:] = 0.0
    if kept == 0:
        return
    for g in range(G):
        probs = logits[g, :S]
        m = np.float32(-np.inf)
        for s in range(S):
            m = fmax(m, probs[s])
        for s in range(S):
            probs[s] = fmax(probs[s] - m, np.float32(-100.0))  # masked slots: about 0, zeroed below
        exp_inplace(probs, bits[:S])
        if masked:
            for s in range(S):
                if not keep[s]:
                    probs[s] = 0.0
        t = np.float32(0.0)
        for s in range(S):
            t += probs[s]
        peak[g], total[g] = m, t
    for s in range(S):
        if masked and not keep[s]:
            continue
        row = v[v_off + idx[s] * v_row :][:Dv]
        for g in range(G):
            w = logits[g, s]
            for d in range(Dv):
                acc[g, d] += w * row[d]


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def merge_partials(peaks, totals, accs, out):
    """``out`` ``[G, Dv]``: the attention output from the `attend_partial` parts ``peaks``/``totals`` ``[C, G]``,
    ``accs`` ``[C, G, Dv]`` over disjoint rows (flash-decoding's merge); zeros where no part kept a row."""
    C, G = peaks.shape
    Dv = out.shape[1]
    for g in range(G):
        m = np.float32(-np.inf)
        for c in range(C):
            m = fmax(m, peaks[c, g])
        out[g, :] = 0.0
        t = np.float32(0.0)
        for c in range(C):
            if totals[c, g] > 0:
                w = np.exp(peaks[c, g] - m)
                t += totals[c, g] * w
                for d in range(Dv):
                    out[g, d] += w * accs[c, g, d]
        if t > 0:
            for d in range(Dv):
                out[g, d] /= t


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def attend_one(q, k, k_off, k_row, v, v_off, v_row, idx, keep, masked, scale, out, logits, bits, acc):
    """Attention of one (b, h): ``q`` ``[G, D]``, rows ``idx`` ``[S]`` of the flat ``k``/``v`` (from ``k_off``/``v_off``,
    row strides ``k_row``/``v_row``), ``keep`` ``[S]`` read when ``masked``; writes ``out`` ``[G, Dv]`` (zeros where
    nothing is kept). Scratch: ``logits`` ``[G, >= S]``, ``bits`` ``[>= S]`` int32, ``acc`` ``[1, G, Dv]``."""
    G = q.shape[0]
    peaks, totals = np.empty((1, G), np.float32), np.empty((1, G), np.float32)
    attend_partial(q, k, k_off, k_row, v, v_off, v_row, idx, keep, masked, scale, peaks[0], totals[0], acc[0],
                   logits, bits)
    merge_partials(peaks, totals, acc, out)


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def _attend_kernel(q, k, k_b, k_h, k_row, v, v_b, v_h, v_row, idx, keep, masked, scale, out):
    """`attend_one` for every (b, h): ``q`` ``[B, H, G, D]``, K/V flat with batch / head / row strides,
    ``idx``/``keep`` ``[B, H, S]``, ``out`` ``[B, H, G, Dv]`` float32."""
    B, H, G, D = q.shape
    Dv, S = out.shape[3], idx.shape[2]
    logits = np.empty((G, S), np.float32)
    bits = np.empty(S, np.int32)
    acc = np.empty((1, G, Dv), np.float32)
    for b in range(B):
        for h in range(H):
            attend_one(q[b, h], k, b * k_b + h * k_h, k_row, v, b * v_b + h * v_h, v_row, idx[b, h],
                       keep[b, h] if masked else keep[0, 0], masked, scale, out[b, h], logits, bits, acc)


def sparse_decode_attention_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """`sparse_attention_naive` for one query row (``T == 1``) on float32 CPU tensors. Returns ``[B, 1, HQ, V]``.

    ``query`` ``[B, HQ, 1, K]``, ``key``/``value`` ``[B, H_kv, L, K|V]``, ``indices``/``keep`` ``[B, H_kv, 1, S]``
    (``keep=None``: every slot kept). Rows with nothing kept give zeros.
    """
    B, HQ, T, K = query.shape
    if T != 1:
        raise ValueError(f"sparse_decode_attention_cpu serves one query row per sequence, got {T}")
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (query, key, value)):
        raise ValueError(
            f"the CPU kernel takes float32 CPU tensors, got {query.dtype}/{key.dtype}/"
            f"{value.dtype} on {query.device}"
        )
    H, V, S = key.shape[1], value.shape[-1], indices.shape[-1]
    k_rows = flat_rows(key.contiguous() if key.stride(-1) != 1 else key)
    v_rows = flat_rows(value.contiguous() if value.stride(-1) != 1 else value)
    q = query.reshape(B, H, HQ // H, K).contiguous()
    idx = indices.reshape(B, H, S).to(torch.int64).contiguous()
    masked = keep is not None
    kp = keep.reshape(B, H, S).contiguous() if masked else torch.ones(1, 1, 1, dtype=torch.bool)
    out = torch.empty(B, H, HQ // H, V, dtype=torch.float32)
    _attend_kernel(q.numpy(), *k_rows, *v_rows, idx.numpy(), kp.numpy(), masked,
                   np.float32(scale), out.numpy())
    return out.view(B, 1, HQ, V)
