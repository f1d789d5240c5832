"""Open WebUI feedback exports -> feedback events.

The export (Admin > Evaluations > Feedbacks > Export, or GET
/api/v1/evaluations/feedbacks/all/export; Open WebUI 0.6.x) is a JSON array of
feedback records:

    {"id", "user_id", "version", "type": "rating",
     "data": {"rating": 1 | -1 (or "1" / "-1"), "model_id", "sibling_model_ids",
              "reason", "comment", "tags", "details": {"rating": 1..10}},
     "meta": {"arena", "chat_id", "message_id", "message_index", "model_id",
              "base_models", "tags"},
     "snapshot": {"chat": {"id", "title", "chat": {"params": {"system"},
                  "history": {"messages": {id: {id, parentId, childrenIds, role,
                  content, model, files, timestamp}}, "currentId"}}}},
     "created_at", "updated_at"}        (epoch seconds)

The rated turn is meta.message_id in the snapshot's history; the prompt is the path
of its parents from the root (the branch the user saw, not the chat's current one),
after the chat's system prompt if it has one. A vote is updated in place, so the
event's ts is updated_at and its event_id names the record and updated_at: a changed
vote is a new event that supersedes the old one, the same export imported twice is
the same events. A rating of 0 or none is no vote; a deleted feedback is simply
absent from later exports, so it cannot be retracted from one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.feedback.imports import (
    ImportOptions,
    Mapped,
    Skip,
    Unmapped,
    content,
    get_path,
    map_each,
    require_model,
    response_text,
    text_id,
    timestamp,
    vote_event,
)

_VOTES = {1: "like", -1: "dislike", "1": "like", "-1": "dislike"}


def map_export(
    records: Iterable[tuple[str, Any] | Unmapped], options: ImportOptions
) -> Iterator[Mapped | Unmapped]:
    """One event, or the reason for none, per record read (what the reader could not
    read passes through)."""
    return map_each(records, _event, options)


def _event(record: Any, options: ImportOptions) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("data"), dict):
        raise Skip("not_a_feedback", "not an Open WebUI feedback record (no `data` object)")
    if record.get("type", "rating") != "rating":
        raise Skip("not_a_rating", f"feedback type {record.get('type')!r} is not a rating")
    data, meta = record["data"], record.get("meta") or {}
    feedback = _vote(data.get("rating"))
    feedback_id = text_id(record.get("id"))
    if feedback_id is None:
        raise Skip("no_id", "the feedback record has no id")
    updated = record.get("updated_at", record.get("created_at"))
    ts = timestamp(updated)
    if ts is None:
        raise Skip("no_timestamp", f"updated_at {updated!r} is not an epoch timestamp")
    message_id = text_id(meta.get("message_id"))
    chat = get_path(record, "snapshot.chat") or {}
    chat_id = text_id(meta.get("chat_id")) or text_id(chat.get("id"))
    if message_id is None or chat_id is None:
        raise Skip("no_message", "meta names no chat_id or message_id")
    # Chats keep their tree in history.messages; older ones only a `messages` list,
    # whose entries carry the same id and parentId.
    tree = get_path(chat, "chat.history.messages") or get_path(chat, "chat.messages")
    rated, path = _branch(tree, message_id)
    system = get_path(chat, "chat.params.system")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    messages += [_turn(m, f"message {m.get('id')}") for m in path]
    if not messages:
        raise Skip("no_prompt", f"message {message_id} has no parent turns in the snapshot")
    return vote_event(
        event_id=f"openwebui:{feedback_id}:{updated}",
        ts=ts,
        conversation_id=chat_id,
        message_id=message_id,
        user_id=text_id(record.get("user_id")) or f"openwebui:{feedback_id}",
        feedback=feedback,
        messages=messages,
        response=response_text(rated.get("content"), f"message {message_id}"),
        model=require_model(
            data.get("model_id") or meta.get("model_id") or rated.get("model"),
            options,
            "the feedback",
        ),
    )


def _vote(rating: Any) -> str:
    key = rating.strip() if isinstance(rating, str) else rating
    if isinstance(key, float) and key.is_integer():
        key = int(key)
    if key is None or (not isinstance(key, bool) and key in (0, "0", "")):
        raise Skip("no_vote", f"data.rating is {rating!r}: no thumbs up or down")
    if isinstance(key, bool) or not isinstance(key, int | str) or key not in _VOTES:
        raise Skip("unknown_rating", f"data.rating {rating!r} is not 1 or -1")
    return _VOTES[key]


def _branch(history: Any, message_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The rated message and the turns before it on its branch, root first."""
    if isinstance(history, list):
        history = {m.get("id"): m for m in history if isinstance(m, dict)}
    if not isinstance(history, dict):
        raise Skip("no_snapshot", "the record holds no chat snapshot (snapshot.chat.chat.history)")
    rated = history.get(message_id)
    if not isinstance(rated, dict):
        raise Skip("message_not_in_snapshot", f"message {message_id} is not in the snapshot")
    path: list[dict[str, Any]] = []
    parent = rated.get("parentId")
    while parent is not None:
        turn = history.get(parent)
        if not isinstance(turn, dict) or len(path) > len(history):
            raise Skip("broken_history", f"parent {parent} of a turn is missing or loops")
        path.append(turn)
        parent = turn.get("parentId")
    return rated, path[::-1]


def _turn(message: dict[str, Any], where: str) -> dict[str, Any]:
    """An Open WebUI history message as a chat turn; attached images become image
    parts (the trainer leaves such prompts out: a text model cannot see them)."""
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise Skip("bad_message", f"{where} has no role")
    text = content(message.get("content") or "", where)
    images = [
        {"type": "image_url", "image_url": {"url": f["url"]}}
        for f in message.get("files") or ()
        if isinstance(f, dict) and f.get("type") == "image" and isinstance(f.get("url"), str)
    ]
    if images:
        parts = [{"type": "text", "text": text}] if isinstance(text, str) and text else []
        return {"role": role, "content": parts + images}
    return {"role": role, "content": text}
