"""``butler-cache eval {perplexity,hits,coref,longctx}``: every policy on one harness, as JSON and a plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..predictor import ButlerPredictor
from ..training.data import TokenChunks
from .coref import make_coref_examples
from .hits import policy_hits
from .longctx import TASKS, make_longctx_examples
from .perplexity import sparse_perplexity
from .runner import cache_factory, coref_generation, coref_teacher_forced, longctx_accuracy


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="compare policies on one harness (perplexity, hits, coref, longctx)")
    ev.add_argument("task", choices=["perplexity", "hits", "coref", "longctx"])
    ev.add_argument("--policies", default="dense,oracle,butler,h2o,snapkv,quest,streaming,random",
                    help="comma-separated; 'dense' is full attention")
    ev.add_argument("--sparsity", default="0.5", help="comma-separated fractions of the past dropped per query")
    ev.add_argument("--token-budget", default=None, help="comma-separated budgets (hits, longctx)")
    ev.add_argument("--text-file", default=None, help="text for perplexity / hits (wikitext-2 test.txt)")
    ev.add_argument("--seq-len", type=int, default=1024)
    ev.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of the text")
    ev.add_argument("--examples", type=int, default=200, help="coref / longctx examples per setting")
    ev.add_argument("--lengths", default="1024,2048,4096,8192", help="longctx context lengths")
    ev.add_argument("--tasks", default=",".join(TASKS), help="longctx tasks")
    ev.add_argument("--haystack", default=None,
                    help="longctx: a text file whose lines hide the needles (default: RULER's repeated filler)")
    ev.add_argument("--model", default="default")
    ev.add_argument("--predictor", default=None, help="predictor folder or Hub id (default: the shipped one)")
    ev.add_argument("--sink-tokens", type=int, default=4)
    ev.add_argument("--local-window", type=int, default=None,
                    help="most recent tokens always kept, the query's own included (default: 1 for perplexity "
                         "and coref, the paper's protocol; 16 for longctx, ButlerCache's default decode buffer)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", default=None)
    ev.add_argument("--plot", default=None)
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..default_model import DEFAULT_PREDICTOR_DIR, load_model

    policies = [p for p in args.policies.split(",") if p]
    model, tokenizer = load_model(args.model)
    predictor = None
    if "butler" in policies:
        source = args.predictor or (DEFAULT_PREDICTOR_DIR if args.model in (None, "default") else None)
        if source is None:
            raise ValueError("policy 'butler' needs --predictor for a model other than the default")
        predictor = ButlerPredictor.from_pretrained(source).to(next(model.parameters()).device)
    results = TASK_RUNNERS[args.task](args, model, tokenizer, policies, predictor)
    report = {"task": args.task, "model": model.config._name_or_path, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def _chunks(args, tokenizer) -> TokenChunks:
    if not args.text_file:
        raise ValueError("--text-file is required for this task")
    max_chunks = None if args.max_tokens is None else max(1, args.max_tokens // args.seq_len)
    return TokenChunks.from_source(args.text_file, tokenizer, args.seq_len, max_chunks=max_chunks)


def _local_window(args, default: int) -> int:
    return default if args.local_window is None else args.local_window


def run_perplexity(args, model, tokenizer, policies, predictor) -> list[dict]:
    chunks = _chunks(args, tokenizer)
    window = _local_window(args, 1)
    results = []
    for sparsity in _floats(args.sparsity):
        for policy in policies:
            ppl = sparse_perplexity(model, chunks, policy="oracle" if policy == "dense" else policy,
                                    sparsity=0.0 if policy == "dense" else sparsity, predictor=predictor,
                                    sink_tokens=args.sink_tokens, local_window=window)
            results.append({"policy": policy, "sparsity": sparsity, "perplexity": ppl, "chunks": len(chunks),
                            "local_window": window})
    return results


def run_hits(args, model, tokenizer, policies, predictor) -> list[dict]:
    chunks = _chunks(args, tokenizer)
    budgets = tuple(_ints(args.token_budget or "64,128,256"))
    results = []
    for policy in policies:
        if policy == "dense":
            continue
        hits = policy_hits(model, chunks, policy, predictor=predictor, budgets=budgets)
        for budget in budgets:
            results.append({"policy": policy, "token_budget": budget, "recall": hits[f"per_kv_head/recall@{budget}"],
                            "token_hits": hits["per_kv_head/token_hits"]})
    return results


def run_coref(args, model, tokenizer, policies, predictor) -> list[dict]:
    examples = make_coref_examples(args.examples, seed=args.seed)
    window = _local_window(args, 1)
    results = []
    for sparsity in _floats(args.sparsity):
        for policy in policies:
            s = 0.0 if policy == "dense" else sparsity
            forced = cache_factory(model, policy, predictor=predictor, sparsity=s, sink_tokens=args.sink_tokens,
                                   local_window=window, sparse_prefill=True)
            decoding = cache_factory(model, policy, predictor=predictor, sparsity=s, sink_tokens=args.sink_tokens,
                                     local_window=window)
            results.append({"policy": policy, "sparsity": sparsity, "local_window": window,
                            **coref_teacher_forced(model, tokenizer, examples, forced),
                            **coref_generation(model, tokenizer, examples, decoding)})
    return results


def run_longctx(args, model, tokenizer, policies, predictor) -> list[dict]:
    results = []
    budgets = _ints(args.token_budget or "256")
    window = _local_window(args, 16)
    haystack = Path(args.haystack).read_text(encoding="utf-8") if args.haystack else None
    for task in [t for t in args.tasks.split(",") if t]:
        for length in _ints(args.lengths):
            examples = make_longctx_examples(tokenizer, task, length, args.examples, seed=args.seed, haystack=haystack)
            # every policy and budget decodes from one dense prefill per example where it can
            factories = {(policy, budget): cache_factory(model, policy, predictor=predictor, token_budget=budget,
                                                         sink_tokens=args.sink_tokens, local_window=window)
                         for budget in budgets for policy in policies}
            accuracy = longctx_accuracy(model, tokenizer, examples, factories)
            results += [{"policy": policy, "task": task, "length": length, "token_budget": budget, "accuracy": acc,
                         "local_window": window}
                        for (policy, budget), acc in accuracy.items()]
    return results


TASK_RUNNERS = {"perplexity": run_perplexity, "hits": run_hits, "coref": run_coref, "longctx": run_longctx}


def plot(report: dict, path: str) -> None:
    """One line per policy: the task's metric against sparsity, budget or length (coref at one sparsity and
    longctx at one length and budget: bars per policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, rows = report["task"], report["results"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if task == "coref" and len({r["sparsity"] for r in rows}) == 1:
        _coref_bars(ax, rows)
        ax.set_title(f"{report['model']}: coref at {rows[0]['sparsity']:.0%} sparsity")
    elif task == "longctx" and len({(r["length"], r["token_budget"]) for r in rows}) == 1:
        _longctx_bars(ax, rows)
        ax.set_title(f"{report['model']}: {rows[0]['length']} tokens, budget {rows[0]['token_budget']}")
    else:
        _metric_lines(ax, task, rows)
        windows = {r.get("local_window") for r in rows}
        window = f" (local window {windows.pop()})" if len(windows) == 1 and None not in windows else ""
        ax.set_title(f"{report['model']}: {task}{window}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _metric_lines(ax, task: str, rows: list[dict]) -> None:
    x_key, y_key = {"perplexity": ("sparsity", "perplexity"), "hits": ("token_budget", "recall"),
                    "coref": ("sparsity", "name_token_error"), "longctx": ("length", "accuracy")}[task]
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r[x_key], r[y_key]) for r in rows if r["policy"] == policy)
        if task == "longctx":  # average over tasks per length
            by_x: dict = {}
            for x, y in pts:
                by_x.setdefault(x, []).append(y)
            pts = [(x, sum(v) / len(v)) for x, v in sorted(by_x.items())]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    if task == "perplexity":
        ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _longctx_bars(ax, rows: list[dict]) -> None:
    """Accuracy of each policy at one context length, a bar per task."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    accuracy = {(r["policy"], r["task"]): r["accuracy"] for r in rows}
    width = 0.8 / len(tasks)
    for t, task in enumerate(tasks):
        offset = (t - (len(tasks) - 1) / 2) * width
        drawn = [(i, accuracy[p, task]) for i, p in enumerate(policies) if (p, task) in accuracy]  # not run: no bar
        ax.bar([i + offset for i, _ in drawn], [a for _, a in drawn], width=width, label=task)
    ax.set_xticks(list(range(len(policies))), policies, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def _coref_bars(ax, rows: list[dict]) -> None:
    """Name-token error (teacher-forced) and exact match (generation) side by side for each policy."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by_policy = {r["policy"]: r for r in rows}
    x = range(len(policies))
    for offset, key in ((-0.2, "name_token_error"), (0.2, "exact_match")):
        ax.bar([i + offset for i in x], [by_policy[p][key] for p in policies], width=0.4, label=key)
    ax.set_xticks(list(x), policies, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
