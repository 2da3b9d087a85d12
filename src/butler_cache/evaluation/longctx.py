"""Long-context synthetic tasks generated offline (RULER-style): passkey, multi-key needles, variable tracking.

Each generator pads to about ``target_tokens`` tokens of the given tokenizer and is deterministic under
its seed. The padding is RULER's repeated filler sentences, or, given a ``haystack`` text, a window of
that text's lines starting at a random line (the needles go between lines), so that retrieval is tested
inside real prose, code, chat or tables. The answer is scored by whether the generated text contains it.
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


def _filler(tokenizer, n_tokens: int, rng: random.Random, haystack: str | None) -> tuple[list[str], str]:
    """``(pieces, separator)``: about ``n_tokens`` tokens of padding, as pieces between which needles may go."""
    if haystack is None:
        per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
        return [FILLER] * max(1, n_tokens // per_filler), " "
    lines = haystack.splitlines(keepends=True)
    counts = [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    suffix = [0] * (len(lines) + 1)  # suffix[i]: tokens of lines[i:]
    for i in range(len(lines) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + counts[i]
    starts = [i for i in range(len(lines)) if suffix[i] >= n_tokens]
    if not starts:
        raise ValueError(f"the haystack has {suffix[0]} tokens, fewer than the {n_tokens} a prompt needs")
    start, end, total = rng.choice(starts), 0, 0
    for end in range(start, len(lines)):
        total += counts[end]
        if total >= n_tokens:
            break
    return lines[start : end + 1], "\n"


def _padding(tokenizer, needles: list[str], question: str, target_tokens: int, rng: random.Random,
             haystack: str | None) -> tuple[list[str], str]:
    """`_filler` pieces that leave room in ``target_tokens`` for the needles and the question."""
    fixed = len(tokenizer(" ".join(needles) + " " + question, add_special_tokens=False)["input_ids"])
    return _filler(tokenizer, target_tokens - fixed, rng, haystack)


def _ending_line(text: str, haystack: str | None) -> str:
    """A haystack's padding ends its last line before the question (the filler runs straight on)."""
    return text if haystack is None or text.endswith("\n") else text + "\n"


def _fill(tokenizer, needles: list[str], question: str, target_tokens: int, rng: random.Random,
          haystack: str | None = None) -> str:
    """Padding with ``needles`` at random depths, about ``target_tokens`` tokens in all, then the question."""
    pieces, sep = _padding(tokenizer, needles, question, target_tokens, rng, haystack)
    for needle in needles:
        pieces.insert(rng.randint(0, len(pieces)), needle + sep)
    return _ending_line("".join(pieces), haystack) + question


def passkey(tokenizer, target_tokens: int, seed: int, haystack: str | None = None) -> LongContextExample:
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prompt = _fill(tokenizer, [needle], "What is the pass key? The pass key is", target_tokens, rng, haystack)
    return LongContextExample("passkey", prompt, (key,), max_new_tokens=8)


def multikey_needle(tokenizer, target_tokens: int, seed: int, haystack: str | None = None,
                    keys: int = 4) -> LongContextExample:
    rng = random.Random(seed)
    words = rng.sample(WORDS, keys)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in words]
    needles = [f"One of the special magic numbers for {w} is: {v}." for w, v in zip(words, values, strict=True)]
    asked = rng.randrange(keys)
    question = f"What is the special magic number for {words[asked]}? The special magic number for {words[asked]} is:"
    prompt = _fill(tokenizer, needles, question, target_tokens, rng, haystack)
    return LongContextExample("multikey_needle", prompt, (values[asked],), max_new_tokens=12)


def variable_tracking(tokenizer, target_tokens: int, seed: int, haystack: str | None = None,
                      hops: int = 3) -> LongContextExample:
    rng = random.Random(seed)
    value = str(rng.randint(10000, 99999))
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    question = f"Which variables are assigned the value {value}? Answer: the variables are"
    if haystack is not None:
        parts, _ = _padding(tokenizer, needles, question, target_tokens, rng, haystack)
        cut = sorted(rng.sample(range(len(parts) + 1), k=len(needles)))  # the chain in order, between lines
        for offset, (pos, needle) in enumerate(zip(cut, needles, strict=True)):
            parts.insert(pos + offset, needle + "\n")
        return LongContextExample("variable_tracking", _ending_line("".join(parts), haystack) + question,
                                  tuple(names), max_new_tokens=32)
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


def make_longctx_examples(tokenizer, task: str, target_tokens: int, n: int, seed: int = 0,
                          haystack: str | None = None) -> list[LongContextExample]:
    """``n`` examples of ``task``; ``haystack``: real text to hide the needles in instead of the filler."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not known; expected one of {sorted(TASKS)}")
    return [TASKS[task](tokenizer, target_tokens, seed * 100_003 + i, haystack) for i in range(n)]
