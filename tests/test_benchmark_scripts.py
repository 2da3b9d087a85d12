"""The GPU benchmark script runs end to end on tiny sizes on the CPU (its numbers mean nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from butler_cache.kernels import NUMBA_AVAILABLE

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_benchmark_dry_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--dry-run", "--json", str(tmp_path / "k.json")],
                   check=True, env=env, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "k.json").read_text())
    step = report["attention"][0]
    assert report["copy_GBps"] > 0 and step["ideal_speedup"] > 1 and step["budget"] == 512 // 16
    assert all(step[f] > 0 for f in ("dense_ms", "scoring_ms", "sparse_kernel_ms", "step_ms", "torch_step_ms"))
    assert step["share_of_ideal"] == pytest.approx(step["speedup"] / step["ideal_speedup"])
    rows = {row["config"]: row for row in report["end_to_end"]}
    assert set(rows) == {"dense (DynamicCache)", "dense (StaticCache)", "butler 1/16"}
    assert rows["dense (DynamicCache)"]["speedup_vs_DynamicCache"] == 1.0
    assert rows["butler 1/16"]["ideal_speedup"] > 1 and all(r["tokens_per_s"] > 0 and r["batch"] == 2 for r in rows.values())


def test_gpu_check_dry_run(tmp_path):
    """The one-shot device check end to end on tiny sizes: kernel checks, attention step, end to end with the
    compiled StaticCache step, its JSON and PNG."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json",
                    str(tmp_path / "g.json"), "--plot", str(tmp_path / "g.png")], check=True, env=env,
                   capture_output=True, timeout=600)
    report = json.loads((tmp_path / "g.json").read_text())
    kernels = {row["kernel"] for row in report["checks"]}
    assert kernels == {"sparse_decode", "scoring", "fused_loss_kl", "fused_loss_mse"}
    assert max(row["rel_error"] for row in report["checks"]) < 2e-2
    configs = [row["config"] for row in report["end_to_end"]]
    assert configs.count("dense (StaticCache, compiled)") == 2 and report["skipped"] == []
    assert all(row["ms_per_step"] > 0 for row in report["end_to_end"] if "ms_per_step" in row)
    assert (tmp_path / "g.png").stat().st_size > 0


def test_compiled_decode_benchmark_runs(tmp_path):
    """decode_compiled.py end to end at a toy size, compiled fullgraph (dynamo's eager backend, to keep CI short):
    five configurations, per-round ratios, the byte floor for the two butler caches."""
    _run_script("decode_compiled.py", "--contexts", "96", "--fraction", "2", "--rounds", "2", "--steps", "1",
                "--warmup", "1", "--compile-backend", "eager", "--json", str(tmp_path / "c.json"))
    report = json.loads((tmp_path / "c.json").read_text())
    rows = {row["config"]: row for row in report["rows"]}
    assert list(rows) == ["DynamicCache (eager)", "StaticCache (eager)", "StaticCache (compiled)",
                          "ButlerCache (eager)", "ButlerStaticCache (compiled)"]
    assert all(row["ms_per_step"] > 0 and row["budget"] == 48 for row in rows.values())
    assert rows["StaticCache (compiled)"]["vs StaticCache (compiled)"] == [1.0, 1.0, 1.0]
    low, ratio, high = (rows["ButlerStaticCache (compiled)"]["vs StaticCache (compiled)"][i] for i in (1, 0, 2))
    assert low <= ratio <= high
    floor = rows["ButlerStaticCache (compiled)"]["byte_floor"]  # at 96 tokens, above 1: importance keys + predictor
    assert floor > 0 and floor != 1 and rows["StaticCache (eager)"]["byte_floor"] == 1


def _run_script(name: str, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], check=True, env=env,
                   capture_output=True, timeout=900)


def test_cpu_benchmarks_run_on_the_default_model(tmp_path):
    """decode_cpu.py, decode_breakdown.py and prediction_interval.py end to end at toy sizes (their numbers
    mean nothing here)."""
    backends = "torch,numba" if NUMBA_AVAILABLE else "torch"
    _run_script("decode_cpu.py", "--contexts", "96", "--fractions", "2", "--steps", "2", "--rounds", "2",
                "--backends", backends, "--batch", "2", "--json", str(tmp_path / "d.json"))
    rows = json.loads((tmp_path / "d.json").read_text())
    assert all(r["batch"] == 2 for r in rows)
    butler = ["butler 1/2 (torch)", "butler 1/2 (numba)"] if NUMBA_AVAILABLE else ["butler 1/2"]
    assert [r["config"] for r in rows] == ["dense (DynamicCache)", "dense (StaticCache)", *butler]
    assert rows[0]["ratio"] == 1.0 and rows[0]["ratio_range"] == [1.0, 1.0]  # per-round ratios of the baseline itself
    assert rows[2]["ratio_range"][0] <= rows[2]["ratio"] <= rows[2]["ratio_range"][1] and rows[2]["predictor_share"] > 0
    assert all(r["predictor_share"] is None for r in rows[3:])  # the fused numba step: not separable
    assert all(0 < r["attention_ms"] < r["ms_per_step"] for r in rows)
    _run_script("decode_breakdown.py", "--context", "96", "--fraction", "2", "--steps", "2", "--probe-repeats", "5",
                "--backend", "numba" if NUMBA_AVAILABLE else "torch", "--json", str(tmp_path / "b.json"))
    breakdown = json.loads((tmp_path / "b.json").read_text())
    dense, butler = breakdown["rows"]
    assert all(value > 0 for value in breakdown["probes"].values())
    assert 0 < dense["attention"] < dense["step"] and set(dense) == {"config", "step", "attention"}
    parts = ["producers", "cache updates"] + (["kernel"] if NUMBA_AVAILABLE else [])
    assert all(0 < butler[p] < butler["step"] for p in parts) and set(butler) == {"config", "step", "attention", *parts}
    read, floor = breakdown["bytes"], breakdown["floor"]
    assert read["butler_dense_kv"] < read["dense_kv"] and read["importance_keys"] > 0 and read["predictor"] > 0
    assert read["selected_rows"] * 2 == read["dense_kv"] - read["butler_dense_kv"]  # budget 1/2 of the sparse layers' K/V
    sparse_kv = read["dense_kv"] - read["butler_dense_kv"]
    assert read["importance_keys"] * (64 + 64) == sparse_kv * 16  # d' = 16 per KV head beside SmolLM2's K + V rows
    assert floor["butler_MB"] * 1e6 == pytest.approx(sum(read.values()) - read["dense_kv"])
    (tmp_path / "text.txt").write_text(" ".join(f"word{i % 50} is here." for i in range(200)))
    _run_script("prediction_interval.py", "--context", "96", "--fraction", "2", "--intervals", "1,2", "--steps", "2",
                "--rounds", "2", "--backend", "numba" if NUMBA_AVAILABLE else "torch",
                "--text", str(tmp_path / "text.txt"), "--chunks", "1", "--seq-len", "48", "--budget", "24",
                "--oracle-intervals", "1,2", "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png"))
    rows = {r["config"]: r for r in json.loads((tmp_path / "p.json").read_text())}
    butler = {"butler, interval 1", "butler, interval 2", "butler, interval 2 + neighbours"}
    timed = {"dense (DynamicCache)", "dense (StaticCache)", *butler}
    assert set(rows) == {"dense", "oracle", "oracle, interval 2", *timed}
    assert all(0 < rows[c]["attention_ms"] < rows[c]["ms_per_step"] for c in timed)
    assert rows["dense (StaticCache)"]["ratio_static_range"] == [1.0, 1.0]
    assert all(r["ratio_static_range"][0] <= r["ratio_static"] <= r["ratio_static_range"][1] for r in map(rows.get, timed))
    assert all(rows[c]["decode_perplexity"] > 1 for c in {"dense", "oracle", "oracle, interval 2", *butler})
    assert all(rows[c]["decode_perplexity"] is None for c in timed - butler)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictor_quality_script_runs(tmp_path):
    """predictor_quality.py on a toy text: one row per predictor, perplexity per local window."""
    (tmp_path / "text.txt").write_text(" ".join(f"word{i % 50} is here." for i in range(400)))
    _run_script("predictor_quality.py", "--text-file", str(tmp_path / "text.txt"), "--seq-len", "64", "--chunks", "1",
                "--hit-chunks", "1", "--local-windows", "1,8", "--json", str(tmp_path / "q.json"))
    report = json.loads((tmp_path / "q.json").read_text())
    shipped = report["results"][-1]
    assert report["local_windows"] == [1, 8] and set(shipped["perplexity"]) == {"1", "8"}
    assert 0.0 <= shipped["per_kv_head/token_hits"] <= 1.0 and shipped["perplexity"]["1"] > 1


def test_domains_script_measures_every_policy_per_domain(tmp_path):
    """domains.py on a tiny model and two toy domains: every metric of every policy, then --update with a
    second predictor keeps the baselines' rows and adds its own."""
    from butler_cache import ButlerConfig, ButlerPredictor

    from .conftest import tiny_model
    from .test_eval_command import WORDS
    from .test_evaluation import _word_tokenizer

    model = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "model")
    _word_tokenizer(WORDS + [str(d) for d in range(10)]).save_pretrained(tmp_path / "model")
    for seed in (1, 2):
        ButlerPredictor(ButlerConfig.for_model(model, layer_stride=2)).save_pretrained(tmp_path / f"p{seed}")
    (tmp_path / "held").mkdir()
    for d, name in enumerate(["prose", "code"]):
        lines = [" ".join(WORDS[(i * (3 + d)) % len(WORDS):][:5]) + f" {i % 10}\n" for i in range(300)]
        (tmp_path / "held" / f"{name}.txt").write_text("".join(lines))
    common = ["--heldout", str(tmp_path / "held"), "--model", str(tmp_path / "model"), "--seq-len", "48",
              "--chunks", "2", "--hit-chunks", "1", "--length", "120", "--token-budget", "24", "--examples", "2",
              "--json", str(tmp_path / "d.json")]
    _run_script("domains.py", *common, "--predictor", str(tmp_path / "p1"), "--policies", "dense,oracle,butler,h2o,quest",
                "--longctx-policies", "dense,butler,streaming", "--plot", str(tmp_path / "d.png"))
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    for domain in ("prose", "code"):
        mine = [r for r in rows if r["domain"] == domain]
        ppl = {(r["label"], r["sparsity"], r["local_window"]) for r in mine if r["metric"] == "perplexity"}
        assert ppl == {("dense", None, None)} | {(p, s, w) for p in ("oracle", "butler", "h2o", "quest")
                                                 for s in (0.5, 0.8) for w in (1, 16)}
        assert {r["label"] for r in mine if r["metric"] == "token_hits"} == {"oracle", "butler", "h2o", "quest"}
        assert next(r["value"] for r in mine if r["metric"] == "token_hits" and r["label"] == "oracle") == 1.0
        for task in ("passkey", "multikey_needle"):
            assert {r["label"] for r in mine if r["metric"] == task} == {"dense", "butler", "streaming"}
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _run_script("domains.py", *common, "--predictor", str(tmp_path / "p2"), "--label", "second", "--policies", "butler",
                "--longctx-policies", "butler", "--windows", "1", "--sparsity", "0.5", "--update")
    updated = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert len(updated) == len(rows) + 2 * (1 + 1 + 2)  # per domain: one perplexity, hits, two long-context tasks
    assert {r["predictor"] for r in updated if r["label"] == "second"} == {str(tmp_path / "p2")}
