"""`TorchBackend`: a sparse layer's decode step in plain PyTorch (any device), and the base of the other backends.

A step is: `select` (the policy's scores, reused between predictions by `PredictionReuse`, then sinks + window +
top-k per KV head, then neighbour fetching) and, for one decode row, `attend` (attention over the selected K/V
rows only; several rows, as with ``sparse_prefill``, run `masked_attention`, the reference, on every backend). `append`
and `step` are the hooks of backends with their own cache update or a fused step (the numba one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels.sparse_attention import sparse_decode_attention_torch
from ..policies import ScoringInputs
from ..selection import Selection, select_decode_tokens, select_tokens

if TYPE_CHECKING:
    from ..layer import ButlerLayer


class TorchBackend:
    """The PyTorch decode paths of one `ButlerLayer` on ``device`` (see the module docstring)."""

    name = "torch"
    feature_major = False  # the layout of the importance keys' storage (see `growth.append_rows`)

    def __init__(self, device: torch.device, requested: str = "torch"):
        self.device = device
        self.requested = requested  # the cache's ``backend`` setting this backend was made for ("auto", ...)

    def append(self, layer: ButlerLayer, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Write the new K/V rows ``[B, H_kv, T, D]`` (and their importance keys) into the layer's storages itself;
        False to have the layer append them (`GrowingLayer.update`)."""
        return False

    def release(self) -> None:
        """Let go of state kept between steps (a cache operation replaced the layer's tensors)."""

    def step(self, inputs: ScoringInputs, value: torch.Tensor) -> torch.Tensor | None:
        """A fused score + select + attend of one unpadded decode row ``[B, 1, HQ, Dv]``, asked only when nothing
        else needs the selection (no stats, stateless policy); None to run `select` and `attend`."""
        return None

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """The policy's scores ``[B, H_kv, T, L]`` (higher = keep)."""
        return inputs.layer.settings.policy.score(inputs)

    def select(self, inputs: ScoringInputs) -> Selection:
        """Sinks + window + top-scored keys per KV head and query row, ``[B, H_kv, T, K]``."""
        layer, kv_len = inputs.layer, inputs.key.shape[2]
        budget = layer.settings.budget
        if inputs.query.shape[2] == 1:
            scores = layer.reuse.scores(lambda: self.score(inputs), kv_len)  # [B, H_kv, 1, L]
        else:
            scores = self.score(inputs)  # [B, H_kv, T, L]
        if inputs.all_valid:
            selection = select_decode_tokens(scores, budget)
        else:
            selection = select_tokens(scores, inputs.valid, budget)
        return layer.reuse.add_neighbours(selection, inputs.valid, kv_len)

    def attend(self, inputs: ScoringInputs, value: torch.Tensor, selection: Selection) -> torch.Tensor:
        """One decode row's attention over the selected K/V rows ``[B, H_kv, 1, K]``, ``[B, 1, HQ, Dv]``."""
        keep = None if selection.all_kept else selection.keep
        return sparse_decode_attention_torch(inputs.query, inputs.key, value, selection.indices, keep, inputs.scaling)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"
