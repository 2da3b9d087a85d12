"""The attention function butler_cache registers with transformers, and attaching it to a model.

`butler_attention_forward` runs transformers' own SDPA attention unless the call comes from a
`ButlerLayer` of a `ButlerCache` whose budget does not cover the context; then it scores the cached
keys with the cache's policy, selects per KV head, and attends over the selected rows only.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from .architecture import check_supported, decoder_layers
from .cache import ACTIVE_LAYER, ButlerCache, ButlerLayer
from .capture import CAPTURE
from .compat import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionInterface,
    AttentionMaskInterface,
    require_method,
    sdpa_attention_forward,
)
from .kernels import sparse_attention
from .policies import ScoringInputs
from .predictor import LayerInput
from .selection import key_validity, select_decode_tokens, select_tokens, with_neighbors

# No "/", "sdpa", "flash" or "flex" in the name: transformers gives those special handling.
ATTENTION_NAME = "butler_cache"

_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, list[RemovableHandle]]] = weakref.WeakKeyDictionary()


def register() -> None:
    """Register the attention and mask functions under ``ATTENTION_NAME`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, butler_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def attach(model: torch.nn.Module) -> torch.nn.Module:
    """Route ``model``'s attention through butler_cache and hook its decoder layers (idempotent).

    Without a `ButlerCache` in ``past_key_values`` the model computes exactly what SDPA computes.
    """
    check_supported(model)
    if model in _ATTACHED:
        return model
    register()
    previous = model.config._attn_implementation
    require_method(type(model), "set_attn_implementation", "the switch to its attention function")
    model.set_attn_implementation(ATTENTION_NAME)
    handles = [model.get_decoder().register_forward_pre_hook(_decoder_input_hook, with_kwargs=True)]
    handles += [
        layer.register_forward_pre_hook(partial(_decoder_layer_input_hook, i), with_kwargs=True)
        for i, layer in enumerate(decoder_layers(model))
    ]
    _ATTACHED[model] = (previous, handles)
    return model


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `attach`: remove the hooks and restore the previous attention implementation."""
    entry = _ATTACHED.pop(model, None)
    if entry is not None:
        previous, handles = entry
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous or "sdpa")
    return model


def is_attached(model: torch.nn.Module) -> bool:
    return model in _ATTACHED


# The 2-D attention mask ([B, past + T], 1 = real token) of the decoder forward in flight.
_KEY_PADDING: ContextVar[torch.Tensor | None] = ContextVar("butler_cache_key_padding", default=None)


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 names it `cache`


def _decoder_input_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = _cache_of(kwargs)
    if not isinstance(cache, ButlerCache) and (torch.compiler.is_compiling() or CAPTURE.get() is None):
        # a dense call (StaticCache, DynamicCache): nothing to record, and a compiled model traces through
        # (dynamo reads no ContextVar; captures, for distillation, run eager)
        return
    mask = kwargs.get("attention_mask")
    _KEY_PADDING.set(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)


def _decoder_layer_input_hook(layer_idx: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = _cache_of(kwargs)
    capture = None if torch.compiler.is_compiling() else CAPTURE.get()
    if capture is None and not (isinstance(cache, ButlerCache) and layer_idx in cache.input_layers):
        return  # most layers host no producer: this runs before every decoder layer, so it returns early
    hidden_states = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
    inputs = LayerInput(hidden_states, kwargs.get("position_ids"), _KEY_PADDING.get())
    if isinstance(cache, ButlerCache):
        cache.on_layer_input(layer_idx, inputs)
    if capture is not None:
        capture.record_layer_input(layer_idx, inputs)


_TRUE: dict[torch.device, torch.Tensor] = {}


def _true_scalar(device: torch.device) -> torch.Tensor:
    """A 0-d ``True`` on ``device``, made once (expanded, read-only, into the all-valid mask of a decode step)."""
    true = _TRUE.get(device)
    if true is None:
        true = _TRUE[device] = torch.ones((), dtype=torch.bool, device=device)
    return true


def _take_active_layer(module: torch.nn.Module, key: torch.Tensor) -> ButlerLayer | None:
    layer = ACTIVE_LAYER.get()
    if layer is None:
        return None
    ACTIVE_LAYER.set(None)
    if layer.layer_idx != getattr(module, "layer_idx", None) or key is not layer.keys:
        return None
    return layer


def butler_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface. ``query`` ``[B, HQ, T, D]``, ``key``/``value`` ``[B, H_kv, L, D]``.

    Returns ``([B, T, HQ, D], None)``.
    """
    if torch.compiler.is_compiling():
        # a compiled model runs dense here: dynamo reads no ContextVar, and the ButlerCache decode step is not
        # graph-capturable yet (its layers hand themselves over through ACTIVE_LAYER)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    capture = CAPTURE.get()
    if capture is not None:
        capture.record_attention(module.layer_idx, query, key, scaling)
    layer = _take_active_layer(module, key)
    if layer is None or kwargs.get("sliding_window") or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is None and layer.numba_step is not None and query.shape[2] == 1:  # numba, unpadded decode
        out = layer.numba_step.attend(layer, query, value, scaling if scaling is not None else query.shape[-1] ** -0.5)
        if out is not None:  # else the general path below decides
            layer.importance_queries = None
            return out, None
    settings = layer.settings
    q_len, kv_len = query.shape[2], key.shape[2]
    dense = settings.budget.covers(kv_len) or (q_len > 1 and not settings.sparse_prefill)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    policy = settings.policy
    if dense:
        if layer.stats is not None:
            layer.stats.record(q_len, kv_len, None)
        if policy.stateful:  # e.g. H2O accumulates the attention of dense (prefill) forwards too
            valid = key_validity(attention_mask, q_len, kv_len, key.device)
            policy.observe(ScoringInputs(query=query, key=key, valid=valid, scaling=scale, layer=layer), None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    # no mask at a decode step: no padding, every cached key is valid (transformers skips the mask then)
    unpadded_decode = q_len == 1 and attention_mask is None
    if unpadded_decode:  # what key_validity returns here, without building it
        valid = _true_scalar(key.device).expand(1, 1, 1, kv_len)
    else:
        valid = key_validity(attention_mask, q_len, kv_len, key.device)  # [B|1, 1, T, L]
    inputs = ScoringInputs(query=query, key=key, valid=valid, scaling=scale, layer=layer, all_valid=unpadded_decode)
    if unpadded_decode and layer.stats is None and not policy.stateful:
        out = policy.attend_decode(inputs, value, settings.budget)  # score + select + attend in one call
        if out is not None:
            layer.importance_queries = None
            return out, None
    selection = None
    if unpadded_decode and settings.prediction_interval == 1:
        selection = policy.select_decode(inputs, settings.budget)  # fused scoring + top-k where the policy has one
    if selection is None:
        if q_len == 1:
            scores = layer.decode_scores(lambda: policy.score(inputs), kv_len)
        else:
            scores = policy.score(inputs)
        if unpadded_decode:
            selection = select_decode_tokens(scores, settings.budget)  # [B, H_kv, 1, K]
        else:
            selection = select_tokens(scores, valid, settings.budget)  # [B, H_kv, T, K]
    if settings.neighbor_fetch:
        selection = with_neighbors(selection, valid, kv_len)
    if policy.stateful:
        policy.observe(inputs, selection)
    layer.importance_queries = None
    if layer.stats is not None:
        layer.stats.record(q_len, kv_len, selection.attended())
    if q_len == 1:
        keep = None if selection.all_kept else selection.keep
        out = sparse_attention(query, key, value, selection.indices, keep, scale, backend=settings.backend)
    else:
        out = masked_attention(query, key, value, selection.as_mask(kv_len), scale)
    return out, None


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense attention restricted by a per-KV-head boolean mask ``[B, H_kv, T, L]``; returns ``[B, T, HQ, D]``.

    Rows with nothing to attend (left-padding queries) attend to everything, so that they stay
    finite; their outputs are never read by valid tokens.
    """
    groups = query.shape[1] // key.shape[1]
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    mask = mask.repeat_interleave(groups, dim=1)  # [B, HQ, T, L]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()
