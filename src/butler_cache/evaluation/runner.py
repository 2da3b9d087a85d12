"""One harness for every policy: caches built the same way, tasks scored the same way."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache import ButlerCache
from ..predictor import ButlerPredictor
from .coref import CorefExample
from .longctx import LongContextExample

CacheFactory = Callable[[], object]


def cache_factory(model, policy: str, *, predictor: ButlerPredictor | None = None, sparsity: float | None = None,
                  token_budget: int | None = None, sink_tokens: int = 4, local_window: int = 16,
                  sparse_prefill: bool = False) -> CacheFactory:
    """A function that builds a fresh cache for one example. ``"dense"`` is a plain `DynamicCache`.

    Give ``sparsity`` (budget = ``1 - sparsity`` of each row's context) or ``token_budget``.
    """
    if policy == "dense":
        return lambda: DynamicCache(config=model.config)
    budget = {"token_budget": token_budget} if token_budget is not None else {"budget_ratio": 1.0 - sparsity}
    return lambda: ButlerCache(model, predictor if policy == "butler" else None, policy=policy, sink_tokens=sink_tokens,
                               local_window=local_window, sparse_prefill=sparse_prefill, **budget)


def coref_teacher_forced(model, tokenizer, examples: list[CorefExample], make_cache: CacheFactory,
                         progress: bool = True) -> dict[str, float]:
    """Fraction of the name's tokens mispredicted (argmax) and of examples with any miss."""
    device = next(model.parameters()).device
    missed_tokens = total_tokens = missed_examples = 0
    for ex in tqdm(examples, desc="coref (teacher-forced)", disable=not progress, leave=False):
        ctx = tokenizer(ex.context, add_special_tokens=False)["input_ids"]
        ans = tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + ans], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, past_key_values=make_cache()).logits[0]
        predicted = logits[len(ctx) - 1 : -1].argmax(-1).tolist()
        misses = sum(p != t for p, t in zip(predicted, ans, strict=True))
        missed_tokens, total_tokens = missed_tokens + misses, total_tokens + len(ans)
        missed_examples += misses > 0
    return {"name_token_error": missed_tokens / total_tokens, "examples_with_miss": missed_examples / len(examples)}


def generate_answers(model, tokenizer, prompts: list[str], make_cache: CacheFactory, max_new_tokens: int,
                     progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy answers, one example at a time (prefill dense, decoding through the cache)."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in tqdm(prompts, desc=desc, disable=not progress, leave=False):
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**inputs, past_key_values=make_cache(), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        outputs.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs


def coref_generation(model, tokenizer, examples: list[CorefExample], make_cache: CacheFactory,
                     progress: bool = True) -> dict[str, float]:
    """Exact match: the generated answer starts with the invented name."""
    answers = generate_answers(model, tokenizer, [ex.context for ex in examples], make_cache, max_new_tokens=8,
                               progress=progress, desc="coref (generation)")
    hits = sum(a.strip().startswith(ex.answer) for a, ex in zip(answers, examples, strict=True))
    return {"exact_match": hits / len(examples)}


def longctx_accuracy(model, tokenizer, examples: list[LongContextExample], make_cache: CacheFactory,
                     progress: bool = True) -> dict[str, float]:
    answers = generate_answers(model, tokenizer, [ex.prompt for ex in examples], make_cache, max_new_tokens=24,
                               progress=progress, desc=examples[0].task if examples else "longctx")
    return {"accuracy": sum(ex.is_correct(a) for a, ex in zip(answers, examples, strict=True)) / len(examples)}
