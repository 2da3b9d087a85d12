"""Compile every Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed) and report its resources.

    python benchmarks/aot_compile.py --json benchmarks/results/aot_compile.json --summary

Each kernel at the block sizes its dispatcher chooses (``launch_config``) for head_dim 64 and 128, GQA 1, 4
and 8, fp16 and bf16, budgets 256-4096, contexts 8k-128k, batch 1 and 8 (8 KV heads, Llama-3.1-8B's);
shapes that share a compile are compiled once. Per compile: registers, spill bytes, static shared memory,
and an occupancy estimate (resident warps / maximum, from registers, shared memory and threads). Exits
with status 1 on a compile error or on any spill in a decode kernel (the fused loss is reported only).
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/kernels.py would shadow the PyPI package `kernels` that transformers probes for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os

from tqdm.auto import tqdm

from butler_cache.kernels import aot


def table(reports: list[dict]) -> str:
    lines = ["| kernel | arch | dtype | constants | warps | stages | registers | spills (st/ld B) | shared B | "
             "occupancy | limited by |", "|---" * 11 + "|"]
    for r in reports:
        consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["constants"].items())
        lines.append(f"| {r['kernel'].split(':')[1]} | sm_{r['arch']} | {r['dtype']} | {consts} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared_bytes']} | {r['occupancy']:.2f} | {r['limited_by']} |")
    return "\n".join(lines)


def summary_table(reports: list[dict]) -> str:
    """Per kernel and arch over all its compiles: how many, register and shared-memory ranges, spills, occupancy."""
    lines = ["| kernel | arch | compiles | registers | max spill stores (B) | compiles spilling | shared B | "
             "occupancy |", "|---" * 8 + "|"]
    groups: dict[tuple, list[dict]] = {}
    for r in reports:
        groups.setdefault((r["kernel"].split(":")[1], r["arch"]), []).append(r)
    for (kernel, arch), rows in groups.items():
        regs, shared, occ = ([r[k] for r in rows] for k in ("registers", "shared_bytes", "occupancy"))
        spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
        lines.append(f"| {kernel} | sm_{arch} | {len(rows)} | {min(regs)}-{max(regs)} | "
                     f"{max(r['spill_stores'] for r in rows)} | {len(spilling)} | {min(shared)}-{max(shared)} | "
                     f"{min(occ):.2f}-{max(occ):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="80,90")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", action="store_true", help="print the markdown table of every compile")
    parser.add_argument("--summary", action="store_true", help="print one markdown row per kernel and arch")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what Triton 3.9 does by default, minus its warning
    variants = aot.all_variants()
    reports, failures = [], []
    for arch in (int(a) for a in args.archs.split(",")):
        for variant in tqdm(variants, desc=f"sm_{arch}", unit=" kernel"):
            try:
                reports.append(aot.compile_variant(variant, arch).row())
            except Exception as error:  # noqa: BLE001 - a failed compile is a finding, reported and counted
                failures.append({"kernel": variant.kernel, "arch": arch, "constants": dict(variant.constants),
                                 "dtype": variant.dtype, "error": str(error)[-500:]})
    spilling = [r for r in reports if r["decode"] and (r["spill_stores"] or r["spill_loads"])]
    summary = {"compiled": len(reports), "failed": len(failures), "decode_kernels_spilling": len(spilling),
               "kernels_spilling": sum(1 for r in reports if r["spill_stores"] or r["spill_loads"])}
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "reports": reports, "failures": failures}, indent=1))
    if args.markdown:
        print(table(reports))
    if args.summary:
        print(summary_table(reports))
    print(json.dumps(summary))
    for failure in failures:
        print(f"FAILED {failure['kernel']} sm_{failure['arch']} {failure['constants']}: {failure['error']}")
    for r in spilling:
        print(f"SPILL {r['kernel']} sm_{r['arch']} {r['dtype']} {r['constants']}: {r['spill_stores']} B stored")
    return 1 if failures or spilling else 0


if __name__ == "__main__":
    sys.exit(main())
