"""Decode-step time on the CPU: dense attention versus ButlerCache, side by side in one run.

    python benchmarks/decode_cpu.py --contexts 2048,4096,8192 --fractions 4,8,16 --steps 12

For each context length the prompt is prefilled once (dense); every configuration then starts from a
copy of that cache (ButlerCache layers compute their importance keys from the copied keys) and
decodes ``--steps`` tokens. Two dense baselines: transformers' `DynamicCache` (the default of
``generate``; it re-copies the whole cache with ``torch.cat`` at every step) and `StaticCache`
(preallocated; attention runs over its whole length). Reported: median ms per decode step, the ratio
to each dense baseline, and the share of the step spent in the predictor (importance queries,
scoring and top-k selection).
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/kernels.py would shadow the Hub package `kernels` that transformers probes for by import:
# keep this folder off the import path before importing transformers.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import statistics
import time
from contextlib import contextmanager

import torch
from transformers import DynamicCache, StaticCache

from butler_cache import ButlerCache, ButlerPredictor, default_predictor_path
from butler_cache import attention as attention_module
from butler_cache.default_model import load_default_model


class Stopwatch:
    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


@contextmanager
def predictor_timer(cache: ButlerCache):
    """Time spent producing importance queries and scoring + selecting (CPU: synchronous)."""
    watch = Stopwatch()
    original_select = attention_module.select_tokens
    original_score = cache.settings.policy.score
    original_produce = cache.on_layer_input
    attention_module.select_tokens = watch.wrap(original_select)
    cache.settings.policy.score = watch.wrap(original_score)
    cache.on_layer_input = watch.wrap(original_produce)
    try:
        yield watch
    finally:
        attention_module.select_tokens = original_select
        del cache.settings.policy.score
        del cache.on_layer_input


def copy_into(cache, prefilled: DynamicCache):
    for layer, source in zip(cache.layers, prefilled.layers, strict=True):
        layer.update(source.keys.clone(), source.values.clone())
    return cache


def time_decode(model, cache, first_token, steps: int, watch: Stopwatch | None = None) -> tuple[float, float]:
    token, times, shares = first_token, [], []
    for _ in range(steps):
        before = watch.seconds if watch else 0.0
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=token, past_key_values=cache).logits
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        shares.append(((watch.seconds - before) / elapsed) if watch else 0.0)
        token = logits[:, -1:].argmax(-1)
    return statistics.median(times) * 1e3, statistics.median(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="2048,4096,8192")
    parser.add_argument("--fractions", default="4,8,16", help="budgets as 1/N of the context")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, _ = load_default_model()
    predictor = ButlerPredictor.from_pretrained(default_predictor_path())
    rows = []
    print(f"threads: {torch.get_num_threads()}, steps per configuration: {args.steps} (median reported)")
    for context in [int(c) for c in args.contexts.split(",")]:
        ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(context))
        prefilled = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(input_ids=ids, past_key_values=prefilled).logits
        first = logits[:, -1:].argmax(-1)
        dense_ms, _ = time_decode(model, copy_into(DynamicCache(config=model.config), prefilled), first, args.steps)
        static = StaticCache(config=model.config, max_cache_len=context + args.steps + 1)
        static_ms, _ = time_decode(model, copy_into(static, prefilled), first, args.steps)
        for name, ms in (("dense (DynamicCache)", dense_ms), ("dense (StaticCache)", static_ms)):
            rows.append({"context": context, "config": name, "ms_per_step": ms, "ratio": ms / dense_ms,
                         "ratio_static": ms / static_ms, "predictor_share": 0.0})
            print(json.dumps(rows[-1]))
        for fraction in [int(f) for f in args.fractions.split(",")]:
            cache = copy_into(ButlerCache(model, predictor, token_budget=context // fraction, backend=args.backend),
                              prefilled)
            with predictor_timer(cache) as watch:
                ms, share = time_decode(model, cache, first, args.steps, watch)
            rows.append({"context": context, "config": f"butler 1/{fraction}", "ms_per_step": ms,
                         "ratio": ms / dense_ms, "ratio_static": ms / static_ms, "predictor_share": share})
            print(json.dumps(rows[-1]))
    print()
    print("| context | configuration | ms / decode step | vs dense (DynamicCache) | vs dense (StaticCache) | predictor share |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['config']} | {r['ms_per_step']:.1f} | {r['ratio']:.2f} | {r['ratio_static']:.2f} "
              f"| {r['predictor_share']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
