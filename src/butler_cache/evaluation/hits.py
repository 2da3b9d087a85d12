"""Token-hit accuracy and recall@k of a scoring policy against the true attention (last query row)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..budget import TokenBudget
from ..hooks import capture_attention
from ..layer import ButlerLayer, SparseAttentionSettings
from ..metrics import recall_at_k, token_hit_accuracy
from ..policies import ScoringInputs, group_max_probabilities, make_policy
from ..predictor import ButlerPredictor
from ..selection import validity_from_padding
from ..training.data import TokenChunks


def policy_hits(
    model: torch.nn.Module,
    chunks: TokenChunks,
    policy: str = "butler",
    *,
    predictor: ButlerPredictor | None = None,
    budgets: tuple[int, ...] = (64, 128, 256),
    progress: bool = True,
) -> dict[str, float]:
    """Mean over chunks and sparse layers of the last row's token-hit accuracy and recall@k.

    ``per_kv_head`` ranks keys as the cache selects them (one ranking per KV head: the max over the
    GQA group of the attention probabilities, true and predicted alike). For the ``butler`` policy,
    ``per_query_head`` also ranks each query head on its own (what the TokenButler paper reports).
    Stateful policies (H2O, SnapKV) see the whole chunk teacher-forced before the last row is ranked.
    """
    scorer = make_policy(policy)
    if scorer.requires_predictor and predictor is None:
        raise ValueError(f"policy {policy!r} needs a predictor")
    device = next(model.parameters()).device
    layers = set(predictor.config.sparse_layers) if predictor is not None else None
    sums: dict[str, float] = {}
    n = 0
    for i in tqdm(range(len(chunks)), desc=f"hits: {policy}", disable=not progress, leave=False):
        ids = chunks[i]["input_ids"][None].to(device)
        with torch.no_grad(), capture_attention(model, layers=layers) as cap:
            model.get_decoder()(input_ids=ids, use_cache=False)
            importance = predictor.teacher_forced(cap.inputs, cap.keys) if scorer.requires_predictor else {}
        for layer_idx in sorted(cap.queries):
            if layer_idx == 0 and predictor is None:
                continue  # layer 0 stays dense
            q, k = cap.queries[layer_idx], cap.keys[layer_idx]  # [1, HQ, T, D], [1, H, L, D]
            HQ, H, T, L = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
            scale = cap.scales[layer_idx]
            layer = ButlerLayer(layer_idx, SparseAttentionSettings(scorer, TokenBudget(budget_ratio=1.0)), predictor)
            layer.update(k, k)
            rows = slice(None) if scorer.stateful else slice(T - 1, T)
            if scorer.requires_predictor:
                layer.importance_keys = importance[layer_idx].keys
                layer.importance_queries = importance[layer_idx].queries[:, :, rows]
            with torch.no_grad():
                scores = scorer.score(ScoringInputs(q[:, :, rows], k, validity_from_padding(None, q[:, :, rows].shape[2], L, device),
                                                    scale, layer))[:, :, -1:]  # [1, H, 1, L]
            valid = validity_from_padding(None, 1, L, device)
            true_logits = (q[:, :, -1:].float() @ k.float().repeat_interleave(HQ // H, 1).transpose(-1, -2)) * scale
            rankings = {"per_kv_head": (group_max_probabilities(true_logits, valid, H), scores.float())}
            if scorer.requires_predictor:
                pred_logits = predictor.score_logits(importance[layer_idx].queries[:, :, -1:].float(),
                                                     importance[layer_idx].keys.float())
                rankings["per_query_head"] = (group_max_probabilities(true_logits, valid, HQ),
                                              group_max_probabilities(pred_logits, valid, HQ))
            for name, (true, pred) in rankings.items():
                metrics = {"token_hits": token_hit_accuracy(true, pred, valid)}
                metrics.update({f"recall@{b}": recall_at_k(true, pred, valid, b) for b in budgets})
                for key, value in metrics.items():
                    sums[f"{name}/{key}"] = sums.get(f"{name}/{key}", 0.0) + value.mean().item()
            n += 1
    return {key: value / n for key, value in sums.items()}


def predictor_hits(model, predictor: ButlerPredictor, chunks: TokenChunks, *, budgets=(64, 128, 256),
                   progress: bool = True) -> dict[str, float]:
    """`policy_hits` of the ``butler`` policy with ``predictor``."""
    return policy_hits(model, chunks, "butler", predictor=predictor, budgets=budgets, progress=progress)
