"""GPU kernel benchmarks, side by side in one run (``--dry-run``: tiny sizes on the CPU, for CI).

    python benchmarks/kernels.py                 # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/kernels.py --dry-run

1. Device copy bandwidth (a large device-to-device copy, bytes read + written).
2. Sparse decode kernel: achieved bandwidth on the bytes it must read (selected K/V rows, queries,
   indices), as a share of the copy bandwidth.
3. One decode step's attention, Llama-3.1-8B shapes (32 query / 8 KV heads, head_dim 128), 4k-128k:
   dense SDPA over the full cache versus scoring (d' = 16) + top-k + sparse attention at a 1/16 budget,
   with the byte-bound ideal speedup beside it.
4. End-to-end decode tokens/s of a randomly initialised Llama-3.2-1B-shaped model at 16k and 32k,
   batch 8, dense versus ButlerCache (untrained predictor, 1/16 budget).
Every figure states batch, dtype, context and the ideal. A speedup is reported only when the sparse
output matches the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# transformers probes for the Hub package `kernels` by importing any module of that name it finds: run as a
# script, this file would be that module. Keep its folder off the import path before importing transformers.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor  # noqa: E402
from butler_cache.compat import cache_argument
from butler_cache.kernels import sparse_attention  # noqa: E402
from butler_cache.kernels.sparse_attention import sparse_attention_naive  # noqa: E402


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
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / seconds


def attention_step(device, dtype, batch, context, hq, hkv, d, d_imp, fraction, reps, check: bool):
    gen = torch.Generator(device="cpu").manual_seed(context)
    q = torch.randn(batch, hq, 1, d, generator=gen).to(device, dtype)
    k = torch.randn(batch, hkv, context, d, generator=gen).to(device, dtype)
    v = torch.randn(batch, hkv, context, d, generator=gen).to(device, dtype)
    q_imp = torch.randn(batch, hq, 1, d_imp, generator=gen).to(device, dtype)
    k_imp = torch.randn(batch, hkv, context, d_imp, generator=gen).to(device, dtype)
    budget = context // fraction
    scale, g = d**-0.5, hq // hkv

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def select():
        s = torch.einsum("bhgte,bhle->bhgtl", q_imp.view(batch, hkv, g, 1, d_imp), k_imp).amax(2)  # [B, H, 1, L]
        return s.topk(budget, dim=-1).indices

    idx = select()
    keep = torch.ones_like(idx, dtype=torch.bool)

    def sparse():
        return sparse_attention(q, k, v, idx, keep, scale, backend="triton")

    def step():
        i = select()
        return sparse_attention(q, k, v, i, keep, scale, backend="triton")

    if check:
        ref = sparse_attention_naive(q.double(), k.double(), v.double(), idx, keep, scale)
        err = ((sparse().double() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise AssertionError(f"sparse kernel mismatch: relative error {err:.2e}")
    esize = q.element_size()
    kernel_bytes = batch * hkv * budget * 2 * d * esize + q.numel() * esize + idx.numel() * 8
    dense_bytes = 2 * k.numel() * esize
    step_bytes = k_imp.numel() * esize + kernel_bytes
    t_dense, t_sparse, t_step = bench(dense, q.device, reps), bench(sparse, q.device, reps), bench(step, q.device, reps)
    return {
        "batch": batch, "context": context, "dtype": str(dtype).replace("torch.", ""), "budget": budget,
        "dense_ms": t_dense * 1e3, "sparse_kernel_ms": t_sparse * 1e3, "step_ms": t_step * 1e3,
        "kernel_GBps": kernel_bytes / t_sparse / 1e9, "speedup": t_dense / t_step,
        "ideal_speedup": dense_bytes / step_bytes,
    }


def end_to_end(device, dtype, batch, context, new_tokens, fraction, small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=4 * context)
    else:  # Llama-3.2-1B shapes
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                             max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    predictor = ButlerPredictor(ButlerConfig.for_model(model)).to(device)
    ids = torch.randint(0, config.vocab_size, (batch, context), device=device)
    out = {}
    for name in ("dense", "butler"):
        def fresh_cache(name=name):
            return None if name == "dense" else ButlerCache(model, predictor, token_budget=context // fraction)

        with torch.no_grad():
            model.generate(input_ids=ids, **cache_argument(fresh_cache()), max_new_tokens=2, do_sample=False)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(input_ids=ids, **cache_argument(fresh_cache()), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
        out[f"{name}_seconds"] = time.perf_counter() - start
    out.update({"batch": batch, "context": context, "dtype": str(dtype).replace("torch.", ""), "new_tokens": new_tokens,
                "speedup_incl_prefill": out["dense_seconds"] / out["butler_seconds"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = 50 if cuda else 2
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)"}
    report["copy_GBps"] = copy_bandwidth(device, dtype, 1 << 28 if cuda else 1 << 16, reps) / 1e9
    contexts = [4096, 8192, 16384, 32768, 65536, 131072] if cuda else [256]
    report["attention"] = []
    for context in contexts:
        row = attention_step(device, dtype, 1 if cuda else 1, context, 32 if cuda else 4, 8 if cuda else 2,
                             128 if cuda else 16, 16, 16, reps, check=True)
        row["kernel_share_of_copy_bw"] = row["kernel_GBps"] / report["copy_GBps"]
        report["attention"].append(row)
        print(json.dumps(row))
    report["end_to_end"] = [
        end_to_end(device, dtype, 8 if cuda else 1, c, 64 if cuda else 2, 16, small=not cuda)
        for c in ([16384, 32768] if cuda else [512])
    ]
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
