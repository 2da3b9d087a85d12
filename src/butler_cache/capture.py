"""Capturing what the frozen model computes, for distillation and evaluation.

Inside ``with capture_attention(model) as cap:`` (`hooks.capture_attention`) every forward of an attached model records, per
decoder layer, the post-RoPE queries and keys its attention saw and the inputs of the layer. Queries
and keys are small (``[B, H, T, D]``); attention matrices are never stored.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from .predictor import LayerInput


@dataclass
class AttentionCapture:
    """What one forward recorded; ``layers`` limits the attention recorded (None = all layers)."""

    layers: frozenset[int] | None = None
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, HQ, T, D]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, H_kv, T, D]
    scales: dict[int, float] = field(default_factory=dict)  # the softmax scale of each layer
    inputs: dict[int, LayerInput] = field(default_factory=dict)
    key_padding: torch.Tensor | None = None  # [B, L] 2-D padding mask of the forward in flight (set by the hooks)

    def record_attention(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scale: float | None) -> None:
        if self.layers is None or layer_idx in self.layers:
            self.queries[layer_idx] = query.detach()  # overwrite: gradient checkpointing may re-run a layer
            self.keys[layer_idx] = key.detach()
            self.scales[layer_idx] = scale if scale is not None else query.shape[-1] ** -0.5

    def record_layer_input(self, layer_idx: int, inputs: LayerInput) -> None:
        self.inputs[layer_idx] = inputs


CAPTURE: ContextVar[AttentionCapture | None] = ContextVar("butler_cache_capture", default=None)
