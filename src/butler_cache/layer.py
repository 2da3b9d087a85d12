"""`ButlerLayer`: a full-attention cache layer that keeps the predictor's per-token state beside its K/V and runs
the sparse attention of its layer.

A decode step reads top-down from here: `attend_sparse` asks the layer's decode backend (`butler_cache.decode`:
torch, triton or numba, made at the first update for the layer's device) for a fused step, else for a selection
(`select`: scores, prediction reuse, top-k, neighbours) and the attention over it (`attend`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .budget import TokenBudget
from .decode import DecodeBackend, PredictionReuse, make_backend
from .growth import GrowingLayer
from .kernels.sparse_attention import masked_attention
from .policies import ScoringInputs, SelectionPolicy
from .predictor import ButlerPredictor
from .selection import key_validity


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
class StatsRecorder:
    """Collects `StepStats`, one per forward, from the sparse layers of one cache."""

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


_TRUE: dict[torch.device, torch.Tensor] = {}


def _all_valid(kv_len: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, 1, kv_len]`` all True, an expanded view of one 0-d tensor made once per device (read-only)."""
    true = _TRUE.get(device)
    if true is None:
        true = _TRUE[device] = torch.ones((), dtype=torch.bool, device=device)
    return true.expand(1, 1, 1, kv_len)


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
        self.reuse = PredictionReuse(settings)  # the prediction interval's kept scores, and neighbour fetching
        self.stats: StatsRecorder | None = None
        # made at the first update, for the layer's device and the settings' backend (again if either changes)
        self.backend: DecodeBackend | None = None
        self._storage["importance_keys"] = None  # importance_keys grow like keys and values

    def __repr__(self) -> str:
        return f"ButlerLayer(layer_idx={self.layer_idx}, predictor={self.predictor is not None}, backend={self.backend})"

    @property
    def last_scores(self) -> torch.Tensor | None:
        """The kept prediction ``[B, H_kv, 1, L_then]`` that decode steps reuse (``prediction_interval`` > 1)."""
        return self.reuse.last_scores

    def reuses_scores(self) -> bool:
        """Whether the next decode step reuses the last prediction (its producers may skip it)."""
        return self.reuse.reuses()

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

    # ------------------------------------------------------------------ the cache update
    def _backend_for(self, device: torch.device) -> DecodeBackend:
        backend = self.backend
        if backend is None or backend.device != device or backend.requested != self.settings.backend:
            if backend is not None:
                backend.release()
            backend = self.backend = make_backend(self.settings.backend, device)
        return backend

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._backend_for(key_states.device).append(self, key_states, value_states):
            super().update(key_states, value_states)
            if self.predictor is not None:
                new = self.predictor.keys_from_cache(self.layer_idx, key_states)  # [B, H_kv, T, d'] or None
                if new is not None:
                    self.append_importance_keys(new)
        return self.keys, self.values

    def append_importance_keys(self, new: torch.Tensor) -> None:
        """Add the importance keys ``[B, H_k, T, d']`` of the new tokens, in the layout the backend reads."""
        self._append("importance_keys", new, self._backend_for(new.device).feature_major)

    # ------------------------------------------------------------------ the attention
    def attend_sparse(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor | None:
        """Sparse attention of this layer's forward, ``[B, T, HQ, Dv]``; None where the forward runs dense (the
        budget covers the context, or a multi-token forward without ``sparse_prefill``), after recording it.

        ``query`` ``[B, HQ, T, D]``, ``key``/``value`` ``[B, H_kv, L, D]`` (this layer's cache), ``attention_mask``
        what transformers' SDPA mask function made (None: plain causal, no padding).
        """
        settings, backend = self.settings, self._backend_for(key.device)
        q_len, kv_len = query.shape[2], key.shape[2]
        policy = settings.policy
        if settings.budget.covers(kv_len) or (q_len > 1 and not settings.sparse_prefill):
            self._record_dense(query, key, attention_mask, scale)
            return None
        # no mask at a decode step: no padding, every cached key is valid (transformers skips the mask then)
        unpadded_decode = q_len == 1 and attention_mask is None
        if unpadded_decode:
            valid = _all_valid(kv_len, key.device)  # what key_validity gives here, without building it
        else:
            valid = key_validity(attention_mask, q_len, kv_len, key.device)  # [B|1, 1, T, L]
        inputs = ScoringInputs(query=query, key=key, valid=valid, scaling=scale, layer=self, all_valid=unpadded_decode)
        if unpadded_decode and self.stats is None and not policy.stateful:
            out = backend.step(inputs, value)  # score + select + attend in one call, where the backend has one
            if out is not None:
                self.importance_queries = None
                return out
        selection = backend.select(inputs)  # [B, H_kv, T, K]
        if policy.stateful:
            policy.observe(inputs, selection)
        self.importance_queries = None
        if self.stats is not None:
            self.stats.record(q_len, kv_len, selection.attended())
        if q_len > 1:  # teacher-forced rows (sparse_prefill), each over its own selection: the reference
            return masked_attention(query, key, value, selection.as_mask(kv_len), scale)
        return backend.attend(inputs, value, selection)  # [B, 1, HQ, Dv]

    def _record_dense(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                      scale: float) -> None:
        """Stats and stateful policies see dense forwards too (H2O accumulates the attention of the prefill)."""
        q_len, kv_len = query.shape[2], key.shape[2]
        if self.stats is not None:
            self.stats.record(q_len, kv_len, None)
        policy = self.settings.policy
        if policy.stateful:
            valid = key_validity(attention_mask, q_len, kv_len, key.device)
            policy.observe(ScoringInputs(query=query, key=key, valid=valid, scaling=scale, layer=self), None)

    # ------------------------------------------------------------------ keeping predictor state in sync
    def _map_state(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.importance_keys is not None and self.importance_keys.numel() > 0:
            self.importance_keys = fn(self.importance_keys)
        self.policy_state = {name: fn(t) for name, t in self.policy_state.items() if t.numel() > 0}
        self.importance_queries = None
        self._release_backend_state()
        self.reuse.forget()  # the next decode step predicts afresh

    def _release_backend_state(self) -> None:
        if self.backend is not None:
            self.backend.release()  # state kept between steps (views of the replaced tensors) no longer serves

    def reset(self) -> None:
        super().reset()
        self._release_backend_state()
        self.importance_keys = None
        self.importance_queries = None
        self.policy_state = {}
        self.reuse.forget()

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
        self._release_backend_state()
        if self.importance_keys is not None:
            self.importance_keys = self.importance_keys.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        super().prefetch()
        if self.importance_keys is not None and self.is_initialized and self.importance_keys.device != self.device:
            self.importance_keys = self.importance_keys.to(self.device, non_blocking=True)
