"""Quality per held-out domain: every policy on text the predictor never saw (prose, code, chat, tables).

    python benchmarks/corpus/build_heldout.py --out out/heldout
    python benchmarks/domains.py --heldout out/heldout --json benchmarks/results/domains.json \\
        --plot benchmarks/results/domains.png
    # another predictor on the same harness, its rows added to the same JSON (the baselines are kept):
    python benchmarks/domains.py --heldout out/heldout --policies butler --longctx-policies butler \\
        --predictor my-predictor --label mine --json benchmarks/results/domains.json --update

Per domain (``<heldout>/<domain>.txt``):
- teacher-forced perplexity at each ``--sparsity`` and ``--windows`` (1: the paper's protocol; 16: the
  decode buffer), on ``--chunks`` evenly spaced chunks of ``--seq-len`` tokens;
- token-hit accuracy of every scoring policy (last query row, per KV head, top 50%);
- passkey and multi-key needle at ``--length`` tokens by real decoding with a ``--token-budget`` budget,
  the needles hidden between lines of the domain's own text (``--examples`` each).
Prints one markdown table per domain (for benchmarks/RESULTS.md); ``--table-only`` prints them from the JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/kernels.py would shadow the Hub package `kernels` that transformers probes for by import:
# keep this folder off the import path before importing transformers.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import time

import torch

from butler_cache import ButlerPredictor
from butler_cache.default_model import DEFAULT_PREDICTOR_DIR, load_model
from butler_cache.evaluation import sparse_perplexity
from butler_cache.evaluation.hits import policy_hits
from butler_cache.evaluation.longctx import make_longctx_examples
from butler_cache.evaluation.runner import cache_factory, longctx_accuracy
from butler_cache.training.data import TokenChunks

POLICIES = "dense,oracle,butler,h2o,snapkv,quest,streaming"
LONGCTX_TASKS = ("passkey", "multikey_needle")
KEY_FIELDS = ("domain", "metric", "label", "sparsity", "local_window", "token_budget", "length")



def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY_FIELDS)


def measure_domain(args, model, tokenizer, predictor, domain: str, text: str) -> list[dict]:
    """Every metric of one domain for the policies asked."""
    label = {p: (args.label if p == "butler" else p) for p in POLICIES.split(",")}
    base = {"domain": domain}
    rows: list[dict] = []
    chunks = TokenChunks.from_texts([text], tokenizer, args.seq_len)
    ppl_chunks, hit_chunks = chunks.evenly_spaced(args.chunks), chunks.evenly_spaced(args.hit_chunks)
    policies = [p for p in args.policies.split(",") if p]
    settings = [(int(w), float(s)) for w in args.windows.split(",") for s in args.sparsity.split(",")]
    runs = [("dense", None, None)] if "dense" in policies else []  # no budget: once per domain
    runs += [(p, w, s) for w, s in settings for p in policies if p != "dense"]
    for policy, window, sparsity in runs:
        start = time.monotonic()
        ppl = sparse_perplexity(model, ppl_chunks, policy="oracle" if policy == "dense" else policy,
                                sparsity=sparsity or 0.0, predictor=predictor, local_window=window or 1)
        rows.append({**base, "metric": "perplexity", "policy": policy, "label": label[policy], "sparsity": sparsity,
                     "local_window": window, "value": ppl, "tokens": ppl_chunks.input_ids.numel(),
                     "seconds": round(time.monotonic() - start, 1)})
        print(f"{domain:>14} perplexity {label[policy]:>10} sparsity {sparsity} window {window}: {ppl:.3f}")
    for policy in policies:
        if policy == "dense":
            continue
        hits = policy_hits(model, hit_chunks, policy, predictor=predictor, budgets=(args.token_budget,))
        rows.append({**base, "metric": "token_hits", "policy": policy, "label": label[policy],
                     "value": hits["per_kv_head/token_hits"], "chunks": len(hit_chunks)})
        print(f"{domain:>14} token hits {label[policy]:>10}: {rows[-1]['value']:.3f}")
    longctx_policies = [p for p in args.longctx_policies.split(",") if p]
    factories = {p: cache_factory(model, p, predictor=predictor, token_budget=args.token_budget, local_window=16)
                 for p in longctx_policies}
    for task in LONGCTX_TASKS:
        if not longctx_policies or args.examples == 0:
            break
        examples = make_longctx_examples(tokenizer, task, args.length, args.examples, seed=args.seed, haystack=text)
        accuracy = longctx_accuracy(model, tokenizer, examples, factories)
        for policy, acc in accuracy.items():
            rows.append({**base, "metric": task, "policy": policy, "label": label[policy], "value": acc,
                         "token_budget": None if policy == "dense" else args.token_budget, "length": args.length,
                         "local_window": None if policy == "dense" else 16, "examples": len(examples)})
            print(f"{domain:>14} {task} {label[policy]:>10}: {acc:.2f}")
    return [{**dict.fromkeys(KEY_FIELDS), **r} for r in rows]


def tables(rows: list[dict]) -> str:
    """One markdown table per domain: a row per policy (label), a column per setting."""
    out = []
    for domain in dict.fromkeys(r["domain"] for r in rows):
        mine = [r for r in rows if r["domain"] == domain]
        settings = sorted({(r["local_window"], r["sparsity"]) for r in mine
                           if r["metric"] == "perplexity" and r["sparsity"] is not None})
        cols = [f"ppl {s:.0%} w{w}" for w, s in settings] + ["token hits", "passkey", "multikey"]
        lines = [f"**{domain}**", "", "| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        oracle = {(r["local_window"], r["sparsity"]): r["value"] for r in mine
                  if r["metric"] == "perplexity" and r["label"] == "oracle"}
        for label in dict.fromkeys(r["label"] for r in mine):
            got = {(r["metric"], r["local_window"], r["sparsity"]): r["value"] for r in mine if r["label"] == label}
            cells = []
            for w, s in settings:
                if label == "dense":
                    value = next((v for (m, _, _), v in got.items() if m == "perplexity"), None)
                else:
                    value = got.get(("perplexity", w, s))
                cell = "" if value is None else f"{value:.3f}"
                if value is not None and label not in ("dense", "oracle") and (w, s) in oracle:
                    cell += f" ({value / oracle[w, s] - 1:+.1%})"
                cells.append(cell)
            hits = got.get(("token_hits", None, None))
            cells.append("" if hits is None else f"{hits:.3f}")
            for task in LONGCTX_TASKS:
                acc = next((v for (m, _, _), v in got.items() if m == task), None)
                cells.append("" if acc is None else f"{acc:.2f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n\n(perplexity: in brackets, against the oracle at the same setting)"


def plot(rows: list[dict], path: str) -> None:
    """Per domain: perplexity over dense at each setting (bars per policy), and the long-context accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(r["domain"] for r in rows))
    fig, axes = plt.subplots(2, len(domains), figsize=(4.2 * len(domains), 7), squeeze=False)
    for d, domain in enumerate(domains):
        mine = [r for r in rows if r["domain"] == domain]
        dense = next((r["value"] for r in mine if r["metric"] == "perplexity" and r["label"] == "dense"), None)
        settings = sorted({(r["local_window"], r["sparsity"]) for r in mine
                           if r["metric"] == "perplexity" and r["sparsity"] is not None})
        labels = [x for x in dict.fromkeys(r["label"] for r in mine if r["metric"] == "perplexity") if x != "dense"]
        width = 0.8 / max(len(labels), 1)
        ax = axes[0, d]
        for i, label in enumerate(labels):
            vals = {(r["local_window"], r["sparsity"]): r["value"] for r in mine
                    if r["metric"] == "perplexity" and r["label"] == label}
            xs = [j + (i - (len(labels) - 1) / 2) * width for j, s in enumerate(settings) if s in vals]
            ys = [vals[s] / dense if dense else vals[s] for s in settings if s in vals]
            ax.bar(xs, ys, width=width, label=label)
        ax.set_xticks(range(len(settings)), [f"{s:.0%}\nw{w}" for w, s in settings])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{domain}: perplexity / dense")
        ax.grid(alpha=0.3, axis="y")
        ax = axes[1, d]
        acc_labels = list(dict.fromkeys(r["label"] for r in mine if r["metric"] in LONGCTX_TASKS))
        for t, task in enumerate(LONGCTX_TASKS):
            vals = {r["label"]: r["value"] for r in mine if r["metric"] == task}
            xs = [i + (t - 0.5) * 0.4 for i, lab in enumerate(acc_labels) if lab in vals]
            ax.bar(xs, [vals[lab] for lab in acc_labels if lab in vals], width=0.4, label=task)
        ax.set_xticks(range(len(acc_labels)), acc_labels, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{domain}: long context (real-text haystack)")
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heldout", default="out/heldout", help="folder of <domain>.txt files")
    parser.add_argument("--domains", default=None, help="comma-separated (default: every .txt in --heldout)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--predictor", default=None, help="predictor folder (default: the shipped one)")
    parser.add_argument("--label", default="butler", help="name of the butler rows (to compare predictors)")
    parser.add_argument("--policies", default=POLICIES)
    parser.add_argument("--longctx-policies", default=POLICIES)
    parser.add_argument("--sparsity", default="0.5,0.8")
    parser.add_argument("--windows", default="1,16")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--chunks", type=int, default=4, help="perplexity chunks per domain")
    parser.add_argument("--hit-chunks", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096, help="long-context prompt length")
    parser.add_argument("--token-budget", type=int, default=256)
    parser.add_argument("--examples", type=int, default=20, help="examples per long-context task and domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--update", action="store_true", help="add the rows to --json, replacing rows of the same key")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--table-only", action="store_true", help="print the tables (and plot) of --json; measure nothing")
    args = parser.parse_args(argv)

    old = json.loads(Path(args.json).read_text())["rows"] if args.json and Path(args.json).is_file() else []
    if args.table_only:
        rows = old
    else:
        torch.manual_seed(args.seed)
        model, tokenizer = load_model(args.model)
        source = args.predictor or (DEFAULT_PREDICTOR_DIR if args.model == "default" else None)
        needs = "butler" in args.policies.split(",") + args.longctx_policies.split(",")
        predictor = ButlerPredictor.from_pretrained(source) if needs else None
        folder = Path(args.heldout)
        domains = args.domains.split(",") if args.domains else sorted(p.stem for p in folder.glob("*.txt"))
        if not domains:
            raise SystemExit(f"no <domain>.txt in {folder}")
        new: list[dict] = []
        for domain in domains:
            text = (folder / f"{domain}.txt").read_text(encoding="utf-8")
            new += measure_domain(args, model, tokenizer, predictor, domain, text)
        for r in new:
            r["predictor"] = str(source) if r["policy"] == "butler" else None
        keys = {row_key(r) for r in new}
        rows = [r for r in old if row_key(r) not in keys] + new if args.update else new
        if args.json:
            report = {"model": model.config._name_or_path, "seq_len": args.seq_len, "rows": rows}
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(tables(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
