"""Build the held-out evaluation domains: text of kinds the training corpus (build_corpus.py) never holds.

    python benchmarks/corpus/build_heldout.py --out out/heldout
    python benchmarks/domains.py --heldout out/heldout ...

Writes ``<out>/<domain>.txt`` and ``<out>/manifest.json``:

- ``legal_prose``: the licence texts of Debian's base-files package (/usr/share/common-licenses);
- ``python_code``: CPython's standard-library sources (the running interpreter's top-level ``*.py``);
- ``chat``: the English dialogues of chatterbot-corpus (the training mix has only its other languages),
  each category one multi-turn chat rendered with the SmolLM2 chat template;
- ``structured``: CSV and TSV tables (vega_datasets' CSV files, /usr/share/distro-info, zoneinfo's
  ``.tab`` files); the training mix holds JSON, YAML and Markdown, no CSV.

These texts are reserved: never train or tune on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from build_corpus import CHATTERBOT_HELDOUT_LANGUAGE  # noqa: E402
from leaks import COMMON_LICENSES, cpython_stdlib  # noqa: E402
from packages import Package, fetch  # noqa: E402

CHATTERBOT = Package("pypi", "chatterbot-corpus", "1.3.3", "BSD-3-Clause")
VEGA_DATASETS = Package("pypi", "vega_datasets", "0.9.0", "MIT (package); each data set its own terms")
MAX_CHARS = 1_500_000  # per domain: far more than the benchmark reads


def _join(parts: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """Documents one after another, separated by a blank line, capped at MAX_CHARS on a document boundary;
    and the names of the documents used."""
    out, used, total = [], [], 0
    for name, text in parts:
        if total and total + len(text) > MAX_CHARS:
            break
        out.append(text.strip() + "\n")
        used.append(name)
        total += len(out[-1])
    return "\n".join(out), used


def legal_prose() -> list[tuple[str, str]]:
    files = sorted(p for p in COMMON_LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    return [(str(p), p.read_text(encoding="utf-8")) for p in files]


def python_code() -> list[tuple[str, str]]:
    return [(str(p), p.read_text(encoding="utf-8")) for p in sorted(cpython_stdlib().glob("*.py"))]


def chat(cache_dir: Path, tokenizer) -> list[tuple[str, str]]:
    root = fetch(CHATTERBOT, cache_dir).root / "chatterbot_corpus" / "data" / CHATTERBOT_HELDOUT_LANGUAGE
    parts = []
    for path in sorted(root.glob("*.yml")):
        messages = []
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(t) for t in turns if t is not None]
            messages += [{"role": ("user", "assistant")[j % 2], "content": t} for j, t in enumerate(turns[:len(turns) - len(turns) % 2])]
        if messages:
            parts.append((str(path), tokenizer.apply_chat_template(messages, tokenize=False)))
    return parts


def structured(cache_dir: Path) -> list[tuple[str, str]]:
    vega = fetch(VEGA_DATASETS, cache_dir).root / "vega_datasets" / "_data"
    files = sorted(vega.glob("*.csv")) + sorted(Path("/usr/share/distro-info").glob("*.csv"))
    files += sorted(Path("/usr/share/zoneinfo").glob("*.tab"))
    return [(str(p), p.read_text(encoding="utf-8")) for p in files]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/heldout"))
    parser.add_argument("--cache-dir", type=Path, default=Path("out/corpus-packages"))
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from butler_cache.default_model import GGUF_FILE, default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)
    args.out.mkdir(parents=True, exist_ok=True)
    domains = {"legal_prose": legal_prose(), "python_code": python_code(),
               "chat": chat(args.cache_dir, tokenizer), "structured": structured(args.cache_dir)}
    manifest = {}
    for name, parts in domains.items():
        text, used = _join(parts)
        if not text.strip():
            raise RuntimeError(f"held-out domain {name} came out empty: are its sources installed?")
        (args.out / f"{name}.txt").write_text(text, encoding="utf-8")
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        manifest[name] = {"files": used, "chars": len(text), "tokens": tokens}
        print(f"{name:>12}: {len(used):4d} files, {len(text) / 1e3:8.1f}k chars, {tokens / 1e3:7.1f}k tokens")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
