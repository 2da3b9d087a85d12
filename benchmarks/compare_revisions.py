"""A CPU decode benchmark of two revisions of butler_cache, side by side: before and after a change.

    python benchmarks/compare_revisions.py --base c2baa85 --repeats 3 -- --contexts 8192 --fractions 16

The base revision is exported (``git archive``) into a temporary folder and laid out as the installed package is
(``src/butler_cache`` with ``kernels/`` and ``integrations/`` inside); the working tree is the other side. Each
repeat runs ``benchmarks/decode_cpu.py`` of each revision (its own script, arguments after ``--``) in a fresh
process, the two sides one after the other, the one going first alternating between repeats (after one short
warm-up run each, which compiles its numba kernels), so that drifts of the machine hit both alike. Reported per
configuration: the median, over repeats, of ms per decode step and of the ratio to DynamicCache measured inside the
same process, and the after / before ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]


def export_revision(revision: str, into: Path) -> Path:
    """``revision`` of this repository as an importable tree under ``into``; returns the folder for PYTHONPATH."""
    archive = into / "rev.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), revision], check=True)
    tree = into / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    package = into / "path" / "butler_cache"
    shutil.copytree(tree / "src" / "butler_cache", package)
    for sub in ("kernels", "integrations"):
        shutil.copytree(tree / sub, package / sub)
    return into / "path"


def run_benchmark(script: Path, pythonpath: Path | None, arguments: list[str], out: Path) -> list[dict]:
    env = dict(os.environ)
    if pythonpath is not None:  # ahead of the editable install of the working tree (a meta-path finder, last)
        env["PYTHONPATH"] = str(pythonpath)
    # run from a neutral folder: the checkout's root on sys.path would shadow the PyPI package `kernels`
    subprocess.run([sys.executable, "-P", str(script), *arguments, "--json", str(out)], check=True, env=env,
                   cwd=out.parent, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare the working tree with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("benchmark_args", nargs="*", help="arguments of decode_cpu.py (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_path = export_revision(args.base, tmp)
        sides = {"before": (tmp / "tree" / "benchmarks" / "decode_cpu.py", base_path),
                 "after": (ROOT / "benchmarks" / "decode_cpu.py", None)}
        rows: dict[str, list[list[dict]]] = {side: [] for side in sides}
        for side, (script, path) in sides.items():  # compiles each side's numba kernels into its own cache first
            run_benchmark(script, path, ["--contexts", "512", "--fractions", "16", "--steps", "1", "--rounds", "1"],
                          tmp / f"{side}-warmup.json")
        with tqdm(total=args.repeats * len(sides), desc="benchmark runs") as bar:
            for repeat in range(args.repeats):
                order = list(sides.items()) if repeat % 2 == 0 else list(sides.items())[::-1]  # who goes first alternates
                for side, (script, path) in order:
                    rows[side].append(run_benchmark(script, path, args.benchmark_args, tmp / f"{side}-{repeat}.json"))
                    bar.update()
    summary = []
    for config in [r["config"] for r in rows["after"][0]]:
        entry = {"config": config, "context": rows["after"][0][0]["context"]}
        for side in sides:
            runs = [r for repeat in rows[side] for r in repeat if r["config"] == config]
            entry[f"{side}_ms"] = statistics.median(r["ms_per_step"] for r in runs)
            entry[f"{side}_ratio"] = statistics.median(r["ratio"] for r in runs)
        entry["after_over_before"] = entry["after_ms"] / entry["before_ms"]
        summary.append(entry)
    print(f"base {args.base} vs working tree, {args.repeats} alternating runs each of decode_cpu.py "
          f"{' '.join(args.benchmark_args)}")
    print("| context | configuration | before ms/step | after ms/step | after / before "
          "| before vs DynamicCache | after vs DynamicCache |")
    print("|---|---|---|---|---|---|---|")
    for e in summary:
        print(f"| {e['context']} | {e['config']} | {e['before_ms']:.1f} | {e['after_ms']:.1f} | "
              f"{e['after_over_before']:.3f} | {e['before_ratio']:.3f} | {e['after_ratio']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": args.base, "rows": summary}, indent=2))


if __name__ == "__main__":
    main()
