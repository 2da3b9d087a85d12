"""Prediction interval and neighbour fetching: decode speed and accuracy side by side, in one run.

    python benchmarks/prediction_interval.py --context 8192 --fraction 16 --intervals 1,2,4,8 \
        --text ../shared/data/wikitext-2/test.txt --chunks 2

Speed: SmolLM2-135M-Instruct, a random prompt of ``--context`` tokens prefilled once; every configuration
starts from a copy of that cache, and the configurations take turns, ``--steps`` decode steps each per round
for ``--rounds`` rounds (`decode_cpu.interleaved`: the machine's drifts hit them alike), beside the two dense
baselines of `decode_cpu.py` (`DynamicCache` and `StaticCache`). Reported per configuration: the mean ms per step of
a round (median over rounds), the per-round ratio of means to each baseline (median and range), and the mean ms
per step inside the attention function. ``--steps`` should be a multiple of every
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


def plot(rows: list[dict], path: str, speed_title: str, quality_title: str) -> None:
    """Two panels: each configuration's decode step time as a ratio to `StaticCache` (bar: median over rounds,
    whisker: range), and its decode perplexity; a configuration not measured on one side gets no bar there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, quality) = plt.subplots(1, 2, figsize=(12, 4.5))
    timed = [r for r in rows if r["ratio_static"] is not None]
    lows = [r["ratio_static"] - r["ratio_static_range"][0] for r in timed]
    highs = [r["ratio_static_range"][1] - r["ratio_static"] for r in timed]
    speed.bar(range(len(timed)), [r["ratio_static"] for r in timed], yerr=[lows, highs], capsize=3)
    speed.set_xticks(list(range(len(timed))), [r["config"] for r in timed], rotation=35, ha="right", fontsize=8)
    speed.axhline(1.0, color="gray", lw=0.8)
    speed.set_ylabel("decode step time / StaticCache step")
    speed.set_title(speed_title, fontsize=9)
    scored = [r for r in rows if r["decode_perplexity"] is not None]
    quality.bar(range(len(scored)), [r["decode_perplexity"] for r in scored], color="tab:orange")
    quality.set_xticks(list(range(len(scored))), [r["config"] for r in scored], rotation=35, ha="right", fontsize=8)
    quality.set_ylabel("decode perplexity (lower is better)")
    quality.set_title(quality_title, fontsize=9)
    for ax in (speed, quality):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument("--plot", default=None, help="PNG: speed (vs StaticCache) and decode perplexity per configuration")
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
    prefilled, first = bench.prefill(model, ids)
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
        # per-round means: a round of an interval configuration mixes predicting and reusing steps
        ms, ratio, low, high = bench.summarise(times[label], times["dense (DynamicCache)"], statistics.fmean)
        _, ratio_static, low_s, high_s = bench.summarise(times[label], times["dense (StaticCache)"], statistics.fmean)
        attention = statistics.median(map(statistics.fmean, times[label + " attention"]))
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
    if args.plot:
        plot(rows, args.plot, f"SmolLM2-135M, {args.context} tokens, budget 1/{args.fraction}",
             f"{args.chunks} x {args.seq_len} tokens, budget {args.budget}")


if __name__ == "__main__":
    main()
