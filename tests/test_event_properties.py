"""Property: every message a producer can send ends as a stored row that reads back
equal, or as a dead letter that keeps its raw bytes; never an exception, never a
silently changed row. Arbitrary bytes, and events built from the schema with random
corruptions, go through the parser, the row builder and a real Parquet write."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from typing import Any

import hypothesis
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.feedback.store import DEAD_LETTERS, FEEDBACK, FeedbackStore
from pipeline.feedback import records
from pipeline.feedback.events import EventError, EventParser, FeedbackEvent
from pipeline.feedback.records import DeadLetter, DeadLetterRows, FeedbackRows, Provenance

KEY = b"0123456789abcdef0123456789abcdef"
KINDS = {
    "empty", "too_large", "invalid_utf8", "not_json", "too_deep", "duplicate_key",
    "invalid_unicode", "missing_field", "wrong_type", "unknown_feedback", "invalid_value",
    "unsupported_schema",
}  # fmt: skip
MAX_BYTES = 64 * 1024
PARSE = EventParser(KEY, max_bytes=MAX_BYTES)
NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)

# Any code point, lone surrogates included: JSON can escape them, UTF-8 cannot hold them.
any_text = st.text(st.characters(exclude_categories=()), max_size=24)
some_text = st.one_of(any_text, st.sampled_from(["", " ", "ok", "like", "x\x00y", "\U0001f600"]))
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    some_text,
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(some_text, inner, max_size=3),
    max_leaves=8,
)
timestamps = st.one_of(
    st.datetimes(
        min_value=dt.datetime(1970, 1, 2),
        max_value=dt.datetime(2262, 1, 1),
        timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-11, minutes=-30))]),
    ).map(dt.datetime.isoformat),
    # Rarely: out of the store's span, no timezone, not a date.
    st.sampled_from(["0001-01-01T00:00:00+01:00", "2026-03-01T12:00:00", "2026-02-30T00:00:00Z"]),
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": some_text})
image_part = st.fixed_dictionaries(
    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": some_text})}
)
turn = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool"]),
        "content": st.one_of(some_text, st.lists(text_part | image_part, min_size=1, max_size=3)),
    },
    optional={"name": some_text},
)
non_empty = st.text(st.characters(exclude_categories=()), min_size=1, max_size=24)


@st.composite
def event(draw: st.DrawFn) -> dict[str, Any]:
    """A schema-1 event that is valid unless its text is (a lone surrogate, a blank
    response) or its timestamp is."""
    body: dict[str, Any] = {
        "schema": 1,
        "event_id": draw(non_empty),
        "ts": draw(timestamps),
        "conversation_id": draw(non_empty),
        "message_id": draw(non_empty),
        "model": draw(non_empty),
    }
    if draw(st.booleans()):
        body["user_id"] = draw(some_text)
    if draw(st.booleans()):
        body["prompt"] = draw(non_empty)
    else:
        body["messages"] = draw(st.lists(turn, min_size=1, max_size=3))
    body["response"] = draw(non_empty)
    if draw(st.booleans()):
        body["feedback"] = draw(st.sampled_from(["like", "dislike", "retract"]))
    else:
        body["rating"] = draw(st.integers(min_value=1, max_value=5))
    if draw(st.booleans()):
        body["adapter"] = draw(st.one_of(st.none(), some_text))
    if draw(st.booleans()):
        body["client"] = draw(json_value)
    return body


def corrupt(draw: st.DrawFn, body: dict[str, Any]) -> tuple[bytes, dict[str, Any] | None]:
    """Serialise, maybe corrupt; returns the raw bytes and what they say (None when the
    corruption leaves that unclear)."""
    how = draw(
        st.sampled_from(
            ["none"] * 6 + ["bom", "drop", "retype", "duplicate", "nan", "deep", "cut", "flip"]
        )
    )
    if how == "drop" and body:
        body = dict(body)
        body.pop(draw(st.sampled_from(sorted(body))))
    if how == "retype" and body:
        body = {**body, draw(st.sampled_from(sorted(body))): draw(json_value)}
    ascii_only = draw(st.booleans())
    text = json.dumps(body, ensure_ascii=ascii_only)
    if how == "duplicate" and len(text) > 2:
        name = draw(st.sampled_from(sorted(body)))
        text = text[:-1] + f", {json.dumps(name)}: {json.dumps(draw(json_value))}}}"
    if how == "nan":
        text = text[:-1] + ', "x": ' + draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])) + "}"
    if how == "deep":
        depth = draw(st.sampled_from([50, 5000]))
        text = text[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    raw = text.encode("utf-8", "surrogatepass")
    if how == "bom":
        raw = b"\xef\xbb\xbf" + raw
    if how == "cut":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if how == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    return raw, body if how in ("none", "bom", "drop", "retype", "deep") else None


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, dict[str, Any] | None]:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300)), None
    body = draw(event())
    return corrupt(draw, body)


def stored_or_dead_lettered(raw: bytes) -> tuple[str, Any]:
    """Run one message through parse, rows and a Parquet write; read it back."""
    with tempfile.TemporaryDirectory() as tmp:
        store = FeedbackStore(tmp)
        try:
            parsed = PARSE(raw)
        except EventError as exc:
            assert exc.kind in KINDS, exc.kind
            assert exc.message
            return "dead", dead_letter_round_trip(store, raw, exc.kind, exc.message)
        rows = FeedbackRows("t", 0)
        rows.append(parsed, 7, None)
        rejected = rows.seal()
        if rejected:
            (_, reason), *_ = rejected
            return "dead", dead_letter_round_trip(store, raw, "unstorable", reason)
        path = store.write_batch(FEEDBACK, "t", 0, 7, 7, rows.to_table(NOW, "test"))
        back = pq.read_table(path, schema=records.FEEDBACK_SCHEMA).to_pylist()
        assert len(back) == 1
        assert_row_equals_event(back[0], parsed)
        return "stored", parsed


def dead_letter_round_trip(store: FeedbackStore, raw: bytes, kind: str, reason: str) -> str:
    letters = DeadLetterRows()
    letters.append(
        DeadLetter(Provenance("t", 0, 7, None), b"k", raw, (("h", b"\xff"),), kind, reason)
    )
    path = store.write_batch(DEAD_LETTERS, "t", 0, 7, 7, letters.to_table(NOW, "test"))
    (row,) = pq.read_table(path, schema=records.DEAD_LETTER_SCHEMA).to_pylist()
    assert row[records.VALUE] == raw  # the whole raw bytes, whatever they are
    assert (row[records.ERROR_KIND], row[records.REASON]) == (kind, reason)
    return kind


def assert_row_equals_event(row: dict[str, Any], parsed: FeedbackEvent) -> None:
    for name in FeedbackEvent.__struct_fields__:
        if name == records.TS:
            assert row[name] == parsed.ts, (row[name], parsed.ts)  # the same instant
        else:
            assert row[name] == getattr(parsed, name), name


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_every_message_is_a_row_that_reads_back_equal_or_a_dead_letter(
    message: tuple[bytes, dict[str, Any] | None],
) -> None:
    raw, body = message
    outcome, value = stored_or_dead_lettered(raw)
    hypothesis.event(outcome if outcome == "stored" else f"dead: {value}")
    if outcome == "stored" and body is not None:
        # Nothing silently changed: the stored event says what the producer sent.
        for name in ("event_id", "conversation_id", "message_id", "prompt", "response"):
            assert getattr(value, name) == body.get(name), name
        if body.get("messages") is not None:
            assert json.loads(value.messages_json) == body["messages"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=MAX_BYTES // 64))
def test_arbitrary_bytes_never_escape_as_an_exception(raw: bytes) -> None:
    assert stored_or_dead_lettered(raw)[0] in ("stored", "dead")
