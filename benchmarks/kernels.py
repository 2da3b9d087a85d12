"""GPU benchmarks, side by side in one run (``--dry-run``: tiny sizes on the CPU through the Triton interpreter, for CI).

    python benchmarks/kernels.py --json results/kernels_gpu.json          # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/kernels.py --dry-run

1. Device copy bandwidth (a large device-to-device copy, bytes read + written).
2. The sparse decode kernel (`sparse_attention`, Triton): achieved bandwidth on the bytes it must read (the selected
   K/V rows, the queries, the indices), as a share of the copy bandwidth.
3. One decode step's attention, Llama-3.1-8B shapes (32 query / 8 KV heads, head_dim 128), 4k to 128k tokens: dense
   SDPA over the full cache against the path a `ButlerCache` runs at a decode step with a 1/16 budget (the Triton
   scoring kernel over the importance keys, d' = 16, per KV head; `select_decode_tokens`, 4 sinks + 16 local; the
   Triton sparse attention), and the same step through the PyTorch references; the byte-bound ideal speedup
   (dense K/V bytes over importance keys + selected rows) beside it.
4. End-to-end decode of a randomly initialised Llama-3.2-1B-shaped model at 16k and 32k, batch 8: the prompts
   prefilled once (dense, one sequence at a time), then `DynamicCache`, `StaticCache` and `ButlerCache` (untrained
   predictor, 1/16 budget) copies of that cache taking turns for ``--rounds`` rounds of ``--steps`` decode steps
   each (prefill not timed; `decode_cpu.interleaved`, synchronised per step); tokens/s and speedups (the inverse of the
   median over rounds of the per-round ratio of median step times), with the byte-bound
   ideal of the whole step (`decode_breakdown.step_totals`: weights + K/V against weights + what the butler step reads).

Every figure carries its batch, dtype, context and ideal. The kernels are checked against their references before
they are timed (a mismatch stops the run).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# transformers probes for the Hub package `kernels` by importing any module of that name it finds: run as a
# script, this file would be that module. Keep its folder off the import path before importing transformers.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor  # noqa: E402
from butler_cache.budget import TokenBudget  # noqa: E402
from butler_cache.kernels import sparse_attention  # noqa: E402
from butler_cache.kernels.scoring import score_reference  # noqa: E402
from butler_cache.kernels.sparse_attention import sparse_attention_naive  # noqa: E402
from butler_cache.selection import select_decode_tokens  # noqa: E402


def _sibling(name: str):
    """Another script of this folder, as a module (the folder itself stays off the import path)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, rep=max(reps, 25), return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, dtype, numel: int, reps: int) -> float:
    """Bytes per second read + written by a device-to-device copy of ``numel`` elements."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / seconds


def attention_step(device, dtype, batch, context, hq, hkv, d, d_imp, fraction, reps) -> dict:
    """Dense SDPA against the cache's decode-step path (Triton, and the PyTorch references) on random tensors."""
    from butler_cache.kernels.scoring.decode import score_decode

    gen = torch.Generator(device="cpu").manual_seed(context)
    q = torch.randn(batch, hq, 1, d, generator=gen).to(device, dtype)  # [B, HQ, 1, D]
    k = torch.randn(batch, hkv, context, d, generator=gen).to(device, dtype)  # [B, H_kv, L, D]
    v = torch.randn(batch, hkv, context, d, generator=gen).to(device, dtype)
    q_imp = torch.randn(batch, hq, 1, d_imp, generator=gen).to(device, dtype)  # [B, HQ, 1, d']
    k_imp = torch.randn(batch, hkv, context, d_imp, generator=gen).to(device, dtype)  # [B, H_kv, L, d']
    budget = TokenBudget(context // fraction, None, 4, 16)
    n = budget.max_selected(context)
    scale, imp_scale = d**-0.5, d_imp**-0.5

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def attend(selection, backend):
        keep = None if selection.all_kept else selection.keep
        return sparse_attention(q, k, v, selection.indices, keep, scale, backend=backend)  # [B, 1, HQ, D]

    def triton_step():
        return attend(select_decode_tokens(score_decode(q_imp, k_imp, imp_scale), budget), "triton")

    def torch_step():
        return attend(select_decode_tokens(score_reference(q_imp, k_imp, imp_scale), budget), "torch")

    scores = score_decode(q_imp, k_imp, imp_scale)  # [B, H_kv, 1, L]
    torch.testing.assert_close(scores.float(), score_reference(q_imp, k_imp, imp_scale).float(), rtol=2e-2, atol=2e-2)
    selection = select_decode_tokens(scores, budget)
    reference = sparse_attention_naive(q.double(), k.double(), v.double(), selection.indices, selection.keep, scale)
    error = ((attend(selection, "triton").double() - reference).norm() / reference.norm()).item()
    if not error < 1e-2:
        raise AssertionError(f"sparse kernel mismatch at context {context}: relative error {error:.2e}")

    esize = q.element_size()
    kernel_bytes = batch * hkv * n * 2 * d * esize + q.numel() * esize + selection.indices.numel() * 8
    step_bytes = k_imp.numel() * esize + q_imp.numel() * esize + kernel_bytes
    dense_bytes = 2 * k.numel() * esize
    t_dense = bench(dense, device, reps)
    t_score = bench(lambda: score_decode(q_imp, k_imp, imp_scale), device, reps)
    t_kernel = bench(lambda: attend(selection, "triton"), device, reps)
    t_step, t_torch = bench(triton_step, device, reps), bench(torch_step, device, reps)
    ideal = dense_bytes / step_bytes
    return {
        "batch": batch, "context": context, "dtype": str(dtype).replace("torch.", ""), "query_heads": hq,
        "kv_heads": hkv, "head_dim": d, "importance_dim": d_imp, "budget": n,
        "dense_ms": t_dense * 1e3, "scoring_ms": t_score * 1e3, "sparse_kernel_ms": t_kernel * 1e3,
        "step_ms": t_step * 1e3, "torch_step_ms": t_torch * 1e3, "kernel_GBps": kernel_bytes / t_kernel / 1e9,
        "speedup": t_dense / t_step, "torch_speedup": t_dense / t_torch, "ideal_speedup": ideal,
        "share_of_ideal": t_dense / t_step / ideal,
    }


def llama_model(small: bool, context: int, device, dtype):
    """A randomly initialised Llama-3.2-1B-shaped model (``small``: a two-layer toy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=4 * context)
    else:
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                             max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


@torch.no_grad()
def end_to_end(model, batch, context, steps, rounds, fraction, backend) -> list[dict]:
    """Decode-step times (prefill not timed) of dense and butler caches taking turns; one row per cache."""
    decode_cpu, decode_breakdown = _sibling("decode_cpu"), _sibling("decode_breakdown")
    device = next(model.parameters()).device
    predictor = ButlerPredictor(ButlerConfig.for_model(model)).to(device)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(context))
    prefilled, first = decode_cpu.prefill(model, ids.to(device))
    length = context + rounds * steps + 1
    butler = ButlerCache(model, predictor, token_budget=context // fraction, backend=backend)
    caches = {
        "dense (DynamicCache)": decode_cpu.copy_into(DynamicCache(config=model.config), prefilled),
        "dense (StaticCache)": decode_cpu.copy_into(StaticCache(config=model.config, max_cache_len=length), prefilled),
        f"butler 1/{fraction}": decode_cpu.copy_into(butler, prefilled),
    }
    del prefilled
    dense_bytes, butler_bytes = decode_breakdown.step_totals(decode_breakdown.step_bytes(model, butler, context))
    times = decode_cpu.interleaved(model, caches, first, steps, rounds, timed=set())  # ms per step, per round
    rows = []
    for name in caches:
        ms = decode_cpu.summarise(times[name], times["dense (DynamicCache)"])[0]
        row = {"batch": batch, "context": context, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
               "config": name, "ms_per_step": ms, "tokens_per_s": batch / ms * 1e3}
        for baseline in ("DynamicCache", "StaticCache"):  # speedup: 1 / the median per-round time ratio
            row[f"speedup_vs_{baseline}"] = 1 / decode_cpu.summarise(times[name], times[f"dense ({baseline})"])[1]
        row["ideal_speedup"] = dense_bytes / butler_bytes if name.startswith("butler") else 1.0
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    parser.add_argument("--steps", type=int, default=16, help="end to end: decode steps per cache per round")
    parser.add_argument("--rounds", type=int, default=5, help="end to end: rounds in which the caches take turns")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = 50 if cuda else 2
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)"}
    report["copy_GBps"] = copy_bandwidth(device, dtype, 1 << 28 if cuda else 1 << 16, reps) / 1e9
    print(f"copy bandwidth: {report['copy_GBps']:.0f} GB/s (read + written)")
    report["attention"] = []
    for context in [4096, 8192, 16384, 32768, 65536, 131072] if cuda else [512]:
        shape = dict(hq=32, hkv=8, d=128) if cuda else dict(hq=4, hkv=2, d=16)
        row = attention_step(device, dtype, 1, context, **shape, d_imp=16, fraction=16, reps=reps)
        row["kernel_share_of_copy_bw"] = row["kernel_GBps"] / report["copy_GBps"]
        report["attention"].append(row)
        print(json.dumps(row))
    report["end_to_end"] = []
    for context in [16384, 32768] if cuda else [512]:
        model = llama_model(not cuda, context, device, dtype)
        rows = end_to_end(model, 8 if cuda else 2, context, args.steps if cuda else 2, args.rounds if cuda else 2, 16,
                          "auto" if cuda else "triton")
        report["end_to_end"] += rows
        for row in rows:
            print(json.dumps(row))
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
