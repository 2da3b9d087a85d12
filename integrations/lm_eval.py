"""lm-evaluation-harness adapter: run lm-eval tasks through a ButlerCache (``pip install lm_eval``).

    import lm_eval
    from butler_cache.integrations.lm_eval import ButlerLM

    lm = ButlerLM(pretrained=model, tokenizer=tokenizer, policy="butler", predictor="path/or/hub-id",
                  budget_ratio=0.5)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

Or from the command line, after ``import butler_cache.integrations.lm_eval`` registered it:
``--model butler_cache --model_args pretrained=...,policy=oracle,budget_ratio=0.5``.

Log-likelihood requests run teacher-forced: every query row attends to its own selection
(``sparse_prefill=True``), the protocol of TokenButler's downstream evaluations; generation requests
prefill densely and decode through the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from butler_cache import ButlerCache, ButlerPredictor
from butler_cache.compat import CACHE_ARGUMENT, cache_argument


@register_model("butler_cache")
class ButlerLM(HFLM):
    """`HFLM` whose forward passes and generations go through a fresh `ButlerCache` each time."""

    def __init__(self, pretrained: Any, *, policy: str = "butler", predictor: str | ButlerPredictor | None = None,
                 token_budget: int | None = None, budget_ratio: float | None = None, sink_tokens: int = 4,
                 local_window: int = 16, **kwargs: Any):
        super().__init__(pretrained=pretrained, **kwargs)
        if isinstance(predictor, str):
            predictor = ButlerPredictor.from_pretrained(predictor)
        if predictor is not None:
            predictor = predictor.to(self.model.device)
        self.predictor = predictor
        self.cache_kwargs = dict(policy=policy, token_budget=None if token_budget is None else int(token_budget),
                                 budget_ratio=None if budget_ratio is None else float(budget_ratio),
                                 sink_tokens=int(sink_tokens), local_window=int(local_window))
        self.make_cache()  # validate the arguments now rather than at the first request

    def make_cache(self, sparse_prefill: bool = True) -> ButlerCache:
        return ButlerCache(self.model, self.predictor, sparse_prefill=sparse_prefill, **self.cache_kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if attn_mask is not None or labels is not None:
            raise ValueError("butler_cache serves decoder-only models")
        with torch.no_grad():
            return self.model(inps, **cache_argument(self.make_cache())).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        generation_kwargs[CACHE_ARGUMENT] = self.make_cache(sparse_prefill=False)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)
