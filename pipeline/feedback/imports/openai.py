"""OpenAI-style chat logs -> feedback events.

One record per rated answer, in any of the shapes teams log OpenAI Chat Completions
calls in (JSON lines or an array):

- a stored completion (Chat Completions `store: true`, listed with its messages):
  {id, model, created, metadata: {...}, request: {messages}, choices: [{message}]};
- {"request": {model, messages, user}, "response": <chat.completion object>};
- {"messages": [...], "response" | "completion": <chat.completion, message or text>};
- {"messages": [..., the rated assistant turn]}: the last assistant turn is rated.

Messages are OpenAI's: content a string or parts, assistant tool_calls, role "tool"
results. The thumbs is the first of `ImportOptions.rating_fields` (dotted paths)
that is set: up/down, like/dislike, true/false, 1/-1, 1/0, or retract (a removed
vote). The answer is identified by the completion id (else a hash of the prompt and
answer); the conversation by metadata conversation_id / thread_id / session_id, else
the answer; the voter by `user` (the request's end-user id) or metadata user_id. ts
is the feedback's own time when the record has one (feedback_at, rated_at,
updated_at), else the completion's `created`; a vote changed later needs the former
to supersede the old one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.feedback.imports import (
    ImportOptions,
    Mapped,
    Skip,
    Unmapped,
    answer_text,
    chat_message,
    chat_messages,
    content_id,
    get_path,
    map_each,
    require_model,
    text_id,
    timestamp,
    vote_event,
    word_vote,
)

_FEEDBACK_TIMES = (
    "feedback_at", "rated_at", "updated_at", "metadata.feedback_at", "metadata.rated_at",
)  # fmt: skip
_CREATED = ("created", "created_at", "timestamp", "request.created", "metadata.created_at")
_THREAD = (
    "metadata.conversation_id", "metadata.thread_id", "metadata.session_id",
    "conversation_id", "thread_id", "session_id",
)  # fmt: skip
_USER = ("user", "request.user", "metadata.user_id", "metadata.user", "user_id")


def map_export(
    records: Iterable[tuple[str, Any] | Unmapped], options: ImportOptions
) -> Iterator[Mapped | Unmapped]:
    """One event, or the reason for none, per record read (what the reader could not
    read passes through)."""
    return map_each(records, _event, options)


def _event(record: Any, options: ImportOptions) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise Skip("not_a_record", "not a JSON object")
    feedback = _vote(record, options)
    completion = record["response"] if isinstance(record.get("response"), dict) else record
    answer_id = text_id(completion.get("id")) or text_id(record.get("id"))
    if feedback == "retract" and answer_id is not None:
        prompt, answer = None, {}  # a retraction names the answer; its text is not needed
    else:
        prompt, answer = _turns(record, completion)
        answer_id = answer_id or content_id(prompt, answer.get("content"), answer.get("tool_calls"))
    feedback_time = _first(record, _FEEDBACK_TIMES)
    created = feedback_time if feedback_time is not None else _first(completion, _CREATED)
    if created is None:
        created = _first(record, _CREATED)
    ts = timestamp(created)
    if ts is None:
        raise Skip("no_timestamp", f"no readable time ({created!r}); log `created` with it")
    user = next((text_id(get_path(record, p)) for p in _USER if text_id(get_path(record, p))), None)
    model = completion.get("model") or record.get("model") or get_path(record, "request.model")
    return vote_event(
        event_id=f"openai:{answer_id}:{created}:{feedback}",
        ts=ts,
        conversation_id=text_id(_first(record, _THREAD)) or answer_id,
        message_id=answer_id,
        user_id=user or f"openai:{answer_id}",
        feedback=feedback,
        messages=prompt,
        response=None if feedback == "retract" else answer_text(answer, "answer"),
        model=None if feedback == "retract" else require_model(model, options, "the record"),
    )


def _vote(record: dict[str, Any], options: ImportOptions) -> str:
    for path in options.rating_fields:
        value = get_path(record, path)
        if value is None:
            continue
        vote = word_vote(value, options)
        if vote is None:
            raise Skip("unknown_rating", f"{path} is {value!r}, not a thumbs up or down")
        return vote
    raise Skip(
        "no_rating", f"none of {', '.join(options.rating_fields)} is set (see --rating-field)"
    )


def _turns(record: dict[str, Any], completion: dict[str, Any]) -> tuple[list, dict[str, Any]]:
    """The prompt's turns and the rated assistant turn."""
    turns = get_path(record, "request.messages") or record.get("messages")
    answer = _answer(record, completion)
    if answer is None and isinstance(turns, list) and turns:
        last = turns[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            turns, answer = turns[:-1], chat_message(last, f"messages[{len(turns) - 1}]")
    if answer is None:
        raise Skip("no_response", "the record holds no answer (choices, response or completion)")
    return chat_messages(turns, "messages"), answer


def _answer(record: dict[str, Any], completion: dict[str, Any]) -> dict[str, Any] | None:
    choices = completion.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return chat_message(choices[0].get("message"), "choices[0].message")
    for name in ("response", "completion", "output"):
        value = record.get(name)
        if isinstance(value, str):
            return {"role": "assistant", "content": value}
        if isinstance(value, dict) and "role" in value:
            return chat_message(value, name)
    return None


def _first(record: dict[str, Any], paths: tuple[str, ...]) -> Any:
    return next((v for p in paths if (v := get_path(record, p)) is not None), None)
