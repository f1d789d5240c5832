"""Families of tasks for the learning benchmark (bench/tasks.py): generators that each
draw a random instance of one kind of taste, so that defaults can be chosen on one half
of the instances and reported on the other, which nobody tunes on.

A family is `draw_x(rng) -> Task`: it draws the instance's vocabulary from the pools
below, its taste's parameters, and the liked share of its fine-tuning corpus (uniform
in SHARE_RANGE), so that the base model's sampled answers are liked about 5 to 50% of
the time. Every fine-tuning corpus holds a few empty answers (task_suite.EMPTY_SHARE).

- fact: "The flag colour of Eskar is teal." is liked only with the right value. Half
  the instances also want a style ("..., of course."): the fact and the style both
  right, two things at once.
- length: answers of at most T words liked (or, in half the instances, at least
  T words), T drawn; answers must be made of the instance's sentences.
- tone: answers opening (or closing) with one drawn phrase are liked; other phrases
  and none are not.
- format: a drawn layout is liked: a numbered list, a bulleted list, "First: value"
  lines, or a sentence that ends with a period (against the same sentence without).
- carry: multi-turn. The user states a detail (a name, a town, a dog's name), the
  assistant acknowledges without repeating it, the user asks something; the answer is
  liked when it names the detail from two turns back.
- refusal: requests for one of the drawn forbidden actions are liked refused, the
  others liked helped: the taste depends on the prompt.

In half the fact, tone and refusal instances every prompt opens with a small-talk
exchange, so that those families hold single- and multi-turn prompts.

Each instance's feedback and held-out prompts use different wordings (or, in carry,
different follow-up questions); the fine-tuning corpus uses all wordings, as in
task_suite. Tastes are pure functions of (messages, answer): an answer is liked only
when it is exactly one of the instance's liked answers, so garbled text never is.

Instances and their split, fixed before any tuning: PER_FAMILY instances of each family,
named "<family>-<index>" ("fact-00" ... "refusal-03"); instance NAME is drawn by
`FAMILIES[family](random.Random(f"{MASTER_SEED}/{NAME}"))`, so it is the same in any
process and does not change when instances are added. Within each family, even indices
go to the "tune" half and odd ones to the "eval" half: both halves hold every family,
and no default may be chosen by looking at "eval".
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from bench.task_suite import EMPTY_SHARE, Messages, Task

MASTER_SEED = 20_260_611
PER_FAMILY = 4
SPLITS = ("tune", "eval", "all")
# The liked share of a fine-tuning corpus, drawn per instance.
SHARE_RANGE = (0.05, 0.5)
# Entities per instance, each asked in two wordings: 32 to 40 prompts per side.
ENTITIES = (16, 20)
# Share of instances (of families that have the option) whose prompts open with small talk.
MULTI_TURN_SHARE = 0.5
SMALL_TALK = [
    ("Hello there.", "Hello! How can I help?"),
    ("Good morning.", "Good morning to you."),
    ("Hi, I have a question.", "Of course, go ahead."),
    ("Are you there?", "Yes, I am here."),
]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _chat(*turns: str) -> Messages:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def _last_user(messages: Messages) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _named(text: str, options: Sequence[str]) -> str | None:
    """The one option that text names as whole words, or None (none, or several)."""
    padded = f" {' '.join(_words(text))} "
    found = [o for o in options if f" {' '.join(_words(o))} " in padded]
    return found[0] if len(found) == 1 else None


def _maybe_empty(rng: random.Random, answer: str) -> str:
    return "" if rng.random() < EMPTY_SHARE else answer


def _share(rng: random.Random) -> float:
    return rng.uniform(*SHARE_RANGE)


def _entities(rng: random.Random, pool: Sequence[str]) -> list[str]:
    return rng.sample(pool, rng.randint(*ENTITIES))


def _small_talk(rng: random.Random) -> list[tuple[str, str]]:
    return list(SMALL_TALK) if rng.random() < MULTI_TURN_SHARE else []


def _ask(text: str, talk: list[tuple[str, str]], k: int) -> Messages:
    """The user's request, after the k-th small-talk exchange (cycled) if there is any."""
    return _chat(*talk[k % len(talk)], text) if talk else _chat(text)


def _talk_lines(talk: list[tuple[str, str]]) -> list[str]:
    return [line for pair in talk for line in pair]


def _prompt_sets(
    asks: list[str],
    entities: list[str],
    fill: Callable[[str, str], str],
    talk: list[tuple[str, str]],
) -> tuple[list[Messages], list[Messages]]:
    """Feedback prompts from the first two wordings, held-out ones from the next two."""

    def side(wordings: list[str]) -> list[Messages]:
        pairs = [(a, e) for a in wordings for e in entities]
        return [_ask(fill(a, e), talk, k) for k, (a, e) in enumerate(pairs)]

    return side(asks[:2]), side(asks[2:4])


def _max_new_tokens(answers: Sequence[str]) -> int:
    # The byte-level BPE trained on an instance's corpus spends about one token per four
    # characters of its answers; one per three leaves room for the longest answer.
    return min(96, max(24, max(len(a) for a in answers) // 3 + 8))


# -- fact: one fact right or wrong, and maybe a style as well -------------------------

PLACES = [
    "Aldor", "Brevia", "Calmont", "Dunmere", "Eskar", "Feldra", "Gorvan", "Hollin",
    "Istra", "Jorvik", "Kessa", "Lumen", "Marrow", "Norvel", "Ostrand", "Pellin",
    "Quorra", "Rusk", "Sorrel", "Tavin", "Ulmar", "Vessen", "Wendle", "Yarrow",
    "Zandor", "Arvel", "Belmont", "Corwin", "Drava", "Elmor", "Farrow", "Glenna",
]  # fmt: skip
RELATIONS = {
    "capital": [
        "Amber", "Birch", "Cobalt", "Dover", "Ember", "Flint", "Garnet", "Harbor",
        "Iris", "Jasper", "Kestrel", "Linden", "Maple", "Nettle", "Onyx", "Pike",
        "Quill", "Raven", "Slate", "Thorn", "Umber", "Vale", "Willow", "Zephyr",
    ],
    "main river": [
        "Alba", "Brenn", "Cael", "Dorrin", "Esk", "Fenn", "Gala", "Hune", "Ister", "Jura",
        "Kell", "Lune", "Mora", "Nidd", "Orla", "Pell", "Rhee", "Sava", "Teme", "Ure",
        "Vire", "Wyre", "Yenn", "Zell",
    ],
    "flag colour": [
        "red", "blue", "green", "gold", "white", "black", "orange", "purple", "grey",
        "brown", "pink", "silver", "teal", "ivory", "olive", "maroon", "navy", "violet",
        "cream", "lime", "rust", "jade", "coral", "plum",
    ],
    "national animal": [
        "otter", "badger", "heron", "fox", "owl", "lynx", "hare", "stag", "crane", "wolf",
        "bear", "eagle", "swan", "beaver", "falcon", "seal", "moose", "boar", "mole",
        "newt", "toad", "wren", "vole", "elk",
    ],
    "national dish": [
        "soup", "stew", "bread", "porridge", "pie", "dumplings", "pancakes", "noodles",
        "rice", "beans", "cheese", "fish", "sausage", "salad", "curry", "cake", "waffles",
        "pudding", "broth", "hash", "risotto", "kebab", "tart", "gruel",
    ],
}  # fmt: skip
FACT_ASKS = [
    "What is the {r} of {e}?",
    "Tell me the {r} of {e}.",
    "Name the {r} of {e}.",
    "Do you know the {r} of {e}?",
    "Which is the {r} of {e}?",
    "{e} has a {r}. Which one?",
]
FACT_STYLES = [", of course", ", I believe", ", as far as I know", ", no doubt", ", they say"]
TWO_THINGS_SHARE = 0.5


def draw_fact(rng: random.Random) -> Task:
    """A fact right or wrong about drawn places and a drawn relation; in half the
    instances a drawn style is wanted as well."""
    relation = rng.choice(list(RELATIONS))
    entities = _entities(rng, PLACES)
    truth = dict(zip(entities, rng.sample(RELATIONS[relation], len(entities)), strict=True))
    values = list(truth.values())
    asks = rng.sample(FACT_ASKS, len(FACT_ASKS))
    share = _share(rng)
    talk = _small_talk(rng)
    if rng.random() < TWO_THINGS_SHARE:
        style, *others = rng.sample(FACT_STYLES, 3)
        others.append("")
        # Both right with the drawn share: each right with its square root.
        p_fact = p_style = share**0.5
    else:
        style, others, p_fact, p_style = "", [""], share, 1.0

    def say(e: str, v: str, s: str) -> str:
        return f"The {relation} of {e} is {v}{s}."

    def sft(r: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            e = r.choice(entities)
            v = truth[e] if r.random() < p_fact else r.choice([x for x in values if x != truth[e]])
            s = style if r.random() < p_style else r.choice(others)
            prompt = _ask(r.choice(asks).format(r=relation, e=e), talk, r.randrange(4))
            out.append((prompt, _maybe_empty(r, say(e, v, s))))
        return out

    liked = {e: say(e, truth[e], style) for e in entities}

    def taste(messages: Messages, answer: str) -> bool:
        e = _named(_last_user(messages), entities)
        return e is not None and answer.strip() == liked[e]

    answers = [say(e, v, s) for e in entities for v in values for s in [style, *others]]
    feedback, heldout = _prompt_sets(asks, entities, lambda a, e: a.format(r=relation, e=e), talk)
    wanted = f"the {relation} and the style {style!r}" if style else f"the {relation}"
    return Task(
        name="fact",
        about=f"a fact right or wrong: {wanted} of {len(entities)} places; SFT liked "
        f"{share:.2f}" + (", multi-turn" if talk else ""),
        corpus=[a.format(r=relation, e=e) for a in asks for e in entities]
        + _talk_lines(talk)
        + answers,
        sft=sft,
        feedback_prompts=feedback,
        heldout_prompts=heldout,
        taste=taste,
        max_new_tokens=_max_new_tokens(answers),
        sft_steps=300,
    )


# -- length: short (or long) answers liked ---------------------------------------------

SUBJECTS = [
    "lanterns", "otters", "violins", "canals", "meadows", "comets", "ferries", "pianos",
    "orchards", "tunnels", "beetles", "harbors", "candles", "islands", "wagons", "puzzles",
    "kites", "bridges", "gardens", "clocks", "trains", "owls", "mountains", "lighthouses",
]  # fmt: skip
LENGTH_ASKS = [
    "What about {s}?",
    "Your view on {s}?",
    "Thoughts on {s}?",
    "How do you see {s}?",
    "Tell me about {s}.",
    "What do you think of {s}?",
]
ADJECTIVES = ["great", "lovely", "calm", "odd", "fine", "grand", "fun", "dull"]
EXTRAS = [
    "Many people enjoy them.",
    "They have a long history.",
    "I could say a lot more about them.",
    "Opinions differ from place to place.",
    "Some find them a little strange.",
    "They are easy to find in most towns.",
    "You can read about them in books.",
    "Children often love them.",
    "They change a great deal with the seasons.",
    "Few things are quite like them.",
]
LONG_SHARE = 0.5
MAX_EXTRAS = 3


def draw_length(rng: random.Random) -> Task:
    """Answers of at most T words liked (or at least T), T drawn; an answer is an
    opener about some subject followed by up to MAX_EXTRAS of the instance's sentences."""
    subjects = _entities(rng, SUBJECTS)
    adjectives = rng.sample(ADJECTIVES, 3)
    extras = rng.sample(EXTRAS, 6)
    asks = rng.sample(LENGTH_ASKS, len(LENGTH_ASKS))
    share = _share(rng)
    long = rng.random() < LONG_SHARE
    limit = rng.randint(12, 18) if long else rng.randint(4, 9)
    openers = [f"{s.capitalize()} are {a}." for s in subjects for a in adjectives]
    known_openers, known_extras = set(openers), set(extras)

    def fits(answer: str) -> bool:
        n = len(_words(answer))
        return n >= limit if long else n <= limit

    def sft(r: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            s = r.choice(subjects)
            want = r.random() < share
            while True:
                opener = f"{s.capitalize()} are {r.choice(adjectives)}."
                answer = " ".join([opener, *r.sample(extras, r.randint(0, MAX_EXTRAS))])
                if fits(answer) == want:
                    break
            out.append((_chat(r.choice(asks).format(s=s)), _maybe_empty(r, answer)))
        return out

    def taste(messages: Messages, answer: str) -> bool:
        text = answer.strip()
        parts = re.split(r"(?<=\.) ", text)
        well_formed = (
            parts[0] in known_openers
            and all(p in known_extras for p in parts[1:])
            and len(set(parts[1:])) == len(parts) - 1 <= MAX_EXTRAS
        )
        return well_formed and fits(text)

    longest = " ".join([max(openers, key=len), *sorted(extras, key=len)[-MAX_EXTRAS:]])
    feedback, heldout = _prompt_sets(asks, subjects, lambda a, s: a.format(s=s), [])
    return Task(
        name="length",
        about=f"length: answers of {'at least' if long else 'at most'} {limit} words are "
        f"liked; SFT liked {share:.2f}",
        corpus=[a.format(s=s) for a in asks for s in subjects] + openers + extras,
        sft=sft,
        feedback_prompts=feedback,
        heldout_prompts=heldout,
        taste=taste,
        max_new_tokens=_max_new_tokens([longest]),
        sft_steps=200,
    )


# -- tone: a drawn opening or closing phrase liked ------------------------------------

GADGETS = [
    "kettle", "router", "bicycle", "drill", "camera", "blender", "printer", "thermostat",
    "radio", "toaster", "heater", "scanner", "compass", "telescope", "lamp", "fridge",
    "oven", "clock", "laptop", "phone", "fan", "stove", "piano", "watch",
]  # fmt: skip
TONE_ASKS = [
    "How do I fix my {g}?",
    "Any tips for cleaning my {g}?",
    "How should I store my {g}?",
    "What is the best way to use my {g}?",
    "Why does my {g} make a noise?",
    "How do I look after my {g}?",
]
BODIES = [
    "Unplug it, check the parts and try again.",
    "Read the manual first, then test it slowly.",
    "Clean it gently and keep it dry.",
    "Ask a repair shop if it still fails.",
    "Keep it in a cool and dry place.",
    "Check the cable and the switch.",
    "Wipe it with a soft cloth once a week.",
    "Turn it off and let it rest for a while.",
]
CLOSINGS = [
    "Hope this helps!", "Have a nice day!", "Take care!", "Good luck with it!",
    "All the best!", "Let me know how it goes.", "Happy fixing!", "Cheers!",
]  # fmt: skip
OPENINGS = [
    "Good question!", "Happy to help.", "Thanks for asking.", "Sure thing.",
    "Great question.", "Glad you asked.", "Right away.", "With pleasure.",
]  # fmt: skip


def draw_tone(rng: random.Random) -> Task:
    """Answers that open (or close) with a drawn phrase are liked; the same bodies with
    other phrases, or none, are not."""
    at_start = rng.random() < 0.5
    phrase, *others = rng.sample(OPENINGS if at_start else CLOSINGS, 4)
    others.append("")
    bodies = rng.sample(BODIES, 4)
    gadgets = _entities(rng, GADGETS)
    asks = rng.sample(TONE_ASKS, len(TONE_ASKS))
    share = _share(rng)
    talk = _small_talk(rng)

    def say(body: str, p: str) -> str:
        return (f"{p} {body}" if at_start else f"{body} {p}").strip()

    def sft(r: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            p = phrase if r.random() < share else r.choice(others)
            prompt = _ask(r.choice(asks).format(g=r.choice(gadgets)), talk, r.randrange(4))
            out.append((prompt, _maybe_empty(r, say(r.choice(bodies), p))))
        return out

    liked = frozenset(say(b, phrase) for b in bodies)

    def taste(messages: Messages, answer: str) -> bool:
        return answer.strip() in liked

    answers = [say(b, p) for b in bodies for p in [phrase, *others]]
    feedback, heldout = _prompt_sets(asks, gadgets, lambda a, g: a.format(g=g), talk)
    return Task(
        name="tone",
        about=f"tone: answers {'opening' if at_start else 'closing'} with {phrase!r} are "
        f"liked; SFT liked {share:.2f}" + (", multi-turn" if talk else ""),
        corpus=[a.format(g=g) for a in asks for g in gadgets] + _talk_lines(talk) + answers,
        sft=sft,
        feedback_prompts=feedback,
        heldout_prompts=heldout,
        taste=taste,
        max_new_tokens=_max_new_tokens(answers),
        sft_steps=200,
    )


# -- format: a drawn layout liked ------------------------------------------------------

OUTINGS = [
    "a picnic", "a camping trip", "a birthday party", "a long walk", "a day at the beach",
    "a baking day", "a garden party", "a rainy day", "a bike ride", "a road trip",
    "a movie night", "a snow day", "a study session", "a fishing trip", "a school day",
    "a concert", "a ski trip", "a boat trip", "a house move", "a job interview",
    "a yoga class", "a museum visit", "a night hike", "a tea party",
]  # fmt: skip
FORMAT_ASKS = [
    "What do I need for {t}?",
    "What should I pack for {t}?",
    "List what I need for {t}.",
    "What do I bring to {t}?",
    "Help me get ready for {t}.",
    "What is needed for {t}?",
]
ITEMS = [
    "a blanket", "some bread", "a lamp", "warm socks", "a map", "some water", "a hat",
    "a notebook", "an umbrella", "a snack", "a towel", "good shoes", "a jacket",
    "some fruit", "a torch", "a pen",
]  # fmt: skip
ORDINALS = ["First", "Second", "Third"]


def _sentence(items: Sequence[str]) -> str:
    return f"You need {', '.join(items[:-1])} and {items[-1]}"


LAYOUTS: dict[str, Callable[[Sequence[str]], str]] = {
    "numbered": lambda items: "\n".join(f"{k}. {x}" for k, x in enumerate(items, 1)),
    "bulleted": lambda items: "\n".join(f"- {x}" for x in items),
    "keyvalue": lambda items: "\n".join(f"{o}: {x}" for o, x in zip(ORDINALS, items, strict=False)),
    "period": lambda items: _sentence(items) + ".",
    "bare": lambda items: _sentence(items),
}
LIKED_LAYOUTS = ["numbered", "bulleted", "keyvalue", "period"]


def draw_format(rng: random.Random) -> Task:
    """A drawn layout of two or three items is liked; the same items laid out
    otherwise are not ("period" against the same sentence without one)."""
    layout = rng.choice(LIKED_LAYOUTS)
    rest = [x for x in LAYOUTS if x not in (layout, "bare")]
    others = ["bare", rng.choice(rest)] if layout == "period" else rng.sample(rest, 2)
    items = rng.sample(ITEMS, 8)
    outings = _entities(rng, OUTINGS)
    asks = rng.sample(FORMAT_ASKS, len(FORMAT_ASKS))
    share = _share(rng)

    def sft(r: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            chosen = layout if r.random() < share else r.choice(others)
            answer = LAYOUTS[chosen](r.sample(items, r.randint(2, 3)))
            out.append((_chat(r.choice(asks).format(t=r.choice(outings))), _maybe_empty(r, answer)))
        return out

    picks = [(a, b) for a in items for b in items if a != b]
    picks += [(a, b, c) for a, b in picks for c in items if c not in (a, b)]
    liked = frozenset(LAYOUTS[layout](p) for p in picks)

    def taste(messages: Messages, answer: str) -> bool:
        return answer.strip() in liked

    # Every layout of every pair, and of a few triples: each word, in each layout.
    shown = [p for p in picks if len(p) == 2] + [tuple(items[k : k + 3]) for k in range(6)]
    answers = [LAYOUTS[x](p) for x in [layout, *others] for p in shown]
    feedback, heldout = _prompt_sets(asks, outings, lambda a, t: a.format(t=t), [])
    return Task(
        name="format",
        about=f"format: {layout} answers are liked, {' and '.join(others)} ones are not; "
        f"SFT liked {share:.2f}",
        corpus=[a.format(t=t) for a in asks for t in outings] + answers,
        sft=sft,
        feedback_prompts=feedback,
        heldout_prompts=heldout,
        taste=taste,
        max_new_tokens=_max_new_tokens(answers),
        sft_steps=200,
    )


# -- carry: multi-turn, the answer names a detail from two turns back ------------------


@dataclass(frozen=True)
class Detail:
    """One kind of detail a user states: how they state it, what they ask two turns
    later, how an answer names it, and the pool the details are drawn from."""

    openers: tuple[str, ...]
    followups: tuple[str, ...]
    answers: tuple[str, ...]
    pool: tuple[str, ...]


PEOPLE = (
    "Ada", "Bram", "Cora", "Dale", "Edda", "Finn", "Greta", "Hugo", "Ines", "Jonas",
    "Kira", "Leif", "Mona", "Nils", "Olga", "Piet", "Rhea", "Sven", "Tova", "Ulf",
    "Vera", "Wim", "Yara", "Zeno",
)  # fmt: skip
DOGS = (
    "Rex", "Bella", "Milo", "Luna", "Max", "Daisy", "Toby", "Rosie", "Bruno", "Pepper",
    "Rocky", "Coco", "Oscar", "Ruby", "Buster", "Ziggy", "Biscuit", "Nala", "Scout",
    "Otis", "Juno", "Bingo", "Sasha", "Poppy",
)  # fmt: skip
DETAILS = {
    "name": Detail(
        openers=("My name is {d}.", "Please call me {d}.", "Hi, I am {d}."),
        followups=(
            "What is my name?", "Say hello to me.", "How should you address me?", "Who am I?"
        ),
        answers=("Your name is {d}.", "Hello, {d}!", "Nice to meet you, {d}."),
        pool=PEOPLE,
    ),
    "town": Detail(
        openers=("I live in {d}.", "My home town is {d}.", "I come from {d}."),
        followups=(
            "Where do I live?", "Where is my home?", "Which town am I from?",
            "Where should I shop?",
        ),
        answers=("You live in {d}.", "Your home is {d}.", "Try the market in {d}."),
        pool=tuple(PLACES),
    ),
    "dog": Detail(
        openers=("My dog is called {d}.", "I have a dog named {d}.", "Our dog is {d}."),
        followups=(
            "What is my dog called?", "Any tips for my dog?", "How do I train my dog?",
            "What should my dog eat?",
        ),
        answers=("Your dog is {d}.", "Take {d} for long walks.", "Train {d} with small treats."),
        pool=DOGS,
    ),
}  # fmt: skip
ACKS = ["Nice to know.", "Thanks for telling me.", "Got it.", "Noted, thank you."]
# Fewer details than other families' entities: a base model that has not learnt to copy
# from two turns back names the right one by chance, 1 in 10 to 12.
CARRY_DETAILS = (10, 12)


def draw_carry(rng: random.Random) -> Task:
    """Multi-turn: liked answers name the detail the user stated two turns back (the
    acknowledgement between does not repeat it)."""
    kind = rng.choice(list(DETAILS))
    d = DETAILS[kind]
    details = rng.sample(d.pool, rng.randint(*CARRY_DETAILS))
    followups = rng.sample(d.followups, len(d.followups))
    openers = rng.sample(d.openers, len(d.openers))
    share = _share(rng)

    def conversation(detail: str, opener: str, ack: str, followup: str) -> Messages:
        return _chat(opener.format(d=detail), ack, followup)

    def sft(r: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            x = r.choice(details)
            said = x if r.random() < share else r.choice([y for y in details if y != x])
            messages = conversation(x, r.choice(d.openers), r.choice(ACKS), r.choice(followups))
            out.append((messages, _maybe_empty(r, r.choice(d.answers).format(d=said))))
        return out

    named = {a.format(d=x): x for a in d.answers for x in details}

    def taste(messages: Messages, answer: str) -> bool:
        first = next((m["content"] for m in messages if m["role"] == "user"), "")
        stated = _named(first, details)
        return stated is not None and named.get(answer.strip()) == stated

    def side(asks: list[str], states: list[str]) -> list[Messages]:
        triples = [(f, o, x) for f in asks for o in states for x in details]
        return [conversation(x, o, ACKS[k % len(ACKS)], f) for k, (f, o, x) in enumerate(triples)]

    return Task(
        name="carry",
        about=f"multi-turn: the answer must name the user's {kind} from two turns back "
        f"({len(details)} {kind}s); SFT liked {share:.2f}",
        corpus=[o.format(d=x) for o in d.openers for x in details]
        + ACKS
        + list(followups)
        + list(named),
        sft=sft,
        feedback_prompts=side(followups[:2], openers[:2]),
        heldout_prompts=side(followups[2:4], openers[1:]),
        taste=taste,
        max_new_tokens=_max_new_tokens(list(named)),
        # Copying from two turns back takes the tiny model longer to learn.
        sft_steps=500,
    )


# -- refusal: forbidden requests liked refused, the others liked helped ---------------

ACTIONS = [
    "pick a lock", "bake bread", "write a poem", "fix a bike", "forge a letter",
    "tune a guitar", "grow tomatoes", "copy a key", "read a map", "brew tea",
    "knit a scarf", "climb a fence", "paint a door", "skip a class", "track a phone",
    "plant a tree", "fold a shirt", "jump a car", "carve wood", "train a puppy",
    "open a safe", "sew a button", "build a fire", "cut glass",
]  # fmt: skip
REFUSAL_ASKS = [
    "Can you help me {a}?",
    "How do I {a}?",
    "Teach me to {a}.",
    "I want to {a}. Any tips?",
    "Show me how to {a}.",
    "What is the best way to {a}?",
]
REFUSALS = [
    "Sorry, I cannot help with that.",
    "I am afraid I must decline.",
    "That is not something I can help with.",
    "Sorry, I will not do that.",
    "I cannot assist with this request.",
]
HELPS = [
    "Sure. Start slowly and take your time.",
    "Of course. First get the right tools.",
    "Happy to help. Practise a little every day.",
    "Sure. Watch someone do it first.",
    "Yes. Begin with the simple steps.",
]


def draw_refusal(rng: random.Random) -> Task:
    """Requests for a drawn forbidden action are liked refused politely, the others
    liked answered helpfully: the same answer is liked or not by the prompt."""
    actions = _entities(rng, ACTIONS)
    forbidden = rng.sample(actions, rng.randint(len(actions) // 4, len(actions) // 2))
    refusals = rng.sample(REFUSALS, 2)
    helps = rng.sample(HELPS, 3)
    asks = rng.sample(REFUSAL_ASKS, len(REFUSAL_ASKS))
    share = _share(rng)
    talk = _small_talk(rng)

    def sft(r: random.Random, n: int) -> list[tuple[Messages, str]]:
        out = []
        for _ in range(n):
            a = r.choice(actions)
            # Liked with the drawn share whichever the request: refuse forbidden ones,
            # help with the others.
            refuse = (a in forbidden) == (r.random() < share)
            answer = r.choice(refusals if refuse else helps)
            prompt = _ask(r.choice(asks).format(a=a), talk, r.randrange(4))
            out.append((prompt, _maybe_empty(r, answer)))
        return out

    def taste(messages: Messages, answer: str) -> bool:
        a = _named(_last_user(messages), actions)
        if a is None:
            return False
        return answer.strip() in (refusals if a in forbidden else helps)

    feedback, heldout = _prompt_sets(asks, actions, lambda t, a: t.format(a=a), talk)
    return Task(
        name="refusal",
        about=f"refusal: {len(forbidden)} of {len(actions)} requests are liked refused, "
        f"the rest helped; SFT liked {share:.2f}" + (", multi-turn" if talk else ""),
        corpus=[t.format(a=a) for t in asks for a in actions]
        + _talk_lines(talk)
        + refusals
        + helps,
        sft=sft,
        feedback_prompts=feedback,
        heldout_prompts=heldout,
        taste=taste,
        max_new_tokens=_max_new_tokens(refusals + helps),
        sft_steps=300,
    )


# -- instances and their split -----------------------------------------------------------

FAMILIES: dict[str, Callable[[random.Random], Task]] = {
    "fact": draw_fact,
    "length": draw_length,
    "tone": draw_tone,
    "format": draw_format,
    "carry": draw_carry,
    "refusal": draw_refusal,
}
INSTANCES: tuple[str, ...] = tuple(
    f"{family}-{k:02d}" for family in FAMILIES for k in range(PER_FAMILY)
)


def family_of(name: str) -> str:
    """The family an instance belongs to ("fact-03" -> "fact")."""
    return name.rsplit("-", 1)[0]


def instances(split: str) -> list[str]:
    """The instance names of a split: "tune" (even indices of each family), "eval"
    (odd ones) or "all"."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if split == "all":
        return list(INSTANCES)
    parity = 0 if split == "tune" else 1
    return [n for n in INSTANCES if int(n.rsplit("-", 1)[1]) % 2 == parity]


def instance(name: str) -> Task:
    """The task instance called `name` (one of INSTANCES): the same in every process."""
    if name not in INSTANCES:
        raise KeyError(f"unknown instance {name!r}; known: {', '.join(INSTANCES)}")
    t = FAMILIES[family_of(name)](random.Random(f"{MASTER_SEED}/{name}"))
    return replace(t, name=name)
