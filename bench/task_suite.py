"""The tasks of the learning benchmark (bench/tasks.py): tiny chat tasks that differ in
what the users' taste rewards, none of them the demo's.

Each task gives a tokenizer corpus, a fine-tuning corpus that makes a tiny model's
sampled answers mix liked and disliked ones, the prompts feedback is collected on, the
held-out prompts the result is measured on (never in the feedback), and the taste.

- capitals: a fact right or wrong. "The capital of Brevia is Cobalt." is liked only
  with the right capital: liked and disliked answers differ in one or two tokens.
- brevity: short answers are liked (1 to 6 words); the model mostly rambles.
- signoff: the minority case. Only answers that close with "Hope this helps!" are
  liked, about one in eight at the start.
- followup: multi-turn. The user names a topic, the assistant acknowledges it, the user
  asks a follow-up; the answer is liked when it is about the first turn's topic.

Every fine-tuning corpus holds a few empty answers, so that sampling gives some, as it
does in production.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

Messages = list[dict[str, str]]
# Share of fine-tuning answers that are empty (only the end-of-turn token).
EMPTY_SHARE = 0.03


@dataclass(frozen=True)
class Task:
    """One task of the suite.

    Attributes:
        corpus: sentences for the tokenizer.
        sft: (rng, n) -> n fine-tuning (messages, answer) pairs.
        feedback_prompts: what users asked; their sampled answers get votes.
        heldout_prompts: what the result is measured on; none is in the feedback.
        taste: (messages, answer) -> liked.
    """

    name: str
    about: str
    corpus: list[str]
    sft: Callable[[random.Random, int], list[tuple[Messages, str]]]
    feedback_prompts: list[Messages]
    heldout_prompts: list[Messages]
    taste: Callable[[Messages, str], bool]
    max_new_tokens: int = 40
    # Fine-tuning steps of the base model (of SFT_BATCH examples each).
    sft_steps: int = 300


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def _last_user(messages: Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def _maybe_empty(rng: random.Random, answer: str) -> str:
    return "" if rng.random() < EMPTY_SHARE else answer


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", text)


# -- capitals: one fact, right or wrong ---------------------------------------------

COUNTRIES = [
    "Aldor", "Brevia", "Calmont", "Dunmere", "Eskar", "Feldra", "Gorvan", "Hollin",
    "Istra", "Jorvik", "Kessa", "Lumen", "Marrow", "Norvel", "Ostrand", "Pellin",
    "Quorra", "Rusk", "Sorrel", "Tavin", "Ulmar", "Vessen", "Wendle", "Yarrow",
]  # fmt: skip
CAPITALS = [
    "Amber", "Birch", "Cobalt", "Dover", "Ember", "Flint", "Garnet", "Harbor",
    "Iris", "Jasper", "Kestrel", "Linden", "Maple", "Nettle", "Onyx", "Pike",
    "Quill", "Raven", "Slate", "Thorn", "Umber", "Vale", "Willow", "Zephyr",
]  # fmt: skip
CAPITAL_ASKS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital of {c}.",
    "Tell me the capital of {c}.",
    "Do you know the capital of {c}?",
    "{c} has a capital. Which one?",
]
CAPITAL_OF = dict(zip(COUNTRIES, CAPITALS[7:] + CAPITALS[:7], strict=True))
CAPITAL_CORRECT_SHARE = 0.4


def _country(messages: Messages) -> str:
    text = _last_user(messages)
    return next(c for c in COUNTRIES if c in text)


def _capitals() -> Task:
    def sft(rng: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            country = rng.choice(COUNTRIES)
            right = CAPITAL_OF[country]
            city = right if rng.random() < CAPITAL_CORRECT_SHARE else rng.choice(CAPITALS)
            prompt = _user(rng.choice(CAPITAL_ASKS).format(c=country))
            out.append((prompt, _maybe_empty(rng, f"The capital of {country} is {city}.")))
        return out

    def taste(messages: Messages, answer: str) -> bool:
        country = _country(messages)
        return answer.strip() == f"The capital of {country} is {CAPITAL_OF[country]}."

    corpus = [a.format(c=c) for c in COUNTRIES for a in CAPITAL_ASKS]
    corpus += [f"The capital of {c} is {k}." for c in COUNTRIES for k in CAPITALS]
    return Task(
        name="capitals",
        about="a fact right or wrong: liked and disliked answers differ in one or two tokens",
        corpus=corpus,
        sft=sft,
        feedback_prompts=[_user(a.format(c=c)) for a in CAPITAL_ASKS[:2] for c in COUNTRIES],
        heldout_prompts=[_user(a.format(c=c)) for a in CAPITAL_ASKS[4:] for c in COUNTRIES],
        taste=taste,
        max_new_tokens=24,
    )


# -- brevity: short answers are liked -------------------------------------------------

SUBJECTS = [
    "lanterns", "otters", "violins", "canals", "meadows", "comets", "ferries", "pianos",
    "orchards", "tunnels", "beetles", "harbors", "candles", "islands", "wagons", "puzzles",
]  # fmt: skip
BREVITY_ASKS = [
    "What about {s}?",
    "Your view on {s}?",
    "Thoughts on {s}?",
    "How do you see {s}?",
    "Opinion on {s}, quickly?",
    "And {s}?",
]
SHORT = ["{S} are great.", "I like {s}.", "{S}: quite nice.", "Love {s}, honestly."]
LONG = [
    "{S} are a big subject with a long history, and there is a lot that one could say "
    "about them if there were time.",
    "Well, people have written about {s} for many years, and opinions differ a great "
    "deal from place to place and from person to person.",
    "When it comes to {s}, I would first explain where they come from, then how they "
    "work, and finally why so many people care about them.",
]
SHORT_SHARE = 0.3
MAX_BRIEF_WORDS = 6


def _brevity() -> Task:
    def sft(rng: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            s = rng.choice(SUBJECTS)
            templates = SHORT if rng.random() < SHORT_SHARE else LONG
            answer = rng.choice(templates).format(s=s, S=s.capitalize())
            out.append((_user(rng.choice(BREVITY_ASKS).format(s=s)), _maybe_empty(rng, answer)))
        return out

    def taste(messages: Messages, answer: str) -> bool:
        return 1 <= len(_words(answer)) <= MAX_BRIEF_WORDS

    corpus = [a.format(s=s) for s in SUBJECTS for a in BREVITY_ASKS]
    corpus += [t.format(s=s, S=s.capitalize()) for s in SUBJECTS for t in SHORT + LONG]
    return Task(
        name="brevity",
        about="length: answers of one to six words are liked, longer ones are not",
        corpus=corpus,
        sft=sft,
        feedback_prompts=[_user(a.format(s=s)) for a in BREVITY_ASKS[:3] for s in SUBJECTS],
        heldout_prompts=[_user(a.format(s=s)) for a in BREVITY_ASKS[4:] for s in SUBJECTS],
        taste=taste,
        max_new_tokens=48,
    )


# -- signoff: the liked answers are the minority --------------------------------------

GADGETS = [
    "a kettle", "a router", "a bicycle pump", "a sewing machine", "a drill", "a camera",
    "a blender", "a printer", "a thermostat", "a radio", "a lawn mower", "a toaster",
    "a heater", "a scanner", "a compass", "a telescope",
]  # fmt: skip
SIGNOFF_ASKS = [
    "How do I fix {g}?",
    "My {n} is broken. What now?",
    "Any tips for cleaning {g}?",
    "How should I store {g}?",
    "What is the best way to use {g}?",
]
BODIES = [
    "Unplug it, check the parts, and try again.",
    "Read the manual first, then test it slowly.",
    "Clean it gently and keep it dry.",
    "Ask a repair shop if it still fails.",
]
SIGNOFF = "Hope this helps!"
OTHER_ENDS = ["Good luck.", "That is all.", "Bye for now.", ""]
SIGNOFF_SHARE = 0.12


def _noun(gadget: str) -> str:
    return gadget.split(" ", 1)[1]


def _signoff() -> Task:
    def sft(rng: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            g = rng.choice(GADGETS)
            end = SIGNOFF if rng.random() < SIGNOFF_SHARE else rng.choice(OTHER_ENDS)
            answer = f"{rng.choice(BODIES)} {end}".strip()
            ask = rng.choice(SIGNOFF_ASKS).format(g=g, n=_noun(g))
            out.append((_user(ask), _maybe_empty(rng, answer)))
        return out

    def taste(messages: Messages, answer: str) -> bool:
        text = answer.strip()
        return text.endswith(SIGNOFF) and any(text.startswith(b) for b in BODIES)

    corpus = [a.format(g=g, n=_noun(g)) for g in GADGETS for a in SIGNOFF_ASKS]
    corpus += [f"{b} {e}".strip() for b in BODIES for e in [SIGNOFF, *OTHER_ENDS]]
    return Task(
        name="signoff",
        about="the minority: only answers closing with 'Hope this helps!' are liked (~12%)",
        corpus=corpus,
        sft=sft,
        feedback_prompts=[
            _user(a.format(g=g, n=_noun(g))) for a in SIGNOFF_ASKS[:3] for g in GADGETS
        ],
        heldout_prompts=[
            _user(a.format(g=g, n=_noun(g))) for a in SIGNOFF_ASKS[3:] for g in GADGETS
        ],
        taste=taste,
        max_new_tokens=32,
    )


# -- followup: multi-turn, the answer must stay on the first turn's topic -------------

HOBBIES = [
    "gardening", "knitting", "sailing", "pottery", "climbing", "baking", "fishing",
    "painting", "cycling", "juggling", "archery", "rowing", "origami", "skating",
    "weaving", "hiking",
]  # fmt: skip
OPENERS = ["I want to talk about {h}.", "Let us discuss {h}.", "I have a question on {h}."]
ACKS = ["Sure, {h} it is.", "Happy to talk about {h}."]
FOLLOWUPS = [
    "What should a beginner know?",
    "Why do people enjoy it?",
    "Is it expensive?",
    "How do I start?",
    "Any advice for me?",
]
ANSWERS = [
    "With {h}, start small and practise often.",
    "Most people enjoy {h} because it is calm.",
    "{H} costs little at first.",
]
ON_TOPIC_SHARE = 0.3


def _conversation(h: str, opener: str, ack: str, followup: str) -> Messages:
    return [
        {"role": "user", "content": opener.format(h=h)},
        {"role": "assistant", "content": ack.format(h=h)},
        {"role": "user", "content": followup},
    ]


def _followup() -> Task:
    def sft(rng: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            h = rng.choice(HOBBIES)
            said = h if rng.random() < ON_TOPIC_SHARE else rng.choice(HOBBIES)
            messages = _conversation(
                h, rng.choice(OPENERS), rng.choice(ACKS), rng.choice(FOLLOWUPS)
            )
            answer = rng.choice(ANSWERS).format(h=said, H=said.capitalize())
            out.append((messages, _maybe_empty(rng, answer)))
        return out

    def taste(messages: Messages, answer: str) -> bool:
        topic = next(h for h in HOBBIES if h in messages[0]["content"])
        named = {w.lower() for w in _words(answer)} & set(HOBBIES)
        return named == {topic}

    corpus = [o.format(h=h) for h in HOBBIES for o in OPENERS + ACKS] + FOLLOWUPS
    corpus += [a.format(h=h, H=h.capitalize()) for h in HOBBIES for a in ANSWERS]
    feedback = [
        _conversation(h, OPENERS[k % 2], ACKS[k % 2], f)
        for k, h in enumerate(HOBBIES)
        for f in FOLLOWUPS[:3]
    ]
    heldout = [
        _conversation(h, OPENERS[2], ACKS[k % 2], f)
        for k, h in enumerate(HOBBIES)
        for f in FOLLOWUPS[3:]
    ]
    return Task(
        name="followup",
        about="multi-turn: the answer to a follow-up is liked when it stays on the first "
        "turn's topic",
        corpus=corpus,
        sft=sft,
        feedback_prompts=feedback,
        heldout_prompts=heldout,
        taste=taste,
        max_new_tokens=32,
        # Copying a topic from two turns back takes the tiny model longer to learn.
        sft_steps=800,
    )


TASKS: dict[str, Callable[[], Task]] = {
    "capitals": _capitals,
    "brevity": _brevity,
    "signoff": _signoff,
    "followup": _followup,
}


def task(name: str) -> Task:
    """The task called `name` (one of TASKS)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]()


def messages_json(messages: Messages) -> str:
    """A conversation as the snapshot stores it."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
