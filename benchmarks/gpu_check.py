"""One-shot device check: kernels against references on the GPU, then speed, in one command of at most 8 minutes.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json --plot benchmarks/results/gpu_check.png
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run      # tiny sizes on the CPU, as CI runs it

1. Correctness on the device: the Triton sparse decode kernel against `sparse_attention_naive` (float64) over head_dim
   64/128, GQA 1/4/8, fp16/bf16, budgets 256/2048, batch 1/8; the Triton scoring kernel against `score_reference`;
   the fused distillation loss (forward and the student gradients) against the PyTorch loss. A mismatch stops the
   run before anything is timed.
2. Copy bandwidth, and the sparse kernel's achieved bandwidth as a share of it (`kernels.attention_step`).
3. One decode step's attention at Llama-3.1-8B shapes, 8k to 128k tokens, against dense SDPA.
4. End-to-end decode of a randomly initialised Llama-3.2-1B-shaped model at 16k and 32k, batch 1 and 8: DynamicCache,
   StaticCache (eager and `torch.compile(mode="reduce-overhead")`, CUDA-graph captured) and ButlerCache (eager; its
   compiled decode step is not graph-capturable yet, and the report says so instead of a number).

Each phase checks the time left (``--minutes``, default 8) and is recorded as skipped rather than run past it.
Writes one JSON report and one PNG (attention-step and end-to-end speedups against their byte-bound ideals).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # see benchmarks/kernels.py

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import StaticCache  # noqa: E402

from butler_cache.kernels import sparse_attention  # noqa: E402
from butler_cache.kernels.scoring import score_reference  # noqa: E402
from butler_cache.kernels.sparse_attention import sparse_attention_naive  # noqa: E402
from butler_cache.training.losses import distillation_loss  # noqa: E402


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def check_sparse_decode(device, dtypes, head_dims, groups, budgets, batches, context: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for d in head_dims:
            for g in groups:
                for s in budgets:
                    for b in batches:
                        h = 2 if device.type == "cpu" else 8
                        q = torch.randn(b, h * g, 1, d, generator=gen).to(device, dtype)  # [B, HQ, 1, D]
                        k = torch.randn(b, h, context, d, generator=gen).to(device, dtype)  # [B, H_kv, L, D]
                        v = torch.randn(b, h, context, d, generator=gen).to(device, dtype)
                        idx = torch.stack([torch.randperm(context, generator=gen)[:s] for _ in range(b * h)])
                        idx = idx.view(b, h, 1, s).to(device)  # [B, H_kv, 1, S]
                        keep = (torch.rand(b, h, 1, s, generator=gen) > 0.1).to(device)
                        got = sparse_attention(q, k, v, idx, keep, d**-0.5, backend="triton")
                        want = sparse_attention_naive(q.double(), k.double(), v.double(), idx, keep, d**-0.5)
                        rows.append({"kernel": "sparse_decode", "dtype": str(dtype)[6:], "head_dim": d, "group": g,
                                     "budget": s, "batch": b, "rel_error": relative_error(got, want)})
    return rows


def check_scoring(device, dtypes, groups, lengths) -> list[dict]:
    from butler_cache.kernels.scoring.decode import score_decode

    rows = []
    gen = torch.Generator().manual_seed(1)
    for dtype in dtypes:
        for g in groups:
            for length in lengths:
                q = torch.randn(2, 2 * g, 1, 16, generator=gen).to(device, dtype)  # [B, HQ, 1, d']
                k = torch.randn(2, 2, length, 16, generator=gen).to(device, dtype)  # [B, H_kv, L, d']
                got, want = score_decode(q, k, 0.25), score_reference(q.double(), k.double(), 0.25)
                rows.append({"kernel": "scoring", "dtype": str(dtype)[6:], "group": g, "length": length,
                             "rel_error": relative_error(got, want)})
    return rows


def check_fused_loss(device, head_dims, lengths) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(2)
    for d in head_dims:
        for length in lengths:
            for loss in ("kl", "mse"):
                tq, tk = torch.randn(1, 4, length, d, generator=gen), torch.randn(1, 2, length, d, generator=gen)
                sq, sk = torch.randn(1, 4, length, 16, generator=gen), torch.randn(1, 2, length, 16, generator=gen)
                tq, tk, sq, sk = (x.to(device) for x in (tq, tk, sq, sk))
                results = {}
                for backend in ("triton", "torch"):
                    q, kk = sq.clone().requires_grad_(), sk.clone().requires_grad_()
                    total, count = distillation_loss(tq, tk, q, kk, teacher_scale=d**-0.5, student_scale=0.25,
                                                     loss=loss, backend=backend)
                    (total / count).backward()
                    results[backend] = (total / count, q.grad, kk.grad)
                errors = [relative_error(a, b) for a, b in zip(results["triton"], results["torch"], strict=True)]
                rows.append({"kernel": f"fused_loss_{loss}", "head_dim": d, "length": length,
                             "rel_error": max(errors)})
    return rows


def compiled_static_decode(model, batch: int, context: int, steps: int, rounds: int, dry_run: bool) -> dict:
    """ms per decode step of StaticCache under torch.compile (CUDA-graph captured on a GPU), after warm-up."""
    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=context + (rounds + 2) * steps + 2)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), past_key_values=cache, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    step = torch.compile(model.forward, mode=None if dry_run else "reduce-overhead", fullgraph=True,
                         backend="eager" if dry_run else "inductor")
    position = context
    times = []
    cuda = device.type == "cuda"
    for i in range(2 + rounds):  # two warm-up rounds: compile and capture
        for _ in range(steps):
            cache_position = torch.tensor([position], device=device)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                out = step(input_ids=token, past_key_values=cache, cache_position=cache_position, use_cache=True)
            token = out.logits[:, -1:].argmax(-1).clone()
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - start) * 1e3)
            position += 1
    times.sort()
    return {"batch": batch, "context": context, "config": "dense (StaticCache, compiled)",
            "ms_per_step": times[len(times) // 2], "tokens_per_s": batch / times[len(times) // 2] * 1e3}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rows = report.get("attention", [])
    if rows:
        xs = [r["context"] for r in rows]
        a.plot(xs, [r["speedup"] for r in rows], "o-", label="butler step (Triton)")
        a.plot(xs, [r["torch_speedup"] for r in rows], "s-", label="butler step (PyTorch)")
        a.plot(xs, [r["ideal_speedup"] for r in rows], "k--", label="byte-bound ideal")
        a.set_xscale("log", base=2)
        a.set_xlabel("context")
        a.set_ylabel("speedup over dense SDPA")
        a.set_title("attention of one decode step, 1/16 budget")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    rows = [r for r in report.get("end_to_end", []) if "speedup_vs_DynamicCache" in r]
    labels = [f"{r['config']}\nB={r['batch']} {r['context'] // 1024}k" for r in rows]
    b.bar(range(len(rows)), [r["speedup_vs_DynamicCache"] for r in rows])
    b.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=6)
    b.set_ylabel("speedup over DynamicCache")
    b.set_title("end-to-end decode, Llama-3.2-1B shapes")
    b.grid(alpha=0.3, axis="y")
    fig.suptitle(report["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    parser.add_argument("--minutes", type=float, default=8.0, help="time budget of the whole run")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    start = time.monotonic()
    kernels = _sibling("kernels")
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)", "skipped": []}

    def time_left(phase: str, needs_s: float) -> bool:
        ok = time.monotonic() - start + needs_s < args.minutes * 60
        if not ok:
            report["skipped"].append(f"{phase}: not started, under {needs_s:.0f} s of the time budget left")
        return ok

    # 1. correctness first
    if cuda:
        checks = check_sparse_decode(device, (torch.float16, torch.bfloat16), (64, 128), (1, 4, 8), (256, 2048), (1, 8), 8192)
        checks += check_scoring(device, (torch.float16, torch.bfloat16, torch.float32), (1, 4, 8), (1000, 8192, 65536))
        checks += check_fused_loss(device, (64, 128), (256, 1000))
    else:
        checks = check_sparse_decode(device, (torch.float32,), (16,), (1, 4), (8,), (1,), 64)
        checks += check_scoring(device, (torch.float32,), (1, 4), (100,))
        checks += check_fused_loss(device, (16,), (40,))
    report["checks"] = checks
    worst = max(checks, key=lambda r: r["rel_error"])
    print(f"{len(checks)} kernel checks against the references; worst relative error {worst['rel_error']:.2e} ({worst})")
    if worst["rel_error"] > 2e-2:
        raise AssertionError(f"a kernel disagrees with its reference: {worst}")
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = 30 if cuda else 2
    # 2-3. bandwidth and the attention step
    report["copy_GBps"] = kernels.copy_bandwidth(device, dtype, 1 << 28 if cuda else 1 << 16, reps) / 1e9
    report["attention"] = []
    for context in tqdm([8192, 16384, 32768, 65536, 131072] if cuda else [512], desc="attention step"):
        if not time_left(f"attention step at {context}", 20 if cuda else 1):
            break
        shape = dict(hq=32, hkv=8, d=128) if cuda else dict(hq=4, hkv=2, d=16)
        row = kernels.attention_step(device, dtype, 1, context, **shape, d_imp=16, fraction=16, reps=reps)
        row["kernel_share_of_copy_bw"] = row["kernel_GBps"] / report["copy_GBps"]
        report["attention"].append(row)
    # 4. end to end
    report["end_to_end"] = []
    for context in [16384, 32768] if cuda else [512]:
        model = kernels.llama_model(not cuda, context, device, dtype)
        for batch in (1, 8) if cuda else (1, 2):
            if not time_left(f"end to end at {context}, batch {batch}", 75 if cuda else 1):
                continue
            steps, rounds = (args.steps, args.rounds) if cuda else (2, 1)
            report["end_to_end"] += kernels.end_to_end(model, batch, context, steps, rounds, 16,
                                                       "auto" if cuda else "triton")
            if time_left(f"compiled StaticCache at {context}, batch {batch}", 60 if cuda else 1):
                row = compiled_static_decode(model, batch, context, steps, rounds, not cuda)
                dynamic = next(r for r in report["end_to_end"] if r["config"] == "dense (DynamicCache)"
                               and r["batch"] == batch and r["context"] == context)
                # timed after the eager caches, not interleaved with them
                row["speedup_vs_DynamicCache"] = dynamic["ms_per_step"] / row["ms_per_step"]
                report["end_to_end"].append(row)
            report["end_to_end"].append({"batch": batch, "context": context, "config": "butler 1/16 (compiled)",
                                         "not_measured": "the ButlerCache decode step is not graph-capturable yet"})
        del model
    report["seconds"] = round(time.monotonic() - start, 1)
    for row in report["end_to_end"]:
        print(json.dumps(row))
    print(f"done in {report['seconds']} s; skipped: {report['skipped'] or 'nothing'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
