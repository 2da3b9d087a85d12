"""`ButlerCache`: a `DynamicCache` that keeps the full K/V and lets each step attend to a budget of it.

Full-attention layers served by the policy become `ButlerLayer`s (`layer.py`), which store beside the real keys
the predictor's importance keys (``[B, H_k, L, d']``) and keep them in sync through every cache operation
transformers performs. Full-attention layers before the first sparse one stay dense as `GrowingLayer`s (a
`DynamicLayer` that appends in place instead of re-copying its K/V every step); sliding-window layers keep
transformers' own classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .architecture import BaseModelShape, check_supported
from .budget import TokenBudget
from .compat import DynamicCache, DynamicLayer
from .growth import GrowingLayer
from .hooks import HookedCache, attach
from .kernels import check_backend, resolve_backend
from .layer import ButlerLayer, SparseAttentionSettings, StatsRecorder, StepStats
from .policies import SelectionPolicy, make_policy
from .predictor import ButlerPredictor, LayerInput

__all__ = ["ButlerCache", "ButlerLayer", "SparseAttentionSettings", "StepStats", "checked_policy", "sparse_layer_indices"]


class ButlerCache(DynamicCache, HookedCache):
    """A KV cache that attends, in its sparse layers, to sinks + local window + the top-scored tokens.

    Parameters
    ----------
    model : the transformers model the cache will serve; it is attached (`butler_cache.attach`).
    predictor : a `ButlerPredictor`, needed by the ``"butler"`` policy.
    policy : a registered policy name (``"butler"``, ``"oracle"``) or instance; by default
        ``"butler"`` when a predictor is given, else ``"oracle"``.
    token_budget, budget_ratio : exactly one; see `TokenBudget`.
    sink_tokens, local_window : always-kept first and most recent tokens (counted in the budget).
    backend : ``"auto"``, ``"torch"`` or ``"triton"`` for the sparse attention.
    sparse_prefill : also make multi-token forwards (prefill, chunks) sparse, each query row attending
        to its own selection; by default they run dense and only decoding is sparse.
    first_sparse_layer : without a predictor, full-attention layers before it stay dense (with a
        predictor, its config decides).
    offloading : as `DynamicCache(offloading=True)`.
    record_stats : record per-forward attended-token counts in ``cache.stats`` (costs a sync per layer).
    prediction_interval : predict (score) every this many decode steps and reuse the scores in between,
        tokens added since the last prediction kept first; the producers of a stateless predictor are
        skipped on the reuse steps.
    neighbor_fetch : also attend, for each run of selected positions, to the position just after it (at
        most one extra token per run, on top of the budget); meant for ``prediction_interval`` > 1.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        predictor: ButlerPredictor | None = None,
        *,
        policy: str | SelectionPolicy | None = None,
        token_budget: int | None = None,
        budget_ratio: float | None = None,
        sink_tokens: int = 4,
        local_window: int = 16,
        backend: str = "auto",
        sparse_prefill: bool = False,
        first_sparse_layer: int = 1,
        offloading: bool = False,
        record_stats: bool = False,
        prediction_interval: int = 1,
        neighbor_fetch: bool = False,
    ):
        policy = checked_policy(model, predictor, policy, type(self).__name__)
        self.settings = SparseAttentionSettings(
            policy=policy,
            budget=TokenBudget(token_budget, budget_ratio, sink_tokens, local_window),
            backend=check_backend(backend),
            sparse_prefill=sparse_prefill,
            record_stats=record_stats,
            prediction_interval=prediction_interval,
            neighbor_fetch=neighbor_fetch,
        )
        self.predictor = predictor if policy.requires_predictor else None
        super().__init__(config=model.config, offloading=offloading)
        self.sparse_layers = sparse_layer_indices(model, self.predictor, first_sparse_layer)
        self.stats_recorder = StatsRecorder() if record_stats else None
        # the predictor's own per-token decode state (attentive predictors), kept in sync below
        self.predictor_state = self.predictor.new_state() if self.predictor is not None else None
        # decoder layers whose input hidden state the predictor reads (`on_layer_input` runs there only)
        self.input_layers = frozenset(self.predictor.producer_layers if self.predictor is not None else ())
        for i, layer in enumerate(self.layers):
            if i in self.sparse_layers:
                self.layers[i] = ButlerLayer(i, self.settings, self.predictor)
                self.layers[i].stats = self.stats_recorder
            elif type(layer) is DynamicLayer:  # dense full attention: same tensors, grown in place
                self.layers[i] = GrowingLayer()
        attach(model)

    def __repr__(self) -> str:
        b = self.settings.budget
        budget = f"token_budget={b.token_budget}" if b.token_budget is not None else f"budget_ratio={b.budget_ratio}"
        return (
            f"ButlerCache(policy={self.settings.policy.name!r}, {budget}, sink_tokens={b.sink_tokens}, "
            f"local_window={b.local_window}, sparse_layers={len(self.sparse_layers)}/{len(self.layers)}, "
            f"seq_length={self.get_seq_length()})"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | Path,
        model: torch.nn.Module,
        *,
        token_budget: int | None = None,
        budget_ratio: float | None = None,
        sink_tokens: int = 4,
        local_window: int = 16,
        policy: str | SelectionPolicy = "butler",
        backend: str = "auto",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> ButlerCache:
        """Load a trained predictor (local folder or Hub id), check it fits ``model``, attach, build the cache.

        ``overrides`` are further `ButlerCache` keywords (``sparse_prefill``, ``offloading``,
        ``record_stats``).
        """
        param = next(model.parameters())
        predictor = ButlerPredictor.from_pretrained(
            pretrained, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        ).to(param.device)
        return cls(
            model,
            predictor,
            policy=policy,
            token_budget=token_budget,
            budget_ratio=budget_ratio,
            sink_tokens=sink_tokens,
            local_window=local_window,
            backend=backend,
            **overrides,
        )

    # ------------------------------------------------------------------ what the hooks ask (`hooks.HookedCache`)
    def sparse_layer(self, layer_idx: int) -> ButlerLayer | None:
        layer = self.layers[layer_idx]
        return layer if isinstance(layer, ButlerLayer) else None

    def on_layer_input(self, layer_idx: int, inputs: LayerInput) -> None:
        """Called with the hidden state entering decoder layer ``layer_idx``: run its producer, if any."""
        if self.predictor is None:
            return
        if inputs.hidden_states.shape[1] == 1 and self.predictor_state is None and self._all_reuse(layer_idx):
            return  # every layer this producer serves reuses its last prediction this step
        backend = resolve_backend(self.settings.backend, inputs.hidden_states.device)
        produced = self.predictor.produce(layer_idx, inputs, self.predictor_state, backend=backend)
        for served, importance in produced.items():
            layer = self.layers[served]
            layer.importance_queries = importance.queries
            if importance.keys is not None:
                layer.append_importance_keys(importance.keys)

    def _all_reuse(self, layer_idx: int) -> bool:
        if self.settings.prediction_interval == 1:
            return False
        groups = [g for g in getattr(self.predictor.config, "producer_groups", ()) if g[0] == layer_idx]
        return bool(groups) and all(self.layers[served].reuses_scores() for served in groups[0])

    # ------------------------------------------------------------------ predictor decode state in sync
    def _with_predictor_state(self, operation: str, *args: Any) -> None:
        """Apply a cache operation to the layers and to the predictor's own decode state alike."""
        getattr(super(), operation)(*args)
        if self.predictor_state is not None:
            getattr(self.predictor_state, operation)(*args)

    def reset(self) -> None:
        self._with_predictor_state("reset")

    def crop(self, tokens_to_remove: int) -> None:
        self._with_predictor_state("crop", tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._with_predictor_state("reorder_cache", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._with_predictor_state("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._with_predictor_state("batch_select_indices", indices)

    @property
    def stats(self) -> list[StepStats]:
        """Per forward: query length, context length, mean tokens attended per sparse row (``record_stats``)."""
        if self.stats_recorder is None:
            raise RuntimeError("build the cache with record_stats=True to collect stats")
        self.stats_recorder.close()
        return self.stats_recorder.steps


def checked_policy(
    model: torch.nn.Module, predictor: ButlerPredictor | None, policy: str | SelectionPolicy | None, cache_name: str
) -> SelectionPolicy:
    """The policy a cache for ``model`` runs (default: ``"butler"`` with a predictor, else ``"oracle"``), after checking
    the model is supported, the policy has the predictor it needs and the predictor was made for this model."""
    check_supported(model)
    policy = make_policy(policy if policy is not None else ("butler" if predictor is not None else "oracle"))
    if policy.requires_predictor and predictor is None:
        raise ValueError(
            f"policy {policy.name!r} needs a predictor: pass predictor=ButlerPredictor(...) or use "
            f"{cache_name}.from_pretrained(path_or_hub_id, model=model, ...)"
        )
    if predictor is not None:
        predictor.check_compatible(model)
    return policy


def sparse_layer_indices(
    model: torch.nn.Module, predictor: ButlerPredictor | None, first_sparse_layer: int
) -> tuple[int, ...]:
    """The layers that attend sparsely: the predictor's, else the full-attention layers from ``first_sparse_layer``."""
    if predictor is not None:
        return predictor.config.sparse_layers
    return tuple(i for i in BaseModelShape.from_model(model).full_attention_layers if i >= first_sparse_layer)
