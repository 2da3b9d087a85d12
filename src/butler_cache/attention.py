"""`butler_attention_forward`: the attention function butler_cache registers with transformers.

It runs transformers' own SDPA attention unless the decoder layer's hook handed it a `ButlerLayer` (keyword
``butler_layer``) whose forward is sparse; then the layer attends (`ButlerLayer.attend_sparse`). Attaching it to a
model is `butler_cache.hooks`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .capture import CAPTURE
from .compat import sdpa_attention_forward

if TYPE_CHECKING:
    from .layer import ButlerLayer

# No "/", "sdpa", "flash" or "flex" in the name: transformers gives those special handling.
ATTENTION_NAME = "butler_cache"


def butler_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    butler_layer: ButlerLayer | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface. ``query`` ``[B, HQ, T, D]``, ``key``/``value`` ``[B, H_kv, L, D]``.

    Returns ``([B, T, HQ, D], None)``.
    """
    if not torch.compiler.is_compiling():  # dynamo reads no ContextVar (captures, for distillation, run eager)
        capture = CAPTURE.get()
        if capture is not None:
            capture.record_attention(module.layer_idx, query, key, scaling)
    if butler_layer is not None and not kwargs.get("sliding_window") and not (dropout and module.training):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = butler_layer.attend_sparse(query, key, value, attention_mask, scale)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
