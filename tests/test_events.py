"""The event schema: what is accepted, how it is labelled, and why the rest is refused."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import msgspec
import pytest

from pipeline.feedback.events import EventError, RatingPolicy, hash_user, json_schema, parse_event
from pipeline.feedback.sample import malformed_samples, sample_events

KEY = b"k"
BASE = {
    "schema": 1,
    "event_id": "e1",
    "ts": "2026-03-01T12:00:00+01:00",
    "conversation_id": "c1",
    "message_id": "m1",
    "user_id": "alice@example.com",
    "prompt": "How do I reset my password?",
    "response": "Open Settings, then Security.",
    "feedback": "like",
    "model": "tiny-chat",
    "adapter": "chat@v3",
}


def parse(**changes: object) -> object:
    event = {k: v for k, v in {**BASE, **changes}.items() if v is not ...}
    return parse_event(json.dumps(event).encode(), user_hash_key=KEY)


def test_like_and_dislike_become_labels() -> None:
    like, dislike = parse(), parse(feedback="dislike")
    assert (like.feedback, like.desirable) == ("like", True)
    assert (dislike.feedback, dislike.desirable) == ("dislike", False)
    assert like.ts == dt.datetime(2026, 3, 1, 11, 0, tzinfo=dt.UTC)
    assert like.adapter == "chat@v3"


@pytest.mark.parametrize(
    ("rating", "desirable"), [(1, False), (2, False), (3, None), (4, True), (5, True)]
)
def test_ratings_split_by_the_default_policy(rating: int, desirable: bool | None) -> None:
    event = parse(feedback=..., rating=rating)
    assert (event.feedback, event.rating, event.desirable) == ("rating", rating, desirable)


def test_rating_policy_is_configurable_and_checked() -> None:
    strict = RatingPolicy(rating_desirable_min=5, rating_undesirable_max=3)
    assert [strict.label(r) for r in range(1, 6)] == [False, False, False, None, True]
    with pytest.raises(ValueError, match="rating_undesirable_max must be below"):
        RatingPolicy(rating_desirable_min=3, rating_undesirable_max=3)
    with pytest.raises(ValueError, match="rating_desirable_min"):
        RatingPolicy(rating_desirable_min=6)


def test_retraction_needs_only_the_message_it_withdraws() -> None:
    event = parse(feedback="retract", prompt=..., response=..., model=...)
    assert (event.feedback, event.desirable, event.response) == ("retract", None, None)


def test_user_id_is_stored_only_as_a_keyed_hash() -> None:
    event = parse()
    assert event.user_hash == hash_user("alice@example.com", KEY)
    assert "alice" not in json.dumps(msgspec.structs.asdict(event), default=str)
    assert hash_user("alice@example.com", b"other key") != event.user_hash
    assert parse(user_id=...).user_hash is None


def test_chat_history_is_kept_as_json() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    event = parse(prompt=..., messages=messages)
    assert event.prompt is None
    assert json.loads(event.messages_json) == messages


@pytest.mark.parametrize(
    ("changes", "kind", "says"),
    [
        ({"feedback": "meh"}, "unknown_feedback", "meh"),
        ({"feedback": ..., "rating": 7}, "invalid_value", "<= 5"),
        ({"feedback": ...}, "missing_field", "exactly one of `feedback`"),
        ({"rating": 4}, "invalid_value", "exactly one of `feedback`"),
        ({"response": ...}, "missing_field", "`response` is required"),
        ({"prompt": ...}, "missing_field", "`prompt` or `messages`"),
        ({"messages": [{"role": "user", "content": "x"}]}, "invalid_value", "not both"),
        ({"prompt": ..., "messages": []}, "invalid_value", "empty list"),
        ({"model": ...}, "missing_field", "`model`"),
        ({"event_id": ...}, "missing_field", "event_id"),
        ({"event_id": ""}, "invalid_value", "event_id"),
        ({"message_id": 3}, "wrong_type", "$.message_id"),
        ({"ts": "2026-03-01T12:00:00"}, "invalid_value", "timezone"),
        ({"ts": "yesterday"}, "invalid_value", "$.ts"),
        ({"schema": 2}, "unsupported_schema", "upgrade kto-loop"),
        ({"schema": 2, "event_id": 5}, "unsupported_schema", "schema version 2"),
    ],
)
def test_invalid_events_are_refused_with_a_kind_and_reason(
    changes: dict, kind: str, says: str
) -> None:
    with pytest.raises(EventError) as err:
        parse(**changes)
    assert err.value.kind == kind
    assert says in err.value.message


def test_every_malformed_sample_gets_its_own_kind() -> None:
    for kind, raw in malformed_samples().items():
        with pytest.raises(EventError) as err:
            parse_event(raw, user_hash_key=KEY)
        assert err.value.kind == kind, (kind, err.value.message)


def test_size_limit_is_checked_before_decoding() -> None:
    raw = json.dumps({**BASE, "response": "x" * 5000}).encode()
    with pytest.raises(EventError, match="above the limit of 4096"):
        parse_event(raw, user_hash_key=KEY, max_bytes=4096)


def test_unknown_extra_fields_are_ignored() -> None:
    assert parse(client_version="2.3.1").event_id == "e1"


def test_sample_events_are_valid_and_deterministic() -> None:
    a = [parse_event(json.dumps(e).encode(), user_hash_key=KEY) for e in sample_events(300, 5)]
    b = list(sample_events(300, 5))
    assert [e.event_id for e in a] == [e["event_id"] for e in b]
    assert {e.feedback for e in a} == {"like", "dislike", "rating", "retract"}


def test_sample_events_credit_no_adapter_unless_asked() -> None:
    # Synthetic votes credited to chat@v1 would count as v1's production feedback.
    plain = [parse_event(json.dumps(e).encode(), user_hash_key=KEY) for e in sample_events(50)]
    assert {e.adapter for e in plain} == {None}
    credited = list(sample_events(50, adapter="chat@v3"))
    assert {e["adapter"] for e in credited} == {"chat@v3"}


def test_published_json_schema_matches_the_code() -> None:
    path = Path(__file__).resolve().parent.parent / "pipeline/schema/feedback-event.v1.json"
    assert json.loads(path.read_text()) == json_schema(), (
        "pipeline/schema/feedback-event.v1.json is stale: run `kto-loop schema --out` on it"
    )


# -- what producers really send -------------------------------------------------------


def raw_variant(**changes: object) -> bytes:
    return json.dumps({k: v for k, v in {**BASE, **changes}.items() if v is not ...}).encode()


DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("raw", "kind", "says"),
    [
        (raw_variant()[:-1] + b', "trace": ' + DEEP + b"}", "too_deep", "flatten"),
        (raw_variant(prompt="x").replace(b'"x"', DEEP), "too_deep", "flatten"),
        (raw_variant(response="a\ud800b"), "invalid_unicode", "$.response"),
        (
            raw_variant(prompt=..., messages=[{"role": "user", "content": "x", "name": "\udc00"}]),
            "invalid_unicode",
            "$.messages[0].name",
        ),
        (raw_variant(feedback=..., rating=10**30), "invalid_value", "<= 5"),
        (raw_variant(feedback=..., rating=2.5), "wrong_type", "$.rating"),
        (raw_variant(schema=10**30), "unsupported_schema", "schema version"),
        (raw_variant(trace=float("nan")), "not_json", "NaN"),
        (raw_variant(trace=float("inf")), "not_json", "Infinity"),
        (raw_variant(feedback=..., rating=float("-inf")), "not_json", "-Infinity"),
        (raw_variant(ts="0001-01-01T00:30:00+01:00"), "invalid_value", "outside 1970"),
        (raw_variant(ts="1969-12-31T23:59:59Z"), "invalid_value", "outside 1970"),
        (raw_variant(ts="9999-12-31T23:59:59-01:00"), "invalid_value", "outside 1970"),
        (raw_variant()[:-1] + b', "feedback": "dislike"}', "duplicate_key", "`feedback`"),
        (
            raw_variant(prompt=..., messages=[{"role": "user", "content": "x"}]).replace(
                b'"content": "x"', b'"content": "x", "content": "y"'
            ),
            "duplicate_key",
            "$.messages[0]",
        ),
        (
            raw_variant(prompt=..., messages=[{"role": "user", "content": [{"text": "x"}]}]),
            "wrong_type",
            '"type"',
        ),
        (
            raw_variant(prompt=..., messages=[{"role": "user", "content": [{"type": "text"}]}]),
            "missing_field",
            "without `text`",
        ),
        (
            raw_variant(prompt=..., messages=[{"role": "user"}]),
            "missing_field",
            "no `content`",
        ),
        (
            raw_variant(prompt=..., messages=[{"role": "user", "content": 5}]),
            "wrong_type",
            "string or an array of parts",
        ),
        (b"\xef\xbb\xbf[1, 2]", "not_json", "not a JSON object"),
        (raw_variant()[:-5], "not_json", "value is not JSON"),
        (raw_variant(prompt="cafe").replace(b'"cafe"', b'"caf\xe9"'), "invalid_utf8", "UTF-8"),
        (raw_variant(trace="x").replace(b'"x"', b'"\xc3"'), "invalid_utf8", "UTF-8"),
    ],
)
def test_what_producers_send_that_cannot_be_stored_gets_a_kind_and_reason(
    raw: bytes, kind: str, says: str
) -> None:
    with pytest.raises(EventError) as err:
        parse_event(raw, user_hash_key=KEY)
    assert (err.value.kind, says in err.value.message) == (kind, True), err.value.message


def test_odd_but_valid_events_are_stored_as_sent() -> None:
    from pipeline.feedback.sample import odd_valid_samples

    samples = odd_valid_samples()
    parsed = {name: parse_event(raw, user_hash_key=KEY) for name, raw in samples.items()}
    sent = {name: json.loads(raw.removeprefix(b"\xef\xbb\xbf")) for name, raw in samples.items()}
    for name, event in parsed.items():
        original = sent[name]
        assert (event.event_id, event.response, event.prompt) == (
            original["event_id"],
            original["response"],
            original.get("prompt"),
        ), name
        if "messages" in original:
            # Every field of every turn is kept: parts, tool calls, ids.
            assert json.loads(event.messages_json) == original["messages"], name
    assert parsed["nul_in_text"].prompt == "a\x00b"
    assert parsed["emoji_pair_escaped"].response.endswith("\U0001f600")


def test_an_event_just_under_the_size_limit_is_accepted() -> None:
    limit = 1 << 20
    overhead = len(raw_variant(response=""))
    raw = raw_variant(response="x" * (limit - overhead))
    assert len(raw) == limit
    assert len(parse_event(raw, user_hash_key=KEY, max_bytes=limit).response) == limit - overhead
    with pytest.raises(EventError, match="above the limit"):
        parse_event(raw + b" ", user_hash_key=KEY, max_bytes=limit)
