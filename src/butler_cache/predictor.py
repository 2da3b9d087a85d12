"""`ButlerPredictor`: the second-generation TokenButler token-importance predictor.

Producers at a depth stride turn the hidden state entering their layer into low-dimensional
importance queries for the layers they serve; a learned per-(layer, KV head) projection maps the real
post-RoPE keys to the same width. The score of key ``j`` for query head ``h`` of layer ``l`` is
``q_imp[l, h] . (k[l, kv(h), j] @ W[l, kv(h)]) / sqrt(d')``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import PushToHubMixin

from . import persistence
from .architecture import BaseModelShape
from .config import ButlerConfig


class ImportanceQueryProducer(nn.Module):
    """LayerNorm + MLP from a hidden state to the importance queries of ``num_layers`` layers."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, dim: int):
        super().__init__()
        self.num_layers, self.num_heads, self.dim = num_layers, num_heads, dim
        self.norm = nn.LayerNorm(hidden_size)
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.SiLU()
        self.down = nn.Linear(intermediate_size, num_layers * num_heads * dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[num_layers, B, HQ, T, d']``."""
        B, T, _ = hidden_states.shape
        out = self.down(self.act(self.up(self.norm(hidden_states))))  # [B, T, n * HQ * d']
        return out.view(B, T, self.num_layers, self.num_heads, self.dim).permute(2, 0, 3, 1, 4)


class ButlerPredictor(nn.Module, PushToHubMixin):
    """Strided importance-query producers plus per-layer key projections.

    Build one for a model with ``ButlerPredictor(ButlerConfig.for_model(model))``, load a trained one
    with ``ButlerPredictor.from_pretrained(path_or_hub_id)``.
    """

    def __init__(self, config: ButlerConfig):
        super().__init__()
        self.config = config
        shape = config.base_model
        self.producers = nn.ModuleList(
            ImportanceQueryProducer(
                shape.hidden_size, config.intermediate_size, len(group), shape.num_attention_heads, config.importance_dim
            )
            for group in config.producer_groups
        )
        # [n_sparse_layers, H_kv, head_dim, d']
        self.key_projections = nn.Parameter(
            torch.empty(len(config.sparse_layers), shape.num_key_value_heads, shape.head_dim, config.importance_dim)
        )
        self._producer_of_layer = {group[0]: i for i, group in enumerate(config.producer_groups)}
        self._slot_of_layer = {layer: i for i, layer in enumerate(config.sparse_layers)}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Start the key projections near a random orthogonal-ish map so that untrained scores are not degenerate.
        nn.init.normal_(self.key_projections, std=self.config.base_model.head_dim**-0.5)

    # ------------------------------------------------------------------ layout
    @property
    def producer_layers(self) -> tuple[int, ...]:
        return tuple(group[0] for group in self.config.producer_groups)

    def serves(self, layer_idx: int) -> bool:
        return layer_idx in self._slot_of_layer

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ compute
    def importance_queries(self, layer_idx: int, hidden_states: torch.Tensor) -> dict[int, torch.Tensor]:
        """Run the producer hosted at ``layer_idx`` (if any) on the hidden state entering that layer.

        Returns ``{served_layer: [B, HQ, T, d']}``; empty when no producer sits at ``layer_idx``.
        """
        producer = self._producer_of_layer.get(layer_idx)
        if producer is None:
            return {}
        queries = self.producers[producer](hidden_states.to(self.key_projections.dtype))
        return dict(zip(self.config.producer_groups[producer], queries.unbind(0), strict=True))

    def project_keys(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        """``[B, H_kv, T, head_dim]`` real keys of ``layer_idx`` -> ``[B, H_kv, T, d']`` projected keys."""
        weight = self.key_projections[self._slot_of_layer[layer_idx]]  # [H_kv, head_dim, d']
        return torch.einsum("bhtd,hde->bhte", keys.to(weight.dtype), weight)

    def score_logits(self, queries: torch.Tensor, projected_keys: torch.Tensor) -> torch.Tensor:
        """Predicted attention logits per query head: ``[B, HQ, T, d']`` x ``[B, H_kv, L, d']`` -> ``[B, HQ, T, L]``."""
        B, HQ, T, E = queries.shape
        H = projected_keys.shape[1]
        grouped = queries.view(B, H, HQ // H, T, E)
        logits = torch.einsum("bhgte,bhle->bhgtl", grouped, projected_keys) * self.config.score_scale
        return logits.reshape(B, HQ, T, -1)

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, model: Any) -> None:
        """Raise ``ValueError`` naming both shapes unless ``model`` has the shape this predictor was built for."""
        model_shape = BaseModelShape.from_model(model)
        mine = self.config.base_model
        diffs = mine.mismatches(model_shape)
        if diffs:
            trained_for = self.config.base_model_name_or_path or mine.model_type
            model_name = getattr(getattr(model, "config", model), "_name_or_path", "") or model_shape.model_type
            raise ValueError(
                f"this predictor was trained for {trained_for!r} and cannot serve {model_name!r}: "
                + "; ".join(diffs)
            )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write ``butler_config.json``, ``butler_predictor.safetensors`` and a model card."""
        persistence.save_predictor(self, save_directory)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", None) or Path(save_directory).name
            self.push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ButlerPredictor:
        """Load a predictor from a local folder or a Hub repository id (safetensors only)."""
        config_path, weights_path = persistence.resolve_files(
            pretrained, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        config = ButlerConfig.from_json_file(config_path)
        predictor = cls(config)
        persistence.load_weights(predictor, weights_path)
        return predictor.to(device=device, dtype=dtype).eval()
