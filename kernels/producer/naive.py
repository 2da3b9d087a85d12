"""Reference of the strided predictor's importance-query producer: LayerNorm, linear, SiLU, linear.

`cpu.importance_queries_cpu` computes the same for the few rows of a decode step in one compiled call; it is
tested against `importance_queries_naive` (equal up to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def importance_queries_naive(norm: nn.LayerNorm, up: nn.Linear, down: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """``down(silu(up(norm(hidden_states))))`` for ``hidden_states`` ``[B, T, D]`` -> ``[B, T, O]``."""
    return down(F.silu(up(norm(hidden_states))))
