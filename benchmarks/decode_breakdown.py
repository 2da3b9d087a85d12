"""Where the time of a ButlerCache decode step goes on the CPU, beside a dense StaticCache step, in one run.

    python benchmarks/decode_breakdown.py --context 8192 --fraction 16 --backend numba

SmolLM2-135M-Instruct, a random prompt of ``--context`` tokens prefilled once (dense); a StaticCache and a
ButlerCache (budget ``context / fraction``) start from copies of it and take turns, one decode step each,
``--steps`` times. Per step (median ms): the whole step; the attention function of all layers (dense SDPA,
or scoring + selection + sparse attention); for the butler cache also the importance-query producers, the
sparse layers' cache updates (K/V appends, key projections, importance-key appends) and, with ``--backend
numba``, the compiled decode-step kernel alone (the rest of its attention time is Python and the dense layer 0).

The bytes a step must read (``step_bytes``), counted from the model's and the caches' shapes: every weight once
(a tied embedding as the output projection), the K/V of every layer for the dense step; for the butler step the
K/V of its dense layers, the importance keys and the selected K/V rows of its sparse layers, and the predictor's
weights. Their ratio is the byte floor of the butler/dense step ratio; each step's bytes over its time give the
rate it ran at.

Then, as context for those numbers, what this machine does outside the model (``probes``): the bandwidth of a
large copy and of the model's largest matrix-vector product (the output embedding), and the time of two small
butler operations (a layer's key projection; with numba, a layer's decode-step kernel on the cache's real
state) warm, called again and again on one layer, and cold, on each sparse layer in turn with one decoder
layer's weights streamed through the caches before each call, as in a decode step.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# keep this folder off the import path (benchmarks/kernels.py would shadow the Hub package `kernels`)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse
import json
import statistics
import time
from contextlib import ExitStack

import torch
from tqdm.auto import tqdm
from transformers import StaticCache

from butler_cache import ButlerCache, ButlerPredictor, default_predictor_path
from butler_cache.cache import ButlerLayer
from butler_cache.compat import cache_argument
from butler_cache.default_model import load_default_model


def _decode_cpu():
    spec = importlib.util.spec_from_file_location("decode_cpu", HERE / "decode_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_us(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _copy_bandwidth(megabytes: int = 512) -> float:
    """GB/s read + written by copying a ``megabytes`` float32 tensor (what the memory system sustains)."""
    source = torch.randn(megabytes * 1024 * 1024 // 4)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / _median_us(lambda: target.copy_(source), 5) * 1e-3


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_bytes(model, butler: ButlerCache, context: int) -> dict[str, int]:
    """Bytes one decode step at ``context`` cached tokens must read, from the caches' shapes (``butler``'s layers
    hold at least ``context`` tokens): ``weights`` (each parameter once; the input embedding, unless tied to the
    output projection, as the one row a step looks up), ``dense_kv`` (all layers' K/V: the dense step),
    ``butler_dense_kv`` (the K/V of the butler cache's dense layers), ``importance_keys`` and ``selected_rows``
    (its sparse layers'), ``predictor`` (the predictor's weights). Writes (the new rows) are not counted."""
    embedding = model.get_input_embeddings().weight  # [V, D]
    tied = embedding.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    weights = _nbytes(model.parameters()) - (0 if tied else _nbytes([embedding]) - _nbytes([embedding[0]]))
    out = {"weights": weights, "dense_kv": 0, "butler_dense_kv": 0, "importance_keys": 0, "selected_rows": 0,
           "predictor": _nbytes(butler.predictor.parameters())}
    for i, layer in enumerate(butler.layers):
        B, H, _, D = layer.keys.shape
        Dv, size = layer.values.shape[-1], layer.keys.element_size()
        kv = B * H * context * (D + Dv) * size
        out["dense_kv"] += kv
        if i not in butler.sparse_layers or butler.settings.budget.covers(context):
            out["butler_dense_kv"] += kv
            continue
        keys = layer.importance_keys  # [B, H_k, L, d']
        out["importance_keys"] += keys.shape[0] * keys.shape[1] * context * keys.shape[3] * keys.element_size()
        out["selected_rows"] += B * H * butler.settings.budget.max_selected(context) * (D + Dv) * size
    return out


def step_totals(read: dict[str, int]) -> tuple[int, int]:
    """The bytes of a dense step and of a butler step from `step_bytes`: (weights + all K/V, weights + the K/V of the
    dense layers + importance keys + selected rows + predictor)."""
    butler = ("butler_dense_kv", "importance_keys", "selected_rows", "predictor")
    return read["weights"] + read["dense_kv"], read["weights"] + sum(read[k] for k in butler)


@torch.no_grad()
def probes(model, butler: ButlerCache, repeats: int = 50) -> dict[str, float]:
    """Bandwidths (GB/s) and warm / cold times (us) of small butler operations; see the module docstring. Warm: the
    same layer's state again and again; cold: the sparse layers' states in turn, one decoder layer's weights
    streamed before each call."""
    out = {"copy_GBps": _copy_bandwidth()}
    embedding = model.get_output_embeddings().weight  # [V, D]
    row = torch.randn(1, embedding.shape[1])
    out["output_embedding_GEMV_GBps"] = embedding.numel() * 4 / _median_us(lambda: row @ embedding.T, 5) * 1e-3
    # one decoder layer's matrices: what the model reads between the attention calls of two consecutive layers
    weights = [m.weight for m in model.get_decoder().layers[1].modules() if isinstance(m, torch.nn.Linear)]
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def stream_weights():
        for w in weights:
            rows[w.shape[1]] @ w.T

    layers = [butler.layers[i] for i in butler.sparse_layers]
    turn = itertools.count()

    def each_layer_in_turn(op):  # the next sparse layer's state each call, as a decode step visits them
        return lambda: op(layers[next(turn) % len(layers)])

    def project(layer):
        butler.predictor.keys_from_cache(layer.layer_idx, layer.keys[:, :, -1:])  # [B, H_kv, 1, D]

    out["key_projection_warm_us"] = _median_us(lambda: project(layers[0]), repeats)
    out["key_projection_cold_us"] = _median_us(each_layer_in_turn(project), repeats, stream_weights)
    if butler.settings.backend == "numba":
        from butler_cache.kernels.decode_step.cpu import butler_decode_cpu

        budget = butler.settings.budget
        queries = torch.randn(1, model.config.num_attention_heads, 1, layers[0].importance_keys.shape[-1])
        query = torch.randn(1, model.config.num_attention_heads, 1, layers[0].keys.shape[-1])

        def step(layer):
            L = layer.keys.shape[2]
            butler_decode_cpu(queries, layer.importance_keys, 0.25, query, layer.keys, layer.values, 0.125,
                              budget.sink_tokens, budget.local_window, budget.max_selected(L))

        out["kernel_warm_us"] = _median_us(lambda: step(layers[0]), repeats)
        out["kernel_cold_us"] = _median_us(each_layer_in_turn(step), repeats, stream_weights)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--fraction", type=int, default=16, help="budget = context / fraction")
    parser.add_argument("--backend", default="numba", help="the butler cache's backend (torch or numba)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--probe-repeats", type=int, default=60, help="calls per probe")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    bench = _decode_cpu()
    torch.manual_seed(0)
    model, _ = load_default_model()
    predictor = ButlerPredictor.from_pretrained(default_predictor_path())
    ids = torch.randint(100, 40000, (1, args.context), generator=torch.Generator().manual_seed(args.context))
    prefilled, first = bench.prefill(model, ids)
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
        stack.enter_context(bench.timed_attribute(butler, "on_layer_input", watches["producers"]))
        stack.enter_context(bench.timed_attribute(ButlerLayer, "update", watches["cache updates"]))
        if args.backend == "numba":
            from butler_cache.kernels.decode_step import cpu as decode_step_cpu

            stack.enter_context(bench.timed_attribute(decode_step_cpu, "_decode_step_kernel", watches["kernel"]))
        for step in tqdm(range(args.steps + 2), desc="steps", leave=False):
            for name, cache in caches.items():
                before = {part: w.seconds for part, w in watches.items()}
                attention_before = attention.seconds
                start = time.perf_counter()
                with torch.no_grad():
                    logits = model(input_ids=tokens[name], **cache_argument(cache)).logits
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
    bytes_read = step_bytes(model, butler, args.context)
    dense_total, butler_total = step_totals(bytes_read)
    step_ms = {row["config"]: row["step"] for row in rows}
    floor = {"dense_MB": dense_total / 1e6, "butler_MB": butler_total / 1e6, "floor_ratio": butler_total / dense_total,
             "measured_ratio": step_ms["butler"] / step_ms["dense (StaticCache)"],
             "dense_GBps": dense_total / step_ms["dense (StaticCache)"] * 1e-6,
             "butler_GBps": butler_total / step_ms["butler"] * 1e-6}
    print()
    print("| bytes a step must read (MB) | " + " | ".join(bytes_read) + " | dense step | butler step |")
    print("|---|" + "---|" * (len(bytes_read) + 2))
    print("| | " + " | ".join(f"{v / 1e6:.1f}" for v in bytes_read.values())
          + f" | {floor['dense_MB']:.1f} | {floor['butler_MB']:.1f} |")
    print(f"byte floor of the butler / dense ratio {floor['floor_ratio']:.3f}, measured {floor['measured_ratio']:.3f}; "
          f"read at {floor['dense_GBps']:.1f} GB/s (dense step) and {floor['butler_GBps']:.1f} GB/s (butler step)")
    machine = probes(model, butler, args.probe_repeats)
    print()
    print("| probe | value |")
    print("|---|---|")
    for name, value in machine.items():
        print(f"| {name} | {value:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": args.context, "fraction": args.fraction, "backend": args.backend, "rows": rows,
                       "bytes": bytes_read, "floor": floor, "probes": machine}, f, indent=2)


if __name__ == "__main__":
    main()
