"""`ButlerStaticCache`: a `StaticCache` whose sparse layers decode with fixed shapes, for compiled decoding.

A compiled decode step (``torch.compile(model.forward, fullgraph=True)``; with ``mode="reduce-overhead"`` a CUDA
graph) can only capture a cache whose step has the same shapes at every position. `ButlerStaticLayer` keeps its
K/V and importance keys preallocated to ``max_cache_len`` (transformers' `StaticLayer`, written in place) and
decodes one row per sequence over that whole length:

- scores ``[B, H_kv, 1, max_cache_len]`` over the preallocated rows, the ones not written yet and the padding
  masked (the attention mask transformers builds for a static cache, and the layer's written length);
- ``min(token_budget, max_cache_len)`` slots by one ``topk`` (sinks and window forced, as `select_tokens` does);
  slots that land on masked rows, while the context is shorter than the budget, are not attended, so a budget that
  covers the context is dense attention;
- attention over those slots (the PyTorch gather path, or the Triton kernel as the operator
  ``torch.ops.butler_cache.sparse_decode_attention`` that torch.compile traces).

Multi-token forwards (prefill) run dense, as with `ButlerCache`. Served: stateless policies (``butler`` with a
strided predictor, ``oracle``, ``quest``, ``streaming``, ``random``) and a fixed ``token_budget``; what needs a
state or shape that grows (H2O, SnapKV, attentive predictors, a budget ratio, a prediction interval) is refused
with a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .budget import TokenBudget
from .cache import checked_policy, sparse_layer_indices
from .compat import StaticCache, StaticLayer
from .hooks import HookedCache, attach
from .kernels import check_backend, resolve_backend
from .kernels.sparse_attention import sparse_decode_attention_torch
from .layer import SparseAttentionSettings
from .policies import ScoringInputs, SelectionPolicy
from .predictor import ButlerPredictor, LayerInput
from .selection import key_validity, select_tokens

__all__ = ["ButlerStaticCache", "ButlerStaticLayer"]


class ButlerStaticLayer(StaticLayer):
    """A `StaticLayer` that also holds the predictor's importance keys ``[B, H_kv, max_cache_len, d']`` and runs its
    layer's fixed-shape sparse decode step (see the module docstring)."""

    def __init__(self, max_cache_len: int, layer_idx: int, settings: SparseAttentionSettings,
                 predictor: ButlerPredictor | None = None):
        super().__init__(max_cache_len=max_cache_len)
        self.layer_idx = layer_idx
        self.settings = settings
        self.predictor = predictor
        self.importance_keys: torch.Tensor | None = None  # [B, H_kv, max_cache_len, d'], written in place
        self.importance_queries: torch.Tensor | None = None  # [B, HQ, T, d'] of the forward in flight
        self.triton = False  # whether the attention runs the Triton operator (resolved for the buffers' device)

    def __repr__(self) -> str:
        return f"ButlerStaticLayer(layer_idx={self.layer_idx}, max_cache_len={self.max_cache_len})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.triton = resolve_backend(self.settings.backend, key_states.device) == "triton"
        if self.triton:
            from .kernels import ops  # noqa: F401  (registers torch.ops.butler_cache)
        if self.predictor is not None:
            B, H = key_states.shape[:2]
            self.importance_keys = torch.zeros(
                (B, H, self.max_cache_len, self.predictor.config.importance_dim), dtype=self.predictor.dtype,
                device=key_states.device,
            )
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.importance_keys)  # as StaticLayer marks its K/V

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.predictor is None:  # a policy without importance keys (oracle, quest, ...)
            return super().update(key_states, value_states, *args, **kwargs)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length  # [T], before
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # the update advances the length
        new = self.predictor.keys_from_cache(self.layer_idx, key_states)  # [B, H_kv, T, d']
        self.importance_keys.index_copy_(2, positions, new.to(self.importance_keys.dtype))
        return keys, values

    def attend_sparse(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor | None:
        """The decode step's sparse attention ``[B, 1, HQ, Dv]``; None for a multi-token forward (it runs dense).

        ``query`` ``[B, HQ, 1, D]``; ``key``/``value`` ``[B, H_kv, max_cache_len, D]`` (this layer's buffers);
        ``attention_mask`` what transformers' SDPA mask function made for the static cache (None: no padding).
        """
        if query.shape[2] != 1:
            self.importance_queries = None
            return None
        L = key.shape[2]
        written = torch.arange(L, device=key.device) < self.cumulative_length  # [L]: rows holding tokens
        valid = key_validity(attention_mask, 1, L, key.device) & written  # [B|1, 1, 1, L]
        inputs = ScoringInputs(query=query, key=key, valid=valid, scaling=scale, layer=self)
        scores = self.settings.policy.score(inputs)  # [B, H_kv, 1, L]
        self.importance_queries = None
        selection = select_tokens(scores, valid, self.settings.budget)  # [B, H_kv, 1, min(budget, L)]
        if self.triton:
            return torch.ops.butler_cache.sparse_decode_attention(
                query, key, value, selection.indices, selection.keep, scale
            )
        return sparse_decode_attention_torch(query, key, value, selection.indices, selection.keep, scale)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.importance_keys is not None:
            self.importance_keys = self.importance_keys.index_select(0, beam_idx.to(self.importance_keys.device))

    def reset(self) -> None:
        super().reset()
        if self.importance_keys is not None:
            self.importance_keys.zero_()  # in place: the compiled step holds its address
        self.importance_queries = None


class ButlerStaticCache(StaticCache, HookedCache):
    """A `StaticCache` (preallocated to ``max_cache_len``) whose sparse layers attend to sinks + window + the
    top-scored tokens within ``token_budget``, with shapes that do not change between decode steps, so that
    ``torch.compile(model.forward, fullgraph=True)`` captures the whole step (see the module docstring).

    Parameters as `ButlerCache`'s, plus ``max_cache_len`` (prompt + new tokens); ``token_budget`` (a count) is
    required. ``backend``: ``"auto"`` (the Triton operator on CUDA, PyTorch elsewhere), ``"torch"`` or
    ``"triton"``; the numba CPU kernels cannot be traced and are not used here.
    """

    traceable = True  # the hooks serve it inside torch.compile too

    def __init__(
        self,
        model: torch.nn.Module,
        predictor: ButlerPredictor | None = None,
        *,
        max_cache_len: int,
        token_budget: int,
        policy: str | SelectionPolicy | None = None,
        sink_tokens: int = 4,
        local_window: int = 16,
        backend: str = "auto",
        first_sparse_layer: int = 1,
        offloading: bool = False,
    ):
        policy = checked_policy(model, predictor, policy, type(self).__name__)
        if policy.stateful:
            raise ValueError(
                f"policy {policy.name!r} keeps per-token state that a fixed-shape decode step does not update; "
                "ButlerStaticCache serves stateless policies (butler, oracle, quest, streaming, random): use "
                "ButlerCache for it"
            )
        if policy.requires_predictor and predictor.new_state() is not None:
            raise ValueError(
                f"a {predictor.config.predictor_type!r} predictor keeps its own growing decode state; "
                "ButlerStaticCache serves strided predictors: use ButlerCache for it"
            )
        if token_budget is None:
            raise ValueError("ButlerStaticCache needs token_budget (a token count): its decode step has a fixed size")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len={max_cache_len!r} must be a positive integer (prompt + new tokens)")
        self.settings = SparseAttentionSettings(
            policy=policy,
            budget=TokenBudget(token_budget, None, sink_tokens, local_window),
            backend=check_backend(backend),
        )
        if self.settings.backend == "numba":
            raise ValueError("backend='numba' cannot be traced: ButlerStaticCache takes 'auto', 'torch' or 'triton'")
        self.predictor = predictor if policy.requires_predictor else None
        super().__init__(config=model.config, max_cache_len=max_cache_len, offloading=offloading)
        self.capacity = max_cache_len  # tokens the buffers hold (prompt + new tokens)
        self.sparse_layers = sparse_layer_indices(model, self.predictor, first_sparse_layer)
        self.input_layers = frozenset(self.predictor.producer_layers if self.predictor is not None else ())
        for i in self.sparse_layers:
            if type(self.layers[i]) is not StaticLayer:
                raise ValueError(f"layer {i} is a {type(self.layers[i]).__name__}, not a full-attention StaticLayer")
            self.layers[i] = ButlerStaticLayer(max_cache_len, i, self.settings, self.predictor)
        attach(model)

    def __repr__(self) -> str:
        b = self.settings.budget
        return (
            f"ButlerStaticCache(policy={self.settings.policy.name!r}, token_budget={b.token_budget}, "
            f"sink_tokens={b.sink_tokens}, local_window={b.local_window}, max_cache_len={self.capacity}, "
            f"sparse_layers={len(self.sparse_layers)}/{len(self.layers)})"
        )

    @classmethod
    def from_pretrained(
        cls, pretrained: str | Path, model: torch.nn.Module, *, max_cache_len: int, token_budget: int,
        revision: str | None = None, cache_dir: str | Path | None = None, token: str | bool | None = None,
        local_files_only: bool = False, **overrides: Any,
    ) -> ButlerStaticCache:
        """Load a trained predictor (local folder or Hub id), check it fits ``model``, attach, build the cache."""
        predictor = ButlerPredictor.from_pretrained(
            pretrained, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        ).to(next(model.parameters()).device)
        return cls(model, predictor, max_cache_len=max_cache_len, token_budget=token_budget, **overrides)

    # ------------------------------------------------------------------ what the hooks ask (`hooks.HookedCache`)
    def sparse_layer(self, layer_idx: int) -> ButlerStaticLayer | None:
        layer = self.layers[layer_idx]
        return layer if isinstance(layer, ButlerStaticLayer) else None

    def on_layer_input(self, layer_idx: int, inputs: LayerInput) -> None:
        """Run the producer at decoder layer ``layer_idx``: importance queries for the layers it serves."""
        for served, importance in self.predictor.produce(layer_idx, inputs).items():
            self.layers[served].importance_queries = importance.queries  # [B, HQ, T, d']
