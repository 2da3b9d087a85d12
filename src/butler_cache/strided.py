"""`StridedPredictor`: the second-generation TokenButler predictor (the default).

Producers at a depth stride turn the hidden state entering their layer into low-dimensional
importance queries for the layers they serve; a learned per-(layer, KV head) projection maps the real
post-RoPE keys to the same width. The score of key ``j`` for query head ``h`` of layer ``l`` is
``q_imp[l, h] . (k[l, kv(h), j] @ W[l, kv(h)]) / sqrt(d')``.
"""

from __future__ import annotations

import torch
from torch import nn

from .compat import DynamicLayer
from .config import ButlerConfig
from .kernels.producer import importance_queries_naive
from .predictor import ButlerPredictor, Importance, LayerInput


class ImportanceQueryProducer(nn.Module):
    """LayerNorm + MLP from a hidden state to the importance queries of ``num_layers`` layers."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, dim: int):
        super().__init__()
        self.num_layers, self.num_heads, self.dim = num_layers, num_heads, dim
        self.norm = nn.LayerNorm(hidden_size)
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, num_layers * num_heads * dim)

    def forward(self, hidden_states: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """``[B, T, D]`` -> ``[num_layers, B, HQ, T, d']``. ``backend="numba"``: the few rows of a decode step in one
        compiled call (`kernels/producer/cpu.py`) where it serves them, this module's operators otherwise."""
        B, T, _ = hidden_states.shape
        if backend == "numba":
            from .kernels.producer import (
                cpu as producer_cpu,  # compiled on first use (the numba backend announces it)
            )
        if backend == "numba" and producer_cpu.serves(self.norm, self.up, self.down, hidden_states):
            out = producer_cpu.importance_queries_cpu(self.norm, self.up, self.down, hidden_states)
        else:
            out = importance_queries_naive(self.norm, self.up, self.down, hidden_states)  # [B, T, n * HQ * d']
        return out.view(B, T, self.num_layers, self.num_heads, self.dim).permute(2, 0, 3, 1, 4)


class StridedPredictor(ButlerPredictor):
    """Strided importance-query producers plus per-layer key projections."""

    predictor_type = "strided"

    def __init__(self, config: ButlerConfig):
        super().__init__(config)
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
        self._groups = config.producer_groups  # computed by the config at each access
        self._producer_of_layer = {group[0]: i for i, group in enumerate(self._groups)}
        nn.init.normal_(self.key_projections, std=shape.head_dim**-0.5)

    @property
    def producer_layers(self) -> tuple[int, ...]:
        return tuple(group[0] for group in self.config.producer_groups)

    @property
    def key_heads(self) -> int:
        return self.config.base_model.num_key_value_heads

    def produce(
        self, layer_idx: int, inputs: LayerInput, state: DynamicLayer | None = None, *, backend: str = "torch"
    ) -> dict[int, Importance]:
        producer = self._producer_of_layer.get(layer_idx)
        if producer is None:
            return {}
        queries = self.producers[producer](inputs.hidden_states.to(self.key_projections.dtype), backend)
        return {
            layer: Importance(q)
            for layer, q in zip(self._groups[producer], queries.unbind(0), strict=True)
        }

    def key_projection(self, layer_idx: int) -> torch.Tensor:
        return self.key_projections[self._slot_of_layer[layer_idx]]  # [H_kv, head_dim, d']

    def keys_from_cache(self, layer_idx: int, key_states: torch.Tensor) -> torch.Tensor:
        """``[B, H_kv, T, head_dim]`` real keys -> ``[B, H_kv, T, d']`` projected keys."""
        weight = self.key_projection(layer_idx)  # [H_kv, head_dim, d']
        B, H, T, D = key_states.shape
        # one bmm over the heads (a broadcasting 4-D x 3-D matmul costs several times more at T = 1)
        rows = key_states.to(weight.dtype).transpose(0, 1).reshape(H, B * T, D)  # [H_kv, B * T, D]
        return torch.bmm(rows, weight).view(H, B, T, -1).transpose(0, 1)  # [B, H_kv, T, d']
