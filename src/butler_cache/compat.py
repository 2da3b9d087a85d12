"""What differs between the transformers 5.x releases butler_cache supports (``transformers>=5.17,<6``)."""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

# transformers 5.24 renamed the cache argument of the models' forward and of `generate` from ``past_key_values`` to
# ``cache``; the old name warns there and goes in 5.40 (forward) and 6.0 (`generate`).
CACHE_ARGUMENT = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


def cache_argument(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)`` and ``model.generate(...)``, under the installed transformers' name."""
    return {CACHE_ARGUMENT: cache}
