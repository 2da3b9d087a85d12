"""Ahead-of-time compilation of the Triton kernels for a GPU that is not there, with their resource usage.

Triton compiles a kernel to PTX and cubin for ``GPUTarget("cuda", arch, 32)`` without a driver; ``ptxas -v``
(shipped in the Triton wheel) then reports registers, spills and static shared memory. Every kernel is
compiled at the block sizes its dispatcher's ``launch_config`` chooses for real shapes, with Triton's
default warps and stages (what a launch uses), pointers marked 16-byte aligned (as torch allocates them).
Used by ``benchmarks/aot_compile.py`` (the report) and ``tests/ops/test_aot_compile.py`` (CI).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# per SM: registers, shared memory a block may use (bytes), threads, resident blocks
SM_LIMITS = {80: dict(registers=65536, shared=163 * 1024, threads=2048, blocks=32),
             90: dict(registers=65536, shared=227 * 1024, threads=2048, blocks=32)}
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@dataclass(frozen=True)
class KernelVariant:
    """One kernel at one set of compile-time constants and pointer dtypes."""

    kernel: str  # "module:function" below butler_cache.kernels
    dtype: str
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type) for every runtime argument
    constants: tuple[tuple[str, int | bool], ...]
    decode: bool  # a decode-step kernel: CI fails on any spill

    @property
    def function(self):
        module, name = self.kernel.split(":")
        return getattr(importlib.import_module(f"butler_cache.kernels.{module}"), name)


@dataclass
class CompileReport:
    kernel: str
    arch: int
    dtype: str
    constants: dict
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    occupancy: float  # resident warps / the SM's maximum, from registers, shared memory and threads
    limited_by: str
    decode: bool

    def row(self) -> dict:
        return asdict(self)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself assembles with for ``arch`` (its wheel ships two; the PTX version must match)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _resources(ptx: str, arch: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` from ``ptxas -v`` on ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        result = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", str(path), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}: {result.stderr[-2000:]}")
    log = result.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"could not read registers and spills from ptxas -v:\n{log}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> tuple[float, str]:
    """Resident warps per SM over the maximum, and the resource that limits them."""
    limits = SM_LIMITS[arch]
    threads = num_warps * 32
    per_block_registers = -(-registers * 32 // 256) * 256 * num_warps  # allocated per warp in units of 256
    bounds = {"threads": limits["threads"] // threads, "blocks": limits["blocks"],
              "registers": limits["registers"] // max(per_block_registers, 1),
              "shared memory": limits["shared"] // shared if shared else limits["blocks"]}
    limiter = min(bounds, key=bounds.get)
    return bounds[limiter] * num_warps / (limits["threads"] // 32), limiter


def compile_variant(variant: KernelVariant, arch: int) -> CompileReport:
    """Compile ``variant`` for ``sm_<arch>`` (raises on a compile error) and read its resources."""
    fn = variant.function
    if not hasattr(fn, "cache_key"):
        raise RuntimeError(f"{variant.kernel} is an interpreted function (TRITON_INTERPRET=1): compile it with "
                           "compile_isolated, which runs the compiler in a fresh process without the interpreter")
    names = fn.arg_names
    constants = dict(variant.constants)
    signature = {name: "constexpr" for name in constants}
    signature.update(dict(variant.signature))
    missing = [n for n in names if n not in signature]
    if missing:
        raise ValueError(f"{variant.kernel}: no type for arguments {missing}")
    pointers = [(names.index(n),) for n, t in variant.signature if t.startswith("*")]
    attrs = {index: [["tt.divisibility", 16]] for index in pointers}
    source = ASTSource(fn=fn, signature={n: signature[n] for n in names},
                       constexprs={(names.index(n),): v for n, v in constants.items()}, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    registers, stores, loads = _resources(compiled.asm["ptx"], arch)
    meta = compiled.metadata
    occ, limiter = occupancy(arch, registers, meta.shared, meta.num_warps)
    return CompileReport(variant.kernel, arch, variant.dtype, constants, meta.num_warps, meta.num_stages, registers,
                         stores, loads, meta.shared, round(occ, 3), limiter, variant.decode)


def compile_isolated(variants: list[KernelVariant], arch: int) -> list[CompileReport]:
    """`compile_variant` for each variant in a fresh Python process without ``TRITON_INTERPRET``: under the
    interpreter (how the tests run the kernels on CPUs) ``@triton.jit`` functions cannot be compiled."""
    payload = json.dumps({"arch": arch, "variants": [asdict(v) for v in variants]})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    # run from a neutral folder: `-m` puts the working directory on sys.path, and from the repository root its
    # top-level kernels/ folder would shadow the PyPI package `kernels` that transformers probes for
    result = subprocess.run([sys.executable, "-m", "butler_cache.kernels.aot"], input=payload, capture_output=True,
                            text=True, env=env, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile for sm_{arch} failed:\n{result.stderr[-3000:]}")
    return [CompileReport(**row) for row in json.loads(result.stdout)]


def _ints(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple((n, "i32") for n in names)


def sparse_decode_variants(dtype: str, head_dim: int, group: int, budget: int, rows: int) -> list[KernelVariant]:
    from .sparse_attention.decode import launch_config

    config = launch_config(rows, group, head_dim, head_dim, budget)
    ptr = DTYPES[dtype]
    fwd = (("q", ptr), ("k", ptr), ("v", ptr), ("idx", "*i64"), ("keep", "*i8"), ("part_m", "*fp32"),
           ("part_l", "*fp32"), ("part_o", "*fp32"), ("scale", "fp32"),
           *_ints("S", "G", "K", "V", "H", "SPLIT", "sq_b", "sq_h", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h", "sv_l",
                  "si_b", "si_h"))
    merge = (("part_m", "*fp32"), ("part_l", "*fp32"), ("part_o", "*fp32"), ("out", ptr),
             *_ints("G", "V", "H", "so_b", "so_h"))
    merge_constants = {k: config[k] for k in ("BG", "BV", "NS")}
    return [KernelVariant("sparse_attention.decode:sparse_decode_fwd_kernel", dtype, fwd, tuple(config.items()), True),
            KernelVariant("sparse_attention.decode:sparse_decode_merge_kernel", dtype, merge,
                          tuple(merge_constants.items()), True)]


def scoring_variants(dtype: str, group: int, dim: int, length: int, rows: int) -> list[KernelVariant]:
    from .scoring.decode import launch_config

    config = launch_config(rows, group, dim, length)
    ptr = DTYPES[dtype]
    logits = (("q", ptr), ("k", ptr), ("logits", "*fp32"), ("part_m", "*fp32"), ("part_l", "*fp32"), ("scale", "fp32"),
              *_ints("L", "G", "E", "H", "SPLIT", "sq_b", "sq_h", "sk_b", "sk_h", "sk_l"))
    group_max = (("logits", "*fp32"), ("part_m", "*fp32"), ("part_l", "*fp32"), ("out", "*fp32"),
                 *_ints("L", "G", "SPLIT_L"))
    return [KernelVariant("scoring.decode:score_logits_kernel", dtype, logits, tuple(config.items()), True),
            KernelVariant("scoring.decode:group_max_kernel", dtype, group_max,
                          tuple((k, config[k]) for k in ("BG", "BL", "NS")), True)]


def distill_loss_variants(dtype: str, head_dim: int, dim: int, kl: bool, padded: bool) -> list[KernelVariant]:
    from .distill_loss.fused import launch_config

    config = {**launch_config(head_dim, dim), "KL": kl, "HAS_PAD": padded}
    teacher, student = DTYPES[dtype], "*fp32"  # teacher activations in the model's dtype, the predictor's in fp32
    pointers = (("tq", teacher), ("tk", teacher), ("sq", student), ("sk", student), ("pad", "*i8"))
    scalars = (("ts", "fp32"), ("ss", "fp32"), *_ints("T", "D", "E", "HQ", "GT", "GS"))
    fwd = (*pointers, ("loss", "*fp32"), ("lse_t", "*fp32"), ("lse_s", "*fp32"), ("count", "*fp32"), *scalars)
    bwd = (*pointers, ("lse_t", "*fp32"), ("lse_s", "*fp32"), ("rows_ok", "*fp32"))
    return [KernelVariant("distill_loss.fused:distill_fwd_kernel", dtype, fwd, tuple(config.items()), False),
            KernelVariant("distill_loss.fused:distill_bwd_dq_kernel", dtype,
                          (*bwd, ("dsq", "*fp32"), ("g", "fp32"), *scalars), tuple(config.items()), False),
            KernelVariant("distill_loss.fused:distill_bwd_dk_kernel", dtype,
                          (*bwd, ("dsk", "*fp32"), ("g", "fp32"), *scalars), tuple(config.items()), False)]


def all_variants(dtypes=("fp16", "bf16"), head_dims=(64, 128), groups=(1, 4, 8), budgets=(256, 1024, 4096),
                 contexts=(8192, 32768, 131072), batches=(1, 8), kv_heads: int = 8) -> list[KernelVariant]:
    """Every distinct compile of the kernels over the shapes asked (many shapes share one compile)."""
    variants: dict[KernelVariant, None] = {}
    for dtype in dtypes:
        for batch in batches:
            rows = batch * kv_heads
            for head_dim in head_dims:
                for group in groups:
                    for budget in budgets:
                        variants.update(dict.fromkeys(sparse_decode_variants(dtype, head_dim, group, budget, rows)))
            for group in groups:
                for length in contexts:
                    variants.update(dict.fromkeys(scoring_variants(dtype, group, 16, length, rows)))
        for head_dim in head_dims:
            for kl in (True, False):
                for padded in (False, True):
                    variants.update(dict.fromkeys(distill_loss_variants(dtype, head_dim, 16, kl, padded)))
    return list(variants)


def _main() -> None:
    """`compile_isolated`'s worker: variants as JSON on stdin, reports as JSON on stdout."""
    request = json.load(sys.stdin)
    variants = [KernelVariant(v["kernel"], v["dtype"], tuple(map(tuple, v["signature"])),
                              tuple(map(tuple, v["constants"])), v["decode"]) for v in request["variants"]]
    print(json.dumps([compile_variant(v, request["arch"]).row() for v in variants]))


if __name__ == "__main__":
    _main()
