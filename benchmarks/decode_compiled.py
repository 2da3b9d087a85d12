"""Compiled decode steps on the CPU: `ButlerStaticCache` against `StaticCache`, both under torch.compile, side by side.

    python benchmarks/decode_compiled.py --contexts 8192,32768 --fraction 16 --json results/decode_compiled.json

SmolLM2-135M-Instruct (fp32, batch 1). At each context length every cache is filled with the same random K/V
(``layer.update`` with the whole context at once, so no 32k-token prefill is needed; a butler layer computes its
importance keys from those keys as it would from a prefill). Five configurations then take turns, ``--steps``
decode steps each per round, so that the machine's drifts hit them alike:

- ``DynamicCache (eager)``: what ``generate`` uses by default;
- ``StaticCache (eager)`` and ``StaticCache (compiled)``: preallocated, attention over the whole length;
  compiled with ``torch.compile(model.forward, fullgraph=True, dynamic=False)`` (inductor);
- ``ButlerCache (eager)``: the default install's sparse path (``backend="auto"``: the numba step on float32 CPUs);
- ``ButlerStaticCache (compiled)``: the fixed-shape sparse step, compiled the same way as the StaticCache.

Budget ``context / fraction``. Reported: median ms per step; the median over rounds of each round's ratio to
``DynamicCache (eager)``, ``StaticCache (eager)`` and ``StaticCache (compiled)``, with its range; the seconds the
first (compiling) call took; and the byte floor of the sparse / dense step ratio (`decode_breakdown.step_bytes`:
weights, the K/V of dense layers, importance keys, selected rows and predictor, against weights + all K/V).
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
import time

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, StaticCache

from butler_cache import ButlerCache, ButlerPredictor, ButlerStaticCache, default_predictor_path
from butler_cache.architecture import BaseModelShape
from butler_cache.compat import cache_argument
from butler_cache.default_model import load_default_model

BASELINES = ("DynamicCache (eager)", "StaticCache (eager)", "StaticCache (compiled)")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fill(caches, model, context: int, seed: int) -> None:
    """Write the same random K/V ``[1, H_kv, context, D]`` into every layer of every cache."""
    shape = BaseModelShape.from_model(model)
    generator = torch.Generator().manual_seed(seed)
    for i in range(shape.num_hidden_layers):
        keys = torch.randn(1, shape.num_key_value_heads, context, shape.head_dim, generator=generator)  # [1, H_kv, L, D]
        values = torch.randn(1, shape.num_key_value_heads, context, shape.head_dim, generator=generator)
        for cache in caches:
            cache.layers[i].update(keys.clone(), values.clone())


class Stepper:
    """One configuration: a cache, the forward it decodes with, its next token and position."""

    def __init__(self, forward, cache, context: int, token: torch.Tensor):
        self.forward, self.cache, self.position, self.token = forward, cache, context, token

    @torch.no_grad()
    def step(self) -> float:
        """One decode step; its wall time in ms."""
        start = time.perf_counter()
        logits = self.forward(input_ids=self.token, cache_position=torch.tensor([self.position]),
                              **cache_argument(self.cache)).logits  # [1, 1, V]
        elapsed = time.perf_counter() - start
        self.token, self.position = logits[:, -1:].argmax(-1), self.position + 1
        return elapsed * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--fraction", type=int, default=16, help="budget = context / fraction")
    parser.add_argument("--steps", type=int, default=3, help="decode steps per configuration per round")
    parser.add_argument("--rounds", type=int, default=12, help="rounds in which the configurations take turns")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (the first compiles)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (CI's dry run takes 'eager': it traces, fullgraph, without codegen)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    bench, breakdown = _load("decode_cpu"), _load("decode_breakdown")
    torch.manual_seed(0)
    model, _ = load_default_model()
    predictor = ButlerPredictor.from_pretrained(default_predictor_path())
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=False, backend=args.compile_backend)
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}, {args.rounds} rounds x {args.steps} steps")
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        budget, capacity = context // args.fraction, context + args.warmup + args.rounds * args.steps + 1
        caches = {
            "DynamicCache (eager)": DynamicCache(config=model.config),
            "StaticCache (eager)": StaticCache(config=model.config, max_cache_len=capacity),
            "StaticCache (compiled)": StaticCache(config=model.config, max_cache_len=capacity),
            "ButlerCache (eager)": ButlerCache(model, predictor, token_budget=budget),
            "ButlerStaticCache (compiled)": ButlerStaticCache(model, predictor, max_cache_len=capacity,
                                                              token_budget=budget, backend="torch"),
        }
        fill(caches.values(), model, context, seed=context)
        first = torch.randint(100, 40000, (1, 1), generator=torch.Generator().manual_seed(context))
        torch._dynamo.reset()  # each context's graphs are compiled for its own shapes
        steppers = {name: Stepper(compiled if "compiled" in name else model, cache, context, first)
                    for name, cache in caches.items()}
        first_call = {}
        for name, stepper in steppers.items():
            first_call[name] = stepper.step() / 1e3
            for _ in range(args.warmup - 1):
                stepper.step()
        times: dict[str, list[list[float]]] = {name: [] for name in steppers}
        for _ in tqdm(range(args.rounds), desc=f"{context} tokens: rounds", leave=False):
            for name, stepper in steppers.items():
                times[name].append([stepper.step() for _ in range(args.steps)])
        read = breakdown.step_bytes(model, caches["ButlerStaticCache (compiled)"], context)
        dense_bytes, butler_bytes = breakdown.step_totals(read)
        for name in steppers:
            row = {"context": context, "budget": budget, "config": name, "first_call_s": first_call[name],
                   "ms_per_step": statistics.median(x for t in times[name] for x in t)}
            for baseline in BASELINES:
                _, ratio, low, high = bench.summarise(times[name], times[baseline])
                row[f"vs {baseline}"] = [ratio, low, high]
            row["byte_floor"] = butler_bytes / dense_bytes if name.startswith("Butler") else 1.0
            rows.append(row)
            print(json.dumps(row))
        del caches, steppers
    print()
    print("| context | configuration | ms / step | " + " | ".join(f"vs {b} [range]" for b in BASELINES)
          + " | byte floor (vs a dense step) | first call (s) |")
    print("|---|---|---|" + "---|" * (len(BASELINES) + 2))
    for r in rows:
        ratios = " | ".join("{:.2f} [{:.2f}-{:.2f}]".format(*r[f"vs {b}"]) for b in BASELINES)
        print(f"| {r['context']} | {r['config']} | {r['ms_per_step']:.1f} | {ratios} | {r['byte_floor']:.3f} "
              f"| {r['first_call_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "fraction": args.fraction,
                       "compile_backend": args.compile_backend,
                       "rounds": args.rounds, "steps": args.steps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
