"""Every hook point butler_cache takes from transformers, and what differs between the releases it supports.

butler_cache extends transformers' cache layers, registers an attention function and a mask function, and hooks
the decoder's calls; those names move between minor releases. They are all looked up here, once, through
`require`, so that a release that moved one fails at import with an error naming the transformers version and
the missing piece, never with a deep AttributeError; and a release newer than the tested range warns once.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

import transformers
from packaging.version import Version

# The oldest minor release the requirements admit and the newest the whole test suite has passed on; CI (.ci/run)
# runs the suite on both (make test, make test-min).
TESTED_RANGE = ("5.17", "5.25")


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is newer than the releases butler_cache was tested on."""


class IncompatibleTransformersError(ImportError):
    """The installed transformers lacks a hook point butler_cache needs."""


def _minor(version: str) -> Version:
    release = Version(version).release
    return Version(f"{release[0]}.{release[1] if len(release) > 1 else 0}")


def check_transformers_version(version: str | None = None) -> bool:
    """True where ``version`` (default: the installed one) lies in `TESTED_RANGE`; a newer one warns (once per
    process, by the warnings filter) with the tested range; an older one is refused by the package's requirements."""
    version = version or transformers.__version__
    newest = Version(TESTED_RANGE[1])
    if _minor(version) > newest:
        warnings.warn(
            f"butler_cache was tested with transformers {TESTED_RANGE[0]} to {TESTED_RANGE[1]}, and {version} is "
            "installed: it may work, but its cache, attention and masking hooks have not been checked there "
            f"(pip install 'transformers<={TESTED_RANGE[1]}' for a tested release)",
            UntestedTransformersWarning, stacklevel=2,
        )
        return False
    return _minor(version) >= Version(TESTED_RANGE[0])


def require(module: str, name: str, role: str, version: str | None = None) -> Any:
    """``module.name`` from transformers, or an `IncompatibleTransformersError` that names the installed version,
    what is missing and what butler_cache uses it for."""
    version = version or transformers.__version__
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        if shadow := shadowing_kernels_folder():
            raise ImportError(
                f"importing `{module}.{name}` failed ({error}): the folder {shadow} of a butler_cache checkout, first on "
                "sys.path, shadows the PyPI package `kernels` that transformers imports; run Python from another "
                "folder, or as `python -P` (pytest: the `pytest` script, not `python -m pytest`)"
            ) from error
        raise IncompatibleTransformersError(
            f"transformers {version}: importing `{module}.{name}` failed ({error}); butler_cache needs it as {role} "
            f"(tested with transformers {TESTED_RANGE[0]} to {TESTED_RANGE[1]})"
        ) from error
    except AttributeError as error:
        raise IncompatibleTransformersError(
            f"transformers {version} has no `{module}.{name}`, which butler_cache needs as {role} (tested with "
            f"transformers {TESTED_RANGE[0]} to {TESTED_RANGE[1]}: pip install 'transformers<={TESTED_RANGE[1]}')"
        ) from error


def shadowing_kernels_folder() -> Path | None:
    """The repository's top-level ``kernels/`` folder where it has been imported as the top-level module ``kernels``
    (Python started in the checkout's root puts it first on sys.path), else None."""
    module = sys.modules.get("kernels")
    folder = Path(getattr(module, "__file__", None) or ".").parent
    return folder if (folder / "aot.py").is_file() and (folder.parent / "src" / "butler_cache").is_dir() else None


def require_method(owner: type, name: str, role: str, version: str | None = None) -> None:
    """Check that ``owner`` has the method ``name`` (an `IncompatibleTransformersError` otherwise)."""
    if not callable(getattr(owner, name, None)):
        raise IncompatibleTransformersError(
            f"transformers {version or transformers.__version__}: `{owner.__module__}.{owner.__name__}` has no "
            f"`{name}`, which butler_cache needs as {role} (tested with transformers {TESTED_RANGE[0]} to "
            f"{TESTED_RANGE[1]})"
        )


def load_hook_points(version: str | None = None) -> dict[str, Any]:
    """Every transformers object butler_cache hooks into, by name; an `IncompatibleTransformersError` (naming
    ``version``, default the installed one) for the first one missing."""
    hooks = {
        "DynamicCache": require("transformers.cache_utils", "DynamicCache", "the cache ButlerCache extends", version),
        "DynamicLayer": require("transformers.cache_utils", "DynamicLayer", "the cache layer ButlerLayer extends",
                                version),
        "StaticCache": require("transformers.cache_utils", "StaticCache", "the cache ButlerStaticCache extends", version),
        "StaticLayer": require("transformers.cache_utils", "StaticLayer", "the cache layer ButlerStaticLayer extends",
                               version),
        "AttentionInterface": require("transformers", "AttentionInterface", "the registry of its attention function",
                                      version),
        "sdpa_attention_forward": require("transformers.integrations.sdpa_attention", "sdpa_attention_forward",
                                          "the dense attention of its dense layers and steps", version),
        "ALL_MASK_ATTENTION_FUNCTIONS": require("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS",
                                                "the registry of its attention-mask function", version),
        "AttentionMaskInterface": require("transformers.masking_utils", "AttentionMaskInterface",
                                          "the interface of its attention-mask function", version),
    }
    for method in ("update", "get_seq_length", "get_mask_sizes", "reset", "crop", "reorder_cache",
                   "batch_repeat_interleave", "batch_select_indices", "offload", "prefetch"):
        require_method(hooks["DynamicLayer"], method, "a cache-layer method ButlerLayer overrides", version)
    for method in ("lazy_initialization", "update", "reset", "reorder_cache"):
        require_method(hooks["StaticLayer"], method, "a cache-layer method ButlerStaticLayer overrides", version)
    return hooks


check_transformers_version()
_HOOKS = load_hook_points()
DynamicCache = _HOOKS["DynamicCache"]
DynamicLayer = _HOOKS["DynamicLayer"]
StaticCache = _HOOKS["StaticCache"]
StaticLayer = _HOOKS["StaticLayer"]
AttentionInterface = _HOOKS["AttentionInterface"]
sdpa_attention_forward = _HOOKS["sdpa_attention_forward"]
ALL_MASK_ATTENTION_FUNCTIONS = _HOOKS["ALL_MASK_ATTENTION_FUNCTIONS"]
AttentionMaskInterface = _HOOKS["AttentionMaskInterface"]

# transformers 5.24 renamed the cache argument of the models' forward and of `generate` from ``past_key_values`` to
# ``cache``; the old name warns there and goes in 5.40 (forward) and 6.0 (`generate`).
CACHE_ARGUMENT = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


def cache_argument(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)`` and ``model.generate(...)``, under the installed transformers' name."""
    return {CACHE_ARGUMENT: cache}
