"""``butler-cache`` command line: ``butler-cache generate --prompt "..."``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from .cache import ButlerCache, StepStats
from .compat import cache_argument
from .kernels import BACKENDS
from .policies import POLICIES


class _TokenClock(StoppingCriteria):
    """Records the time at which each new token is available (never stops generation)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _timed_generate(model, inputs, cache, args) -> tuple[torch.Tensor, float, list[float]]:
    clock = _TokenClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            **cache_argument(cache),
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_p=None,
            top_k=None,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    first = clock.times[0] - start if clock.times else float("nan")
    per_token = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    return out, first, per_token


def _describe_steps(stats: list[StepStats], width: int = 8) -> list[str]:
    decode = [s for s in stats if s.query_length == 1]
    lines = [f"{'step':>6} {'context':>8} {'attended':>9}"]
    for step, s in enumerate(decode):
        if width <= step < len(decode) - width:
            if step == width:
                lines.append(f"{'...':>6}")
            continue
        att = "dense" if s.attended is None else f"{s.attended:.1f}"
        lines.append(f"{step:>6} {s.context_length:>8} {att:>9}")
    sparse = [s for s in decode if s.attended is not None]
    if sparse:
        mean_att = sum(s.attended for s in sparse) / len(sparse)
        mean_ctx = sum(s.context_length for s in sparse) / len(sparse)
        lines.append(
            f"sparse steps: {len(sparse)}/{len(decode)}; mean tokens attended {mean_att:.1f} of {mean_ctx:.1f} "
            f"in context ({mean_att / mean_ctx:.0%}) per KV head in each sparse layer"
        )
    else:
        lines.append(f"sparse steps: 0/{len(decode)} (the budget covered the whole context at every step)")
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    from .default_model import DEFAULT_PREDICTOR_DIR, load_model

    is_default_model = args.model in (None, "default")
    shipped = is_default_model and (DEFAULT_PREDICTOR_DIR / "butler_predictor.safetensors").is_file()
    if args.policy is None:
        args.policy = "butler" if (args.predictor or shipped) else "oracle"
    if args.policy == "butler" and not args.predictor:
        if not shipped:
            print("error: --policy butler needs --predictor PATH_OR_HUB_ID (a predictor ships only for the default "
                  "model)", file=sys.stderr)
            return 2
        args.predictor = str(DEFAULT_PREDICTOR_DIR)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    if args.chat_template and tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    budget = {"token_budget": args.token_budget} if args.budget_ratio is None else {"budget_ratio": args.budget_ratio}
    common = {"sink_tokens": args.sink_tokens, "local_window": args.local_window, "record_stats": True,
              "backend": args.backend, **budget}
    if args.policy == "butler":
        cache = ButlerCache.from_pretrained(args.predictor, model, policy="butler", **common)
    else:
        cache = ButlerCache(model, policy=args.policy, **common)

    out, first, per_token = _timed_generate(model, inputs, cache, args)
    answer = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
    print(answer.strip())
    print()
    print(f"model: {model.config._name_or_path} | {cache}")
    print(f"prompt: {prompt_len} tokens, generated: {out.shape[1] - prompt_len} tokens")
    for line in _describe_steps(cache.stats):
        print(line)
    mean = sum(per_token) / len(per_token) if per_token else float("nan")
    print(f"time: prefill + first token {first * 1e3:.0f} ms, then {mean * 1e3:.1f} ms per token ({args.policy})")
    if args.compare_dense:
        dense_out, dense_first, dense_per_token = _timed_generate(model, inputs, DynamicCache(config=model.config), args)
        dense_mean = sum(dense_per_token) / len(dense_per_token) if dense_per_token else float("nan")
        same = torch.equal(dense_out, out)
        print(
            f"dense:  prefill + first token {dense_first * 1e3:.0f} ms, then {dense_mean * 1e3:.1f} ms per token; "
            f"output {'identical to' if same else 'differs from'} the sparse run"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from .training.recipe import TrainRecipe, train_predictor

    fields = {k: v for k, v in vars(args).items() if k in TrainRecipe.__dataclass_fields__}
    command = " ".join(shlex.quote(a) for a in ["butler-cache", *sys.argv[1:]])
    recipe = TrainRecipe(**fields, extra={"command": command})
    predictor = train_predictor(recipe)
    print(f"saved a {predictor.config.predictor_type} predictor ({predictor.num_parameters():,} parameters) to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="butler-cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate through a ButlerCache and report what the cache did")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a folder or a Hub id")
    gen.add_argument("--policy", default=None, choices=sorted(POLICIES),
                     help="default: butler with the shipped predictor on the default model, else oracle")
    gen.add_argument("--predictor", default=None, help="predictor folder or Hub id (for --policy butler)")
    gen.add_argument("--token-budget", type=int, default=64, help="tokens attended per KV head (default 64)")
    gen.add_argument("--budget-ratio", type=float, default=None, help="fraction of the context instead of a count")
    gen.add_argument("--sink-tokens", type=int, default=4)
    gen.add_argument("--local-window", type=int, default=16)
    gen.add_argument("--backend", default="auto", choices=BACKENDS,
                     help="kernels: auto (Triton on CUDA, PyTorch otherwise), torch, triton, numba (compiled CPU kernels)")
    gen.add_argument("--max-new-tokens", type=int, default=96)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    gen.add_argument("--compare-dense", action="store_true", help="also run dense attention and compare")
    gen.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="distil a predictor for a model with the transformers Trainer")
    train.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a folder or a Hub id")
    train.add_argument("--data", nargs="+", required=True,
                       help="sources of the mix: text files, folders, globs, JSONL files (a 'text' field or a "
                            "'messages' chat), folders saved by `datasets`, or dataset ids")
    train.add_argument("--data-weights", nargs="+", type=float, default=None,
                       help="one weight per --data source (the mix's row shares); default: each source's size")
    train.add_argument("--text-field", default="text", help="the text field of JSONL rows and datasets")
    train.add_argument("--output", required=True, help="folder for the predictor (checkpoints go to OUTPUT/checkpoints)")
    train.add_argument("--seq-len", type=int, default=512)
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=1)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument("--loss", choices=["kl", "mse"], default="kl")
    train.add_argument("--predictor-type", choices=["strided", "attentive"], default="strided")
    train.add_argument("--layer-stride", type=int, default=4)
    train.add_argument("--importance-dim", type=int, default=16)
    train.add_argument("--intermediate-size", type=int, default=128)
    train.add_argument("--attentive-hidden-size", type=int, default=128)
    train.add_argument("--attentive-num-heads", type=int, default=4)
    train.add_argument("--block-size", type=int, default=128, help="query rows per block of the streamed loss")
    train.add_argument("--max-chunks", type=int, default=None,
                       help="rows in the mix (sources repeat if needed); default: the largest mix without repeats")
    train.add_argument("--save-steps", type=int, default=100)
    train.add_argument("--logging-steps", type=int, default=10)
    train.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this long")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--init-from", default=None,
                       help="continue training this predictor (folder or Hub id) with a fresh schedule")
    train.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUTPUT/checkpoints")
    train.set_defaults(func=cmd_train)

    from .evaluation.commands import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
