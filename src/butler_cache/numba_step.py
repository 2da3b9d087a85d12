"""`NumbaDecodeStep`: a sparse layer's decode step on the CPU, with the Python around its compiled calls cut down
to what changes from one step to the next.

With the numba backend, the decode step of a `ButlerLayer` is two compiled calls: the cache update
(`kernels/cache_update_cpu.py`: the new K/V rows and their importance keys written into the storages' spare
rows) and the fused score + select + attend (`kernels/decode_step_cpu.py`). At 8k tokens the Python around them
cost about a third as much as the kernels themselves, because the decoder layer's weights, streamed between two
layers, evict that Python's code and data: each check and each tensor-to-numpy conversion costs several times its
warm price.

A layer makes a `NumbaDecodeStep` when its storages have room. The step keeps what stays the same between steps:
the flat numpy views of the three storages, their layout checks, the shapes, numba's thread count. It serves
while the layer's tensors are the very views it made. Every cache operation replaces them, and so does an append
by the PyTorch path; then the layer makes a new step. Each step checks only what a step can change: the new rows'
shapes and dtypes, the room left, autograd, the importance queries, the settings. Where it does not serve, the
general paths run: the same kernels, through `ButlerPolicy.attend_decode`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .kernels import numba_module, resolve_backend
from .policies.butler import ButlerPolicy

if TYPE_CHECKING:
    from .cache import ButlerLayer

_STORED = ("keys", "values", "importance_keys")


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
        self._flat = tuple(layer.flat_storage(name) for name in _STORED)
        self._key_rows, self._value_rows = self._flat[0][:4], self._flat[1][:4]
        self._importance_keys = (*self._flat[2], 0)
        self._importance_scale = np.float32(layer.predictor.config.score_scale)
        self._threads = threads
        self._backend = layer.settings.backend  # resolved to numba for these CPU storages (see `for_layer`)

    @classmethod
    def for_layer(cls, layer: ButlerLayer) -> NumbaDecodeStep | None:
        """A step for ``layer`` where the numba path can serve its next updates, else None: numba backend, a
        predictor whose importance keys are a projection of the real keys, float32 CPU storages with contiguous
        K/V rows, importance keys in sync with the K/V, and spare rows in all three storages."""
        if layer.predictor is None or not layer.is_initialized or layer.keys.device.type != "cpu":
            return None
        if resolve_backend(layer.settings.backend, layer.keys.device) != "numba":
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
        if rows_left < 1 or layer.flat_storage("keys")[4] != 1 or layer.flat_storage("values")[4] != 1:
            return None
        import numba

        return cls(layer, rows_left, numba.get_num_threads())

    def serves(self, layer: ButlerLayer) -> bool:
        """Whether ``layer``'s tensors are still the views this step made (and its backend still numba)."""
        views = self.views
        return (
            layer.keys is views[0] and layer.values is views[1] and layer.importance_keys is views[2]
            and layer.settings.backend == self._backend  # same setting, same storages: still numba
        )

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
        numba_module("cache_update_cpu").append_and_project_cpu(key_states, value_states, weight, *self._flat, self.length)
        self.length += T
        self.rows_left -= T
        self.views = tuple(storage.narrow(-2, 0, self.length) for storage in self._storages)
        return True

    def attend(self, layer: ButlerLayer, query: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor | None:
        """The sparse attention ``[B, 1, HQ, Dv]`` of an unpadded one-row decode step whose update this step made,
        ``query`` ``[B, HQ, 1, D]``; None where the general path must decide (other settings or policy, the budget
        covering the context, importance queries missing or of another shape or dtype, a kept prediction of
        another form). With ``prediction_interval`` > 1 it keeps its prediction in ``layer.last_scores`` or reuses
        the one kept there, as the general path does (`ButlerLayer.decode_scores`)."""
        settings = layer.settings
        policy = settings.policy
        if (
            not self.serves(layer)
            or value is not self.views[1]
            or type(policy).attend_decode is not ButlerPolicy.attend_decode
            or policy.stateful
            or layer.stats is not None
            or query.dtype is not torch.float32
            or query.shape != self._query_shape
        ):
            return None
        budget, L = settings.budget, self.length
        n, sinks, window = budget.max_selected(L), budget.sink_tokens, budget.local_window
        if not sinks + window <= n < L:
            return None
        kernels = numba_module("decode_step_cpu")
        splits = kernels.default_splits(self._heads[0] * self._heads[1], L, n, self._threads)
        out = np.empty(self._out_shape, np.float32)
        if settings.prediction_interval == 1 and not settings.neighbor_fetch:
            queries = self._importance_queries(layer)
            if queries is None:
                return None
            kernels.decode_step_flat(queries, self._importance_scale, self._importance_keys, query.numpy(),
                                     self._key_rows, self._value_rows, L, sinks, window, n, np.float32(scale), splits, out)
            return torch.from_numpy(out).view(self._result_shape)
        return self._attend_with_interval(kernels, layer, query, scale, L, n, sinks, window, splits, out)

    def _importance_queries(self, layer: ButlerLayer) -> np.ndarray | None:
        """The step's importance queries as numpy, None where the producers left none of the expected form."""
        queries = layer.importance_queries
        if queries is None or queries.dtype is not torch.float32 or queries.shape != self._importance_query_shape:
            return None
        return queries.numpy()

    def _attend_with_interval(self, kernels, layer: ButlerLayer, query: torch.Tensor, scale: float, L: int, n: int,
                              sinks: int, window: int, splits: tuple[int, int], out: np.ndarray) -> torch.Tensor | None:
        """`attend` with a prediction interval or neighbour fetching (`ButlerLayer.fused_decode`): a step that reuses
        the kept prediction scores nothing; one that predicts keeps its scores ``[B, H, 1, L]`` for the next steps."""
        B, H = self._heads

        def run(kept: torch.Tensor | None, keep: bool):
            new = torch.empty(B, H, 1, L) if keep else None
            if kept is not None:
                queries, scores = kernels.NO_QUERIES, kept.contiguous().numpy().reshape(B * H, kept.shape[3])
            else:
                queries = self._importance_queries(layer)
                if queries is None:
                    return None
                scores = new.numpy().reshape(B * H, L) if keep else kernels.NO_SCORES
            kernels.decode_step_flat(queries, self._importance_scale, self._importance_keys, query.numpy(),
                                     self._key_rows, self._value_rows, L, sinks, window, n, np.float32(scale), splits,
                                     out, scores, 0 if kept is None else kept.shape[3], keep,
                                     layer.settings.neighbor_fetch)
            return torch.from_numpy(out).view(self._result_shape), new

        return layer.fused_decode(H, L, run)
