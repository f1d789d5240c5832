"""Stored feedback rows built by hand, for the tests of what is built from the store:
snapshots, the vote table, continual nights, lineage."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa

from pipeline.feedback import records
from pipeline.feedback.events import parse_event
from pipeline.feedback.records import FEEDBACK_SCHEMA, FeedbackRows
from pipeline.feedback.sample import sample_events

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def event(
    event_id: str,
    *,
    user: str | None = "u1",
    message: str = "m1",
    conversation: str = "c1",
    feedback: str = "like",
    t: int = 0,
    offset: int | None = None,
    prompt: str | None = "How do I reset my password?",
    messages: list[dict[str, str]] | None = None,
    response: str | None = "Open Settings, then Security.",
    rating: int | None = None,
    adapter: str | None = "chat@v1",
) -> dict[str, Any]:
    """One stored feedback row; `desirable` follows from feedback / rating as
    pipeline.feedback.events decides it (ratings: 4-5 desirable, 1-2 undesirable, 3 neutral)."""
    if rating is not None:
        feedback, desirable = "rating", (True if rating >= 4 else False if rating <= 2 else None)
    else:
        desirable = None if feedback == "retract" else feedback == "like"
    if messages is not None:
        prompt = None
    if feedback == "retract":
        prompt, response = None, None
    return {
        records.EVENT_ID: event_id,
        records.TS: T0 + dt.timedelta(seconds=t),
        records.CONVERSATION_ID: conversation,
        records.MESSAGE_ID: message,
        records.USER_HASH: user,
        records.PROMPT: prompt,
        records.MESSAGES_JSON: None if messages is None else json.dumps(messages),
        records.RESPONSE: response,
        records.FEEDBACK: feedback,
        records.RATING: rating,
        records.DESIRABLE: desirable,
        records.MODEL: "tiny-chat",
        records.ADAPTER: adapter,
        records.SCHEMA: 1,
        records.KAFKA_TOPIC: "fb",
        records.KAFKA_PARTITION: 0,
        records.KAFKA_OFFSET: t if offset is None else offset,
        records.KAFKA_TIMESTAMP: None,
        records.INGESTED_AT: T0,
        records.INGESTED_BY: "test",
    }


def stored(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as the store reads them back (its Arrow schema)."""
    return pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA)


INGESTED_AT = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


def feedback_rows(offsets: list[int]) -> pa.Table:
    """Feedback rows of sample events at these offsets of partition 0 of topic "fb", as
    ingest stores them."""
    events = list(sample_events(max(offsets, default=0) + 1))
    rows = FeedbackRows("fb", 0)
    for offset in offsets:
        parsed = parse_event(json.dumps(events[offset]).encode(), user_hash_key=b"k")
        rows.append(parsed, offset, 1_767_225_600_000 + offset)
    return rows.to_table(INGESTED_AT, "test")


def feedback_range(first: int, last: int) -> pa.Table:
    """`feedback_rows` of offsets first to last, both included."""
    return feedback_rows(list(range(first, last + 1)))
