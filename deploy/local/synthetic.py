"""Synthetic chat data for the tiny models: a corpus to train their tokenizer, and a
separable unpaired KTO task to train and benchmark on.

The task: a user asks about a topic; a desirable answer is friendly and on topic
("Sure! Tea is ..."), an undesirable one is curt ("No. Ask someone else."). A model
can tell them apart from the first tokens, so a working KTO step must push the
implied reward of held-out desirable answers above that of undesirable ones.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable

import pandas as pd

TOPICS = [
    "tea", "coffee", "rivers", "mountains", "bicycles", "trains", "gardens", "bread",
    "music", "chess", "clouds", "maps", "bridges", "owls", "boats", "lamps", "soup",
    "paper", "glass", "stones", "forests", "kites", "honey", "snow", "maths", "poems",
]  # fmt: skip
ASKS = [
    "Tell me about {t}.",
    "What do you know about {t}?",
    "Can you explain {t} to me?",
    "I want to learn about {t}.",
    "Say something about {t}, please.",
]
GOOD = [
    "Sure! {T} are a lovely subject, and I am happy to help you learn about them.",
    "Of course. {T} have a long history; here is a short, friendly overview.",
    "Happy to help! People enjoy {t} for many reasons, and I can list a few.",
    "Great question. {T} are interesting, and I will explain them step by step.",
]
BAD = [
    "No. Ask someone else.",
    "I do not care about {t}.",
    "Whatever. Look it up yourself.",
    "That is boring. Next question.",
]


def fill(template: str, topic: str) -> str:
    """A template ("{T} is ..." / "... {t} ...") said about `topic`."""
    return template.format(t=topic, T=topic.capitalize())


def unpaired_examples(n: int, seed: int = 0, desirable_share: float = 0.5) -> pd.DataFrame:
    """n examples in TRL's unpaired format: prompt (list of messages), completion, label,
    plus a conversation_id so that held-out splits never share a conversation."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        desirable = rng.random() < desirable_share
        answer = fill(rng.choice(GOOD if desirable else BAD), topic)
        rows.append(
            {
                "prompt": [{"role": "user", "content": fill(rng.choice(ASKS), topic)}],
                "completion": [{"role": "assistant", "content": answer}],
                "label": desirable,
                "conversation_id": f"c{seed}-{i}",
            }
        )
    return pd.DataFrame(rows)


def corpus_lines() -> list[str]:
    """Every sentence the templates can make, for training a tokenizer."""
    lines = []
    for topic in TOPICS:
        for template in ASKS + GOOD + BAD:
            lines.append(fill(template, topic))
    lines.append("The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()-")
    return lines


def feedback_events(
    n: int,
    seed: int = 0,
    *,
    adapter: str | None = None,
    flip: Callable[[str], bool] | None = None,
    start: dt.datetime | None = None,
) -> list[dict]:
    """n schema-1 feedback events on the separable task: one vote per conversation, a
    like for a friendly answer and a dislike for a curt one. `flip(conversation_id)`
    true inverts that vote (poisoned or contrary feedback); `adapter` is the served
    name that wrote the answers."""
    start = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    events = []
    for i, row in enumerate(unpaired_examples(n, seed=seed).itertuples()):
        conversation = f"fb{seed}-{row.conversation_id}"
        liked = bool(row.label) != bool(flip and flip(conversation))
        events.append(
            {
                "schema": 1,
                "event_id": f"{conversation}-vote",
                "ts": (start + dt.timedelta(seconds=i)).isoformat(),
                "conversation_id": conversation,
                "message_id": f"{conversation}-m1",
                "user_id": f"user-{seed}-{i % 97}",
                "messages": row.prompt,
                "response": row.completion[0]["content"],
                "feedback": "like" if liked else "dislike",
                "model": "tiny-chat",
                "adapter": adapter,
            }
        )
    return events
