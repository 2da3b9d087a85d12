"""`ButlerCache`: a `DynamicCache` that keeps the full K/V and lets each step attend to a budget of it.

Full-attention layers served by the policy become `ButlerLayer`s, which store beside the real keys
the predictor's importance keys (``[B, H_k, L, d']``) and keep them in sync through every cache
operation transformers performs. Full-attention layers before the first sparse one stay dense as
`GrowingLayer`s (a `DynamicLayer` that appends in place instead of re-copying its K/V every step);
sliding-window layers keep transformers' own classes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architecture import BaseModelShape, check_supported
from .budget import TokenBudget
from .compat import DynamicCache, DynamicLayer
from .growth import GrowingLayer
from .kernels import check_backend, resolve_backend
from .numba_step import NumbaDecodeStep
from .policies import SelectionPolicy, make_policy
from .predictor import ButlerPredictor, LayerInput

# A fused decode call as `ButlerLayer.fused_decode` runs it: (kept prediction or None, keep this step's) ->
# (attention output [B, 1, HQ, Dv], this step's prediction [B, H_kv, 1, L] or None), or None where it cannot serve.
FusedDecode = Callable[[torch.Tensor | None, bool], tuple[torch.Tensor, torch.Tensor | None] | None]

# The ButlerLayer whose `update` ran last and whose attention has not run yet. The attention function
# reads it to find the cache layer of the call (it is given neither the cache nor the layer).
ACTIVE_LAYER: ContextVar[ButlerLayer | None] = ContextVar("butler_cache_active_layer", default=None)


@dataclass
class SparseAttentionSettings:
    """How the sparse layers of one cache select and attend (shared by its layers)."""

    policy: SelectionPolicy
    budget: TokenBudget
    backend: str = "auto"
    sparse_prefill: bool = False
    record_stats: bool = False
    prediction_interval: int = 1
    neighbor_fetch: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prediction_interval, int) or self.prediction_interval < 1:
            raise ValueError(f"prediction_interval={self.prediction_interval!r} must be an integer >= 1")


@dataclass
class StepStats:
    """What one forward did in the sparse layers: queries, context and mean tokens attended per row."""

    query_length: int
    context_length: int
    attended: float | None  # None: the forward ran dense (the budget covered the context)


@dataclass
class _StatsRecorder:
    steps: list[StepStats] = field(default_factory=list)
    _sum: float = 0.0
    _layers: int = 0
    _open: tuple[int, int] | None = None

    def record(self, query_length: int, context_length: int, attended: torch.Tensor | None) -> None:
        key = (query_length, context_length)
        if self._open != key:
            self.close()
            self._open = key
        if attended is not None:
            self._sum += attended.float().mean().item()
            self._layers += 1

    def close(self) -> None:
        if self._open is not None:
            q, n = self._open
            self.steps.append(StepStats(q, n, self._sum / self._layers if self._layers else None))
        self._open, self._sum, self._layers = None, 0.0, 0


class ButlerLayer(GrowingLayer):
    """A full-attention cache layer with per-token predictor state kept in sync with its K/V."""

    def __init__(self, layer_idx: int, settings: SparseAttentionSettings, predictor: ButlerPredictor | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.settings = settings
        self.predictor = predictor
        self.importance_keys: torch.Tensor | None = None  # [B, H_k, L, d'], one row per cached token
        self.importance_queries: torch.Tensor | None = None  # [B, HQ, T, d'] of the forward in flight
        # per-token state of stateful policies (H2O's accumulated attention, ...), each [B, H_kv, L, 1]
        self.policy_state: dict[str, torch.Tensor] = {}
        # decode scores of the last prediction and the decode steps they have served (prediction_interval)
        self.last_scores: torch.Tensor | None = None  # [B, H_kv, 1, L_then]
        self.last_scores_age = 0
        self.stats: _StatsRecorder | None = None
        # the numba decode path's reusable state (`NumbaDecodeStep`), made by `update` when it can serve
        self.numba_step: NumbaDecodeStep | None = None
        self._storage["importance_keys"] = None  # importance_keys grow like keys and values

    def token_state(self, name: str, length: int, fill: float = 0.0) -> torch.Tensor:
        """Policy state ``name`` ``[B, H_kv, length, 1]`` (float32), new tokens' rows set to ``fill``."""
        state = self.policy_state.get(name)
        B, H = self.keys.shape[:2]
        if state is None:
            state = self.keys.new_full((B, H, 0, 1), fill, dtype=torch.float32)
        if state.shape[2] < length:
            state = torch.cat([state, state.new_full((B, H, length - state.shape[2], 1), fill)], dim=2)
        self.policy_state[name] = state
        return state

    def reuses_scores(self) -> bool:
        """Whether the next decode step reuses the last prediction (``prediction_interval`` > 1)."""
        return self.last_scores is not None and self.last_scores_age + 1 < self.settings.prediction_interval

    def decode_scores(self, score: Callable[[], torch.Tensor], kv_len: int) -> torch.Tensor:
        """Scores for a decode step: a fresh prediction every ``prediction_interval`` steps, in between the
        last one, with the tokens added since ranked first (they were never scored)."""
        if self.settings.prediction_interval == 1:
            return score()
        if self.reuses_scores():
            last = self.reuse_scores()
            fresh = last.new_full((*last.shape[:-1], kv_len - last.shape[-1]), float("inf"))
            return torch.cat([last, fresh], dim=-1)
        return self.keep_scores(score())

    def fused_decode(self, kv_heads: int, kv_len: int, run: FusedDecode) -> torch.Tensor | None:
        """`decode_scores` for a call that scores, selects and attends at once (the numba CPU step): ``run(kept,
        keep)`` gets the kept prediction to reuse (float32 ``[B, H_kv, 1, L' <= kv_len]``; None: score afresh) and
        whether to return this step's prediction, and returns ``(out, scores or None)``, or None where it cannot
        serve. None also where the kept prediction has another form (the general path reuses it)."""
        keeping = self.settings.prediction_interval > 1
        kept = self.last_scores if keeping and self.reuses_scores() else None  # [B, H_kv, 1, L'] or None
        if kept is not None and (
            kept.dtype != torch.float32 or kept.shape[:3] != (self.keys.shape[0], kv_heads, 1) or kept.shape[3] > kv_len
        ):
            return None
        result = run(kept, keeping and kept is None)
        if result is None:
            return None
        out, scores = result
        if kept is not None:
            self.reuse_scores()
        elif keeping:
            self.keep_scores(scores)
        return out

    def reuse_scores(self) -> torch.Tensor:
        """The kept prediction, counted as serving one more decode step (call where `reuses_scores`)."""
        self.last_scores_age += 1
        return self.last_scores

    def keep_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep ``scores`` ``[B, H_kv, 1, L]`` as the prediction the next ``prediction_interval - 1`` steps reuse."""
        self.last_scores, self.last_scores_age = scores, 0
        return scores

    def __repr__(self) -> str:
        return f"ButlerLayer(layer_idx={self.layer_idx}, predictor={self.predictor is not None})"

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._update_in_place(key_states, value_states):
            super().update(key_states, value_states)
            if self.predictor is not None:
                new = self.predictor.keys_from_cache(self.layer_idx, key_states)  # [B, H_kv, T, d'] or None
                if new is not None:
                    self.append_importance_keys(new)
        ACTIVE_LAYER.set(self)
        return self.keys, self.values

    def _update_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """With the numba backend: K/V rows and their importance keys written into the storages' spare rows in
        one compiled call, through the layer's `NumbaDecodeStep` (made anew when the last one no longer serves).
        False if it did nothing."""
        step = self.numba_step
        if step is None or not step.serves(self):
            step = self.numba_step = NumbaDecodeStep.for_layer(self)
            if step is None:
                return False
        if not step.append(self, key_states, value_states):
            return False
        self.keys, self.values, self.importance_keys = step.views
        return True

    def append_importance_keys(self, new: torch.Tensor) -> None:
        """Add the importance keys ``[B, H_k, T, d']`` of the new tokens.

        With the numba backend they are kept feature-major (`growth.append_rows`): its scoring kernel streams
        over the tokens one feature at a time.
        """
        feature_major = resolve_backend(self.settings.backend, new.device) == "numba"
        self._append("importance_keys", new, feature_major)

    # ------------------------------------------------------------------ keeping predictor state in sync
    def _map_state(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.importance_keys is not None and self.importance_keys.numel() > 0:
            self.importance_keys = fn(self.importance_keys)
        self.policy_state = {name: fn(t) for name, t in self.policy_state.items() if t.numel() > 0}
        self.importance_queries = None
        self.numba_step = None  # it no longer serves (the tensors were replaced); let go of its storages
        self.last_scores = None  # the next decode step predicts afresh

    def reset(self) -> None:
        super().reset()
        self.numba_step = None
        self.importance_keys = None
        self.importance_queries = None
        self.policy_state = {}
        self.last_scores = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove != 0:
            self._map_state(lambda t: t[..., : -abs(tokens_to_remove), :])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_state(lambda t: t[indices, ...])

    def offload(self) -> None:
        super().offload()
        self.numba_step = None
        if self.importance_keys is not None:
            self.importance_keys = self.importance_keys.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        super().prefetch()
        if self.importance_keys is not None and self.is_initialized and self.importance_keys.device != self.device:
            self.importance_keys = self.importance_keys.to(self.device, non_blocking=True)


class ButlerCache(DynamicCache):
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
        from .attention import attach

        check_supported(model)
        policy = make_policy(policy if policy is not None else ("butler" if predictor is not None else "oracle"))
        if policy.requires_predictor and predictor is None:
            raise ValueError(
                f"policy {policy.name!r} needs a predictor: pass predictor=ButlerPredictor(...) or use "
                "ButlerCache.from_pretrained(path_or_hub_id, model=model, ...)"
            )
        if predictor is not None:
            predictor.check_compatible(model)
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
        full = BaseModelShape.from_model(model).full_attention_layers
        if self.predictor is not None:
            self.sparse_layers = self.predictor.config.sparse_layers
        else:
            self.sparse_layers = tuple(i for i in full if i >= first_sparse_layer)
        self.stats_recorder = _StatsRecorder() if record_stats else None
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

    # ------------------------------------------------------------------ predictor hook
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
