"""Independent, loop-based references the library is checked against (slow; tiny sizes only)."""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

REFERENCE_NAME = "butler_test_reference"


def reference_selection(scores: list[float], valid_positions: list[int], budget: dict) -> set[int]:
    """Sinks + window + top scores among the rest, by plain Python, for one query row."""
    n = len(valid_positions)
    sinks, window = budget.get("sink_tokens", 4), budget.get("local_window", 16)
    if budget.get("token_budget") is not None:
        k = budget["token_budget"]
    else:
        k = math.ceil(budget["budget_ratio"] * n - 1e-9)
    k = min(max(k, min(n, sinks + window)), n)
    forced = set(valid_positions[:sinks]) | set(valid_positions[n - window :] if window else [])
    rest = sorted((j for j in valid_positions if j not in forced), key=lambda j: -scores[j])
    return forced | set(rest[: k - len(forced)])


def reference_neighbours(selected: set[int], valid_positions: set[int]) -> set[int]:
    """Neighbour fetching by plain Python, for one row: the selection plus, for each run of selected positions,
    the position just after it where that one is valid."""
    return selected | {i + 1 for i in selected if i + 1 not in selected and i + 1 in valid_positions}


def reference_sparse_attention(query, key, value, valid, scale, budget, score_logits=None):
    """Eager attention where each (row, KV head) attends to its own selection. Returns ``[B, T, HQ, D]``.

    ``score_logits`` ``[B, HQ, T, L]`` are the logits the selection ranks by (per head softmax, max
    over the group); by default the true ones, which makes this the oracle.
    """
    B, HQ, T, D = query.shape
    H, L = key.shape[1], key.shape[2]
    G = HQ // H
    q, k, v = query.double(), key.double(), value.double()
    if score_logits is None:
        score_logits = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * scale
    out = torch.zeros(B, T, HQ, value.shape[-1], dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            row_valid = valid[b if valid.shape[0] > 1 else 0, 0, t]
            positions = [j for j in range(L) if row_valid[j]]
            if not positions:
                continue
            for h in range(H):
                logits = [(q[b, h * G + g, t] @ k[b, h].T) * scale for g in range(G)]  # G x [L]
                probs = [torch.softmax(score_logits[b, h * G + g, t, positions].double(), dim=0) for g in range(G)]
                best = torch.stack(probs).amax(0)
                scores = dict(zip(positions, best.tolist(), strict=True))
                chosen = sorted(reference_selection(scores, positions, budget))
                for g in range(G):
                    w = torch.softmax(logits[g][chosen], dim=0)
                    out[b, t, h * G + g] = w @ v[b, h, chosen]
    return out.to(query.dtype)


def install_reference(sparse_layers: set[int], budget: dict, sparse_prefill: bool, score_logits_fn=None) -> str:
    """Register the reference as an attention implementation; returns its name.

    ``score_logits_fn(module, query, key) -> [B, HQ, T, L]`` gives the ranking logits (oracle if None).
    """

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        if module.layer_idx not in sparse_layers or (q_len > 1 and not sparse_prefill):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if attention_mask is None:
            valid = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        else:
            valid = attention_mask[..., -q_len:, -kv_len:]
        logits = score_logits_fn(module, query, key) if score_logits_fn is not None else None
        return reference_sparse_attention(query, key, value, valid, scaling, budget, logits), None

    AttentionInterface.register(REFERENCE_NAME, forward)
    AttentionMaskInterface.register(REFERENCE_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return REFERENCE_NAME
