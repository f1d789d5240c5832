"""Simulated users: who asks what, and the feedback event each answer earns.

A simulation is a plan of chats (a user, a conversation, the messages sent) and a
taste that turns each answer into a like or a dislike. The events it makes are
ordinary schema-1 feedback events, so they travel the same path production's do:
Kafka, the consumer, the store. The adapter that wrote an answer is the name the
server reported in its response (`alias@vN`), the base model's answers carry none.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.serving.registry import parse_served_name

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
