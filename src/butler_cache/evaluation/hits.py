"""Token-hit accuracy and recall@k of a predictor against the model's true attention (last query row)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..capture import capture_attention
from ..metrics import recall_at_k, token_hit_accuracy
from ..policies import group_max_probabilities
from ..predictor import ButlerPredictor
from ..selection import validity_from_padding
from ..training.data import TokenChunks


def predictor_hits(
    model: torch.nn.Module,
    predictor: ButlerPredictor,
    chunks: TokenChunks,
    *,
    budgets: tuple[int, ...] = (64, 128, 256),
    progress: bool = True,
) -> dict[str, float]:
    """Mean over chunks, served layers and heads of the last row's token-hit accuracy and recall@k.

    Two granularities: ``per_kv_head`` ranks by the max over each GQA group of the attention
    probabilities (what the cache selects with); ``per_query_head`` ranks each query head on its own
    (what the paper reports).
    """
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    layers = set(predictor.config.sparse_layers)
    for i in tqdm(range(len(chunks)), desc="token hits", disable=not progress, leave=False):
        ids = chunks[i]["input_ids"][None].to(device)
        with torch.no_grad(), capture_attention(model, layers=layers) as cap:
            model.get_decoder()(input_ids=ids, use_cache=False)
            importance = predictor.teacher_forced(cap.inputs, cap.keys)
        for layer, imp in importance.items():
            q, k = cap.queries[layer][:, :, -1:].float(), cap.keys[layer].float()  # [1, HQ, 1, D], [1, H, L, D]
            HQ, H, L = q.shape[1], k.shape[1], k.shape[2]
            valid = validity_from_padding(None, 1, L, device)
            true_logits = (q @ k.repeat_interleave(HQ // H, 1).transpose(-1, -2)) * cap.scales[layer]
            pred_logits = predictor.score_logits(imp.queries[:, :, -1:].float(), imp.keys.float())
            for name, groups in (("per_kv_head", H), ("per_query_head", HQ)):
                true = group_max_probabilities(true_logits, valid, groups)
                pred = group_max_probabilities(pred_logits, valid, groups)
                metrics = {"token_hits": token_hit_accuracy(true, pred, valid)}
                metrics.update({f"recall@{b}": recall_at_k(true, pred, valid, b) for b in budgets})
                for key, value in metrics.items():
                    full = f"{name}/{key}"
                    sums[full] = sums.get(full, 0.0) + value.mean().item()
            n += 1
    return {key: value / n for key, value in sums.items()}
