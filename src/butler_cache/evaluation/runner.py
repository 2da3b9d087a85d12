"""One harness for every policy: caches built the same way, tasks scored the same way."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..cache import ButlerCache
from ..compat import DynamicCache, DynamicLayer, cache_argument
from ..growth import GrowingLayer
from ..layer import ButlerLayer
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
            logits = model(input_ids=ids, **cache_argument(make_cache())).logits[0]
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
            out = model.generate(**inputs, **cache_argument(make_cache()), max_new_tokens=max_new_tokens, do_sample=False,
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


def shares_dense_prefill(cache) -> bool:
    """Whether ``cache`` would prefill densely and keep nothing but K/V from it (so one dense prefill can
    be copied into it): plain dynamic caches, and ButlerCaches of stateless policies without a stateful
    predictor or sparse prefill."""
    layers_ok = all(type(layer) in (DynamicLayer, GrowingLayer, ButlerLayer) for layer in cache.layers)
    if isinstance(cache, ButlerCache):
        s = cache.settings
        return layers_ok and not s.policy.stateful and not s.sparse_prefill and cache.predictor_state is None
    return layers_ok and type(cache) is DynamicCache


def copy_prefill(source: DynamicCache, cache):
    """Fill an empty ``cache`` with the K/V of ``source`` (ButlerLayers derive their importance keys)."""
    for target, layer in zip(cache.layers, source.layers, strict=True):
        target.update(layer.keys, layer.values)  # both layer types copy on update
    return cache


def greedy_continue(model, cache, first_token: torch.Tensor, max_new_tokens: int, eos_token_id) -> list[int]:
    """Greedy decoding of one sequence from a prefilled ``cache``; ``first_token`` ``[1, 1]`` came from the prefill."""
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
    tokens, token = [first_token.item()], first_token
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        with torch.no_grad():
            token = model(input_ids=token, **cache_argument(cache)).logits[:, -1:].argmax(-1)
        tokens.append(token.item())
    return tokens


def generate_answers_shared(model, tokenizer, prompts: list[str], factories: dict[str, CacheFactory],
                            max_new_tokens: int, progress: bool = True, desc: str = "generate") -> dict[str, list[str]]:
    """Greedy answers of every cache in ``factories`` to every prompt, one dense prefill per prompt.

    Caches that prefill densely and keep only K/V (`shares_dense_prefill`) decode from a copy of that
    prefill, which gives what ``model.generate`` gives them; the others (H2O, SnapKV, attentive
    predictors) run ``model.generate`` from scratch.
    """
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id  # what model.generate stops at
    shared = {name for name, make in factories.items() if shares_dense_prefill(make())}
    answers: dict[str, list[str]] = {name: [] for name in factories}
    for prompt in tqdm(prompts, desc=desc, disable=not progress, leave=False):
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        if shared:
            prefill = DynamicCache(config=model.config)
            with torch.no_grad():
                first = model(**inputs, **cache_argument(prefill)).logits[:, -1:].argmax(-1)  # [1, 1]
        for name, make in factories.items():
            if name in shared:
                tokens = greedy_continue(model, copy_prefill(prefill, make()), first, max_new_tokens, eos)
                answers[name].append(tokenizer.decode(tokens, skip_special_tokens=True))
            else:
                answers[name] += generate_answers(model, tokenizer, [prompt], make, max_new_tokens, progress=False)
    return answers


def longctx_accuracy(model, tokenizer, examples: list[LongContextExample], factories: dict[str, CacheFactory],
                     progress: bool = True) -> dict[str, float]:
    """Accuracy of each cache in ``factories`` (decoding the answers greedily) on ``examples``."""
    if not examples:
        return dict.fromkeys(factories, float("nan"))
    answers = generate_answers_shared(model, tokenizer, [ex.prompt for ex in examples], factories,
                                      max_new_tokens=examples[0].max_new_tokens, progress=progress,
                                      desc=examples[0].task)
    return {name: sum(ex.is_correct(a) for a, ex in zip(out, examples, strict=True)) / len(examples)
            for name, out in answers.items()}
