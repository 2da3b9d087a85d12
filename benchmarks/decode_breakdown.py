"""Where the time of a ButlerCache decode step goes on the CPU, beside a dense StaticCache step, in one run.

    python benchmarks/decode_breakdown.py --context 8192 --fraction 16 --backend numba

SmolLM2-135M-Instruct, a random prompt of ``--context`` tokens prefilled once (dense); a StaticCache and a
ButlerCache (budget ``context / fraction``) start from copies of it and take turns, one decode step each,
``--steps`` times. Per step (median ms): the whole step; the attention function of all layers (dense SDPA,
or scoring + selection + sparse attention); for the butler cache also the importance-query producers,
the sparse layers' cache updates (K/V appends, key projections, importance-key appends) and, with ``--backend numba``,
the compiled decode-step kernel alone (the rest of its attention time is Python and the dense layer 0).
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
from contextlib import ExitStack, contextmanager

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, StaticCache

from butler_cache import ButlerCache, ButlerPredictor, default_predictor_path
from butler_cache.cache import ButlerLayer
from butler_cache.default_model import load_default_model


def _decode_cpu():
    spec = importlib.util.spec_from_file_location("decode_cpu", HERE / "decode_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def timed_attribute(owner, name: str, watch):
    """Route ``owner.name`` through ``watch`` (a `decode_cpu.Stopwatch`) for the duration."""
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, watch.wrap(original))
    try:
        yield
    finally:
        if isinstance(owner, type):
            setattr(owner, name, original)
        else:
            delattr(owner, name)  # the instance attribute shadowed the class's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--fraction", type=int, default=16, help="budget = context / fraction")
    parser.add_argument("--backend", default="numba", help="the butler cache's backend (torch or numba)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    bench = _decode_cpu()
    torch.manual_seed(0)
    model, _ = load_default_model()
    predictor = ButlerPredictor.from_pretrained(default_predictor_path())
    ids = torch.randint(100, 40000, (1, args.context), generator=torch.Generator().manual_seed(args.context))
    prefilled = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=ids, past_key_values=prefilled).logits[:, -1:].argmax(-1)
    length = args.context + args.steps + 2
    caches = {
        "dense (StaticCache)": bench.copy_into(StaticCache(config=model.config, max_cache_len=length), prefilled),
        "butler": bench.copy_into(ButlerCache(model, predictor, token_budget=args.context // args.fraction,
                                              backend=args.backend), prefilled),
    }
    butler = caches["butler"]
    parts = ["producers", "cache updates"] + (["kernel"] if args.backend == "numba" else [])
    watches = {name: bench.Stopwatch() for name in parts}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in caches}
    tokens = dict.fromkeys(caches, first)
    with ExitStack() as stack:
        attention = stack.enter_context(bench.attention_timer())
        stack.enter_context(timed_attribute(butler, "on_layer_input", watches["producers"]))
        stack.enter_context(timed_attribute(ButlerLayer, "update", watches["cache updates"]))
        if args.backend == "numba":
            from butler_cache.kernels import decode_step_cpu

            stack.enter_context(timed_attribute(decode_step_cpu, "_decode_step_kernel", watches["kernel"]))
        for step in tqdm(range(args.steps + 2), desc="steps", leave=False):
            for name, cache in caches.items():
                before = {part: w.seconds for part, w in watches.items()}
                attention_before = attention.seconds
                start = time.perf_counter()
                with torch.no_grad():
                    logits = model(input_ids=tokens[name], past_key_values=cache).logits
                elapsed = time.perf_counter() - start
                tokens[name] = logits[:, -1:].argmax(-1)
                if step < 2:  # warm-up (the first numba call compiles or loads the kernel)
                    continue
                record = times[name]
                record.setdefault("step", []).append(elapsed * 1e3)
                record.setdefault("attention", []).append((attention.seconds - attention_before) * 1e3)
                if name == "butler":
                    for part, w in watches.items():
                        record.setdefault(part, []).append((w.seconds - before[part]) * 1e3)
    rows = [{"config": name, **{part: statistics.median(ms) for part, ms in record.items()}}
            for name, record in times.items()]
    print(f"context {args.context}, budget 1/{args.fraction}, backend {args.backend}; median ms per decode step "
          f"over {args.steps} steps")
    columns = ["step", "attention", "producers", "cache updates", "kernel"]
    print("| configuration | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['config']} | " + " | ".join(f"{row[c]:.1f}" if c in row else "" for c in columns) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": args.context, "fraction": args.fraction, "backend": args.backend, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
