"""Synthetic co-reference retrieval (TokenButler's task), generated offline from a seed.

A passage introduces an invented name for a place or a person, distractor passages follow
(philosophy, food, a small maths problem), and a closing question can only be answered with that
name. The answer is cued ("Answer: The village remembered for ... was called"), so that even a small
model answers with the name itself: what the task measures is whether attention still reaches the
passage that introduced it. Scored teacher-forced (name tokens mispredicted) and by generation
(exact match).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYLLABLES = ["zor", "vel", "qua", "mir", "thal", "brix", "ond", "sev", "kal", "dru", "pem", "yth", "gor", "lin",
             "fas", "nox", "ter", "vim", "ash", "quo", "rel", "bax", "ulm", "hesp"]
PLACES = [("village", "its blue salt mines"), ("harbour town", "its copper lighthouse"),
          ("mountain fortress", "its seven bells"), ("river city", "its floating markets"),
          ("desert oasis", "its glass gardens"), ("island", "its singing caves")]
PEOPLE = [("healer", "a satchel of dried moss"), ("cartographer", "a map drawn on leather"),
          ("blacksmith", "a hammer with a silver handle"), ("astronomer", "a brass telescope"),
          ("merchant", "a crate of amber"), ("poet", "a notebook bound in red cloth")]
PHILOSOPHY = [
    "Philosophers have long asked whether {a} can be known without {b}. Some argue that every belief rests on "
    "experience, while others hold that reason alone reveals the structure of {a}.",
    "The debate between {a} and {b} shaped much of early modern thought. Critics replied that neither side "
    "explained how ordinary people come to trust their senses.",
]
PHIL_WORDS = ["truth", "virtue", "freedom", "justice", "beauty", "time", "causality", "duty"]
FOOD = [
    "To make a simple {a} stew, brown the onions slowly, add {b} and a cup of stock, then simmer for an hour. "
    "Season at the end, because salt added early makes the {a} tough.",
    "Bakers say that good {a} bread depends on patience: the dough rests overnight, and a handful of {b} gives "
    "the crust its colour.",
]
FOOD_WORDS = ["lentil", "barley", "pumpkin", "chestnut", "rye", "mushroom", "fennel", "apricot"]
MATHS = "A shop sells {a} pencils each morning and {b} each afternoon. Over {c} days it sells {total} pencils in all."


@dataclass(frozen=True)
class CorefExample:
    context: str  # everything before the answer, ending with "Answer: The <kind> ... was called"
    answer: str  # the invented name

    @property
    def text(self) -> str:
        return f"{self.context} {self.answer}"


def invented_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_coref_examples(n: int = 200, seed: int = 0, distractors: int = 3) -> list[CorefExample]:
    """``n`` varied examples, identical for the same ``seed``."""
    rng = random.Random(seed)
    examples, seen = [], set()
    while len(examples) < n:
        name = invented_name(rng)
        if name in seen:
            continue
        seen.add(name)
        if rng.random() < 0.5:
            kind, feature = rng.choice(PLACES)
            intro = f"Long ago there was a {kind} called {name}. Travellers remembered it for {feature}."
            question = f"What was the name of the {kind} remembered for {feature}?"
            cue = f"The {kind} remembered for {feature} was called"
        else:
            kind, item = rng.choice(PEOPLE)
            intro = f"One winter a {kind} named {name} came down from the hills carrying {item}."
            question = f"What was the name of the {kind} who carried {item}?"
            cue = f"The {kind} who carried {item} was named"
        passages = []
        for _ in range(distractors):
            topic = rng.choice(["philosophy", "food", "maths"])
            if topic == "philosophy":
                a, b = rng.sample(PHIL_WORDS, 2)
                passages.append(rng.choice(PHILOSOPHY).format(a=a, b=b))
            elif topic == "food":
                a, b = rng.sample(FOOD_WORDS, 2)
                passages.append(rng.choice(FOOD).format(a=a, b=b))
            else:
                a, b, c = rng.randint(3, 40), rng.randint(3, 40), rng.randint(2, 9)
                passages.append(MATHS.format(a=a, b=b, c=c, total=(a + b) * c))
        context = " ".join([intro, *passages, f"Question: {question} Answer: {cue}"])
        examples.append(CorefExample(context=context, answer=name))
    return examples
