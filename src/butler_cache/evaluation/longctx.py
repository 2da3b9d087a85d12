"""Long-context synthetic tasks generated offline (RULER-style): passkey, multi-key needles, variable tracking.

Each generator pads with filler to about ``target_tokens`` tokens of the given tokenizer and is
deterministic under its seed. The answer is scored by whether the generated text contains it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
WORDS = ["apple", "river", "candle", "falcon", "marble", "violin", "harbor", "lantern", "meadow", "pepper",
         "saddle", "thunder", "walnut", "beacon", "copper", "orchid"]


@dataclass(frozen=True)
class LongContextExample:
    task: str
    prompt: str
    answers: tuple[str, ...]  # all must appear in the generated text
    max_new_tokens: int = 16  # enough for the answer

    def is_correct(self, generated: str) -> bool:
        return all(a in generated for a in self.answers)


def _fill(tokenizer, needles: list[str], question: str, target_tokens: int, rng: random.Random) -> str:
    """Filler with ``needles`` at random depths, about ``target_tokens`` tokens in all, then the question."""
    fixed = len(tokenizer(" ".join(needles) + " " + question, add_special_tokens=False)["input_ids"])
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    n = max(1, (target_tokens - fixed) // per_filler)
    pieces = [FILLER] * n
    for needle in needles:
        pieces.insert(rng.randint(0, len(pieces)), needle + " ")
    return "".join(pieces) + question


def passkey(tokenizer, target_tokens: int, seed: int) -> LongContextExample:
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prompt = _fill(tokenizer, [needle], "What is the pass key? The pass key is", target_tokens, rng)
    return LongContextExample("passkey", prompt, (key,), max_new_tokens=8)


def multikey_needle(tokenizer, target_tokens: int, seed: int, keys: int = 4) -> LongContextExample:
    rng = random.Random(seed)
    words = rng.sample(WORDS, keys)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in words]
    needles = [f"One of the special magic numbers for {w} is: {v}." for w, v in zip(words, values, strict=True)]
    asked = rng.randrange(keys)
    question = f"What is the special magic number for {words[asked]}? The special magic number for {words[asked]} is:"
    return LongContextExample("multikey_needle", _fill(tokenizer, needles, question, target_tokens, rng), (values[asked],),
                              max_new_tokens=12)


def variable_tracking(tokenizer, target_tokens: int, seed: int, hops: int = 3) -> LongContextExample:
    rng = random.Random(seed)
    value = str(rng.randint(10000, 99999))
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    question = f"Which variables are assigned the value {value}? Answer: the variables are"
    rng_order = random.Random(seed + 1)
    prompt = _fill(tokenizer, [], question, target_tokens, rng_order)
    # keep the chain in order: insert needles at increasing depths
    body, q = prompt[: -len(question)], question
    cut = sorted(rng.sample(range(len(body) // len(FILLER)), k=len(needles)))
    parts = [FILLER] * (len(body) // len(FILLER))
    for offset, (pos, needle) in enumerate(zip(cut, needles, strict=True)):
        parts.insert(pos + offset, needle + " ")
    return LongContextExample("variable_tracking", "".join(parts) + q, tuple(names), max_new_tokens=32)


TASKS = {"passkey": passkey, "multikey_needle": multikey_needle, "variable_tracking": variable_tracking}


def make_longctx_examples(tokenizer, task: str, target_tokens: int, n: int, seed: int = 0) -> list[LongContextExample]:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not known; expected one of {sorted(TASKS)}")
    return [TASKS[task](tokenizer, target_tokens, seed * 100_003 + i) for i in range(n)]
