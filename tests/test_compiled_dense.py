"""A model that a ButlerCache has been attached to still compiles whole (fullgraph) for dense decoding with a
StaticCache: the hooks and the attention function step aside under torch.compile."""

from __future__ import annotations

import torch
from transformers import StaticCache

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor
from butler_cache.compat import cache_argument
from butler_cache.hooks import is_attached

from .conftest import random_batch, tiny_model


@torch.no_grad()
def _static_decode(forward, model, ids, steps: int) -> torch.Tensor:
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    logits = model(input_ids=ids, **cache_argument(cache)).logits
    token, out = logits[:, -1:].argmax(-1), []
    for i in range(steps):
        position = torch.tensor([ids.shape[1] + i])
        logits = forward(input_ids=token, **cache_argument(cache), cache_position=position).logits
        out.append(logits[:, -1])
        token = logits[:, -1:].argmax(-1)
    return torch.stack(out, 1)  # [B, steps, vocab]


def test_attached_model_compiles_fullgraph_for_static_cache_decoding():
    model = tiny_model("llama")
    ids, _ = random_batch(2, 24)
    predictor = ButlerPredictor(ButlerConfig.for_model(model))
    with torch.no_grad():  # a butler decode first: the model is attached from here on
        model(input_ids=ids, **cache_argument(ButlerCache(model, predictor, token_budget=20)))
    assert is_attached(model)
    eager = _static_decode(model, model, ids, steps=4)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")  # fails on any graph break
    torch.testing.assert_close(_static_decode(compiled, model, ids, steps=4), eager)
