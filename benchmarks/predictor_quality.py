"""Quality of trained predictors on wikitext-2 test: token-hit accuracy, recall@k, teacher-forced perplexity.

    python benchmarks/predictor_quality.py --predictors default /tmp/runs/* --chunks 8 --json out.json

Every predictor is compared, on the same chunks, with dense attention and the per-KV-head oracle.
Perplexity is measured for each ``--local-windows`` value: 1 is the paper's protocol (sinks + the
token itself + top-k), 16 the decode buffer ButlerCache keeps by default (sinks + the 16 most recent
tokens + top-k); the oracle gets the same window, so budgets stay equal. Prints a markdown table
(paste it into benchmarks/RESULTS.md).
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
from pathlib import Path

import torch

from butler_cache import ButlerPredictor, default_predictor_path
from butler_cache.default_model import load_default_model
from butler_cache.evaluation import predictor_hits, sparse_perplexity
from butler_cache.training.data import TokenChunks

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "test.txt"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictors", nargs="+", default=["default"], help="predictor folders ('default' = shipped)")
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--chunks", type=int, default=8, help="evenly spaced chunks used for perplexity")
    parser.add_argument("--hit-chunks", type=int, default=16, help="evenly spaced chunks used for token hits")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--local-windows", default="1,16", help="comma-separated local windows (1 = paper protocol)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    all_chunks = TokenChunks.from_source(args.text_file, tokenizer, args.seq_len)
    ppl_chunks, hit_chunks = all_chunks.evenly_spaced(args.chunks), all_chunks.evenly_spaced(args.hit_chunks)
    print(f"{len(all_chunks)} chunks of {args.seq_len} tokens; perplexity on {len(ppl_chunks)}, hits on {len(hit_chunks)}")

    windows = [int(w) for w in args.local_windows.split(",") if w]
    rows = []
    dense = sparse_perplexity(model, ppl_chunks, policy="oracle", sparsity=0.0)
    oracle = {w: sparse_perplexity(model, ppl_chunks, policy="oracle", sparsity=args.sparsity, local_window=w)
              for w in windows}
    rows.append({"name": "dense", "perplexity": {w: dense for w in windows}})
    rows.append({"name": "oracle (per KV head)", "perplexity": oracle})
    for spec in args.predictors:
        folder = default_predictor_path() if spec == "default" else Path(spec)
        predictor = ButlerPredictor.from_pretrained(folder)
        start = time.monotonic()
        hits = predictor_hits(model, predictor, hit_chunks)
        ppl = {w: sparse_perplexity(model, ppl_chunks, policy="butler", sparsity=args.sparsity, predictor=predictor,
                                    local_window=w) for w in windows}
        training = predictor.config.training
        rows.append({
            "name": spec if spec != "default" else "default (shipped)",
            "predictor_type": predictor.config.predictor_type,
            "loss": training.get("loss"),
            "steps": training.get("steps_done"),
            "seq_len": training.get("seq_len"),
            "parameters": predictor.num_parameters(),
            "share_of_model": predictor.num_parameters() / sum(p.numel() for p in model.parameters()),
            "perplexity": ppl,
            "vs_oracle": {w: ppl[w] / oracle[w] - 1.0 for w in windows},  # same window
            # against the paper protocol's oracle (no window), when it was measured
            "vs_oracle_window_1": {w: ppl[w] / oracle[1] - 1.0 for w in windows} if 1 in oracle else None,
            **hits,
            "eval_seconds": time.monotonic() - start,
        })
        print(json.dumps(rows[-1]))

    print()
    ppl_heads = "".join(f" ppl @ {args.sparsity:.0%}, window {w} | vs oracle (window {w}) |" for w in windows)
    print(f"| predictor | type | loss | steps x seq | params | token hits (KV head / query head) | "
          f"recall@64 | recall@128 | recall@256 |{ppl_heads}")
    print("|---" * (9 + 2 * len(windows)) + "|")
    for r in rows:
        ppl_cells = "".join(f" {r['perplexity'][w]:.2f} | {r['vs_oracle'][w]:+.2%} |" if "vs_oracle" in r
                            else f" {r['perplexity'][w]:.2f} | |" for w in windows)
        if "predictor_type" not in r:
            print(f"| {r['name']} | | | | | | | | |{ppl_cells}")
            continue
        print(f"| {r['name']} | {r['predictor_type']} | {r['loss']} | {r['steps']} x {r['seq_len']} | "
              f"{r['parameters'] / 1e6:.2f}M ({r['share_of_model']:.2%}) | "
              f"{r['per_kv_head/token_hits']:.3f} / {r['per_query_head/token_hits']:.3f} | "
              f"{r['per_kv_head/recall@64']:.3f} | {r['per_kv_head/recall@128']:.3f} | {r['per_kv_head/recall@256']:.3f} |"
              f"{ppl_cells}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sparsity": args.sparsity, "local_windows": windows, "chunks": len(ppl_chunks),
                                               "hit_chunks": len(hit_chunks), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
