"""`ButlerPredictor`: the interface every TokenButler predictor implements, its persistence and checks.

Two generations share it (``ButlerConfig.predictor_type``):

- ``"strided"`` (`StridedPredictor`, the default): producers at a depth stride emit importance queries;
  keys are a learned projection of the real cached keys.
- ``"attentive"`` (`AttentivePredictor`): one small causal self-attention over layer-0 hidden states
  emits importance queries *and* keys for every sparse layer; it keeps its own decode state.

``ButlerPredictor(config)`` builds the class that ``config.predictor_type`` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.utils import PushToHubMixin

from . import persistence
from .architecture import BaseModelShape
from .compat import DynamicLayer
from .config import ButlerConfig

PREDICTOR_CLASSES: dict[str, type[ButlerPredictor]] = {}


@dataclass
class LayerInput:
    """The hidden state entering a decoder layer, with what transformers passed beside it."""

    hidden_states: torch.Tensor  # [B, T, D]
    position_ids: torch.Tensor | None = None  # [B or 1, T]
    key_padding: torch.Tensor | None = None  # [B, L] the model's 2-D attention mask over past + new tokens


@dataclass
class Importance:
    """Importance queries for one served layer, and importance keys of the new tokens when the
    predictor makes them itself (attentive); None when they come from the real keys (strided)."""

    queries: torch.Tensor  # [B, HQ, T, d']
    keys: torch.Tensor | None = None  # [B, H_k, T, d']


class ButlerPredictor(nn.Module, PushToHubMixin):
    """Base class of TokenButler predictors (see the module docstring)."""

    predictor_type: ClassVar[str] = ""

    def __new__(cls, config: ButlerConfig, *args: Any, **kwargs: Any):
        if cls is ButlerPredictor:
            cls = PREDICTOR_CLASSES[config.predictor_type]
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.predictor_type:
            PREDICTOR_CLASSES[cls.predictor_type] = cls

    def __init__(self, config: ButlerConfig):
        super().__init__()
        self.config = config
        self._slot_of_layer = {layer: i for i, layer in enumerate(config.sparse_layers)}

    # ------------------------------------------------------------------ interface
    @property
    def producer_layers(self) -> tuple[int, ...]:
        """Decoder layers whose input hidden state the predictor reads."""
        raise NotImplementedError

    def produce(
        self, layer_idx: int, inputs: LayerInput, state: DynamicLayer | None = None, *, backend: str = "torch"
    ) -> dict[int, Importance]:
        """Run the producer at ``layer_idx`` (if any): ``{served layer: Importance}`` for the new tokens.

        ``state`` is the predictor's own per-token decode state (`new_state`), extended in place. ``backend``: the
        cache's resolved backend (``"numba"`` lets a predictor use its compiled CPU producer where it has one).
        """
        raise NotImplementedError

    def keys_from_cache(self, layer_idx: int, key_states: torch.Tensor) -> torch.Tensor | None:
        """Importance keys derived from the model's new real keys ``[B, H_kv, T, D]``, or None."""
        return None

    def key_projection(self, layer_idx: int) -> torch.Tensor | None:
        """``[H_kv, head_dim, d']`` when `keys_from_cache` is ``key_states[:, h] @ W[h]`` per KV head (what the
        numba cache update computes itself), else None."""
        return None

    def new_state(self) -> DynamicLayer | None:
        """A fresh per-sequence decode state, kept by the cache beside the K/V (None if stateless)."""
        return None

    @property
    def key_heads(self) -> int:
        """Heads of the importance keys (KV heads for strided, query heads for attentive)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def serves(self, layer_idx: int) -> bool:
        return layer_idx in self._slot_of_layer

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def score_logits(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Predicted logits per query head: ``[B, HQ, T, d']`` x ``[B, H_k, L, d']`` -> ``[B, HQ, T, L]``."""
        B, HQ, T, E = queries.shape
        H = keys.shape[1]
        grouped = queries.reshape(B, H, HQ // H * T, E)  # query heads of a group share its keys
        logits = torch.matmul(grouped, keys.to(queries.dtype).transpose(-1, -2)) * self.config.score_scale
        return logits.view(B, HQ, T, -1)  # [B, H, G * T, L] -> [B, HQ, T, L]

    def teacher_forced(self, inputs: dict[int, LayerInput], keys: dict[int, torch.Tensor]) -> dict[int, Importance]:
        """Importance queries and keys of every served layer for whole sequences (training, evaluation).

        ``inputs[l]``: what entered decoder layer ``l`` (producer layers at least); ``keys[l]``: the
        model's post-RoPE keys of layer ``l``, ``[B, H_kv, T, D]``.
        """
        out: dict[int, Importance] = {}
        for layer in self.producer_layers:
            out.update(self.produce(layer, inputs[layer]))
        for layer, importance in out.items():
            if importance.keys is None:
                importance.keys = self.keys_from_cache(layer, keys[layer])
        return out

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
                f"this predictor was trained for {trained_for!r} and cannot serve {model_name!r}: " + "; ".join(diffs)
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
        predictor = ButlerPredictor(config)
        if cls is not ButlerPredictor and not isinstance(predictor, cls):
            raise ValueError(f"{pretrained} holds a {config.predictor_type!r} predictor, not a {cls.__name__}")
        persistence.load_weights(predictor, weights_path)
        return predictor.to(device=device, dtype=dtype).eval()
