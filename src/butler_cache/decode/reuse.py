"""`PredictionReuse`: the prediction interval and neighbour fetching of one sparse layer's decode steps.

With ``prediction_interval`` = n a layer predicts (scores its cached tokens) at one decode step in n and reuses
that prediction at the others, the tokens added since ranked first (they were never scored). With
``neighbor_fetch`` each run of selected positions also brings the position just after it. Every decode backend
goes through this one helper: the PyTorch paths through `scores` and `add_neighbours`, the fused CPU step through
`fused` (which hands the kept prediction to the kernel instead of concatenating scores).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..selection import Selection, with_neighbors

if TYPE_CHECKING:
    from ..layer import SparseAttentionSettings

# A fused decode call as `PredictionReuse.fused` runs it: (kept prediction or None, keep this step's) ->
# (attention output [B, 1, HQ, Dv], this step's prediction [B, H_kv, 1, L] or None), or None where it cannot serve.
FusedDecode = Callable[[torch.Tensor | None, bool], tuple[torch.Tensor, torch.Tensor | None] | None]


class PredictionReuse:
    """The last prediction of one layer and the decode steps it has served (see the module docstring)."""

    def __init__(self, settings: SparseAttentionSettings):
        self.settings = settings  # read at every step: the interval and neighbour fetching are the cache's settings
        self.last_scores: torch.Tensor | None = None  # [B, H_kv, 1, L_then]
        self.age = 0  # decode steps served by `last_scores` after the one that predicted it

    @property
    def interval(self) -> int:
        return self.settings.prediction_interval

    def reuses(self) -> bool:
        """Whether the next decode step reuses the last prediction instead of scoring."""
        return self.last_scores is not None and self.age + 1 < self.interval

    def forget(self) -> None:
        """Drop the kept prediction (a cache operation changed the tokens): the next decode step predicts afresh."""
        self.last_scores = None

    def scores(self, score: Callable[[], torch.Tensor], kv_len: int) -> torch.Tensor:
        """Scores ``[B, H_kv, 1, kv_len]`` for a decode step: ``score()`` every ``interval`` steps, in between the
        kept prediction with the newer tokens at +inf."""
        if self.interval == 1:
            return score()
        if self.reuses():
            last = self._reuse()
            fresh = last.new_full((*last.shape[:-1], kv_len - last.shape[-1]), float("inf"))
            return torch.cat([last, fresh], dim=-1)
        return self._keep(score())

    def fused(self, batch: int, kv_heads: int, kv_len: int, run: FusedDecode) -> torch.Tensor | None:
        """`scores` for a call that scores, selects and attends at once: ``run(kept, keep)`` gets the kept
        prediction to reuse (float32 ``[B, H_kv, 1, L' <= kv_len]``; None: score afresh) and whether to return this
        step's prediction, and returns ``(out, scores or None)``, or None where it cannot serve. None also where the
        kept prediction has another form (then `scores` reuses it)."""
        keeping = self.interval > 1
        kept = self.last_scores if keeping and self.reuses() else None  # [B, H_kv, 1, L'] or None
        if kept is not None and (
            kept.dtype != torch.float32 or kept.shape[:3] != (batch, kv_heads, 1) or kept.shape[3] > kv_len
        ):
            return None
        result = run(kept, keeping and kept is None)
        if result is None:
            return None
        out, scores = result
        if kept is not None:
            self._reuse()
        elif keeping:
            self._keep(scores)
        return out

    def add_neighbours(self, selection: Selection, valid: torch.Tensor, kv_len: int) -> Selection:
        """With ``neighbor_fetch``: the selection plus, for each run of selected positions, the one after it."""
        return with_neighbors(selection, valid, kv_len) if self.settings.neighbor_fetch else selection

    def _reuse(self) -> torch.Tensor:
        self.age += 1
        return self.last_scores

    def _keep(self, scores: torch.Tensor) -> torch.Tensor:
        self.last_scores, self.age = scores, 0
        return scores
