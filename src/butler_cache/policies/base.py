"""The interface every selection policy implements, and the registry that names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ..layer import ButlerLayer
    from ..selection import Selection

POLICIES: dict[str, type[SelectionPolicy]] = {}


@dataclass
class ScoringInputs:
    """What a policy may look at when scoring the keys of one layer for the current queries."""

    query: torch.Tensor  # [B, HQ, T, D], post-RoPE
    key: torch.Tensor  # [B, H_kv, L, D], the full cache, post-RoPE
    valid: torch.Tensor  # [B or 1, 1 or H_kv, T, L] bool, keys each query row may see
    scaling: float  # the model's softmax scale
    layer: ButlerLayer  # the cache layer (predictor state lives there)
    all_valid: bool = False  # known on the host: every query row may see every key (``valid`` all True)

    @property
    def num_key_value_heads(self) -> int:
        return self.key.shape[1]


class SelectionPolicy:
    """Scores cached keys; the cache keeps sinks + window + the top-scored keys within the budget.

    A policy implements `score`, returning ``[B, H_kv, T, L]`` (higher = keep), one score per KV head
    so that a GQA group shares one selection and each selected K/V row is read once. Subclasses
    register themselves under ``name``. ``requires_predictor`` policies need a `ButlerPredictor`.
    """

    name: ClassVar[str] = ""
    requires_predictor: ClassVar[bool] = False
    stateful: ClassVar[bool] = False  # True: `observe` is called after every forward of a sparse layer

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            POLICIES[cls.name] = cls

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, inputs: ScoringInputs, selection: Selection | None) -> None:
        """Stateful policies: update per-token state (``inputs.layer.token_state``) after a forward.

        ``selection`` is None when the forward ran dense (the budget covered the context, or prefill).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def group_max_probabilities(logits: torch.Tensor, valid: torch.Tensor | None, num_key_value_heads: int) -> torch.Tensor:
    """Per-head softmax over the valid keys, then the max over each GQA group.

    ``logits``: ``[B, HQ, T, L]``; ``valid``: broadcastable ``[B, 1, T, L]``, or None when every key is
    valid for every row (skips the masking). Returns ``[B, H_kv, T, L]``.
    A key matters to the group if it matters to any of its heads; probabilities (not logits) are
    compared so that heads with different softmax normalisers are on one scale.
    """
    B, HQ, T, L = logits.shape
    if valid is None:
        probs = torch.softmax(upcast(logits), dim=-1)
    else:
        probs = torch.softmax(upcast(logits).masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.view(B, num_key_value_heads, HQ // num_key_value_heads, T, L).amax(dim=2)


def true_probabilities(inputs: ScoringInputs, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The current queries' attention probabilities per query head, ``[B, HQ, T, L]``, over ``mask``
    (``[B|1, H_kv|1, T, L]`` bool, default: the valid keys)."""
    q, k = inputs.query, inputs.key
    B, HQ, T, D = q.shape
    H = k.shape[1]
    logits = torch.einsum("bhgtd,bhld->bhgtl", upcast(q.view(B, H, HQ // H, T, D)), upcast(k)) * inputs.scaling
    mask = inputs.valid if mask is None else mask
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))  # [B, H, G, T, L]
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).reshape(B, HQ, T, -1)


def group_sum(probs: torch.Tensor, num_key_value_heads: int) -> torch.Tensor:
    """``[B, HQ, T, L]`` -> ``[B, H_kv, T, L]``: summed over the query heads of each GQA group."""
    B, HQ, T, L = probs.shape
    return probs.view(B, num_key_value_heads, HQ // num_key_value_heads, T, L).sum(dim=2)


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32; float32 and float64 stay as they are."""
    return tensor.float() if tensor.element_size() < 4 else tensor


def make_policy(policy: str | SelectionPolicy) -> SelectionPolicy:
    """A policy instance from its registered name (or the instance itself)."""
    if isinstance(policy, SelectionPolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not known; expected one of {sorted(POLICIES)}")
    return POLICIES[policy]()
