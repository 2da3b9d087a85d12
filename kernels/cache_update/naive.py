"""Reference of the CPU cache update in plain PyTorch: the new K/V rows and their importance keys appended.

`cpu.append_and_project_cpu` writes the same rows in place into the storages' spare rows; it is tested against
`append_and_project_naive` (equal up to float rounding of the projection).
"""

from __future__ import annotations

import torch


def append_and_project_naive(
    keys: torch.Tensor, values: torch.Tensor, importance_keys: torch.Tensor,
    key_states: torch.Tensor, value_states: torch.Tensor, weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache ``[B, H, L, D]``, ``[B, H, L, Dv]``, ``[B, H, L, d']`` grown by ``key_states`` ``[B, H, T, D]`` and
    ``value_states`` ``[B, H, T, Dv]``, whose importance keys are ``key_states[:, h] @ weight[h]`` (``weight``
    ``[H, D, d']``, the strided predictor's key projection)."""
    projected = torch.einsum("bhtd,hde->bhte", key_states, weight)  # [B, H, T, d']
    return (torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2),
            torch.cat([importance_keys, projected], dim=2))
