"""`ButlerConfig`: what a trained predictor is and which base model it belongs to.

Saved as ``butler_config.json`` beside ``butler_predictor.safetensors``, the way PEFT saves
``adapter_config.json`` beside its weights (under names of our own, see ``persistence.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .architecture import BaseModelShape

CONFIG_NAME = "butler_config.json"
WEIGHTS_NAME = "butler_predictor.safetensors"

PREDICTOR_TYPES = ("strided", "attentive")


@dataclass
class ButlerConfig:
    """Hyper-parameters of a TokenButler predictor and the shape of the base model it serves.

    Second-generation design ("strided"): producers sit at a fixed depth stride over the sparse
    layers; each reads the hidden state entering its layer and emits, for every query head of the
    ``layer_stride`` layers it serves, an importance query of ``importance_dim`` numbers. Each
    (layer, KV head) has a learned projection of the real keys to the same width.

    First-generation design ("attentive"): the hidden state entering layer 0 is projected down to
    ``attentive_hidden_size``, passed through one causal self-attention block (RoPE,
    ``attentive_num_heads`` heads) and a feed-forward, added back at full width, and two MLPs of
    width ``intermediate_size`` emit importance queries and keys (RoPE in ``d'`` dims) for every
    (sparse layer, query head).

    Parameters
    ----------
    base_model : BaseModelShape
        Shape of the model the predictor was built for; attaching it elsewhere is an error.
    predictor_type : str
        ``"strided"`` (second generation, default) or ``"attentive"`` (first generation).
    layer_stride : int
        Strided: number of consecutive sparse layers served by one producer (``G`` in the paper).
    importance_dim : int
        Width ``d'`` of importance queries and keys.
    intermediate_size : int
        Hidden width of the producers' MLPs (strided) or of the query / key MLPs (attentive).
    first_sparse_layer : int
        Full-attention layers before this index stay dense (layer 0 by default).
    attentive_hidden_size, attentive_num_heads : int
        Attentive: width and heads of the small self-attention block.
    rope_theta : float
        Attentive: RoPE base of the self-attention block and of the importance queries / keys.
    training : dict
        Free-form record of how the predictor was trained (written into the model card).
    """

    base_model: BaseModelShape
    predictor_type: str = "strided"
    layer_stride: int = 4
    importance_dim: int = 16
    intermediate_size: int = 128
    first_sparse_layer: int = 1
    attentive_hidden_size: int = 128
    attentive_num_heads: int = 4
    rope_theta: float = 10000.0
    base_model_name_or_path: str | None = None
    revision: str | None = None
    library_version: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.base_model, dict):
            self.base_model = BaseModelShape(**self.base_model)
        if self.predictor_type not in PREDICTOR_TYPES:
            raise ValueError(
                f"predictor_type={self.predictor_type!r} is not known; expected one of {PREDICTOR_TYPES}"
            )
        for name in ("layer_stride", "importance_dim", "intermediate_size", "attentive_hidden_size",
                     "attentive_num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not 0 <= self.first_sparse_layer < self.base_model.num_hidden_layers:
            raise ValueError(
                f"first_sparse_layer={self.first_sparse_layer} must lie in "
                f"[0, {self.base_model.num_hidden_layers}) for a {self.base_model.num_hidden_layers}-layer model"
            )
        if self.attentive_hidden_size % (2 * self.attentive_num_heads) or self.importance_dim % 2:
            raise ValueError(
                f"attentive_hidden_size={self.attentive_hidden_size} must split into attentive_num_heads="
                f"{self.attentive_num_heads} heads of even width, and importance_dim={self.importance_dim} must be even (RoPE)"
            )
        if not self.sparse_layers:
            raise ValueError(
                f"no full-attention layer at or after first_sparse_layer={self.first_sparse_layer} "
                f"(full-attention layers: {list(self.base_model.full_attention_layers)}): nothing to predict"
            )

    # ------------------------------------------------------------------ derived layout
    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """Layers whose attention the predictor serves (full attention, index >= first_sparse_layer)."""
        return tuple(i for i in self.base_model.full_attention_layers if i >= self.first_sparse_layer)

    @property
    def producer_groups(self) -> tuple[tuple[int, ...], ...]:
        """Sparse layers split into runs of ``layer_stride``; each run's first layer hosts its producer."""
        layers = self.sparse_layers
        return tuple(layers[i : i + self.layer_stride] for i in range(0, len(layers), self.layer_stride))

    @property
    def score_scale(self) -> float:
        return 1.0 / math.sqrt(self.importance_dim)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ButlerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{CONFIG_NAME} has unknown fields {unknown}; expected a subset of {sorted(known)}")
        if "base_model" not in data:
            raise ValueError(f"{CONFIG_NAME} lacks the 'base_model' section describing the model it was trained for")
        return cls(**data)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> ButlerConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def for_model(cls, model_or_config: Any, **kwargs: Any) -> ButlerConfig:
        """A config for ``model_or_config`` (a transformers model or its config) with the given sizes."""
        shape = BaseModelShape.from_model(model_or_config)
        config = getattr(model_or_config, "config", model_or_config)
        kwargs.setdefault("base_model_name_or_path", getattr(config, "_name_or_path", None) or None)
        return cls(base_model=shape, **kwargs)
