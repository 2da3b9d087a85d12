"""Attaching butler_cache to a model: its attention function and two forward pre-hooks.

The hooks are how a cache reaches the attention function without hidden channels. The decoder's pre-hook hands
the forward's 2-D padding mask to the cache (and to an attention capture); each decoder layer's pre-hook runs
the predictor's producer on the layer's input hidden state, and passes the layer's `ButlerLayer` down to
`butler_attention_forward` as its ``butler_layer`` keyword (transformers forwards a decoder layer's extra keywords
to its attention function).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

from .architecture import check_supported, decoder_layers
from .attention import ATTENTION_NAME, butler_attention_forward
from .capture import CAPTURE, AttentionCapture
from .compat import ALL_MASK_ATTENTION_FUNCTIONS, AttentionInterface, AttentionMaskInterface, require_method
from .predictor import LayerInput

if TYPE_CHECKING:
    from .layer import ButlerLayer

_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, list[RemovableHandle]]] = weakref.WeakKeyDictionary()


class HookedCache:
    """What the hooks ask of a cache (`ButlerCache` implements it)."""

    key_padding: torch.Tensor | None = None  # [B, past + T] of the forward in flight, 1 = real token; None: none
    # whether the hooks serve it inside torch.compile too (its sparse step has fixed shapes: `ButlerStaticCache`);
    # a compiled model with any other cache runs dense
    traceable: bool = False
    input_layers: frozenset[int] = frozenset()  # decoder layers whose input hidden state the predictor reads

    def on_layer_input(self, layer_idx: int, inputs: LayerInput) -> None:
        """Called with the hidden state entering decoder layer ``layer_idx`` (one of `input_layers`)."""

    def sparse_layer(self, layer_idx: int) -> ButlerLayer | None:
        """The cache layer whose attention butler_cache runs at decoder layer ``layer_idx``, or None (dense)."""
        return None


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


@contextmanager
def capture_attention(model: torch.nn.Module, layers: set[int] | None = None) -> Iterator[AttentionCapture]:
    """Record queries, keys and layer inputs of ``model``'s forwards (the model is attached if needed)."""
    attach(model)
    capture = AttentionCapture(frozenset(layers) if layers is not None else None)
    token = CAPTURE.set(capture)
    try:
        yield capture
    finally:
        CAPTURE.reset(token)


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 names it `cache`


def _capture() -> AttentionCapture | None:
    # a compiled model traces through: dynamo reads no ContextVar (captures, for distillation, run eager)
    return None if torch.compiler.is_compiling() else CAPTURE.get()


def _served(cache: Any) -> bool:
    """Whether the hooks serve ``cache`` in this forward: any `HookedCache` eagerly, a traceable one when compiling."""
    return isinstance(cache, HookedCache) and (cache.traceable or not torch.compiler.is_compiling())


def _decoder_input_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    if torch.compiler.is_compiling():
        return
    cache, capture = _cache_of(kwargs), _capture()
    if not isinstance(cache, HookedCache) and capture is None:
        return  # a dense call (StaticCache, DynamicCache): nothing to record
    mask = kwargs.get("attention_mask")
    padding = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None  # [B, past + T]
    if isinstance(cache, HookedCache):
        cache.key_padding = padding
    if capture is not None:
        capture.key_padding = padding


def _decoder_layer_input_hook(layer_idx: int, module: torch.nn.Module, args: tuple, kwargs: dict):
    cache, capture = _cache_of(kwargs), _capture()
    hooked = _served(cache)
    if not hooked and capture is None:
        return None  # this runs before every decoder layer of every model forward: it returns early
    if capture is not None or layer_idx in cache.input_layers:
        hidden_states = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
        padding = cache.key_padding if hooked else capture.key_padding
        inputs = LayerInput(hidden_states, kwargs.get("position_ids"), padding)
        if hooked and layer_idx in cache.input_layers:
            cache.on_layer_input(layer_idx, inputs)
        if capture is not None:
            capture.record_layer_input(layer_idx, inputs)
    layer = cache.sparse_layer(layer_idx) if hooked else None
    if layer is None:
        return None
    return args, {**kwargs, "butler_layer": layer}  # down to the attention function, through the decoder layer
