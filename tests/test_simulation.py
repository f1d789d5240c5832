"""Simulated users, the pure part: the plan of chats and the events their votes make."""

from __future__ import annotations

import datetime as dt
import json

import msgspec
import pytest

from pipeline.feedback.events import parse_event
from pipeline.feedback.simulation import feedback_event, plan_chats

PROMPTS = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
TS = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


def test_a_plan_repeats_for_a_seed_and_spreads_chats_over_users() -> None:
    plan = plan_chats(PROMPTS, users=3, chats=30, seed=7, run="r")
    assert plan == plan_chats(PROMPTS, users=3, chats=30, seed=7, run="r")
    assert plan != plan_chats(PROMPTS, users=3, chats=30, seed=8, run="r")
    assert {c.user_id for c in plan} == {"sim-user-0", "sim-user-1", "sim-user-2"}
    assert len({c.conversation_id for c in plan}) == 30
    assert {json.dumps(c.messages) for c in plan} <= {json.dumps(p) for p in PROMPTS}
    # The same seed in another run asks the same questions with the same sampling seeds.
    again = plan_chats(PROMPTS, users=3, chats=30, seed=7, run="after")
    assert [(c.messages, c.seed) for c in again] == [(c.messages, c.seed) for c in plan]


def test_a_plan_needs_prompts_users_and_chats() -> None:
    with pytest.raises(ValueError, match="no prompts"):
        plan_chats([], 1, 1, 0, "r")
    with pytest.raises(ValueError, match="at least 1"):
        plan_chats(PROMPTS, 0, 1, 0, "r")


@pytest.mark.parametrize(
    ("model", "adapter"), [("chat@v3", "chat@v3"), ("base", None), ("/models/qwen", None)]
)
def test_votes_are_valid_events_naming_the_adapter_that_answered(model, adapter) -> None:
    (chat,) = plan_chats(PROMPTS, 1, 1, 0, "r")
    raw = feedback_event(chat, "Sure! Tea are lovely.", model, True, TS)
    event = parse_event(msgspec.json.encode(raw), user_hash_key=b"key")
    assert (event.adapter, event.model, event.desirable) == (adapter, model, True)
    assert json.loads(event.messages_json) == chat.messages
    disliked = feedback_event(chat, "No.", model, False, TS)
    assert disliked["feedback"] == "dislike"
