"""`NumbaBackend`: a sparse layer's decode step on the CPU in numba-compiled kernels (float32 tensors).

Everything numba-specific lives here. With the butler policy a decode step is two compiled calls: the cache
update (`kernels/cache_update/cpu.py`: the new K/V rows and their importance keys written into the storages'
spare rows) and the fused score + select + attend (`kernels/decode_step/cpu.py`). Where those cannot serve (a
stateful policy, recorded stats, padding, other dtypes) the step runs the PyTorch path with compiled scoring and
attention kernels where they apply. The importance keys are kept feature-major (`growth.append_rows`): the scoring
kernels stream over the tokens one feature at a time.

`NumbaDecodeStep` keeps, between steps, what stays the same: the flat numpy views of the three storages, their
layout checks, the shapes, numba's thread count. At 8k tokens the Python around the kernels cost about a third as
much as the kernels themselves, because the decoder layer's weights, streamed between two layers, evict that
Python's code and data. It serves while the layer's tensors are the very views it made: every cache operation
replaces them, and so does an append by the PyTorch path; then the backend makes a new step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..kernels import numba_serves
from ..kernels.cpu_utils import announce_compile, flat_view
from ..policies import ButlerPolicy, ScoringInputs
from ..selection import Selection
from .torch_backend import TorchBackend

announce_compile()  # compiling the kernels below takes tens of seconds in a process that numba has not cached them for
from ..kernels.cache_update import cpu as cache_update_cpu  # noqa: E402
from ..kernels.decode_step import cpu as decode_step_cpu  # noqa: E402
from ..kernels.scoring import cpu as scoring_cpu  # noqa: E402
from ..kernels.sparse_attention import cpu as sparse_attention_cpu  # noqa: E402

if TYPE_CHECKING:
    from ..layer import ButlerLayer

_STORED = ("keys", "values", "importance_keys")


def _is_butler(layer: ButlerLayer) -> bool:
    """Whether the layer's policy scores as `ButlerPolicy` does (a subclass that scores otherwise is not fused)."""
    return type(layer.settings.policy).score is ButlerPolicy.score


def _row_budget(inputs: ScoringInputs) -> int | None:
    """The row budget where the compiled butler kernels can serve this decode row (no padding, a budget below the
    context), else None."""
    L = inputs.key.shape[2]
    n = inputs.layer.settings.budget.max_selected(L)
    return n if inputs.all_valid and n < L and _is_butler(inputs.layer) else None


def _scorable(inputs: ScoringInputs) -> bool:
    """Whether the importance queries and keys are in the compiled kernels' form (else the PyTorch path runs, and
    `ButlerPolicy.score` raises on out-of-sync predictor state)."""
    queries, keys = inputs.layer.importance_queries, inputs.layer.importance_keys
    return (
        queries is not None
        and keys is not None
        and keys.shape[2] == inputs.key.shape[2]
        and keys.dtype == torch.float32
        # importance keys per KV head (strided predictor) or per query head (attentive)
        and keys.shape[1] in (inputs.num_key_value_heads, queries.shape[1])
    )


class NumbaBackend(TorchBackend):
    """The numba decode paths of one `ButlerLayer` (see the module docstring)."""

    name = "numba"
    feature_major = True

    def __init__(self, device: torch.device, requested: str = "numba"):
        super().__init__(device, requested)
        self.step_state: NumbaDecodeStep | None = None  # made by `append` when the storages have room

    def release(self) -> None:
        self.step_state = None  # its views no longer serve; let go of its storages

    def append(self, layer: ButlerLayer, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """K/V rows and their importance keys written into the storages' spare rows in one compiled call, through
        the layer's `NumbaDecodeStep` (made anew when the last one no longer serves); False if it did nothing."""
        state = self.step_state
        if state is None or not state.serves(layer):
            state = self.step_state = NumbaDecodeStep.for_layer(layer)
            if state is None:
                return False
        if not state.append(layer, key_states, value_states):
            return False
        layer.keys, layer.values, layer.importance_keys = state.views
        return True

    def step(self, inputs: ScoringInputs, value: torch.Tensor) -> torch.Tensor | None:
        """The whole butler decode step of the layer in one compiled call, with the prediction interval and
        neighbour fetching (`PredictionReuse.fused`): through the kept `NumbaDecodeStep` where it serves, else
        through `butler_decode_cpu` on the layer's tensors."""
        state = self.step_state
        if state is not None:
            out = state.attend(inputs.layer, inputs.query, value, inputs.scaling)
            if out is not None:
                return out
        n = _row_budget(inputs)
        if n is None or not numba_serves(inputs.query, inputs.key, value):
            return None
        layer = inputs.layer
        budget = layer.settings.budget

        def run(kept: torch.Tensor | None, keep: bool):
            if kept is None and not _scorable(inputs):  # a reusing step reads no importance state
                return None
            result = decode_step_cpu.butler_decode_cpu(
                layer.importance_queries, layer.importance_keys, layer.predictor.config.score_scale,
                inputs.query, inputs.key, value, inputs.scaling, budget.sink_tokens, budget.local_window, n,
                reuse_scores=kept, return_scores=keep, neighbours=layer.settings.neighbor_fetch,
            )  # [B, 1, HQ, Dv], with this step's prediction [B, H_kv, 1, L] where `keep`
            return result if keep else (result, None)

        return layer.reuse.fused(inputs.key.shape[0], inputs.num_key_value_heads, inputs.key.shape[2], run)

    def select(self, inputs: ScoringInputs) -> Selection:
        """Scoring and top-k in one compiled pass per KV head (butler policy, one unpadded row, a prediction at
        every step, no neighbour fetching), else the PyTorch path."""
        layer = inputs.layer
        n = _row_budget(inputs)
        if n is None or layer.reuse.interval != 1 or layer.settings.neighbor_fetch or not _scorable(inputs):
            return super().select(inputs)
        budget = layer.settings.budget
        indices = scoring_cpu.score_select_decode_cpu(
            layer.importance_queries, layer.importance_keys, layer.predictor.config.score_scale, budget.sink_tokens,
            budget.local_window, n, kv_heads=inputs.num_key_value_heads,
        )  # [B, H_kv, 1, n]
        return Selection(indices, torch.ones_like(indices, dtype=torch.bool), all_kept=True)

    def attend(self, inputs: ScoringInputs, value: torch.Tensor, selection: Selection) -> torch.Tensor:
        if not numba_serves(inputs.query, inputs.key, value):
            return super().attend(inputs, value, selection)
        keep = None if selection.all_kept else selection.keep
        return sparse_attention_cpu.sparse_decode_attention_cpu(inputs.query, inputs.key, value, selection.indices,
                                                                keep, inputs.scaling)  # [B, 1, HQ, Dv]


class NumbaDecodeStep:
    """The numba update and attention of one `ButlerLayer`'s decode steps (see the module docstring).

    Holds views of the layer's storages, not the layer, so that a cache dropped by its user frees its memory at
    once (no reference cycle).
    """

    def __init__(self, layer: ButlerLayer, rows_left: int, threads: int):
        self.views = (layer.keys, layer.values, layer.importance_keys)  # the layer's tensors while this step serves
        self._storages = tuple(layer.storage(name) for name in _STORED)
        self.length = layer.keys.shape[-2]
        self.rows_left = rows_left  # rows every storage still has past `length`
        B, H, _, D = layer.keys.shape
        HQ = layer.predictor.config.base_model.num_attention_heads
        Dv, E = layer.values.shape[-1], layer.importance_keys.shape[-1]
        self._heads, self._key_dim, self._value_dim = (B, H), D, Dv
        self._query_shape, self._importance_query_shape = (B, HQ, 1, D), (B, HQ, 1, E)
        self._out_shape, self._result_shape = (B, H, HQ // H, Dv), (B, 1, HQ, Dv)
        # the storages in the kernels' forms: `cpu_utils.flat_view` for the update, `flat_rows` and
        # `importance_key_strides` for the fused step (keys per KV head, as `for_layer` requires: shared by the group)
        self._flat = tuple(flat_view(storage) for storage in self._storages)
        self._key_rows, self._value_rows = self._flat[0][:4], self._flat[1][:4]
        self._importance_keys = (*self._flat[2], 0)
        self._importance_scale = np.float32(layer.predictor.config.score_scale)
        self._threads = threads

    @classmethod
    def for_layer(cls, layer: ButlerLayer) -> NumbaDecodeStep | None:
        """A step for ``layer`` where the numba path can serve its next updates, else None: a predictor whose
        importance keys are a projection of the real keys, float32 CPU storages with contiguous K/V rows,
        importance keys in sync with the K/V, and spare rows in all three storages."""
        if layer.predictor is None or not layer.is_initialized or layer.keys.device.type != "cpu":
            return None
        importance_keys = layer.importance_keys
        if (
            layer.predictor.key_projection(layer.layer_idx) is None
            or importance_keys is None
            or importance_keys.shape[-2] != layer.keys.shape[-2]
            or importance_keys.shape[1] != layer.keys.shape[1]  # per KV head (the strided predictor's)
            or not all(t.dtype == torch.float32 for t in (layer.keys, layer.values, importance_keys))
        ):
            return None
        rows_left = min(layer.spare_rows(name) for name in _STORED)  # 0 also where a storage is missing
        if rows_left < 1 or any(flat_view(layer.storage(name))[4] != 1 for name in ("keys", "values")):
            return None
        import numba

        return cls(layer, rows_left, numba.get_num_threads())

    def serves(self, layer: ButlerLayer) -> bool:
        """Whether ``layer``'s tensors are still the views this step made."""
        views = self.views
        return layer.keys is views[0] and layer.values is views[1] and layer.importance_keys is views[2]

    def append(self, layer: ButlerLayer, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Write the new rows ``[B, H, T, D]`` and their importance keys into the storages and move `views` on by
        ``T`` rows; False (nothing written) where the numba update cannot take them (no room, another shape or
        dtype, autograd)."""
        T = key_states.shape[2]
        B, H = self._heads
        if (
            T > self.rows_left
            or key_states.dtype is not torch.float32
            or value_states.dtype is not torch.float32
            or key_states.shape != (B, H, T, self._key_dim)
            or value_states.shape != (B, H, T, self._value_dim)
        ):
            return False
        weight = layer.predictor.key_projection(layer.layer_idx)  # [H, D, d'], read every step: it may be trained
        if weight.dtype is not torch.float32 or torch.is_grad_enabled() and (
            weight.requires_grad or key_states.requires_grad or value_states.requires_grad
        ):
            return False
        cache_update_cpu.append_and_project_cpu(key_states, value_states, weight, *self._flat, self.length)
        self.length += T
        self.rows_left -= T
        self.views = tuple(storage.narrow(-2, 0, self.length) for storage in self._storages)
        return True

    def attend(self, layer: ButlerLayer, query: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor | None:
        """The sparse attention ``[B, 1, HQ, Dv]`` of an unpadded one-row decode step whose update this step made,
        ``query`` ``[B, HQ, 1, D]``; None where `NumbaBackend.step` must decide (another policy, the budget covering
        the context, importance queries missing or of another shape or dtype, a kept prediction of another
        form)."""
        if (
            not self.serves(layer)
            or value is not self.views[1]
            or not _is_butler(layer)
            or query.dtype is not torch.float32
            or query.shape != self._query_shape
        ):
            return None
        settings = layer.settings
        budget, L = settings.budget, self.length
        n, sinks, window = budget.max_selected(L), budget.sink_tokens, budget.local_window
        if not sinks + window <= n < L:
            return None
        splits = decode_step_cpu.default_splits(self._heads[0] * self._heads[1], L, n, self._threads)
        out = np.empty(self._out_shape, np.float32)
        if settings.prediction_interval == 1 and not settings.neighbor_fetch:
            queries = self._importance_queries(layer)
            if queries is None:
                return None
            decode_step_cpu.decode_step_flat(queries, self._importance_scale, self._importance_keys, query.numpy(),
                                             self._key_rows, self._value_rows, L, sinks, window, n, np.float32(scale),
                                             splits, out)
            return torch.from_numpy(out).view(self._result_shape)
        return self._attend_with_interval(layer, query, scale, L, n, sinks, window, splits, out)

    def _importance_queries(self, layer: ButlerLayer) -> np.ndarray | None:
        """The step's importance queries as numpy, None where the producers left none of the expected form."""
        queries = layer.importance_queries
        if queries is None or queries.dtype is not torch.float32 or queries.shape != self._importance_query_shape:
            return None
        return queries.numpy()

    def _attend_with_interval(self, layer: ButlerLayer, query: torch.Tensor, scale: float, L: int, n: int,
                              sinks: int, window: int, splits: tuple[int, int], out: np.ndarray) -> torch.Tensor | None:
        """`attend` with a prediction interval or neighbour fetching (`PredictionReuse.fused`): a step that reuses
        the kept prediction scores nothing; one that predicts keeps its scores ``[B, H, 1, L]`` for the next steps."""
        B, H = self._heads

        def run(kept: torch.Tensor | None, keep: bool):
            new = torch.empty(B, H, 1, L) if keep else None
            if kept is not None:
                queries, scores = decode_step_cpu.NO_QUERIES, kept.contiguous().numpy().reshape(B * H, kept.shape[3])
            else:
                queries = self._importance_queries(layer)
                if queries is None:
                    return None
                scores = new.numpy().reshape(B * H, L) if keep else decode_step_cpu.NO_SCORES
            decode_step_cpu.decode_step_flat(queries, self._importance_scale, self._importance_keys, query.numpy(),
                                             self._key_rows, self._value_rows, L, sinks, window, n, np.float32(scale),
                                             splits, out, scores, 0 if kept is None else kept.shape[3], keep,
                                             layer.settings.neighbor_fetch)
            return torch.from_numpy(out).view(self._result_shape), new

        return layer.reuse.fused(B, H, L, run)
