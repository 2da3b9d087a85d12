"""The GPU benchmark script runs end to end on tiny sizes on the CPU (its numbers mean nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_benchmark_dry_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--dry-run", "--json", str(tmp_path / "k.json")],
                   check=True, env=env, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "k.json").read_text())
    assert report["copy_GBps"] > 0 and report["attention"][0]["ideal_speedup"] > 1
    assert report["end_to_end"][0]["butler_seconds"] > 0
