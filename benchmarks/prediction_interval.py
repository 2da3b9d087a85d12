"""Prediction interval and neighbour fetching: decode speed and accuracy side by side, in one run.

    python benchmarks/prediction_interval.py --context 8192 --fraction 16 --intervals 1,2,4,8 \
        --text ../shared/data/wikitext-2/test.txt --chunks 2

Speed: SmolLM2-135M-Instruct, a random prompt of ``--context`` tokens prefilled once; every configuration
starts from a copy of that cache, and the configurations take turns, ``--steps`` decode steps each per round
for ``--rounds`` rounds (`decode_cpu.interleaved`: the machine's drifts hit them alike), beside the two dense
baselines of `decode_cpu.py` (`DynamicCache` and `StaticCache`). ``--steps`` should be a multiple of every
interval, so that each round holds the same mix of predicting and reusing steps.
Accuracy: decode-mode perplexity on ``--chunks`` chunks of ``--seq-len`` (1024) tokens of ``--text``:
the first quarter prefilled, the rest fed one decode step at a time through the cache with a
``--budget``-token budget, so that reusing a prediction over several steps is what is measured.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# keep this folder off the import path (benchmarks/kernels.py would shadow the Hub package `kernels`)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse
import json
import statistics

import torch
from transformers import DynamicCache, StaticCache

from butler_cache import ButlerCache, ButlerPredictor, default_predictor_path
from butler_cache.default_model import load_default_model
from butler_cache.evaluation import decode_perplexity
from butler_cache.training.data import TokenChunks


def _decode_cpu():
    spec = importlib.util.spec_from_file_location("decode_cpu", HERE / "decode_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--fraction", type=int, default=16, help="speed: budget = context / fraction")
    parser.add_argument("--intervals", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=8, help="speed: decode steps per configuration per round")
    parser.add_argument("--rounds", type=int, default=5, help="speed: rounds in which the configurations take turns")
    parser.add_argument("--text", default=None, help="text file for the accuracy part (skipped without it)")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024, help="accuracy: chunk length (the first quarter is prefilled)")
    parser.add_argument("--budget", type=int, default=128, help="accuracy: tokens attended per KV head")
    parser.add_argument("--oracle-intervals", default="1",
                        help="accuracy: also the oracle at these intervals (a control: what reusing a selection "
                             "costs when the selection itself is exact)")
    parser.add_argument("--backend", default="torch", help="butler caches' backend (torch or numba on CPUs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    bench = _decode_cpu()
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    predictor = ButlerPredictor.from_pretrained(default_predictor_path())
    configs = [(n, False) for n in map(int, args.intervals.split(","))]
    configs += [(n, True) for n, _ in configs if n > 1]
    oracle_intervals = [n for n in map(int, args.oracle_intervals.split(",")) if n > 1]

    def butler(budget: int, interval: int, neighbours: bool) -> ButlerCache:
        return ButlerCache(model, predictor, token_budget=budget, prediction_interval=interval,
                           neighbor_fetch=neighbours, backend=args.backend)

    def name(interval: int, neighbours: bool) -> str:
        return f"butler, interval {interval}" + (" + neighbours" if neighbours else "")

    rows = []
    ids = torch.randint(100, 40000, (1, args.context), generator=torch.Generator().manual_seed(args.context))
    prefilled = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=ids, past_key_values=prefilled).logits[:, -1:].argmax(-1)
    length = args.context + args.rounds * args.steps + 1
    caches = {"dense (DynamicCache)": bench.copy_into(DynamicCache(config=model.config), prefilled),
              "dense (StaticCache)": bench.copy_into(StaticCache(config=model.config, max_cache_len=length), prefilled)}
    for interval, neighbours in configs:
        if args.steps % interval:
            print(f"note: --steps {args.steps} is not a multiple of interval {interval}: rounds differ in their mix")
        caches[name(interval, neighbours)] = bench.copy_into(butler(args.context // args.fraction, interval, neighbours),
                                                             prefilled)
    times = bench.interleaved(model, caches, first, args.steps, args.rounds, timed=set())
    del caches
    speed = {}
    for label in (n for n in times if not n.endswith(" attention")):
        ms, ratio, low, high = bench.summarise(times[label], times["dense (DynamicCache)"])
        _, ratio_static, low_s, high_s = bench.summarise(times[label], times["dense (StaticCache)"])
        attention = statistics.median([x for t in times[label + " attention"] for x in t])
        speed[label] = {"ms_per_step": ms, "ratio": ratio, "ratio_range": [low, high], "ratio_static": ratio_static,
                        "ratio_static_range": [low_s, high_s], "attention_ms": attention}
        print(f"{label}: {ms:.1f} ms / step, {ratio_static:.2f}x StaticCache, attention {attention:.1f} ms")

    quality = {}
    if args.text:
        text = Path(args.text).read_text()
        chunks = TokenChunks.from_texts([text], tokenizer, args.seq_len, max_chunks=args.chunks)
        makers = {"dense": lambda: DynamicCache(config=model.config),
                  "oracle": lambda: ButlerCache(model, policy="oracle", token_budget=args.budget)}
        for i in oracle_intervals:
            makers[f"oracle, interval {i}"] = lambda i=i: ButlerCache(model, policy="oracle", token_budget=args.budget,
                                                                      prediction_interval=i)
        makers.update({name(i, nb): (lambda i=i, nb=nb: butler(args.budget, i, nb)) for i, nb in configs})
        for label, make in makers.items():
            quality[label] = decode_perplexity(model, chunks, make, prefix=args.seq_len // 4, desc=label)
            print(f"{label}: decode perplexity {quality[label]:.3f}")

    empty = {"ms_per_step": None, "ratio": None, "ratio_range": None, "ratio_static": None,
             "ratio_static_range": None, "attention_ms": None}
    for label in speed.keys() | quality.keys():
        rows.append({"config": label, **speed.get(label, empty), "decode_perplexity": quality.get(label)})
    order = ["dense (DynamicCache)", "dense (StaticCache)", "dense", "oracle"]
    order += [f"oracle, interval {i}" for i in oracle_intervals] + [name(i, nb) for i, nb in configs]
    rows.sort(key=lambda r: order.index(r["config"]))
    print(f"\ncontext {args.context}, budget 1/{args.fraction}, {args.rounds} rounds x {args.steps} steps (speed); "
          f"budget {args.budget} tokens, {args.chunks} x {args.seq_len}-token chunks (decode perplexity)\n")
    print("| configuration | ms / decode step | vs dense (StaticCache) [range] | vs dense (DynamicCache) [range] "
          "| of which attention (ms) | decode perplexity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["ms_per_step"] is None:
            timing = "- | - | - | -"
        else:
            (lo, hi), (lo_s, hi_s) = r["ratio_range"], r["ratio_static_range"]
            timing = (f"{r['ms_per_step']:.1f} | {r['ratio_static']:.2f} [{lo_s:.2f}-{hi_s:.2f}] | "
                      f"{r['ratio']:.2f} [{lo:.2f}-{hi:.2f}] | {r['attention_ms']:.1f}")
        ppl = f"{r['decode_perplexity']:.3f}" if r["decode_perplexity"] is not None else "-"
        print(f"| {r['config']} | {timing} | {ppl} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
