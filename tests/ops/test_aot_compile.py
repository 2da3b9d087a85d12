"""The decode kernels compile for real GPUs (sm_80, sm_90) without register spills, at the launch
configurations their dispatchers choose; compiled ahead of time on the CPU (no GPU needed)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

DECODE_SHAPES = [(64, 1, 256, 1), (64, 8, 4096, 8), (128, 4, 1024, 1), (128, 8, 4096, 8)]  # head_dim, GQA, budget, batch
SCORING_SHAPES = [(8192, 1), (131072, 8)]  # context, batch


@pytest.fixture(scope="module")
def aot():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as error:  # noqa: BLE001 - no NVIDIA backend in this triton build
        pytest.skip(f"triton has no NVIDIA backend with ptxas here: {error}")
    from butler_cache.kernels import aot

    return aot


@pytest.fixture(scope="module", params=[80, 90], ids=lambda a: f"sm_{a}")
def decode_reports(request, aot):
    """Every decode kernel at the shapes above, compiled in one process per arch."""
    variants = [v for d, g, s, b in DECODE_SHAPES for v in aot.sparse_decode_variants("bf16", d, g, s, rows=b * 8)]
    variants += [v for ctx, b in SCORING_SHAPES for v in aot.scoring_variants("fp16", 4, 16, ctx, rows=b * 8)]
    variants = list(dict.fromkeys(variants))
    return request.param, variants, aot.compile_isolated(variants, request.param)


def test_decode_kernels_compile_without_spills(aot, decode_reports):
    arch, variants, reports = decode_reports
    assert [r.kernel for r in reports] == [v.kernel for v in variants]
    assert {r.kernel.split(":")[1] for r in reports} == {"sparse_decode_fwd_kernel", "sparse_decode_merge_kernel",
                                                         "score_logits_kernel", "group_max_kernel"}
    for report in reports:
        assert report.arch == arch and report.decode
        assert report.spill_stores == 0 and report.spill_loads == 0, report
        assert 0 < report.registers <= 255 and 0 < report.occupancy <= 1
        assert report.shared_bytes <= aot.SM_LIMITS[arch]["shared"]


def test_fused_loss_compiles_and_a_spilling_kernel_is_reported(aot):
    """The fused loss compiles; and the spill check can fail: a gathered block of 64 rows at head_dim 128 (the
    old launch choice) spills."""
    variant = aot.sparse_decode_variants("bf16", 128, 4, 1024, rows=8)[0]
    old_choice = dataclasses.replace(variant, constants=tuple({**dict(variant.constants), "BS": 64}.items()))
    loss = aot.distill_loss_variants("bf16", head_dim=64, dim=16, kl=True, padded=True)
    *loss_reports, spilling = aot.compile_isolated([*loss, old_choice], 90)
    assert len(loss_reports) == 3 and all(r.registers > 0 for r in loss_reports)
    assert spilling.spill_stores > 0


def test_occupancy_estimate(aot):
    # 128 threads at 64 registers: 65536 / (64 * 128) = 8 blocks = 32 warps of 64
    assert aot.occupancy(90, registers=64, shared=0, num_warps=4) == (0.5, "registers")
    # 100 KB of shared memory per block: 2 blocks on sm_90 (227 KB), 1 on sm_80 (163 KB)
    assert aot.occupancy(90, registers=32, shared=100 * 1024, num_warps=4) == (8 / 64, "shared memory")
    assert aot.occupancy(80, registers=32, shared=100 * 1024, num_warps=4) == (4 / 64, "shared memory")


def test_interpreted_kernels_are_refused_with_a_clear_error(aot, monkeypatch):
    variant = aot.sparse_decode_variants("bf16", 64, 1, 256, rows=8)[0]
    monkeypatch.setattr(aot.KernelVariant, "function", property(lambda self: object()))
    with pytest.raises(RuntimeError, match="interpreted function"):
        aot.compile_variant(variant, 90)
