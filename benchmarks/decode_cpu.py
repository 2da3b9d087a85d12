"""Decode-step time on the CPU: dense attention versus ButlerCache, side by side in one run.

    python benchmarks/decode_cpu.py --contexts 2048,4096,8192 --fractions 4,8,16 --backends torch,numba

``--backends`` makes each butler budget one configuration per backend: ``auto`` (the default: numba on
float32 CPU tensors where numba is installed), ``torch`` (the PyTorch paths) and ``numba`` (the compiled CPU
kernels: scoring, top-k and sparse attention of a layer in one call).

For each context length the prompt is prefilled once (dense); every configuration starts from a copy
of that cache (ButlerCache layers compute their importance keys from the copied keys). ``--batch`` decodes
that many sequences at once (each its own random prompt of the context length, prefilled one at a time). The
configurations then take turns: each round, every configuration decodes ``--steps`` tokens, so that
drifts of the machine (memory bandwidth shared with other tenants, frequency) hit all of them alike.
Two dense baselines: transformers' `DynamicCache` (the default of ``generate``; it re-copies the whole
cache with ``torch.cat`` at every step) and `StaticCache` (preallocated; attention runs over its
whole length). Reported: the median ms per decode step over all rounds; the ratio to each dense
baseline as the median over rounds of the per-round ratio, with its range; the median ms per step
inside the attention function (all layers: dense SDPA, or scoring + selection + sparse attention);
and the share of the step spent in the predictor (importance queries, scoring and top-k selection;
not separable in the fused numba step, reported as "fused").
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
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, DynamicCache, StaticCache

from butler_cache import ButlerCache, ButlerPredictor, default_predictor_path
from butler_cache import attention as attention_module
from butler_cache.compat import cache_argument
from butler_cache.decode import torch_backend
from butler_cache.default_model import load_default_model
from butler_cache.kernels import NUMBA_AVAILABLE, resolve_backend


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
def timed_attribute(owner, name: str, watch: Stopwatch):
    """Route ``owner.name`` (a class, module or instance attribute) through ``watch`` for the duration."""
    own = name in vars(owner)  # else inherited (a method seen through an instance): shadowed, then unshadowed
    original = vars(owner)[name] if own else getattr(owner, name)
    setattr(owner, name, watch.wrap(original))
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@contextmanager
def predictor_timer(cache: ButlerCache):
    """Time spent producing importance queries and scoring + selecting (CPU: synchronous)."""
    watch = Stopwatch()
    policy = cache.settings.policy
    targets = [(torch_backend, "select_tokens"), (torch_backend, "select_decode_tokens"), (policy, "score"),
               (cache, "on_layer_input")]
    if NUMBA_AVAILABLE:  # the numba backend's scoring + top-k in one compiled pass (where its fused step does not run)
        from butler_cache.kernels.scoring import cpu as scoring_cpu

        targets.append((scoring_cpu, "score_select_decode_cpu"))
    with ExitStack() as stack:
        for owner, name in targets:
            stack.enter_context(timed_attribute(owner, name, watch))
        yield watch


def prefill(model, ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """The dense cache of prompts ``ids`` ``[B, L]``, prefilled one sequence at a time (the attention of a whole
    batch of long prompts at once would need B times the memory), and each sequence's next token ``[B, 1]``."""
    rows, firsts = [], []
    for row in ids.split(1):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(input_ids=row, **cache_argument(cache), logits_to_keep=1).logits  # [1, 1, V]
        rows.append(cache)
        firsts.append(logits[:, -1:].argmax(-1))
    if len(rows) == 1:
        return rows[0], firsts[0]
    batched = DynamicCache(config=model.config)
    for i, layers in enumerate(zip(*(c.layers for c in rows), strict=True)):
        batched.update(torch.cat([layer.keys for layer in layers]), torch.cat([layer.values for layer in layers]), i)
    return batched, torch.cat(firsts)


def copy_into(cache, prefilled: DynamicCache):
    for layer, source in zip(cache.layers, prefilled.layers, strict=True):
        layer.update(source.keys.clone(), source.values.clone())
    return cache


def time_decode(model, cache, first_token, steps: int, watch: Stopwatch | None = None) -> tuple[float, float]:
    """Median ms per step and median predictor share of ``steps`` decode steps from ``first_token``."""
    ms, shares, _, _ = time_steps(model, cache, first_token, steps, watch)
    return statistics.median(ms), statistics.median(shares)


@contextmanager
def attention_timer():
    """Time spent inside the attention function of every layer (dense SDPA or butler's sparse path).

    Every configuration runs through the function butler_cache registers (a dense cache falls through
    to transformers' SDPA), so wrapping that one entry times the attention of all of them alike.
    """
    watch = Stopwatch()
    AttentionInterface.register(attention_module.ATTENTION_NAME, watch.wrap(attention_module.butler_attention_forward))
    try:
        yield watch
    finally:
        AttentionInterface.register(attention_module.ATTENTION_NAME, attention_module.butler_attention_forward)


def interleaved(model, caches: dict, first_token, steps: int, rounds: int, timed: set[str]) -> dict[str, list[list[float]]]:
    """Decode with each cache in turn, ``steps`` tokens per cache per round: ``{name: [[ms per step] per round]}``,
    the ms per step inside the attention function in ``{name + " attention": ...}`` and, for the caches
    named in ``timed``, the predictor share of each step in ``{name + " share": ...}``."""
    tokens = dict.fromkeys(caches, first_token)
    times: dict[str, list[list[float]]] = {}
    with attention_timer() as attention:
        for _ in tqdm(range(rounds), desc="rounds", leave=False):
            for name, cache in caches.items():
                with predictor_timer(cache) if name in timed else nullcontext(None) as watch:
                    ms, share, attention_ms, tokens[name] = time_steps(model, cache, tokens[name], steps, watch, attention)
                times.setdefault(name, []).append(ms)
                times.setdefault(name + " attention", []).append(attention_ms)
                if name in timed:
                    times.setdefault(name + " share", []).append(share)
    return times


def time_steps(model, cache, token, steps: int, watch: Stopwatch | None, attention: Stopwatch | None = None):
    """Per-step ms, predictor shares and ms inside attention (0 without ``attention``) of ``steps`` decode
    steps, and the next token."""
    attention = attention or Stopwatch()
    cuda = token.device.type == "cuda"  # (benchmarks/kernels.py times GPU decoding with these helpers)
    ms, shares, attention_ms = [], [], []
    for _ in range(steps):
        before, attention_before = (watch.seconds if watch else 0.0), attention.seconds
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=token, **cache_argument(cache)).logits
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        ms.append(elapsed * 1e3)
        shares.append(((watch.seconds - before) / elapsed) if watch else 0.0)
        attention_ms.append((attention.seconds - attention_before) * 1e3)
        token = logits[:, -1:].argmax(-1)
    return ms, shares, attention_ms, token


def summarise(times: list[list[float]], baseline: list[list[float]], average=None) -> tuple[float, float, float, float]:
    """(median ms over all steps, median per-round ratio to ``baseline``, its min, its max). ``average``: how a round's
    steps are averaged (default the median); with ``statistics.fmean`` the first figure is the median over rounds
    of each round's mean (what a token costs where a round mixes kinds of steps)."""
    if average is None:
        average, overall = statistics.median, statistics.median([x for t in times for x in t])
    else:
        overall = statistics.median(map(average, times))
    ratios = [average(t) / average(b) for t, b in zip(times, baseline, strict=True)]
    return overall, statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="2048,4096,8192")
    parser.add_argument("--fractions", default="4,8,16", help="budgets as 1/N of the context")
    parser.add_argument("--steps", type=int, default=6, help="decode steps per configuration per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds in which the configurations take turns")
    parser.add_argument("--backends", default="auto", help="comma-separated butler backends, each a configuration")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")

    torch.manual_seed(0)
    model, _ = load_default_model()
    predictor = ButlerPredictor.from_pretrained(default_predictor_path())
    rows = []
    print(f"threads: {torch.get_num_threads()}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps per "
          "configuration")
    for context in [int(c) for c in args.contexts.split(",")]:
        ids = torch.randint(100, 40000, (args.batch, context), generator=torch.Generator().manual_seed(context))
        prefilled, first = prefill(model, ids)
        length = context + args.rounds * args.steps + 1
        caches = {
            "dense (DynamicCache)": copy_into(DynamicCache(config=model.config), prefilled),
            "dense (StaticCache)": copy_into(StaticCache(config=model.config, max_cache_len=length), prefilled),
        }
        backends = args.backends.split(",")
        fused = set()  # numba configurations: the predictor's share is not separable from the attention
        for fraction in [int(f) for f in args.fractions.split(",")]:
            for backend in backends:
                butler = ButlerCache(model, predictor, token_budget=context // fraction, backend=backend)
                name = f"butler 1/{fraction}" + (f" ({backend})" if len(backends) > 1 else "")
                caches[name] = copy_into(butler, prefilled)
                if resolve_backend(backend, torch.device("cpu")) == "numba":
                    fused.add(name)
        timed = {name for name in caches if name.startswith("butler")}
        times = interleaved(model, caches, first, args.steps, args.rounds, timed)
        del caches
        for name in (n for n in times if not n.endswith((" share", " attention"))):
            ms, ratio, low, high = summarise(times[name], times["dense (DynamicCache)"])
            _, ratio_static, low_s, high_s = summarise(times[name], times["dense (StaticCache)"])
            shares = [x for t in times.get(name + " share", [[0.0]]) for x in t]
            rows.append({"context": context, "batch": args.batch, "config": name, "ms_per_step": ms, "ratio": ratio,
                         "ratio_range": [low, high], "ratio_static": ratio_static,
                         "ratio_static_range": [low_s, high_s],
                         "predictor_share": None if name in fused else statistics.median(shares),
                         "attention_ms": statistics.median([x for t in times[name + " attention"] for x in t])})
            print(json.dumps(rows[-1]))
    print()
    print("| context | batch | configuration | ms / decode step | vs dense (DynamicCache) [range over rounds] "
          "| vs dense (StaticCache) [range] | of which attention (ms) | predictor share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        (lo, hi), (lo_s, hi_s) = r["ratio_range"], r["ratio_static_range"]
        print(f"| {r['context']} | {r['batch']} | {r['config']} | {r['ms_per_step']:.1f} | {r['ratio']:.2f} [{lo:.2f}-{hi:.2f}] "
              f"| {r['ratio_static']:.2f} [{lo_s:.2f}-{hi_s:.2f}] | {r['attention_ms']:.1f} | "
              f"{'fused' if r['predictor_share'] is None else format(r['predictor_share'], '.0%')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
