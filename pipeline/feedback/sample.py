"""Synthetic feedback events for the demo, the tests and the benchmarks.

`sample_events` yields valid schema-1 events, deterministic for a seed: a mix of
likes, dislikes, 1-5 ratings and retractions over a few hundred conversations, some
sent as a chat history (`messages`) rather than a flat `prompt`. `malformed_samples`
gives one raw message per way an event can be wrong.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterator

_TOPICS = [
    "reset my password", "export my invoices", "cancel my subscription",
    "change the billing address", "add a teammate", "enable two-factor login",
    "find last month's report", "connect the Slack integration",
]  # fmt: skip
_STYLES = [
    "Sure! Here is how to {t}: open Settings, choose the right tab and follow the steps.",
    "To {t}, go to your account page. If anything fails, contact support with the error.",
    "I cannot help with that.",
    "{t}? That depends on many factors, and I would rather not guess.",
]


def sample_events(
    n: int,
    seed: int = 0,
    *,
    start: dt.datetime | None = None,
    model: str = "tiny-chat",
    adapter: str | None = None,
    pad_to: int = 0,
) -> Iterator[dict]:
    """Yield n valid events as dicts; pad_to grows the response to about that many
    characters (benchmarks use ~700-byte events).

    The events name no adapter unless `adapter` (alias@vN) is given: a made-up vote
    credited to a version would count as that version's production feedback."""
    rng = random.Random(seed)
    start = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for i in range(n):
        conversation = rng.randrange(max(1, n // 4))
        topic = rng.choice(_TOPICS)
        style = rng.randrange(len(_STYLES))
        response = _STYLES[style].format(t=topic)
        if pad_to and len(response) < pad_to:
            response += " " + "Details follow." * ((pad_to - len(response)) // 15)
        event: dict = {
            "schema": 1,
            "event_id": f"s{seed}-e{i}",
            "ts": (start + dt.timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
            "conversation_id": f"s{seed}-c{conversation}",
            "message_id": f"s{seed}-c{conversation}-m{rng.randrange(8)}",
            "user_id": f"user-{rng.randrange(1000)}",
            "response": response,
            "model": model,
        }
        if adapter is not None:
            event["adapter"] = adapter
        question = f"How do I {topic}?"
        if rng.random() < 0.3:
            event["messages"] = [
                {"role": "system", "content": "You are a helpful support assistant."},
                {"role": "user", "content": question},
            ]
        else:
            event["prompt"] = question
        roll = rng.random()
        if roll < 0.15:
            event["rating"] = rng.randint(1, 5)
        elif roll < 0.18:
            event["feedback"] = "retract"
        else:
            liked = style < 2 if rng.random() < 0.85 else style >= 2
            event["feedback"] = "like" if liked else "dislike"
        yield event


def encode(event: dict) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka message for an event: keyed by conversation."""
    return event["conversation_id"].encode(), json.dumps(event).encode()


def sample_messages(
    n: int,
    seed: int = 0,
    *,
    pad_to: int = 0,
    malformed: bool = False,
    adapter: str | None = None,
) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) messages of n sample events (naming `adapter` when given), then
    optionally one message of every malformed kind (keyed b"malformed")."""
    messages: list[tuple[bytes | None, bytes | None]] = [
        encode(e) for e in sample_events(n, seed, adapter=adapter, pad_to=pad_to)
    ]
    if malformed:
        messages += [(b"malformed", raw) for raw in malformed_samples().values()]
    return messages


def malformed_samples() -> dict[str, bytes]:
    """One raw message per malformation, named for the dead-letter kind it must get."""
    good = next(sample_events(1, seed=99))
    good.pop("rating", None)
    good["feedback"] = "like"

    def variant(**changes: object) -> bytes:
        event = {**good, **changes}
        return json.dumps({k: v for k, v in event.items() if v is not ...}).encode()

    return {
        "not_json": b"thumbs up!",
        "invalid_utf8": b'{"schema": 1, "event_id": "\xff\xfe"}',
        "missing_field": variant(event_id=...),
        "wrong_type": variant(message_id=42),
        "unknown_feedback": variant(feedback="meh"),
        "invalid_value": variant(prompt="   "),
        "too_large": variant(response="x" * (5 * 1024 * 1024)),
        "unsupported_schema": variant(schema=2),
        "empty": b"",
        "too_deep": variant()[:-1] + b', "trace": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "duplicate_key": variant()[:-1] + b', "feedback": "dislike"}',
        "invalid_unicode": variant(response="ok \ud800"),
    }


def odd_valid_samples() -> dict[str, bytes]:
    """Raw messages that look odd but are valid events, each stored as sent: named for
    what is odd about them."""
    base = next(sample_events(1, seed=98))
    base.pop("rating", None)
    base["feedback"] = "like"

    def variant(i: int, **changes: object) -> dict:
        event = {**base, **changes, "event_id": f"odd-{i}"}
        return {k: v for k, v in event.items() if v is not ...}

    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "How do I reset"},
                {"type": "text", "text": "my password?"},
            ],
        },
    ]
    tools = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"},
    ]
    image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
        }
    ]
    return {
        "utf8_bom": b"\xef\xbb\xbf" + json.dumps(variant(0)).encode(),
        "nul_in_text": json.dumps(variant(1, prompt="a\x00b", response="c\x00d")).encode(),
        "emoji_pair_escaped": json.dumps(variant(2, response="ok \U0001f600")).encode(),
        "content_parts": json.dumps(variant(3, prompt=..., messages=parts)).encode(),
        "tool_calls": json.dumps(variant(4, prompt=..., messages=tools)).encode(),
        "image_part": json.dumps(variant(5, prompt=..., messages=image)).encode(),
        "huge_number_in_ignored_field": json.dumps(variant(6, trace=10**40)).encode(),
        # The model ended its turn at once; users rate that too.
        "empty_response": json.dumps(variant(8, response="")).encode(),
        "deep_but_allowed_ignored_field": json.dumps(
            variant(7, trace=json.loads("[" * 100 + "]" * 100))
        ).encode(),
    }
