"""How many tokens each query may attend to, per KV head, sinks and local window included."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# ceil(0.1 * 30) must be 3, not 4: round products within this of an integer down to it
_EPS = 1e-9


@dataclass(frozen=True)
class TokenBudget:
    """A per-query, per-KV-head attention budget.

    Exactly one of ``token_budget`` (a fixed count) and ``budget_ratio`` (a fraction of the
    query's causal past, rounded up) is set. The budget counts everything attended: the first
    ``sink_tokens`` tokens, the ``local_window`` most recent tokens (the query's own included) and
    the top-scored tokens that fill the rest. Sinks and window are always kept, so a ratio budget
    never drops below ``min(context, sink_tokens + local_window)``.
    """

    token_budget: int | None = None
    budget_ratio: float | None = None
    sink_tokens: int = 4
    local_window: int = 16

    def __post_init__(self) -> None:
        if (self.token_budget is None) == (self.budget_ratio is None):
            raise ValueError(
                f"give exactly one of token_budget and budget_ratio (got token_budget={self.token_budget!r}, "
                f"budget_ratio={self.budget_ratio!r})"
            )
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens={self.sink_tokens!r} must be an integer >= 0")
        if not isinstance(self.local_window, int) or self.local_window < 1:
            raise ValueError(
                f"local_window={self.local_window!r} must be an integer >= 1 (the query's own token is in it)"
            )
        if self.token_budget is not None:
            if isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int) or self.token_budget <= 0:
                raise ValueError(f"token_budget={self.token_budget!r} must be a positive integer")
            if self.token_budget < self.sink_tokens + self.local_window:
                raise ValueError(
                    f"token_budget={self.token_budget} cannot hold sink_tokens={self.sink_tokens} + "
                    f"local_window={self.local_window}; use token_budget >= {self.sink_tokens + self.local_window} "
                    "or fewer sinks / a smaller window"
                )
        else:
            ratio = self.budget_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
                raise ValueError(f"budget_ratio={ratio!r} must lie in (0, 1]")

    @property
    def forced(self) -> int:
        """Tokens kept whatever their score: sinks plus window."""
        return self.sink_tokens + self.local_window

    def covers(self, context: int) -> bool:
        """True when every query with at most ``context`` past tokens attends to all of them."""
        if self.token_budget is not None:
            return context <= self.token_budget
        return self.budget_ratio >= 1.0 or context <= self.forced

    def max_selected(self, context: int) -> int:
        """Upper bound of the per-row budget over rows of at most ``context`` tokens (host int, no sync)."""
        return min(context, self.for_length(context))

    def for_length(self, context: int) -> int:
        if self.token_budget is not None:
            return max(self.token_budget, min(context, self.forced))
        return max(math.ceil(self.budget_ratio * context - _EPS), min(context, self.forced))

    def per_row(self, context: torch.Tensor) -> torch.Tensor:
        """Budget of each query row, given the number of tokens it may see. ``context``: integer tensor, any shape."""
        forced = torch.clamp(context, max=self.forced)
        if self.token_budget is not None:
            budget = torch.clamp(forced, min=self.token_budget)
        else:
            budget = torch.ceil(context.to(torch.float64) * self.budget_ratio - _EPS).to(context.dtype)
            budget = torch.maximum(budget, forced)
        return torch.minimum(budget, context)
