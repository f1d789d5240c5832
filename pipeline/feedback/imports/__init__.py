"""Importing feedback from other tools: what every importer shares.

An importer (pipeline/feedback/imports/<format>.py) takes the parsed JSON records of an export,
each with where it was found (`file:line` or `file[index]`), and yields schema-1
wire events (`Mapped`) or what it could not map and why (`Unmapped`). Nothing is
dropped silently. `check` then puts each event through the consumer's own
`EventParser`: an imported vote is valid exactly when it would be valid on the topic.

Ids come from the source, so importing the same export twice gives the same
event_ids (counted once by snapshots), and a vote the source updated in place gets
a new event_id with a later ts (the snapshot keeps the latest vote per user and
message). A source record without a user stands for its own voter: its user_id is
`<format>:<record id>`, so an update of that record still supersedes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pipeline.feedback.events import EventError, EventParser, FeedbackEvent

FORMATS = ("openwebui", "langsmith", "langfuse", "openai")
# Feedback keys (LangSmith) and score names (Langfuse) taken as thumbs by default.
DEFAULT_KEYS = frozenset(
    {"user_score", "user-score", "user_feedback", "user-feedback", "thumbs", "thumbs_up",
     "thumb", "feedback", "vote"}
)  # fmt: skip
# Where an OpenAI-style log record holds its thumbs, tried in order.
DEFAULT_RATING_FIELDS = (
    "feedback", "thumbs", "rating", "vote", "metadata.feedback", "metadata.thumbs",
    "metadata.rating", "metadata.vote",
)  # fmt: skip
_LIKE_WORDS = frozenset(
    {"like", "liked", "up", "thumbs_up", "thumbs-up", "thumbsup", "+1", "1", "true",
     "yes", "positive", "good", "\N{THUMBS UP SIGN}"}
)  # fmt: skip
_DISLIKE_WORDS = frozenset(
    {"dislike", "disliked", "down", "thumbs_down", "thumbs-down", "thumbsdown", "-1", "0",
     "false", "no", "negative", "bad", "\N{THUMBS DOWN SIGN}"}
)  # fmt: skip
_RETRACT_WORDS = frozenset({"retract", "retracted", "removed", "cleared", "unset"})
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
TOO_DEEP = "the record nests arrays/objects deeper than an event can; flatten it"


@dataclass(frozen=True)
class Unmapped:
    """A record (or line) that became no event: where it is, a stable short reason
    (for counting) and what exactly was wrong (for a person)."""

    where: str
    reason: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"where": self.where, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class Mapped:
    """One wire event (a dict of schema 1) made from the record at `where`."""

    where: str
    event: dict[str, Any]


@dataclass(frozen=True)
class Checked:
    """A mapped event as the consumer will see it: its Kafka key and value, and the
    parsed event the store would hold."""

    where: str
    key: bytes
    value: bytes
    event: FeedbackEvent


@dataclass(frozen=True)
class ImportOptions:
    """What the importers cannot read from the source.

    model: the base model of records that do not name one.
    keys: LangSmith feedback keys / Langfuse score names that count as thumbs (None:
        any key).
    threshold: a score in [0, 1] above it is a like, below it a dislike; equal to
        it is neutral (reported, no vote).
    categories: string values (lower-cased) mapped to like or dislike, for Langfuse
        categorical scores and any other word the defaults do not know.
    rating_fields: dotted paths of the thumbs in OpenAI-style records, tried in order.
    """

    model: str | None = None
    keys: frozenset[str] | None = DEFAULT_KEYS
    threshold: float = 0.5
    categories: Mapping[str, str] = field(default_factory=dict)
    rating_fields: tuple[str, ...] = DEFAULT_RATING_FIELDS

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        bad = {k: v for k, v in self.categories.items() if v not in ("like", "dislike")}
        if bad:
            raise ValueError(f"categories must map to like or dislike, got {bad}")


class Skip(Exception):
    """Raised inside a mapper: this record becomes `Unmapped(where, reason, detail)`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# -- votes ----------------------------------------------------------------------------


def word_vote(value: Any, options: ImportOptions) -> str | None:
    """like, dislike or retract for a thumbs value given as a word, a bool or 1/0/-1;
    None when it is no vote we know."""
    if isinstance(value, bool):
        return "like" if value else "dislike"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {1: "like", 0: "dislike", -1: "dislike"}.get(value)  # type: ignore[call-overload]
    if not isinstance(value, str):
        return None
    word = value.strip().lower()
    if word in options.categories:
        return options.categories[word]
    if word in _LIKE_WORDS:
        return "like"
    if word in _DISLIKE_WORDS:
        return "dislike"
    if word in _RETRACT_WORDS:
        return "retract"
    return None


def score_vote(score: Any, options: ImportOptions) -> str:
    """like or dislike for a numeric score: a bool, -1, or a number in [0, 1] against
    the threshold.

    Raises:
        Skip: neutral (equal to the threshold), out of range, or not a number.
    """
    if isinstance(score, bool):
        return "like" if score else "dislike"
    if not isinstance(score, int | float) or not math.isfinite(score):
        raise Skip("no_score", f"score {score!r} is not a number")
    if score == -1:
        return "dislike"
    if not 0 <= score <= 1:
        raise Skip(
            "score_out_of_range",
            f"score {score} is outside [0, 1] (and not -1); only thumbs-like scores import",
        )
    if score == options.threshold:
        raise Skip("neutral_score", f"score {score} equals the threshold {options.threshold}")
    return "like" if score > options.threshold else "dislike"


# -- content --------------------------------------------------------------------------


def content(value: Any, where: str) -> str | list[dict[str, Any]] | None:
    """A message's content in the form the trainer renders: a string, or a list of
    parts where text parts are {"type": "text", "text": ...} and other parts are kept
    as sent.

    Raises:
        Skip: a part that is neither a string nor an object with a type or text.
    """
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise Skip("bad_content", f"{where} content is {type(value).__name__}, not text or parts")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(value):
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif isinstance(part, dict) and (part.get("type") in _TEXT_PARTS or "type" not in part):
            text = part.get("text")
            if not isinstance(text, str):
                raise Skip("bad_content", f"{where} content[{i}] is a text part without text")
            parts.append({"type": "text", "text": text})
        elif isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"]:
            parts.append(part)
        else:
            raise Skip("bad_content", f"{where} content[{i}] is not a content part")
    return parts


def response_text(value: Any, where: str) -> str:
    """The rated answer as text: a string, or the text parts joined by newlines.

    Raises:
        Skip: no text (a tool call only), or a part that is not text.
    """
    parts = content(value, where)
    if isinstance(parts, str):
        return parts
    if parts is None:
        raise Skip("no_response_text", f"{where} has no text content (a tool call only?)")
    other = [p["type"] for p in parts if p["type"] != "text"]
    if other:
        raise Skip("non_text_response", f"{where} holds {other[0]} parts; only text is rated")
    return "\n".join(p["text"] for p in parts)


def answer_text(message: dict[str, Any], where: str) -> str:
    """The text of the rated assistant message (see response_text).

    Raises:
        Skip: the answer is a tool call with no text: there is no text to rate.
    """
    text = response_text(message.get("content"), where)
    if message.get("tool_calls") and not text.strip():
        raise Skip("no_response_text", f"{where} is a tool call with no text; only text is rated")
    return text


def tool_calls(calls: Any) -> list[dict[str, Any]] | None:
    """Tool calls in OpenAI's chat format ({id, type: function, function: {name,
    arguments: JSON string}}), from that format or LangChain's ({name, args, id})."""
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict):
            continue
        if "function" in call:
            out.append(call)
        elif "name" in call:
            args = call.get("args", {})
            out.append(
                {
                    "id": call.get("id") or "",
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": args if isinstance(args, str) else json.dumps(args),
                    },
                }
            )
    return out or None


def chat_message(turn: Any, where: str) -> dict[str, Any]:
    """One turn in OpenAI's chat format from an OpenAI-style message dict: content
    normalised, tool calls kept, a tool result as role "tool" with its call id.

    Raises:
        Skip: not an object with a role.
    """
    if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not turn["role"]:
        raise Skip("bad_message", f"{where} is not a chat message with a role")
    out: dict[str, Any] = {"role": turn["role"], "content": content(turn.get("content"), where)}
    calls = tool_calls(turn.get("tool_calls"))
    if calls:
        out["tool_calls"] = calls
    for name in ("tool_call_id", "name"):
        if isinstance(turn.get(name), str):
            out[name] = turn[name]
    if out["content"] is None and not calls:
        out["content"] = ""
    return out


def chat_messages(turns: Any, where: str) -> list[dict[str, Any]]:
    """A prompt history in OpenAI's chat format.

    Raises:
        Skip: not a non-empty list of chat messages.
    """
    if not isinstance(turns, list) or not turns:
        raise Skip("no_prompt", f"{where} has no prompt messages")
    return [chat_message(t, f"{where}[{i}]") for i, t in enumerate(turns)]


# -- events ---------------------------------------------------------------------------


def timestamp(value: Any) -> str | None:
    """RFC 3339 (UTC when the source gives no zone) from epoch seconds, epoch
    milliseconds or an ISO 8601 string; None when absent or unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        seconds = value / 1000 if value > 1e11 else value
        try:
            return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str) and value:
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.isoformat()
    return None


def get_path(record: Any, path: str) -> Any:
    """The value at a dotted path (`metadata.feedback`) of nested objects, or None."""
    value = record
    for name in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def text_id(value: Any) -> str | None:
    """An id as text (sources use strings, numbers or UUIDs); None when absent."""
    if value is None or isinstance(value, bool) or value == "":
        return None
    return str(value) if isinstance(value, str | int) else None


def content_id(*values: Any) -> str:
    """A stable id for a record that carries none: a hash of its content."""
    blob = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def vote_event(
    *,
    event_id: str,
    ts: str,
    conversation_id: str,
    message_id: str,
    user_id: str,
    feedback: str,
    messages: list[dict[str, Any]] | None = None,
    response: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """A schema-1 wire event; a retraction carries no prompt, response or model."""
    event: dict[str, Any] = {
        "schema": 1,
        "event_id": event_id,
        "ts": ts,
        "conversation_id": conversation_id,
        "message_id": message_id,
        "user_id": user_id,
        "feedback": feedback,
    }
    if feedback != "retract":
        event.update(messages=messages, response=response, model=model)
    return event


def require_model(model: Any, options: ImportOptions, what: str) -> str:
    """The source's model name, else --model.

    Raises:
        Skip: neither names one.
    """
    if isinstance(model, str) and model:
        return model
    if options.model:
        return options.model
    raise Skip("no_model", f"{what} names no model; pass --model for such records")


def guarded(where: str, make: Any, *args: Any) -> Mapped | Unmapped:
    """`make(*args)` as a Mapped event at `where`, or the Unmapped its Skip says (or
    too_deep, for a record nested deeper than the mapping can follow)."""
    try:
        return Mapped(where, make(*args))
    except Skip as skip:
        return Unmapped(where, skip.reason, skip.detail)
    except RecursionError:
        return Unmapped(where, "too_deep", TOO_DEEP)


def map_each(
    records: Iterable[tuple[str, Any] | Unmapped], make: Any, options: ImportOptions
) -> Iterator[Mapped | Unmapped]:
    """`make(record, options)` guarded for each record read, for formats where one
    record is one vote; what the reader could not read passes through."""
    for item in records:
        yield item if isinstance(item, Unmapped) else guarded(item[0], make, item[1], options)


def check(items: Iterable[Mapped | Unmapped], parser: EventParser) -> Iterator[Checked | Unmapped]:
    """Each mapped event as the consumer parses it (the same `EventParser`), or why the
    consumer would dead-letter it; Unmapped items pass through."""
    encode = msgspec.json.encode
    for item in items:
        if isinstance(item, Unmapped):
            yield item
            continue
        try:
            value = encode(item.event)
        except RecursionError:
            yield Unmapped(item.where, "too_deep", TOO_DEEP)
            continue
        try:
            event = parser(value)
        except EventError as exc:
            yield Unmapped(item.where, f"invalid_event:{exc.kind}", exc.message)
            continue
        yield Checked(item.where, event.conversation_id.encode(), value, event)
