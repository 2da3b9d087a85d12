"""One decode step of a sparse layer on the CPU in one compiled call (numba): score, select, attend.

`butler_decode_cpu` runs, for every (batch, KV head), the scoring of `scoring.cpu.select_one` (importance
logits, each head's log-sum-exp, group max, radix top-k) and then `sparse_attention.cpu.attend_one` (the
selected K/V rows read in place). The work is spread over numba's threads by token ranges, not by heads
alone: the logits pass and the attention are each split into ``splits`` parts per (b, h), whose partial
log-sum-exps and partial outputs are merged (flash-decoding style), so that one sequence with fewer KV heads
than threads (3 KV heads on 2 cores for SmolLM2, 8 on 32 cores for Llama-3.1-8B) still keeps every thread
busy. Equal to ``sparse_attention(query, key, value, select_decode_tokens(score_reference(...)).indices,
...)`` up to ties in the selection and float rounding. The same call serves the prediction interval (a step keeps
its scores for the next ones, a step that reuses them scores nothing) and neighbour fetching (`add_neighbours`).

numba's on-disk cache is keyed on each function's own source file: the compiled helpers inlined here
from `scoring/cpu.py`, `sparse_attention/cpu.py` and `numba_math.py` do not invalidate it. After
editing those files, delete ``kernels/**/__pycache__/*.nb[ic]`` (an installed release updates all
files together, so users never see a stale mix).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch

from ..cpu_utils import FlatImportanceKeys, FlatRows, check_row_budget, flat_rows, importance_key_strides
from ..numba_math import FASTMATH
from ..scoring.cpu import (
    add_neighbours,
    group_max_log_probs,
    logits_and_partial_lse,
    merge_lse,
    select_from_keys,
    sortable_keys,
)
from ..sparse_attention.cpu import attend_partial, merge_partials

# a part of a (b, h) has at least this many tokens to score and rows to attend (set so that a part's work stays
# well above a thread hand-off, about 2 us here; not tuned further)
MIN_SCORED_PER_PART = 1024
MIN_ATTENDED_PER_PART = 128


def default_splits(pairs: int, L: int, n: int, threads: int) -> tuple[int, int]:
    """Parts per (b, h) for the scoring and for the attention: enough for twice as many tasks as ``threads`` over
    the ``pairs`` (b, h), no more than the minimum part sizes allow."""
    wanted = -(-2 * threads // pairs) if threads > 1 else 1
    return (max(1, min(wanted, L // MIN_SCORED_PER_PART)), max(1, min(wanted, n // MIN_ATTENDED_PER_PART)))


_WORKSPACE = threading.local()
_WORKSPACE_GROWTH = 4096  # tokens of room the workspace is allocated with beyond the context that needs it


def _workspace(pairs: int, groups: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's scratch for the kernel: logits ``[pairs, groups, >= L]`` float32 and ranking keys
    ``[pairs, >= L]`` uint32, kept between calls (fresh arrays this size would cost page faults every step)."""
    logits = getattr(_WORKSPACE, "logits", None)
    if logits is None or logits.shape[:2] != (pairs, groups) or logits.shape[2] < L:
        capacity = L + _WORKSPACE_GROWTH
        _WORKSPACE.logits = np.empty((pairs, groups, capacity), np.float32)
        _WORKSPACE.keys = np.empty((pairs, capacity), np.uint32)
    return _WORKSPACE.logits, _WORKSPACE.keys


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy", parallel=True)
def _decode_step_kernel(qi, qi_scale, ik, ik_b, ik_h, ik_l, ik_e, ik_g, q, k, k_b, k_h, k_row, v, v_b, v_h, v_row, L, sinks,
                        window, n, scale, score_parts, attend_parts, logits, keys, scores, reuse_upto, store, neighbours,
                        out):
    """``qi`` ``[B, HQ, 1, E]`` importance queries (any strides, scaled by ``qi_scale`` here); importance keys flat
    with batch / KV-head / token / feature / query-head-of-the-group strides (``ik_g`` 0: shared by the group);
    ``q`` ``[B, HQ, 1, D]`` (any strides); K/V flat with batch / head / row strides; ``out`` ``[B, H, G, Dv]``;
    scratch ``logits`` ``[B * H, G, >= L]``, ``keys`` ``[B * H, >= L]``. Each (b, h) is scored in ``score_parts``
    token ranges and attended in ``attend_parts`` ranges of its selected rows, all ranges run as parallel tasks.

    Prediction interval: ``scores`` ``[B * H, >= L]`` float32 holds a prediction, each token's log group-max
    probability. With ``store`` this step's is written there (positions ``0 .. L``; the sinks' as 0, never
    ranked). With ``reuse_upto`` > 0 nothing is scored (``qi`` and the importance keys are not read): the tokens
    ``< reuse_upto`` rank by ``scores``, the ones added since first. ``neighbours``: each run of selected positions
    also attends to the position after it (`add_neighbours`)."""
    B, H, G, Dv = out.shape
    E, D = qi.shape[3], q.shape[3]
    P = B * H
    qg, qd = np.empty((P, G, E), np.float32), np.empty((P, G, D), np.float32)  # each group's queries, contiguous
    for p in range(P):
        b, h = p // H, p % H
        for g in range(G):
            if reuse_upto == 0:
                for e in range(E):
                    qg[p, g, e] = qi[b, h * G + g, 0, e] * qi_scale
            for d in range(D):
                qd[p, g, d] = q[b, h * G + g, 0, d]
    inner = L - sinks - window  # tokens ranked
    ranked = L - sinks if store else inner  # tokens given a score: all but the sinks where the prediction is kept
    rank_span = -(-ranked // score_parts)
    if reuse_upto == 0:
        peaks, totals = np.empty((P, score_parts, G), np.float32), np.empty((P, score_parts, G), np.float32)
        span = -(-L // score_parts)
        for task in numba.prange(P * score_parts):  # importance logits and partial log-sum-exps of a token range
            p, c = task // score_parts, task % score_parts
            b, h = p // H, p % H
            begin = min(L, c * span)
            logits_and_partial_lse(qg[p], ik, b * ik_b + h * ik_h, ik_l, ik_e, ik_g, begin, min(L, begin + span),
                                   logits[p], peaks[p, c], totals[p, c])
        lse = np.empty((P, G), np.float32)
        for p in range(P):
            merge_lse(peaks[p], totals[p], lse[p])
        for task in numba.prange(P * score_parts):  # the ranking keys of a token range
            p, c = task // score_parts, task % score_parts
            begin = min(ranked, c * rank_span)
            end = min(ranked, begin + rank_span)
            group_max_log_probs(logits[p], lse[p], sinks, begin, end, keys[p].view(np.float32))
            if store:
                scores[p, sinks + begin : sinks + end] = keys[p, begin:end].view(np.float32)
                if c == 0:
                    scores[p, :sinks] = 0.0
            sortable_keys(keys[p, begin:end])
    else:
        for task in numba.prange(P * score_parts):  # the kept prediction's ranking keys; newer tokens first
            p, c = task // score_parts, task % score_parts
            begin = min(inner, c * rank_span)
            end = min(inner, begin + rank_span)
            ranked_scores = keys[p].view(np.float32)
            for i in range(begin, end):
                ranked_scores[i] = scores[p, sinks + i] if sinks + i < reuse_upto else np.inf
            sortable_keys(keys[p, begin:end])
    idx = np.empty((P, 2 * n if neighbours else n), np.int64)
    counts = np.empty(P, np.int64)
    for p in numba.prange(P):  # top-k of each (b, h)
        if neighbours:
            selected = np.empty(n, np.int64)
            select_from_keys(keys[p], L, sinks, window, selected)
            counts[p] = add_neighbours(selected, sinks, window, L, idx[p])
        else:
            select_from_keys(keys[p], L, sinks, window, idx[p])
            counts[p] = n
    a_peaks, a_totals = np.empty((P, attend_parts, G), np.float32), np.empty((P, attend_parts, G), np.float32)
    a_accs = np.empty((P, attend_parts, G, Dv), np.float32)
    for task in numba.prange(P * attend_parts):  # attention over a range of the selected rows
        p, c = task // attend_parts, task % attend_parts
        b, h = p // H, p % H
        rows = -(-counts[p] // attend_parts)
        begin = min(counts[p], c * rows)
        end = min(counts[p], begin + rows)
        attend_partial(qd[p], k, b * k_b + h * k_h, k_row, v, b * v_b + h * v_h, v_row, idx[p, begin:end],
                       np.ones(1, np.bool_), False, scale, a_peaks[p, c], a_totals[p, c], a_accs[p, c],
                       np.empty((G, end - begin), np.float32), np.empty(end - begin, np.int32))
    for p in range(P):
        merge_partials(a_peaks[p], a_totals[p], a_accs[p], out[p // H, p % H])


NO_SCORES = np.empty((1, 1), np.float32)  # the kernel's ``scores`` where a step neither keeps nor reuses a prediction
NO_QUERIES = np.zeros((1, 1, 1, 1), np.float32)  # its importance queries where a step reuses a prediction (not read)


def butler_decode_cpu(
    importance_queries: torch.Tensor | None,
    importance_keys: torch.Tensor,
    importance_scale: float,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    sinks: int,
    window: int,
    n: int,
    splits: tuple[int, int] | None = None,
    *,
    reuse_scores: torch.Tensor | None = None,
    return_scores: bool = False,
    neighbours: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention output ``[B, 1, HQ, Dv]`` of one unpadded decode step (float32 CPU tensors).

    ``importance_queries`` ``[B, HQ, 1, d']``, ``importance_keys`` ``[B, H, L, d']`` or, per query head (the
    attentive predictor's), ``[B, HQ, L, d']`` (any strides),
    ``query`` ``[B, HQ, 1, D]``, ``key``/``value`` ``[B, H, L, D|Dv]`` with contiguous rows; ``n`` the row
    budget, ``sinks + window <= n < L``. ``splits``: parts per (b, h) of the scoring and of the attention
    (`default_splits` for numba's thread count when None).

    Prediction interval and neighbour fetching (``ButlerCache(prediction_interval=..., neighbor_fetch=...)``):
    ``return_scores`` also returns this step's prediction ``[B, H, 1, L]`` (each token's log group-max
    probability, as `score_reference`; the sinks' 0); ``reuse_scores`` ``[B, H, 1, L']`` (``L' <= L``, float32) is
    such a prediction, reused instead of scoring (``importance_queries`` may then be None), the ``L - L'`` tokens
    added since ranked first; ``neighbours`` adds, for each run of selected positions, the position after it.
    Equal to `sparse_attention` over ``with_neighbors(select_decode_tokens(scores))`` up to ties.
    """
    B, HQ, T, _ = query.shape
    H, L = key.shape[1], key.shape[2]
    if T != 1:
        raise ValueError(f"butler_decode_cpu serves one query row per sequence, got {T}")
    check_row_budget(n, sinks, window, L)
    if splits is not None and (splits[0] < 1 or splits[1] < 1):
        raise ValueError(f"splits={splits} must be two positive part counts")
    if reuse_scores is not None:
        if return_scores:
            raise ValueError("return_scores=True makes a prediction; it cannot be given reuse_scores too")
        if reuse_scores.dtype != torch.float32 or reuse_scores.shape[:3] != (B, H, 1) or not 0 < reuse_scores.shape[3] <= L:
            raise ValueError(f"reuse_scores must be float32 [B, H, 1, L' <= L] = [{B}, {H}, 1, <= {L}], got "
                             f"{reuse_scores.dtype} {tuple(reuse_scores.shape)}")
        scores = reuse_scores.reshape(B * H, -1).contiguous().numpy()
        queries = NO_QUERIES
    else:
        if importance_queries is None or importance_queries.shape[2] != 1:
            raise ValueError("butler_decode_cpu scores with one row of importance queries [B, HQ, 1, d'] per sequence")
        scores = np.empty((B * H, L), np.float32) if return_scores else NO_SCORES
        queries = importance_queries.to(torch.float32).numpy()
    out = np.empty((B, H, HQ // H, value.shape[3]), np.float32)  # [B, 1, HQ, Dv] memory
    decode_step_flat(queries, np.float32(importance_scale), importance_key_strides(importance_keys, H, HQ),
                     query.numpy(), flat_rows(key), flat_rows(value), L, sinks, window, n, np.float32(scale),
                     splits or default_splits(B * H, L, n, numba.get_num_threads()), out, scores,
                     0 if reuse_scores is None else reuse_scores.shape[3], return_scores, neighbours)
    result = torch.from_numpy(out).view(B, 1, HQ, value.shape[3])
    return (result, torch.from_numpy(scores).view(B, H, 1, L)) if return_scores else result


def decode_step_flat(
    importance_queries: np.ndarray,
    importance_scale: np.float32,
    importance_keys: FlatImportanceKeys,
    query: np.ndarray,
    key: FlatRows,
    value: FlatRows,
    L: int,
    sinks: int,
    window: int,
    n: int,
    scale: np.float32,
    splits: tuple[int, int],
    out: np.ndarray,
    scores: np.ndarray = NO_SCORES,
    reuse_upto: int = 0,
    store: bool = False,
    neighbours: bool = False,
) -> None:
    """`butler_decode_cpu` on operands already in the kernel's form, checked by the caller: numpy queries
    ``[B, HQ, 1, d']`` and ``[B, HQ, 1, D]``, the importance keys as `cpu_utils.importance_key_strides`, K/V as
    `cpu_utils.flat_rows` (of the cache tensors or of the storages behind them: rows ``0 .. L`` are read); writes
    ``out`` ``[B, H, G, Dv]`` float32 (``[B, 1, HQ, Dv]`` memory). ``scores`` ``[B * H, >= L]`` float32: the
    prediction written where ``store``, read where ``reuse_upto`` > 0 (see `_decode_step_kernel`). `NumbaDecodeStep`
    calls it with the flat views it keeps between steps."""
    B, H, G, _ = out.shape
    _decode_step_kernel(importance_queries, importance_scale, *importance_keys, query, *key, *value, L, sinks, window, n,
                        scale, splits[0], splits[1], *_workspace(B * H, G, L), scores, reuse_upto, store, neighbours, out)
