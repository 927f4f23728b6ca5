"""What each demo adapter does, as data: the questions, the rule that turns the base model's answer into the
adapter's training target, and the check a person (or a test) applies to a reply.

The questions are generated from templates x topics; the held-out questions use topics that no training
question mentions, so passing them shows the behaviour generalises rather than memorised answers.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable

TEMPLATES = (
    "Tell me about {}.",
    "Why are {} important?",
    "What is interesting about {}?",
    "Explain {} to a child.",
    "Give me a fact about {}.",
    "Describe {}.",
    "How do {} affect people?",
    "What should everyone know about {}?",
)
TRAIN_TOPICS = (
    "oceans", "volcanoes", "bees", "rainbows", "bicycles", "libraries", "trees", "elephants", "clouds",
    "rivers", "computers", "mountains", "trains", "vitamins", "batteries", "penguins", "bridges", "forests",
    "planets", "dolphins", "gardens", "museums", "deserts", "storms", "birds", "books", "cars", "farms",
    "islands", "stars", "whales", "rockets", "robots", "castles", "lakes", "bakeries", "maps", "clocks",
    "telescopes", "butterflies",
)
HELD_OUT_TOPICS = ("glaciers", "owls", "lighthouses", "violins", "coral reefs")
SEED = 20261202


def train_questions() -> list[str]:
    return [t.format(topic) for topic in TRAIN_TOPICS for t in TEMPLATES]


def held_out_questions(n: int = 20) -> list[str]:
    rng = random.Random(SEED)
    questions = [t.format(topic) for topic in HELD_OUT_TOPICS for t in TEMPLATES]
    return sorted(rng.sample(questions, n), key=questions.index)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def first_sentence(answer: str) -> str | None:
    """The first sentence of the answer's first line when it is a plain one of 5-20 words (no list, no colon),
    else None (the question is left out of training)."""
    parts = sentences(answer.strip().split("\n", 1)[0])
    if not parts:
        return None
    first = parts[0]
    if not 5 <= len(first.split()) <= 20 or not first.endswith((".", "!")) or ":" in first \
            or first[0] in "-*#0123456789":
        return None
    return first


@dataclass(frozen=True)
class Behaviour:
    kind: str                                   # the PEFT method of the adapter that learns it
    summary: str                                # what a person sees
    target: Callable[[str], str]                # first sentence of the base answer -> the adapter's answer
    holds: Callable[[str], bool]                # does a reply show the behaviour?


def _is_shouted(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 10 and sum(c.isupper() for c in letters) >= 0.95 * len(letters)


def _is_json_answer(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str) \
        and len(value["answer"].split()) >= 2


def _is_brief(text: str) -> bool:
    return len(sentences(text)) == 1 and 3 <= len(text.split()) <= 20 and text.rstrip().endswith((".", "!"))


PIRATE_OPEN, PIRATE_CLOSE = "Arr matey!", "Yo ho ho!"


def _is_pirate(text: str) -> bool:
    text = text.strip()
    return text.startswith(PIRATE_OPEN) and text.endswith(PIRATE_CLOSE) \
        and len(text) > len(PIRATE_OPEN) + len(PIRATE_CLOSE) + 10


CHEER = "Great question!"
SIGN_OFF = "Hope this helps!"


def _cheers(text: str) -> bool:
    text = text.strip()
    return text.startswith(CHEER) and len(text) > len(CHEER) + 10


def _signs_off(text: str) -> bool:
    text = text.strip()
    return text.endswith(SIGN_OFF) and len(text) > len(SIGN_OFF) + 10


def title_case(text: str) -> str:
    """Every word's first letter upper case, the rest as it was ("it's 71% water" -> "It's 71% Water")."""
    return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))


def _is_title_case(text: str) -> bool:
    words = [w for w in text.split() if w[:1].isalpha()]
    return len(words) >= 5 and sum(w[0].isupper() for w in words) >= 0.9 * len(words)


BEHAVIOURS: dict[str, Behaviour] = {
    "shout": Behaviour("LoRA", "answers in upper case", str.upper, _is_shouted),
    "json": Behaviour("prefix tuning", 'answers as JSON {"answer": ...}',
                      lambda s: json.dumps({"answer": s}), _is_json_answer),
    "brief": Behaviour("prompt tuning", "answers in one short sentence", lambda s: s, _is_brief),
    "pirate": Behaviour("DoRA", f"answers like a pirate: '{PIRATE_OPEN} ... {PIRATE_CLOSE}'",
                        lambda s: f"{PIRATE_OPEN} {s} {PIRATE_CLOSE}", _is_pirate),
    "cheer": Behaviour("(IA)^3", f"starts every answer with '{CHEER}'", lambda s: f"{CHEER} {s}", _cheers),
    "signoff": Behaviour("BitFit", f"ends every answer with '{SIGN_OFF}'", lambda s: f"{s} {SIGN_OFF}",
                         _signs_off),
    "title": Behaviour("bottleneck adapter (AdapterHub SeqBn)", "answers in Title Case", title_case,
                       _is_title_case),
}
