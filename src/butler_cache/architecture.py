"""What butler_cache needs to know about a base model, and the checks that it can serve it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import PretrainedConfig

from .compat import DynamicCache, DynamicLayer


class UnsupportedModelError(ValueError):
    """The model's attention cannot be routed through butler_cache."""


@dataclass(frozen=True)
class BaseModelShape:
    """The shape facts a predictor depends on; two models with equal shapes can share a predictor."""

    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    full_attention_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "full_attention_layers", tuple(int(i) for i in self.full_attention_layers))
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_model(cls, model_or_config: Any) -> BaseModelShape:
        config = getattr(model_or_config, "config", model_or_config)
        if not isinstance(config, PretrainedConfig):
            raise UnsupportedModelError(
                f"expected a transformers model or PretrainedConfig, got {type(model_or_config).__name__}"
            )
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            model_type=text.model_type,
            num_hidden_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            full_attention_layers=full_attention_layers(text),
        )

    def mismatches(self, other: BaseModelShape) -> list[str]:
        """Human-readable differences ``self`` (predictor's) vs ``other`` (model's)."""
        return [
            f"{f.name}: predictor {getattr(self, f.name)!r} vs model {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def full_attention_layers(config: PretrainedConfig) -> tuple[int, ...]:
    """Indices of layers whose cache is a plain, growing ``DynamicLayer`` (no sliding window, no chunking).

    Asks transformers itself, by building an empty ``DynamicCache`` for the config, so that every
    architecture's own rule for sliding / chunked / shared layers is respected.
    """
    cache = DynamicCache(config=config)
    if not cache.layers:  # configs without layer information: all layers are full attention
        return tuple(range(config.num_hidden_layers))
    return tuple(i for i, layer in enumerate(cache.layers) if type(layer) is DynamicLayer)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM, in order."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} exposes no `get_decoder().layers` list of decoder blocks; "
            "butler_cache needs one to find the hidden states that feed its predictor"
        )
    return layers


def check_supported(model: torch.nn.Module) -> None:
    """Raise `UnsupportedModelError` unless the model routes attention through transformers' interface."""
    is_compatible = getattr(model, "is_backend_compatible", None)
    if not callable(is_compatible) or not is_compatible():
        raise UnsupportedModelError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface "
            "(`_supports_attention_backend` is False), so butler_cache cannot replace its attention; "
            "supported: decoders such as Llama, Qwen2/3, Mistral, Phi3 and Gemma2/3"
        )
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", i) != i:
            raise UnsupportedModelError(
                f"decoder layer {i} of {type(model).__name__} has no `self_attn` with layer_idx={i}"
            )
