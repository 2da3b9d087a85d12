"""`DistillationModel`: a frozen causal LM and a predictor, as one module a stock `Trainer` can train.

Its forward runs the frozen model's decoder once (no LM head) while capturing each sparse layer's
queries and keys, runs the predictor teacher-forced on the captured inputs, and returns
``{"loss": ...}``: the distillation loss averaged over every (layer, head, row) term. Only the
predictor is a sub-module, so the Trainer optimises, checkpoints and resumes the predictor alone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import capture_attention
from ..kernels import check_backend
from ..metrics import recall_at_k, token_hit_accuracy
from ..policies import group_max_probabilities
from ..predictor import ButlerPredictor, Importance
from ..selection import validity_from_padding
from .losses import LOSSES, distillation_loss


class DistillationModel(nn.Module):
    """Trains ``predictor`` to reproduce ``model``'s attention; ``model`` stays frozen.

    Parameters
    ----------
    model : the frozen causal LM (attached to butler_cache for capture).
    predictor : the `ButlerPredictor` to train.
    loss : ``"kl"`` (default) or ``"mse"``; see `butler_cache.training.losses`.
    block_size : query rows per block of the streamed loss.
    recall_budgets : budgets at which recall@k of the last row is tracked for logging.
    backend : ``"auto"`` (the fused Triton loss on CUDA, the streamed PyTorch loss elsewhere), ``"torch"``
        or ``"triton"``.
    """

    accepts_loss_kwargs = False  # the loss is a mean over its own terms; let the Trainer scale it

    def __init__(self, model: nn.Module, predictor: ButlerPredictor, *, loss: str = "kl", block_size: int = 128,
                 recall_budgets: tuple[int, ...] = (64, 128, 256), backend: str = "auto"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not known; expected one of {LOSSES}")
        predictor.check_compatible(model)
        self.predictor = predictor
        self.__dict__["teacher"] = model  # not a sub-module: never optimised, saved or wrapped by DDP
        model.requires_grad_(False).eval()
        self.loss_type, self.block_size, self.recall_budgets = loss, block_size, recall_budgets
        self.backend = check_backend(backend)
        self._metric_sums: dict[str, float] = {}
        self._metric_count = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        teacher = self.teacher
        if next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)
        sparse = set(self.predictor.config.sparse_layers)
        with torch.no_grad(), capture_attention(teacher, layers=sparse) as cap:
            teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        importance = self.predictor.teacher_forced(cap.inputs, cap.keys)
        padding = attention_mask.bool() if attention_mask is not None else None
        total = count = 0
        for layer, imp in importance.items():
            layer_sum, layer_count = distillation_loss(
                cap.queries[layer], cap.keys[layer], imp.queries, imp.keys,
                teacher_scale=cap.scales[layer], student_scale=self.predictor.config.score_scale,
                key_padding=padding, loss=self.loss_type, block_size=self.block_size, backend=self.backend,
            )
            total, count = total + layer_sum, count + layer_count
        loss = total / count
        with torch.no_grad():
            self._track_metrics(cap, importance, padding)
        return {"loss": loss}

    # ------------------------------------------------------------------ logged metrics (last query row)
    def _track_metrics(self, cap, importance: dict[int, Importance], padding: torch.Tensor | None) -> None:
        sums: dict[str, float] = {}
        for layer, imp in importance.items():
            q, k = cap.queries[layer][:, :, -1:], cap.keys[layer]  # last row: [B, HQ, 1, D]
            L, H = k.shape[2], k.shape[1]
            valid = validity_from_padding(padding, 1, L, q.device)
            true_logits = (q.float() @ k.float().repeat_interleave(q.shape[1] // H, 1).transpose(-1, -2))
            true = group_max_probabilities(true_logits * cap.scales[layer], valid, H)
            pred = group_max_probabilities(self.predictor.score_logits(imp.queries[:, :, -1:].float(), imp.keys.float()),
                                           valid, H)
            sums["token_hits"] = sums.get("token_hits", 0.0) + token_hit_accuracy(true, pred, valid).mean().item()
            for budget in self.recall_budgets:
                if budget < L:
                    key = f"recall@{budget}"
                    sums[key] = sums.get(key, 0.0) + recall_at_k(true, pred, valid, budget).mean().item()
        for key, value in sums.items():
            self._metric_sums[key] = self._metric_sums.get(key, 0.0) + value / len(importance)
        self._metric_count += 1

    def pop_metrics(self) -> dict[str, float]:
        """Mean token-hit accuracy and recall@k (last query row, per KV head) since the last call."""
        out = {k: v / self._metric_count for k, v in self._metric_sums.items()} if self._metric_count else {}
        self._metric_sums, self._metric_count = {}, 0
        return out
