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
and model may be left out of it. A user_id of the form `kto-user-hash:<32 hex>` is
taken as the hash it names instead of being hashed: it is what a dead letter keeps
in place of the user id (pipeline/feedback/redact.py), so that a replayed one counts
for the same user.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import hmac
import json
import re
from typing import Annotated, Any, Literal

import msgspec
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = frozenset({SCHEMA_VERSION})

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

# The span a timestamp may take: that of a nanosecond timestamp, which every tool that
# reads the store (pandas, Spark, DuckDB) can hold. A vote outside it is a producer bug.
TS_MIN = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
TS_MAX = dt.datetime(2262, 4, 11, tzinfo=dt.UTC)
_BOM = b"\xef\xbb\xbf"
_MESSAGE_FIELDS = ("role", "content", "tool_calls")
_PART_FIELDS = ("type", "text")
_FEEDBACK_VALUES = ("like", "dislike", "retract")


class ContentPart(msgspec.Struct, frozen=True, gc=False):
    """One part of a message's content in OpenAI's chat format: {"type": "text",
    "text": ...} is text; image, audio, file and other parts are kept as sent."""

    type: Annotated[str, msgspec.Meta(min_length=1, description="text, image_url, ...")]
    text: Annotated[str | None, msgspec.Meta(description="The text of a text part.")] = None


class Message(msgspec.Struct, frozen=True, gc=False):
    """One chat turn of the conversation that led to the rated response. Content is a
    string or a list of parts (OpenAI's chat format); an assistant turn that only
    calls tools may leave it out. Other fields (name, tool_calls, tool_call_id) are
    kept as sent."""

    role: Annotated[str, msgspec.Meta(min_length=1, description="system, user, assistant or tool")]
    content: str | list[ContentPart] | None = None
    tool_calls: Annotated[
        list[dict[str, Any]] | None, msgspec.Meta(description="An assistant turn's tool calls.")
    ] = None


class WireEventV1(msgspec.Struct, frozen=True, gc=False):
    """A thumbs up/down, rating or retraction of one assistant turn (schema 1).

    The one declaration of the wire event: ingest and the HTTP endpoint decode into it,
    and json_schema() publishes it. `messages` is kept as its raw JSON (stored as sent,
    with every field of every turn) and decoded on its own as a list of `Message`s,
    which is what json_schema() says it is.
    """

    schema: Annotated[int, msgspec.Meta(description="Version of this schema; 1.")]
    event_id: Annotated[
        NonEmpty, msgspec.Meta(description="Unique per event; the idempotency key.")
    ]
    ts: Annotated[dt.datetime, msgspec.Meta(tz=True, description="When the user voted (RFC 3339).")]
    conversation_id: NonEmpty
    message_id: Annotated[NonEmpty, msgspec.Meta(description="The rated assistant turn.")]
    user_id: str | None = None
    prompt: str | None = None
    # Raw cannot be optional: an empty Raw means the field was absent.
    messages: msgspec.Raw = msgspec.Raw()
    response: str | None = None
    feedback: Literal["like", "dislike", "retract"] | None = None
    rating: Annotated[int, msgspec.Meta(ge=1, le=5)] | None = None
    model: str | None = None
    adapter: Annotated[
        str | None, msgspec.Meta(description="alias@version that produced the response.")
    ] = None


# Top-level fields whose value we read; a message naming one twice is ambiguous.
_READ_FIELDS = WireEventV1.__struct_fields__
# One pass over the bytes finds every key named like a field we read, at any depth.
_READ_KEY = re.compile(rb'"(' + b"|".join(n.encode() for n in _READ_FIELDS) + rb')"\s*:')
_decoder = msgspec.json.Decoder(WireEventV1)
_messages_decoder = msgspec.json.Decoder(list[Message])


class EventError(ValueError):
    """An event that cannot be stored; `kind` is a stable short code for dead letters."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class RatingPolicy:
    """How a 1-5 rating becomes a label: >= rating_desirable_min likes, <=
    rating_undesirable_max dislikes, anything between is neutral (stored, but carries
    no label). The `[events]` configuration section, less the user-hash key (bounds
    checked whenever one is built)."""

    rating_desirable_min: Annotated[
        int,
        Field(
            ge=1,
            le=5,
            description="a rating this high or higher is a like; applied when an event is "
            "stored (stored votes keep their label)",
        ),
    ] = 4
    rating_undesirable_max: Annotated[
        int,
        Field(
            ge=1,
            le=5,
            description="a rating this low or lower is a dislike (between the two: stored "
            "without a label); applied when an event is stored",
        ),
    ] = 2

    @model_validator(mode="after")
    def _check(self) -> RatingPolicy:
        if self.rating_undesirable_max >= self.rating_desirable_min:
            raise ValueError(
                "rating_undesirable_max must be below rating_desirable_min, got "
                f"{self.rating_undesirable_max} and {self.rating_desirable_min}"
            )
        return self

    def label(self, rating: int) -> bool | None:
        if rating >= self.rating_desirable_min:
            return True
        if rating <= self.rating_undesirable_max:
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


# A user_id already hashed: what a dead letter keeps in place of the id it was sent
# with (pipeline/feedback/redact.py), so that replaying it does not hash the hash.
HASHED_USER_ID = "kto-user-hash:"
_HASHED = re.compile(re.escape(HASHED_USER_ID) + "[0-9a-f]{32}")


def is_hashed_user_id(user_id: Any) -> bool:
    """Whether `user_id` is HASHED_USER_ID followed by a hash_user() hash."""
    return isinstance(user_id, str) and _HASHED.fullmatch(user_id) is not None


def _user_hash(key: bytes, user_id: str) -> str:
    """The stored hash of a user id: hash_user(), or the hash an already hashed id
    (a replayed dead letter's) names."""
    if is_hashed_user_id(user_id):
        return user_id[len(HASHED_USER_ID) :]
    return hash_user(user_id, key)


# -- decoding ---------------------------------------------------------------------
#
# The fast path decodes straight into `WireEventV1`. Whatever it refuses is diagnosed by
# our own checks on the generic JSON value (`_diagnose`), so the dead-letter kind
# never depends on a library's wording. What the fast path accepts but the store
# could not hold or would silently change (duplicate keys, lone surrogates, a
# timestamp out of range) is checked by us too.


def _decode(raw: bytes) -> tuple[WireEventV1, list[Message] | None]:
    """The typed event and, when they decode, its turns."""
    # ASCII is valid UTF-8 and holds no BOM: one fast scan settles most events.
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventError(
                "invalid_utf8",
                f"value is not valid UTF-8 (byte {exc.start}); JSON events must be UTF-8",
            ) from None
        if raw.startswith(_BOM):
            # RFC 8259 lets a parser ignore a byte order mark; it is not part of the event.
            raw = raw[len(_BOM) :]
    try:
        wire = _decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _diagnose(raw, exc) from None
    turns = None
    if wire.messages:
        # Turns that do not decode are diagnosed by _decode_messages.
        with contextlib.suppress(msgspec.DecodeError, RecursionError):
            turns = _messages_decoder.decode(wire.messages)
    value = None  # the generic parse, made at most once and only when a check needs it
    if _may_repeat_keys(raw, wire, turns):
        value = _generic(raw)
        _check_repeated_keys(value)
    # Turns keep fields we do not decode, so their strings are checked here; only a
    # history with \u escapes can hold a lone surrogate.
    if wire.messages and b"\\u" in bytes(wire.messages):
        value = _generic(raw) if value is None else value
        _check_unicode({k: value[k] for k in _READ_FIELDS if k in value}, "$")
    return wire, turns


def _may_repeat_keys(raw: bytes, wire: WireEventV1, turns: list[Message] | None) -> bool:
    """Cheap and conservative: a field name we read appears as a key more than once
    (perhaps in a nested object we ignore), or message fields appear more often than
    turns exist. The exact check runs only then."""
    # Every key written the usual way ends in `":`. When there are exactly as many as
    # the keys we decoded, no key is there twice: the common case costs one C scan.
    # (A key written `"k" :` is not counted, so it sends the event to the exact check
    # unless an escaped `\":` inside a string happens to make up for it.)
    # WireEventV1 holds exactly the fields we read; its `messages` is never None.
    values = msgspec.structs.astuple(wire)
    expected = len(values) - 1 - values.count(None)
    if wire.messages:
        expected += 1 + _keys_in_turns(turns)
    if raw.count(b'":') == expected:
        return False
    keys = _READ_KEY.findall(raw)
    if len(keys) != len(set(keys)):
        return True
    if not wire.messages:
        return False
    turns = raw.count(b'"role"')
    return turns > 0 and (raw.count(b'"content"') > turns or raw.count(b'"text"') > turns * 64)


def _keys_in_turns(turns: list[Message] | None) -> int:
    """How many keys the turns hold as decoded (-1 if they did not decode)."""
    if turns is None:
        return -1
    keys = 0
    for turn in turns:
        keys += 1 + (turn.content is not None) + (turn.tool_calls is not None)
        if isinstance(turn.content, list):
            keys += sum(1 + (part.text is not None) for part in turn.content)
    return keys


class _Object(dict):
    """A decoded JSON object that remembers which of its keys were repeated."""

    repeated: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.repeated = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _refuse_constant(name: str) -> Any:
    raise _NonJsonConstant(name)


class _NonJsonConstant(ValueError):
    pass


def _generic(raw: bytes) -> Any:
    """The JSON value of `raw`, parsed by the standard library with the checks JSON
    itself requires (no NaN/Infinity) and repeated keys recorded."""
    try:
        return json.loads(
            raw.decode("utf-8"), object_pairs_hook=_object_pairs, parse_constant=_refuse_constant
        )
    except _NonJsonConstant as exc:
        raise EventError(
            "not_json", f"value is not JSON: {exc} is not a JSON number (send null or a string)"
        ) from None
    except RecursionError:
        raise EventError(
            "too_deep",
            "value nests arrays/objects deeper than the decoder allows; flatten it "
            "(feedback events need only a few levels)",
        ) from None
    except json.JSONDecodeError as exc:
        first = raw.lstrip(b" \t\r\n")[:1]
        detail = "not a JSON object" if first != b"{" else f"{exc.msg} at byte {exc.pos}"
        raise EventError("not_json", f"value is not JSON: {detail}") from None


def _check_repeated_keys(value: Any) -> None:
    """Refuse a parsed event (from `_generic`) that repeats a key we read."""
    if not isinstance(value, dict):
        return
    _refuse_repeats(value, _READ_FIELDS, "$")
    messages = value.get("messages")
    if isinstance(messages, list):
        for i, turn in enumerate(messages):
            if isinstance(turn, dict):
                _refuse_repeats(turn, _MESSAGE_FIELDS, f"$.messages[{i}]")
                content = turn.get("content")
                for j, part in enumerate(content if isinstance(content, list) else ()):
                    if isinstance(part, dict):
                        _refuse_repeats(part, _PART_FIELDS, f"$.messages[{i}].content[{j}]")


def _refuse_repeats(obj: dict, fields: tuple[str, ...], where: str) -> None:
    repeated = [k for k in getattr(obj, "repeated", ()) if k in fields]
    if repeated:
        raise EventError(
            "duplicate_key",
            f"field `{repeated[0]}` appears more than once at {where}; send each field once "
            "(parsers disagree on which copy wins)",
        )


def _check_unicode(value: Any, where: str) -> None:
    """Refuse strings with lone UTF-16 surrogates (valid JSON escapes, but no text):
    they cannot be written as UTF-8, so the store could not hold them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EventError(
                "invalid_unicode",
                f"{where} holds a lone surrogate escape (\\u{ord(value[exc.start]):04x}) that "
                "is not a character; encode text as UTF-8 or escape whole surrogate pairs",
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, where)
            _check_unicode(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{where}[{i}]")


def _diagnose(raw: bytes, cause: BaseException) -> EventError:
    """Why the typed decoder refused `raw`, decided by our own checks."""
    value = _generic(raw)
    if not isinstance(value, dict):
        return EventError("not_json", "value is not JSON: not a JSON object")
    version = value.get("schema")
    if _is_int(version) and version not in SUPPORTED_SCHEMAS:
        return _unsupported(version)
    _check_repeated_keys(value)
    _check_unicode({k: value[k] for k in _READ_FIELDS if k in value}, "$")
    for check in (_check_required, _check_types, _check_values):
        problem = check(value)
        if problem is not None:
            return problem
    # Our checks found nothing the decoder did: say what it said, as an invalid value.
    return EventError("invalid_value", f"event could not be decoded: {cause}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_REQUIRED = ("schema", "event_id", "ts", "conversation_id", "message_id")
_STRINGS = (
    "event_id", "ts", "conversation_id", "message_id", "user_id", "prompt", "response",
    "feedback", "model", "adapter",
)  # fmt: skip
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", float: "number"}


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if _is_int(v):
        return "integer"
    return _JSON_TYPES.get(type(v), "object" if isinstance(v, dict) else "value")


def _wrong_type(field: str, expected: str, got: Any) -> EventError:
    return EventError(
        "wrong_type", f"`{field}` must be {expected}, got {_json_type(got)} - at `$.{field}`"
    )


def _check_required(value: dict) -> EventError | None:
    for field in _REQUIRED:
        if field not in value or (value[field] is None and field != "schema"):
            return EventError("missing_field", f"`{field}` is required - at `$.{field}`")
    if value["schema"] is None:
        return EventError("missing_field", "`schema` is required (1) - at `$.schema`")
    return None


def _check_types(value: dict) -> EventError | None:
    if not _is_int(value["schema"]):
        return _wrong_type("schema", "the integer 1", value["schema"])
    for field in _STRINGS:
        v = value.get(field)
        if v is not None and not isinstance(v, str):
            return _wrong_type(field, "a string", v)
    rating = value.get("rating")
    if rating is not None and not _is_int(rating):
        return _wrong_type("rating", "an integer 1..5", rating)
    messages = value.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            return _wrong_type("messages", "an array of {role, content} objects", messages)
        return _check_message_types(messages)
    return None


def _check_message_types(messages: list) -> EventError | None:
    for i, turn in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            return _wrong_type(where, "an object with role and content", turn)
        if not isinstance(turn.get("role"), str):
            return _wrong_type(f"{where}.role", "a string", turn.get("role"))
        content = turn.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    return _wrong_type(at, 'an object with a string "type"', part)
                if part.get("text") is not None and not isinstance(part["text"], str):
                    return _wrong_type(f"{at}.text", "a string", part["text"])
        elif content is not None and not isinstance(content, str):
            return _wrong_type(f"{where}.content", "a string or an array of parts", content)
        tool_calls = turn.get("tool_calls")
        if tool_calls is not None and not (
            isinstance(tool_calls, list) and all(isinstance(c, dict) for c in tool_calls)
        ):
            return _wrong_type(f"{where}.tool_calls", "an array of objects", tool_calls)
    return None


def _check_values(value: dict) -> EventError | None:
    for field in ("event_id", "conversation_id", "message_id"):
        if not value[field]:
            return EventError("invalid_value", f"`{field}` is empty - at `$.{field}`")
    feedback = value.get("feedback")
    if feedback is not None and feedback not in _FEEDBACK_VALUES:
        return EventError(
            "unknown_feedback",
            f"`feedback` is {feedback!r}; send one of like, dislike, retract - at `$.feedback`",
        )
    rating = value.get("rating")
    if rating is not None and not 1 <= rating <= 5:
        return EventError(
            "invalid_value", f"`rating` must be >= 1 and <= 5, got {rating} - at `$.rating`"
        )
    try:
        ts = msgspec.convert(value["ts"], dt.datetime)
    except msgspec.ValidationError:
        return EventError(
            "invalid_value",
            f"`ts` {value['ts'][:64]!r} is not an RFC 3339 timestamp - at `$.ts`",
        )
    if ts.tzinfo is None:
        return EventError(
            "invalid_value",
            "`ts` has no timezone; add Z or an offset such as +01:00 - at `$.ts`",
        )
    return None


def _unsupported(version: int) -> EventError:
    return EventError(
        "unsupported_schema",
        f"schema version {version} is not supported by this consumer (supports "
        f"{sorted(SUPPORTED_SCHEMAS)}); upgrade kto-loop to read it",
    )


def _utc_in_range(ts: dt.datetime) -> dt.datetime:
    if ts.tzinfo is dt.UTC and TS_MIN <= ts < TS_MAX:
        return ts  # the common case, without a conversion
    try:
        utc = ts.astimezone(dt.UTC)
    except OverflowError:
        utc = None
    if utc is None or not TS_MIN <= utc < TS_MAX:
        raise EventError(
            "invalid_value",
            f"`ts` {ts.isoformat()} lies outside {TS_MIN.year}..{TS_MAX.date()} (UTC), "
            "the span the store's timestamp can hold; check the producer's clock - at `$.ts`",
        )
    return ts


def _decode_messages(raw: msgspec.Raw, turns: list[Message] | None) -> tuple[str, int]:
    """The messages' JSON (every field kept, compact) and the number of turns, or
    (None, 0) when absent or null; raises EventError if they are not a valid chat
    history."""
    if not raw or bytes(raw) == b"null":
        return None, 0
    try:
        if turns is None:
            turns = _messages_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _diagnose_messages(bytes(raw), exc) from None
    for i, turn in enumerate(turns):
        where = f"$.messages[{i}]"
        if turn.content is None and not (turn.role == "assistant" and turn.tool_calls):
            raise EventError(
                "missing_field",
                f"{where} has no `content`; only an assistant turn with tool_calls may "
                "leave it out",
            )
        if isinstance(turn.content, list):
            for j, part in enumerate(turn.content):
                if part.type == "text" and part.text is None:
                    raise EventError(
                        "missing_field", f'{where}.content[{j}] is a "text" part without `text`'
                    )
    # Compact JSON, every field and key order as sent: the same history sent with other
    # whitespace is the same prompt to a snapshot.
    return msgspec.json.encode(msgspec.json.decode(raw)).decode("utf-8"), len(turns)


def _diagnose_messages(raw: bytes, cause: BaseException) -> EventError:
    value = _generic(raw)
    if not isinstance(value, list):
        return _wrong_type("messages", "an array of {role, content} objects", value)
    problem = _check_message_types(value)
    if problem is not None:
        return problem
    for i, turn in enumerate(value):
        if not turn["role"]:
            return EventError("invalid_value", f"`messages[{i}].role` is empty")
        for j, part in enumerate(turn.get("content") or ()):
            if not part["type"]:
                return EventError("invalid_value", f"`messages[{i}].content[{j}].type` is empty")
    return EventError("invalid_value", f"`messages` could not be decoded: {cause}")


class EventParser:
    """Decodes and validates Kafka message values into `FeedbackEvent`s.

    Holds what every event needs (the hash key, the rating policy, the size limit)
    and a bounded cache of user hashes: users vote many times, and an HMAC per
    event would be a fifth of the ingest path's own cost.
    """

    def __init__(
        self,
        user_hash_key: bytes,
        rating_policy: RatingPolicy | None = None,
        max_bytes: int = 1 << 20,
        user_cache_size: int = 1 << 16,
    ) -> None:
        self.rating_policy = rating_policy or RatingPolicy()
        self.max_bytes = max_bytes
        self._hash = functools.lru_cache(maxsize=user_cache_size)(
            functools.partial(_user_hash, user_hash_key)
        )

    def __call__(self, raw: bytes | None) -> FeedbackEvent:
        """Decode and validate one Kafka message value.

        Raises:
            EventError: with `kind` one of empty, too_large, invalid_utf8, not_json,
                too_deep, duplicate_key, invalid_unicode, missing_field, wrong_type,
                unknown_feedback, invalid_value, unsupported_schema; the message names
                the field and what to send.
        """
        if not raw:
            raise EventError("empty", "message has no value (null or empty)")
        if len(raw) > self.max_bytes:
            raise EventError(
                "too_large",
                f"event is {len(raw)} bytes, above the limit of {self.max_bytes} "
                "(ingest.max_event_bytes); feedback events should not carry whole documents",
            )
        wire, turns_decoded = _decode(raw)
        if wire.schema not in SUPPORTED_SCHEMAS:
            raise _unsupported(wire.schema)
        ts = _utc_in_range(wire.ts)
        if wire.messages:
            messages_json, turns = _decode_messages(wire.messages, turns_decoded)
        else:
            messages_json, turns = None, 0

        feedback = wire.feedback
        if (feedback is None) == (wire.rating is None):
            raise EventError(
                "missing_field" if feedback is None else "invalid_value",
                "exactly one of `feedback` (like, dislike, retract) or `rating` (1-5) is required",
            )
        if feedback != "retract":
            _check_vote(wire, messages_json, turns)

        if wire.rating is not None:
            feedback, desirable = "rating", self.rating_policy.label(wire.rating)
        elif feedback == "retract":
            desirable = None
        else:
            desirable = feedback == "like"
        return FeedbackEvent(
            wire.event_id,
            ts,
            wire.conversation_id,
            wire.message_id,
            self._hash(wire.user_id) if wire.user_id else None,
            wire.prompt,
            messages_json,
            wire.response,
            feedback,
            wire.rating,
            desirable,
            wire.model,
            wire.adapter,
            wire.schema,
        )


def _check_vote(wire: WireEventV1, messages: str | None, turns: int) -> None:
    prompt, response = wire.prompt, wire.response
    if prompt is not None and messages is not None:
        raise EventError("invalid_value", "send either `prompt` or `messages`, not both")
    if prompt is None and messages is None:
        raise EventError("missing_field", "one of `prompt` or `messages` is required")
    if prompt is not None and (not prompt or prompt.isspace()):
        raise EventError("invalid_value", "`prompt` is empty")
    if messages is not None and not turns:
        raise EventError("invalid_value", "`messages` is an empty list")
    if response is None:
        raise EventError("missing_field", "`response` is required: the rated assistant text")
    # An empty response is a real answer (the model ended its turn at once), and users
    # rate it like any other.
    if not wire.model:
        raise EventError("missing_field", "`model` is required: the base model that answered")


def parse_event(
    raw: bytes | None,
    *,
    user_hash_key: bytes,
    rating_policy: RatingPolicy | None = None,
    max_bytes: int = 1 << 20,
) -> FeedbackEvent:
    """Decode and validate one message value; see `EventParser` (use one for streams)."""
    return EventParser(user_hash_key, rating_policy, max_bytes)(raw)


def _as_published(wire: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """`wire` as producers see it: its fields, with `messages` a list of turns (decoded
    apart from the rest, see WireEventV1) instead of raw JSON."""
    fields = [
        ("messages", list[Message] | None, None)
        if f.name == "messages"
        else (f.name, f.type)
        if f.required
        else (f.name, f.type, f.default)
        for f in msgspec.structs.fields(wire)
    ]
    return msgspec.defstruct(wire.__name__, fields, frozen=True)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the wire event, for frontend teams (pipeline/schema/)."""
    _, components = msgspec.json.schema_components([_as_published(WireEventV1)])
    schema: dict[str, Any] = {
        **components["WireEventV1"],
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kto-loop.dev/schema/feedback-event.v1.json",
        "title": "kto-loop feedback event, schema 1",
        "description": (
            "One thumbs up/down, 1-5 rating or retraction of an assistant turn, sent as "
            "one UTF-8 JSON Kafka message keyed by conversation_id. Send exactly one of "
            "feedback or rating; for a vote (not a retraction) also prompt or messages, "
            'a response ("" when the model ended its turn at once) and model.'
        ),
        "$defs": {name: components[name] for name in ("Message", "ContentPart")},
    }
    schema["properties"]["schema"]["const"] = SCHEMA_VERSION
    schema["oneOf"] = [{"required": ["feedback"]}, {"required": ["rating"]}]
    schema["if"] = {
        "not": {"properties": {"feedback": {"const": "retract"}}, "required": ["feedback"]}
    }
    schema["then"] = {
        "required": ["response", "model"],
        "properties": {"response": {"type": "string"}},
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
    }
    return schema
