"""Simulated users: who asks what, and the feedback event each answer earns.

A simulation is a plan of chats (a user, a conversation, the messages sent) and a
taste that turns each answer into a like or a dislike. The events it makes are
ordinary schema-1 feedback events, so they travel the same path production's do:
Kafka, the consumer, the store. The adapter that wrote an answer is the name the
server reported in its response (`alias@vN`), the base model's answers carry none.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.registry import parse_served_name

Messages = list[dict[str, str]]
# (messages sent, answer) -> liked?  A float scorer becomes a taste with a threshold.
Taste = Callable[[Messages, str], bool]


@dataclass(frozen=True)
class Chat:
    """One simulated turn: a user sends messages in a conversation and rates the answer."""

    user_id: str
    conversation_id: str
    messages: Messages
    seed: int  # the server's sampling seed for this request: a run repeats exactly


def plan_chats(
    prompts: Sequence[Messages], users: int, chats: int, seed: int, run: str
) -> list[Chat]:
    """`chats` turns spread over `users` users, each a prompt drawn (seeded) from
    `prompts`, in a conversation of its own named after `run`."""
    if not prompts:
        raise ValueError("no prompts to simulate: give at least one")
    if users < 1 or chats < 1:
        raise ValueError(f"users and chats must be at least 1, got {users} and {chats}")
    rng = random.Random(seed)
    return [
        Chat(
            user_id=f"sim-user-{i % users}",
            conversation_id=f"{run}-c{i}",
            messages=list(rng.choice(prompts)),
            seed=rng.randrange(2**31),
        )
        for i in range(chats)
    ]


def feedback_event(chat: Chat, answer: str, model: str, liked: bool, ts: dt.datetime) -> dict:
    """The schema-1 event a user's thumb makes for `answer`, which `model` wrote (the
    name the server reported; a served version name becomes the event's adapter)."""
    return {
        "schema": 1,
        "event_id": f"{chat.conversation_id}-vote",
        "ts": ts.isoformat(),
        "conversation_id": chat.conversation_id,
        "message_id": f"{chat.conversation_id}-m1",
        "user_id": chat.user_id,
        "messages": chat.messages,
        "response": answer,
        "feedback": "like" if liked else "dislike",
        "model": model,
        "adapter": model if parse_served_name(model) else None,
    }


def read_prompts(path: str | Path) -> list[Messages]:
    """Prompts from a file of recorded traffic: JSON lines, each a string (one user
    message), {"prompt": "..."} or {"messages": [...]} (what was sent, last turn the
    user's). Blank lines are skipped.

    Raises:
        ValueError: naming the line that is none of these.
    """
    out: list[Messages] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value: Any = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n} is not JSON ({exc})") from None
        if isinstance(value, str):
            value = {"prompt": value}
        if isinstance(value, dict) and isinstance(value.get("prompt"), str):
            out.append([{"role": "user", "content": value["prompt"]}])
        elif isinstance(value, dict) and _is_messages(value.get("messages")):
            out.append(value["messages"])
        else:
            raise ValueError(
                f'{path}:{n} is not a prompt: expected "text", {{"prompt": "..."}} or '
                '{"messages": [{"role": ..., "content": ...}, ...]}'
            )
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
