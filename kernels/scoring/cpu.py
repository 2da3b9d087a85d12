"""Token scoring and top-k selection for one decode step on the CPU (numba).

`score_select_decode_cpu` ranks the cached tokens of each KV head as `score_reference` does (the
log of the group-max predicted probability) and returns the selection `select_decode_tokens` makes
from those scores: sinks, local window and the top-k of the tokens between them. Per KV head, one
compiled loop reads the importance keys once, in blocks of tokens, computing the ``G`` heads' logits
and their running log-sum-exp (a vectorised exp); then the group max, and the top-k by an exact radix
select on the float bits (no sort), run on the keys above a floor estimated from a strided sample
(`_top_positions`). Keys kept feature-major (``[d', L]`` memory, what `ButlerLayer` keeps with this
backend) are read with unit stride; row-major keys work too, more slowly. Importance keys may be per KV
head (the strided predictor's, shared by the group) or per query head (the attentive predictor's).
The sinks and the window come first in each row, the top-k after them in position order. The pieces
(`logits_and_partial_lse`, `merge_lse`, `rank_keys`, `select_from_keys`) also make up the fused decode
step (`decode_step/cpu.py`), which runs them over token ranges in parallel.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..cpu_utils import check_row_budget, importance_key_strides
from ..numba_intrinsics import fmax
from ..numba_math import FASTMATH, exp_inplace


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _kth_largest_key(keys: np.ndarray, m: int) -> tuple[np.uint32, int]:
    """The ``m``-th largest of the uint32 ``keys`` (1-based) and how many keys equal to it it takes to make ``m``.

    Radix select on 11 + 11 + 10 bits, most significant first. Each pass histograms the digit of the keys still
    in play, finds the bucket that holds the ``m``-th (walking down from the highest digit seen), and keeps only
    that bucket's keys (gathered into a scratch array) for the next pass.
    """
    hist = np.empty(2048, np.int32)
    scratch = np.empty_like(keys)
    candidates, count = keys, keys.shape[0]
    prefix, remaining = np.uint32(0), m
    for shift, width in ((21, 11), (10, 11), (0, 10)):
        mask = np.uint32((1 << width) - 1)
        hist[: mask + 1] = 0
        high = np.uint32(0)
        for i in range(count):
            digit = (candidates[i] >> np.uint32(shift)) & mask
            hist[digit] += 1
            high = max(high, digit)
        bucket = np.int64(high)
        while hist[bucket] < remaining:
            remaining -= hist[bucket]
            bucket -= 1
        prefix |= np.uint32(bucket) << np.uint32(shift)
        if shift:
            kept = 0
            for i in range(count):  # branch-free: keep the keys of that bucket
                key = candidates[i]
                scratch[kept] = key
                kept += ((key >> np.uint32(shift)) & mask) == bucket
            candidates, count = scratch, kept
    return prefix, remaining


# Above this many keys, `_top_positions` first estimates a floor for the top ``m`` from every
# ``_SAMPLE_STRIDE``-th key and goes on with the keys above it only.
_SAMPLE_MIN = 2048
_SAMPLE_STRIDE = 8


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _top_positions(keys: np.ndarray, m: int, out: np.ndarray) -> None:
    """``out[:m]`` = the positions of the ``m`` largest uint32 ``keys``, in position order (of equal keys, the
    first ones).

    The exact threshold comes from `_kth_largest_key`, run on the keys at or above a floor taken from a
    strided sample (chosen so that about 1.5 ``m`` keys pass, more than ``m`` with high probability): one
    gathering pass over all keys, the rest on the few hundred gathered. If fewer than ``m`` pass, or the keys
    are few, all keys go through (same result, slower).
    """
    n = keys.shape[0]
    candidates, positions, count = keys, np.empty(0, np.int32), n
    if n >= _SAMPLE_MIN and 4 * m <= n:
        sample = keys[::_SAMPLE_STRIDE].copy()
        expected = m * sample.shape[0] / n  # the sample's share of the top m
        rank = int(expected + 3.0 * np.sqrt(expected)) + 2  # <= the sample's size, as 4 m <= n and n >= 2048
        floor, _ = _kth_largest_key(sample, rank)
        gathered, at = np.empty(n, np.uint32), np.empty(n, np.int32)
        passed = 0
        for i in range(n):  # branch-free gather of the keys at or above the floor, in position order
            key = keys[i]
            gathered[passed] = key
            at[passed] = i
            passed += key >= floor
        if passed >= m:  # then the m-th largest key is >= floor: every key above the threshold is here
            candidates, positions, count = gathered, at, passed
    if positions.shape[0] == 0:  # all keys go through
        positions = np.arange(n, dtype=np.int32)
    threshold, ties = _kth_largest_key(candidates[:count], m)
    o = 0
    for c in range(count):
        key = candidates[c]
        if key > threshold or (key == threshold and ties > 0):
            ties -= key == threshold
            out[o] = positions[c]
            o += 1


_BLOCK = 1024  # tokens per block of the scoring loop (a block's d' feature slices stay in L2, its logits in L1)


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def logits_and_partial_lse(q, k, k_off, s_l, s_e, s_g, begin, end, logits, peak, total):
    """``logits[g, l] = q[g] . k_g[l]`` for the tokens ``begin <= l < end`` of one (b, h), and each head's
    log-sum-exp over them as ``peak[g] + log(total[g])``, in one pass over those keys.

    ``q`` ``[G, E]`` (scale folded in), ``k`` flat with the (b, h) block at ``k_off``, token stride ``s_l``,
    feature stride ``s_e``, and query head ``g``'s keys ``s_g`` further on (0: the ``G`` heads share the keys;
    the head stride: keys per query head, as the attentive predictor makes them); ``logits`` ``[G, >= end]``;
    ``peak``, ``total`` ``[G]`` are written. Per block of tokens: four feature slices at a time into each logits
    row (vectorised over the tokens; shared slices are read again from L1), then each row folded into its
    head's running log-sum-exp while still in L1.
    """
    G, E = q.shape
    work = np.empty(_BLOCK, np.float32)
    bits = np.empty(_BLOCK, np.int32)
    peak[:] = -np.inf
    total[:] = 0.0
    for l0 in range(begin, end, _BLOCK):
        nb = min(_BLOCK, end - l0)
        start = k_off + l0 * s_l
        for g in range(G):
            row = logits[g, l0 : l0 + nb]  # 1-D rows of a C array keep unit stride (2-D slices would not vectorise)
            for j in range(nb):
                row[j] = 0.0
        done = 0  # features accumulated so far
        if s_l == 1:  # feature-major keys: the tokens of one feature are contiguous; four features per pass
            for e in range(0, E - 3, 4):
                for g in range(G):
                    at = start + g * s_g + e * s_e
                    f0 = k[at : at + nb]
                    f1 = k[at + s_e : at + s_e + nb]
                    f2 = k[at + 2 * s_e : at + 2 * s_e + nb]
                    f3 = k[at + 3 * s_e : at + 3 * s_e + nb]
                    q0, q1, q2, q3 = q[g, e], q[g, e + 1], q[g, e + 2], q[g, e + 3]
                    row = logits[g, l0 : l0 + nb]
                    for j in range(nb):
                        row[j] += q0 * f0[j] + q1 * f1[j] + q2 * f2[j] + q3 * f3[j]
            done = E - E % 4
        for e in range(done, E):  # the rest (row-major keys: all features)
            for g in range(G):
                qe = q[g, e]
                row = logits[g, l0 : l0 + nb]
                at = start + g * s_g + e * s_e
                for j in range(nb):
                    row[j] += qe * k[at + j * s_l]
        for g in range(G):  # online log-sum-exp over the blocks
            row = logits[g, l0 : l0 + nb]
            m = peak[g]
            for j in range(nb):
                m = fmax(m, row[j])
            for j in range(nb):
                work[j] = row[j] - m
            exp_inplace(work[:nb], bits[:nb])
            acc = np.float32(0.0)
            for j in range(nb):
                acc += work[j]
            total[g] = total[g] * np.exp(peak[g] - m) + acc
            peak[g] = m


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def merge_lse(peaks, totals, lse):
    """``lse[g]`` = the log-sum-exp of the parts ``peaks[c, g] + log(totals[c, g])`` (``[C, G]``; an empty part has
    peak -inf and total 0)."""
    C, G = peaks.shape
    for g in range(G):
        m = np.float32(-np.inf)
        for c in range(C):
            m = fmax(m, peaks[c, g])
        acc = np.float32(0.0)
        for c in range(C):
            if totals[c, g] > 0:
                acc += totals[c, g] * np.exp(peaks[c, g] - m)
        lse[g] = m + np.log(acc)


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def group_max_log_probs(logits, lse, offset, begin, end, scores):
    """``scores[i] = max_g (logits[g, offset + i] - lse[g])`` for ``begin <= i < end`` (``scores`` ``[>= end]``
    float32; ``logits`` ``[G, >= offset + end]``): each token's log group-max probability, as `score_reference`."""
    G = logits.shape[0]
    ranked = scores[begin:end]
    row = logits[0, offset + begin : offset + end]
    for i in range(end - begin):
        ranked[i] = row[i] - lse[0]
    for g in range(1, G):
        row = logits[g, offset + begin : offset + end]
        for i in range(end - begin):
            ranked[i] = fmax(ranked[i], row[i] - lse[g])


@numba.njit(nogil=True, cache=True, error_model="numpy")
def sortable_keys(bits):
    """float32 bit patterns (``bits`` uint32) -> uint32 keys in the order of the floats, in place: flip all bits of
    negatives, the sign bit of the rest (branch-free)."""
    for i in range(bits.shape[0]):
        key = bits[i]
        bits[i] = key ^ ((np.uint32(0) - (key >> np.uint32(31))) | np.uint32(0x80000000))


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def rank_keys(logits, lse, offset, begin, end, keys):
    """``keys[i]`` for ``begin <= i < end``: the uint32 key of ``max_g (logits[g, offset + i] - lse[g])``, keys in the
    order of the floats (``keys`` ``[>= end]`` uint32; ``logits`` ``[G, >= offset + end]``)."""
    group_max_log_probs(logits, lse, offset, begin, end, keys.view(np.float32))
    sortable_keys(keys[begin:end])


@numba.njit(nogil=True, cache=True, error_model="numpy")
def select_from_keys(keys, L, sinks, window, out):
    """``out`` ``[n]`` int64: the sinks, the window, then the positions of the top ``n - sinks - window`` of the
    ``L - sinks - window`` ranked ``keys`` (`rank_keys` of the tokens between sinks and window), in position order."""
    m = out.shape[0] - sinks - window
    for i in range(sinks):
        out[i] = i
    for i in range(window):
        out[sinks + i] = L - window + i
    chosen = out[sinks + window :]
    _top_positions(keys[: L - sinks - window], m, chosen)
    for i in range(m):
        chosen[i] += sinks


@numba.njit(nogil=True, cache=True, error_model="numpy")
def add_neighbours(selected, sinks, window, L, out):
    """Neighbour fetching on a `select_from_keys` selection ``selected`` ``[n]`` (sinks, window, then the chosen
    tokens in position order): ``out[:n]`` gets the selection in position order, then, for each run of selected
    positions, the position just after it where that is a cached token (``out`` ``[>= 2 n]`` int64). Returns the
    number of positions written, as `selection.with_neighbors` (which also leaves out invalid keys; every key of
    an unpadded decode step is valid)."""
    n = selected.shape[0]
    chosen = n - sinks - window
    for i in range(sinks):
        out[i] = selected[i]
    for i in range(chosen):
        out[sinks + i] = selected[sinks + window + i]
    for i in range(window):
        out[sinks + chosen + i] = selected[sinks + i]
    count = n
    for i in range(n):
        after = out[i] + 1
        if after < L and (i + 1 == n or out[i + 1] != after):
            out[count] = after
            count += 1
    return count


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def select_one(q, k, k_off, s_l, s_e, s_g, L, sinks, window, out, logits, lse, best):
    """The selection of one (b, h): ``out`` ``[n]`` int64 gets the sinks, the window, then the top
    ``n - sinks - window`` tokens between them by ``max_g (logit_g - logsumexp_g)``, in position order.

    ``q`` ``[G, E]`` (scale folded in); keys flat from ``k_off`` with token / feature / query-head strides ``s_l`` /
    ``s_e`` / ``s_g`` (see `logits_and_partial_lse`); scratch: ``logits`` ``[G, >= L]``, ``lse`` ``[G]``,
    ``best`` ``[>= L]`` uint32.
    """
    peaks, totals = np.empty((1, lse.shape[0]), np.float32), np.empty((1, lse.shape[0]), np.float32)
    logits_and_partial_lse(q, k, k_off, s_l, s_e, s_g, 0, L, logits, peaks[0], totals[0])
    merge_lse(peaks, totals, lse)
    rank_keys(logits, lse, sinks, 0, L - sinks - window, best)
    select_from_keys(best, L, sinks, window, out)


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy")
def _score_select_kernel(q, k, s_b, s_h, s_l, s_e, s_g, L, sinks, window, out):
    """`select_one` for every (b, h): ``q`` ``[B, H, G, E]``, keys flat with strides ``s_b, s_h, s_l, s_e`` per KV
    head and ``s_g`` per query head of a group, ``out`` ``[B, H, n]``."""
    B, H, G, E = q.shape
    logits = np.empty((G, L), np.float32)
    lse = np.empty(G, np.float32)
    best = np.empty(L, np.uint32)
    for b in range(B):
        for h in range(H):
            select_one(q[b, h], k, b * s_b + h * s_h, s_l, s_e, s_g, L, sinks, window, out[b, h], logits, lse, best)


def score_select_decode_cpu(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, sinks: int, window: int, n: int, kv_heads: int | None = None
) -> torch.Tensor:
    """Selected positions ``[B, H, 1, n]`` (int64) of one decode step with every cached key valid.

    ``queries``: ``[B, HQ, 1, d']`` importance queries; ``keys``: ``[B, H_k, L, d']`` importance keys (float32,
    CPU), per KV head (``H_k = H``) or per query head (``H_k = HQ``, with ``kv_heads=H``); the row budget ``n``
    must satisfy ``sinks + window <= n < L``. Same selection as ``select_decode_tokens(score_reference(queries,
    keys, scale), budget)`` (its group max taken over each KV head's query heads) up to ties.
    """
    B, HQ, T, E = queries.shape
    H = keys.shape[1] if kv_heads is None else kv_heads
    L = keys.shape[2]
    if T != 1:
        raise ValueError(f"score_select_decode_cpu serves one query row per sequence, got {T}")
    check_row_budget(n, sinks, window, L)
    if keys.dtype != torch.float32 or keys.device.type != "cpu":
        raise ValueError(f"score_select_decode_cpu takes float32 CPU keys, got {keys.dtype} on {keys.device}")
    q = (queries.reshape(B, H, HQ // H, E).to(torch.float32) * scale).contiguous()  # [B, H, G, d']
    out = torch.empty(B, H, n, dtype=torch.int64)
    _score_select_kernel(q.numpy(), *importance_key_strides(keys, H, HQ), L, sinks, window, out.numpy())
    return out[:, :, None]
