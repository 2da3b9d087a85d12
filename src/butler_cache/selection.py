"""Turning scores into a per-KV-head selection: sinks + local window + top-k, within the budget.

Plain PyTorch; everything here is shape-generic over the number of query rows, so the same code
serves one decode step and a whole teacher-forced sequence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .budget import TokenBudget


def key_validity(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Which keys each query row may see, as a boolean ``[B or 1, 1 or H, q, L]`` tensor.

    ``attention_mask`` is what transformers' sdpa mask function produced: ``None`` (plain causal,
    queries are the last ``q_len`` positions), a boolean mask (True = attend) or an additive float
    mask (0 = attend, very negative = masked).
    """
    if attention_mask is None:
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)  # [q, 1]
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]  # [1, 1, q, L]
    if attention_mask.dtype == torch.bool:
        valid = attention_mask
    else:
        valid = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return valid[..., -q_len:, -kv_len:]


def validity_from_padding(key_padding: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Causal validity ``[B or 1, 1, q, L]`` from a 2-D padding mask ``[B, >= L]`` (1 = real token) or None."""
    valid = key_validity(None, q_len, kv_len, device)
    if key_padding is None:
        return valid
    return valid & key_padding[:, None, None, -kv_len:].bool()


@dataclass
class Selection:
    """Selected key positions per (batch, KV head, query row).

    ``indices``: ``[B, H_kv, q, K]`` positions into the key cache, most important first;
    ``keep``: ``[B, H_kv, q, K]`` whether each slot is inside the row's budget (slots past a
    row's budget, or past its valid context, are False and must not be attended).
    """

    indices: torch.Tensor
    keep: torch.Tensor
    all_kept: bool = False  # known on the host: every slot is kept (lets attention skip the masking)

    def as_mask(self, kv_len: int) -> torch.Tensor:
        """The selection as a dense boolean mask ``[B, H_kv, q, L]``."""
        shape = (*self.indices.shape[:-1], kv_len)
        mask = torch.zeros(shape, dtype=torch.bool, device=self.indices.device)
        return mask.scatter_(-1, self.indices, self.keep)  # scatter of False into unkept slots is harmless

    def attended(self) -> torch.Tensor:
        """Number of tokens each row attends to, ``[B, H_kv, q]``."""
        return self.keep.sum(-1)


def forced_tokens(valid: torch.Tensor, sink_tokens: int, local_window: int) -> torch.Tensor:
    """The first ``sink_tokens`` and last ``local_window`` valid keys of each row (left padding aware)."""
    rank_from_start = valid.cumsum(-1)  # 1-based among valid keys
    rank_from_end = valid.flip(-1).cumsum(-1).flip(-1)
    return valid & ((rank_from_start <= sink_tokens) | (rank_from_end <= local_window))


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, budget: TokenBudget) -> Selection:
    """Select, per row, the sinks, the local window and the highest-scoring other valid keys.

    Parameters
    ----------
    scores : ``[B, H_kv, q, L]`` float, higher is more important; only its order matters.
    valid : ``[B or 1, 1 or H_kv, q, L]`` bool, which keys each row may see.
    budget : the per-row budget rule.
    """
    B, H, q, L = scores.shape
    valid = valid.expand(B, H, q, L)
    n_valid = valid.sum(-1)  # [B, H, q]
    row_budget = budget.per_row(n_valid)  # [B, H, q]
    k = budget.max_selected(L)
    forced = forced_tokens(valid, budget.sink_tokens, budget.local_window)
    priority = scores.masked_fill(~valid, float("-inf")).masked_fill(forced, float("inf"))
    # Forced keys (+inf) rank before scored ones, invalid keys (-inf) last; a row's budget is at least
    # its number of forced keys and at most its number of valid keys, so its first `row_budget`
    # slots are exactly its selection.
    indices = priority.topk(k, dim=-1, sorted=True).indices  # [B, H, q, K]
    keep = torch.arange(k, device=scores.device) < row_budget[..., None]  # [B, H, q, K]
    keep &= valid.gather(-1, indices)  # guards against policies that score valid keys -inf
    return Selection(indices=indices, keep=keep)


@functools.lru_cache(maxsize=16)
def _forced_offsets(sinks: int, window: int, device: torch.device) -> torch.Tensor:
    """The sinks' positions and the window's, counted from the end: ``[0, .., sinks - 1, -window, .., -1]``."""
    return torch.cat([torch.arange(sinks), torch.arange(-window, 0)]).to(device)


def select_decode_tokens(scores: torch.Tensor, budget: TokenBudget) -> Selection:
    """`select_tokens` for one query row per sequence that may see all ``L`` cached keys (no padding).

    Without masks: the sinks and the window are known positions, so only the keys between them are
    ranked, by one ``topk``. Same selection as `select_tokens` (up to ties), in a different slot order.
    ``scores``: ``[B, H_kv, 1, L]``.
    """
    B, H, q, L = scores.shape
    if q != 1:
        raise ValueError(f"select_decode_tokens serves one query row per sequence, got {q}")
    n = budget.max_selected(L)  # every row sees L keys, so this is every row's budget
    sinks, window = budget.sink_tokens, budget.local_window
    if n >= L:
        indices = torch.arange(L, device=scores.device).expand(B, H, 1, L)
        return Selection(indices, torch.ones_like(indices, dtype=torch.bool), all_kept=True)
    # n < L implies L > sinks + window (the budget holds them whenever the context exceeds them)
    top = scores[..., sinks : L - window].topk(n - sinks - window, dim=-1, sorted=False)  # [B, H, 1, n - forced]
    forced = _forced_offsets(sinks, window, scores.device).remainder(L)  # [sinks + window] positions
    indices = torch.cat([forced.expand(B, H, 1, sinks + window), top.indices + sinks], dim=-1)  # [B, H, 1, n]
    # every key is valid, so every slot is kept (as in `select_tokens`, whatever the scores)
    return Selection(indices, torch.ones_like(indices, dtype=torch.bool), all_kept=True)


def with_neighbors(selection: Selection, valid: torch.Tensor, kv_len: int) -> Selection:
    """Add, for each run of selected positions, the valid position just after it (neighbour fetching).

    Works on the ``K`` selected slots, not on an ``L``-wide mask: the kept positions sorted, each followed by its
    successor unless that is selected too. Returns ``2 K`` slots per row (the selection, then its neighbours;
    ``keep`` marks the ones to attend). ``valid``: ``[B or 1, 1 or H_kv, q, L]``.
    """
    indices, keep = selection.indices, selection.keep  # [B, H, q, K]
    ordered = indices.masked_fill(~keep, kv_len).sort(dim=-1).values  # kept positions ascending, unkept (= L) last
    after = ordered + 1  # [B, H, q, K]
    following = torch.cat([ordered[..., 1:], ordered.new_full((*ordered.shape[:-1], 1), kv_len + 1)], dim=-1)
    ends_a_run = (ordered < kv_len) & (after < kv_len) & (after != following)
    after = after.clamp_(max=kv_len - 1)
    fetched = ends_a_run & valid.expand(*indices.shape[:-1], kv_len).gather(-1, after)
    return Selection(indices=torch.cat([indices, after], dim=-1), keep=torch.cat([keep, fetched], dim=-1))
