"""The feedback event: its wire schema (version 1), decoding, validation and binarisation.

A frontend sends one JSON object per rated assistant turn. `parse_event` turns the
raw Kafka value into a typed `FeedbackEvent` or raises `EventError` with a kind and
a message that says what was wrong, so the caller can dead-letter it.

Wire format, schema 1 (unknown extra fields are ignored so producers can add some):

    {"schema": 1, "event_id": "<unique>", "ts": "<RFC 3339 with offset>",
     "conversation_id": "...", "message_id": "<the rated assistant turn>",
     "user_id": "<optional>",
     "prompt": "<text>"  or  "messages": [{"role": "...", "content": "..."}],
     "response": "<the assistant text that was rated>",
     "feedback": "like" | "dislike" | "retract"   or  "rating": 1..5,
     "model": "<base>", "adapter": "<alias@version that produced it, optional>"}

A retraction names the (user, message) whose vote it withdraws; prompt, response
and model may be left out of it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = frozenset({SCHEMA_VERSION})

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Message(msgspec.Struct, frozen=True, gc=False):
    """One chat turn of the conversation that led to the rated response."""

    role: Annotated[str, msgspec.Meta(min_length=1, description="system, user, assistant or tool")]
    content: str


class WireEventV1(msgspec.Struct, frozen=True, gc=False):
    """A thumbs up/down, rating or retraction of one assistant turn (schema 1)."""

    schema: Annotated[int, msgspec.Meta(description="Version of this schema; 1.")]
    event_id: Annotated[
        NonEmpty, msgspec.Meta(description="Unique per event; the idempotency key.")
    ]
    ts: Annotated[dt.datetime, msgspec.Meta(tz=True, description="When the user voted (RFC 3339).")]
    conversation_id: NonEmpty
    message_id: Annotated[NonEmpty, msgspec.Meta(description="The rated assistant turn.")]
    user_id: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    response: str | None = None
    feedback: Literal["like", "dislike", "retract"] | None = None
    rating: Annotated[int, msgspec.Meta(ge=1, le=5)] | None = None
    model: str | None = None
    adapter: Annotated[
        str | None, msgspec.Meta(description="alias@version that produced the response.")
    ] = None


class _SchemaOnly(msgspec.Struct):
    schema: Any = None


_decoder = msgspec.json.Decoder(WireEventV1)
_schema_decoder = msgspec.json.Decoder(_SchemaOnly)


class EventError(ValueError):
    """An event that cannot be stored; `kind` is a stable short code for dead letters."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class RatingPolicy:
    """How a 1-5 rating becomes a label: >= desirable_min likes, <= undesirable_max
    dislikes, anything between is neutral (stored, but carries no label)."""

    desirable_min: int = 4
    undesirable_max: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.undesirable_max < self.desirable_min <= 5:
            raise ValueError(
                "rating policy needs 1 <= undesirable_max < desirable_min <= 5, got "
                f"undesirable_max={self.undesirable_max}, desirable_min={self.desirable_min}"
            )

    def label(self, rating: int) -> bool | None:
        if rating >= self.desirable_min:
            return True
        if rating <= self.undesirable_max:
            return False
        return None


class FeedbackEvent(msgspec.Struct, frozen=True, gc=False):
    """A validated event, ready to store. `desirable` is None for retractions and
    neutral ratings; `user_hash` replaces the user id, which is never kept."""

    event_id: str
    ts: dt.datetime
    conversation_id: str
    message_id: str
    user_hash: str | None
    prompt: str | None
    messages_json: str | None
    response: str | None
    feedback: str  # like | dislike | retract | rating
    rating: int | None
    desirable: bool | None
    model: str | None
    adapter: str | None
    schema: int


def hash_user(user_id: str, key: bytes) -> str:
    """Keyed hash (HMAC-SHA256, 128 bits hex) that stands in for a user id."""
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def _hash_user_keyed(key: bytes, user_id: str) -> str:
    return hash_user(user_id, key)


def _kind_of_validation_error(message: str) -> str:
    if message.startswith("Object missing required field"):
        return "missing_field"
    if message.startswith("Invalid enum value") and "$.feedback" in message:
        return "unknown_feedback"
    if message.startswith("Expected `") and ", got `" in message:
        return "wrong_type"
    return "invalid_value"


def _decode(raw: bytes) -> WireEventV1:
    try:
        return _decoder.decode(raw)
    except UnicodeDecodeError as exc:
        raise EventError("invalid_utf8", f"value is not valid UTF-8: {exc}") from None
    except msgspec.ValidationError as exc:
        _check_schema_version(raw)
        message = str(exc)
        raise EventError(_kind_of_validation_error(message), message) from None
    except msgspec.DecodeError as exc:
        if raw[:1] not in (b"{", b" ", b"\n", b"\t", b"\r"):
            detail = "not a JSON object"
        else:
            detail = str(exc)
        raise EventError("not_json", f"value is not JSON: {detail}") from None


def _check_schema_version(raw: bytes) -> None:
    try:
        version = _schema_decoder.decode(raw).schema
    except (msgspec.DecodeError, UnicodeDecodeError):
        return
    known = isinstance(version, int) and not isinstance(version, bool)
    if known and version not in SUPPORTED_SCHEMAS:
        raise _unsupported(version)


def _unsupported(version: int) -> EventError:
    return EventError(
        "unsupported_schema",
        f"schema version {version} is not supported by this consumer (supports "
        f"{sorted(SUPPORTED_SCHEMAS)}); upgrade kto-loop to read it",
    )


class EventParser:
    """Decodes and validates Kafka message values into `FeedbackEvent`s.

    Holds what every event needs (the hash key, the rating policy, the size limit)
    and a bounded cache of user hashes: users vote many times, and an HMAC per
    event would be a fifth of the ingest path's own cost.
    """

    def __init__(
        self,
        user_hash_key: bytes,
        rating_policy: RatingPolicy = RatingPolicy(),
        max_bytes: int = 1 << 20,
        user_cache_size: int = 1 << 16,
    ) -> None:
        self.rating_policy = rating_policy
        self.max_bytes = max_bytes
        self._hash = functools.lru_cache(maxsize=user_cache_size)(
            functools.partial(_hash_user_keyed, user_hash_key)
        )

    def __call__(self, raw: bytes | None) -> FeedbackEvent:
        """Decode and validate one Kafka message value.

        Raises:
            EventError: with `kind` one of empty, too_large, invalid_utf8, not_json,
                missing_field, wrong_type, unknown_feedback, invalid_value,
                unsupported_schema; the message names the field and what to send.
        """
        if not raw:
            raise EventError("empty", "message has no value (null or empty)")
        if len(raw) > self.max_bytes:
            raise EventError(
                "too_large",
                f"event is {len(raw)} bytes, above the limit of {self.max_bytes} "
                "(ingest.max_event_bytes); feedback events should not carry whole documents",
            )
        wire = _decode(raw)
        if wire.schema not in SUPPORTED_SCHEMAS:
            raise _unsupported(wire.schema)

        feedback = wire.feedback
        if (feedback is None) == (wire.rating is None):
            raise EventError(
                "missing_field" if feedback is None else "invalid_value",
                "exactly one of `feedback` (like, dislike, retract) or `rating` (1-5) is required",
            )
        if feedback != "retract":
            _check_vote(wire)

        if wire.rating is not None:
            feedback, desirable = "rating", self.rating_policy.label(wire.rating)
        elif feedback == "retract":
            desirable = None
        else:
            desirable = feedback == "like"
        messages = wire.messages
        return FeedbackEvent(
            wire.event_id,
            wire.ts,
            wire.conversation_id,
            wire.message_id,
            self._hash(wire.user_id) if wire.user_id else None,
            wire.prompt,
            None if messages is None else _encode_messages(messages).decode(),
            wire.response,
            feedback,
            wire.rating,
            desirable,
            wire.model,
            wire.adapter,
            wire.schema,
        )


_encode_messages = msgspec.json.Encoder().encode


def _check_vote(wire: WireEventV1) -> None:
    prompt, messages, response = wire.prompt, wire.messages, wire.response
    if prompt is not None and messages is not None:
        raise EventError("invalid_value", "send either `prompt` or `messages`, not both")
    if prompt is None and messages is None:
        raise EventError("missing_field", "one of `prompt` or `messages` is required")
    if prompt is not None and (not prompt or prompt.isspace()):
        raise EventError("invalid_value", "`prompt` is empty")
    if messages is not None and not messages:
        raise EventError("invalid_value", "`messages` is an empty list")
    if response is None:
        raise EventError("missing_field", "`response` is required: the rated assistant text")
    if not response or response.isspace():
        raise EventError("invalid_value", "`response` is empty: nothing was rated")
    if not wire.model:
        raise EventError("missing_field", "`model` is required: the base model that answered")


def parse_event(
    raw: bytes | None,
    *,
    user_hash_key: bytes,
    rating_policy: RatingPolicy = RatingPolicy(),
    max_bytes: int = 1 << 20,
) -> FeedbackEvent:
    """Decode and validate one message value; see `EventParser` (use one for streams)."""
    return EventParser(user_hash_key, rating_policy, max_bytes)(raw)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the wire event, for frontend teams (pipeline/schema/)."""
    _, components = msgspec.json.schema_components([WireEventV1])
    schema: dict[str, Any] = {
        **components["WireEventV1"],
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kto-loop.dev/schema/feedback-event.v1.json",
        "title": "kto-loop feedback event, schema 1",
        "description": (
            "One thumbs up/down, 1-5 rating or retraction of an assistant turn, sent as "
            "one UTF-8 JSON Kafka message keyed by conversation_id. Send exactly one of "
            "feedback or rating; for a vote (not a retraction) also prompt or messages, "
            "a non-empty response and model."
        ),
        "$defs": {"Message": components["Message"]},
    }
    schema["properties"]["schema"]["const"] = SCHEMA_VERSION
    schema["oneOf"] = [{"required": ["feedback"]}, {"required": ["rating"]}]
    schema["if"] = {
        "not": {"properties": {"feedback": {"const": "retract"}}, "required": ["feedback"]}
    }
    schema["then"] = {
        "required": ["response", "model"],
        "properties": {"response": {"type": "string", "minLength": 1}},
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
    }
    return schema
