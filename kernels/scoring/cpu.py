"""Token scoring and top-k selection for one decode step on the CPU (numba).

`score_select_decode_cpu` ranks the cached tokens of each KV head as `score_reference` does (the
log of the group-max predicted probability) and returns the selection `select_decode_tokens` makes
from those scores: sinks, local window and the top-k of the tokens between them. Per KV head, one
compiled loop reads the importance keys once, in blocks of tokens, computing the ``G`` heads' logits
and their running log-sum-exp (a vectorised exp); then the group max, and the top-k by an exact radix
select on the float bits (three histogram passes, no sort). Keys kept feature-major (``[d', L]``
memory, what `ButlerLayer` keeps with this backend) are read with unit stride; row-major keys work too,
more slowly. The sinks and the window come first in each row, the top-k after them in position order.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..cpu_utils import check_row_budget, flat_view
from ..numba_math import FASTMATH, exp_inplace


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _kth_largest_key(keys: np.ndarray, m: int) -> tuple[np.uint32, int]:
    """The ``m``-th largest of the uint32 ``keys`` (1-based) and how many keys equal to it it takes to make ``m``."""
    prefix, mask, remaining = np.uint32(0), np.uint32(0), m
    hist = np.empty(2048, np.int64)
    for shift, width in ((21, 11), (10, 11), (0, 10)):  # 11 + 11 + 10 bits, most significant first
        top = (1 << width) - 1
        hist[: top + 1] = 0
        for i in range(keys.shape[0]):
            key = keys[i]
            if (key & mask) == prefix:
                hist[(key >> shift) & top] += 1
        bucket = top
        while hist[bucket] < remaining:
            remaining -= hist[bucket]
            bucket -= 1
        prefix |= np.uint32(bucket) << np.uint32(shift)
        mask |= np.uint32(top) << np.uint32(shift)
    return prefix, remaining


_BLOCK = 1024  # tokens per block of the scoring loop (a block's d' feature slices stay in L2, its logits in L1)


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def _logits_and_lse(q, k, k_off, s_l, s_e, L, logits, lse):
    """``logits[g, l] = q[g] . k[l]`` over one (b, h) and each head's log-sum-exp, in one pass over the keys.

    ``q`` ``[G, E]`` (scale folded in), ``k`` flat with the (b, h) block at ``k_off``, token stride ``s_l``,
    feature stride ``s_e``; ``logits`` ``[G, >= L]``, ``lse`` ``[G]``. Per block of tokens, each head in turn:
    its logits row accumulated over the features (vectorised over the tokens), then folded into its running
    log-sum-exp while still in L1.
    """
    G, E = q.shape
    work = np.empty(_BLOCK, np.float32)
    bits = np.empty(_BLOCK, np.int32)
    peak = np.full(G, -np.inf, np.float32)
    total = np.zeros(G, np.float32)
    for l0 in range(0, L, _BLOCK):
        nb = min(_BLOCK, L - l0)
        start = k_off + l0 * s_l
        for g in range(G):
            row = logits[g, l0 : l0 + nb]  # 1-D rows of a C array keep unit stride (2-D slices would not vectorise)
            for j in range(nb):
                row[j] = 0.0
            for e in range(E):
                qe = q[g, e]
                if s_l == 1:  # feature-major keys: the tokens of one feature are contiguous
                    feature = k[start + e * s_e : start + e * s_e + nb]
                    for j in range(nb):
                        row[j] += qe * feature[j]
                else:
                    for j in range(nb):
                        row[j] += qe * k[start + e * s_e + j * s_l]
            m = peak[g]  # online log-sum-exp over the blocks
            for j in range(nb):
                m = max(m, row[j])
            for j in range(nb):
                work[j] = row[j] - m
            exp_inplace(work[:nb], bits[:nb])
            acc = np.float32(0.0)
            for j in range(nb):
                acc += work[j]
            total[g] = total[g] * np.exp(peak[g] - m) + acc
            peak[g] = m
    for g in range(G):
        lse[g] = peak[g] + np.log(total[g])


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def select_one(q, k, k_off, s_l, s_e, L, sinks, window, out, logits, lse, best):
    """The selection of one (b, h): ``out`` ``[n]`` int64 gets the sinks, the window, then the top
    ``n - sinks - window`` tokens between them by ``max_g (logit_g - logsumexp_g)``, in position order.

    ``q`` ``[G, E]`` (scale folded in); keys flat from ``k_off`` with token / feature strides ``s_l`` / ``s_e``;
    scratch: ``logits`` ``[G, >= L]``, ``lse`` ``[G]``, ``best`` ``[>= L]``.
    """
    G = q.shape[0]
    n = out.shape[0]
    inner = L - sinks - window  # tokens ranked
    m = n - sinks - window  # tokens chosen among them
    _logits_and_lse(q, k, k_off, s_l, s_e, L, logits, lse)
    for i in range(inner):
        best[i] = logits[0, sinks + i] - lse[0]
    for g in range(1, G):
        for i in range(inner):
            best[i] = max(best[i], logits[g, sinks + i] - lse[g])
    # float -> uint32 keys in the same order: flip all bits of negatives, the sign bit of the rest
    keys = best[:inner].view(np.uint32)
    for i in range(inner):
        key = keys[i]
        keys[i] = ~key if key >> np.uint32(31) else key | np.uint32(0x80000000)
    threshold, ties = _kth_largest_key(keys, m)
    o = 0
    for i in range(sinks):
        out[o] = i
        o += 1
    for i in range(window):
        out[o] = L - window + i
        o += 1
    for i in range(inner):
        key = keys[i]
        if key > threshold or (key == threshold and ties > 0):
            ties -= key == threshold
            out[o] = sinks + i
            o += 1


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def _score_select_kernel(q, k, s_b, s_h, s_l, s_e, L, sinks, window, out):
    """`select_one` for every (b, h): ``q`` ``[B, H, G, E]``, keys flat with strides ``s_b, s_h, s_l, s_e``,
    ``out`` ``[B, H, n]``."""
    B, H, G, E = q.shape
    logits = np.empty((G, L), np.float32)
    lse = np.empty(G, np.float32)
    best = np.empty(L, np.float32)
    for b in range(B):
        for h in range(H):
            select_one(q[b, h], k, b * s_b + h * s_h, s_l, s_e, L, sinks, window, out[b, h], logits, lse, best)


def score_select_decode_cpu(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, sinks: int, window: int, n: int
) -> torch.Tensor:
    """Selected positions ``[B, H, 1, n]`` (int64) of one decode step with every cached key valid.

    ``queries``: ``[B, HQ, 1, d']`` importance queries; ``keys``: ``[B, H, L, d']`` importance keys (float32,
    CPU); the row budget ``n`` must satisfy ``sinks + window <= n < L``. Same selection as
    ``select_decode_tokens(score_reference(queries, keys, scale), budget)`` up to ties.
    """
    B, HQ, T, E = queries.shape
    H, L = keys.shape[1], keys.shape[2]
    if T != 1:
        raise ValueError(f"score_select_decode_cpu serves one query row per sequence, got {T}")
    check_row_budget(n, sinks, window, L)
    q = (queries.reshape(B, H, HQ // H, E).to(torch.float32) * scale).contiguous()  # [B, H, G, d']
    if keys.dtype != torch.float32 or keys.device.type != "cpu":
        raise ValueError(f"score_select_decode_cpu takes float32 CPU keys, got {keys.dtype} on {keys.device}")
    out = torch.empty(B, H, n, dtype=torch.int64)
    _score_select_kernel(q.numpy(), *flat_view(keys), L, sinks, window, out.numpy())
    return out[:, :, None]
