"""Random selection within the budget: the floor every policy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoringInputs, SelectionPolicy


@dataclass
class RandomPolicy(SelectionPolicy):
    """Sinks + window + uniformly random other tokens (a fresh draw per forward, from ``seed``)."""

    name = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        device = inputs.key.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        B, H, L = inputs.key.shape[0], inputs.num_key_value_heads, inputs.key.shape[2]
        return torch.rand(B, H, inputs.query.shape[2], L, device=device, generator=self._generators[device])
