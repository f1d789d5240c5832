"""Langfuse scores, joined with their traces and observations -> feedback events.

Follows the Langfuse public API v2 (GET /api/public/v2/scores, /api/public/traces,
/api/public/observations; a page {"data": [...], "meta": ...} or its items):

    Score       {id, traceId, observationId, sessionId, name, value, stringValue,
                 dataType: "BOOLEAN" | "NUMERIC" | "CATEGORICAL", source, comment,
                 authorUserId, timestamp, createdAt, updatedAt, trace: {userId}}
    Trace       {id, timestamp, name, userId, sessionId, input, output, metadata}
    Observation {id, traceId, type: "GENERATION" | "SPAN" | ..., startTime, model,
                 input (messages or text), output (text or a message)}

A score on an observation rates that generation; a score on a trace rates the
trace's last generation, or the trace's own input and output when no observation
was exported. Only score names in `ImportOptions.keys` are thumbs. BOOLEAN is 1/0;
NUMERIC is -1/0/1 or [0, 1] against the threshold; CATEGORICAL values map only
through `ImportOptions.categories`. The voter is the score's author, else the
trace's user. A score can be edited (same id, later updatedAt): its event_id names
the id and updatedAt, so the edit supersedes; a deleted score is absent from later
exports and cannot be retracted from one.
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
    guarded,
    require_model,
    score_vote,
    text_id,
    timestamp,
    word_vote,
)


def record_kind(record: Any) -> str | None:
    """ "score", "observation" or "trace" for a Langfuse record, told apart by its
    fields; None for anything else."""
    if not isinstance(record, dict):
        return None
    if "dataType" in record or ("name" in record and "value" in record and "traceId" in record):
        return "score"
    if "traceId" in record and ("startTime" in record or "type" in record):
        return "observation"
    if "id" in record and ("input" in record or "output" in record or "sessionId" in record):
        return "trace"
    return None


class Traces:
    """Traces and observations by id, and each trace's generations in order."""

    def __init__(self, traces: Iterable[dict[str, Any]], observations: Iterable[dict[str, Any]]):
        self.traces = {text_id(t.get("id")): t for t in traces}
        self.observations: dict[str | None, dict[str, Any]] = {}
        self.generations: dict[str | None, list[dict[str, Any]]] = {}
        for o in observations:
            self.observations[text_id(o.get("id"))] = o
            if o.get("type") == "GENERATION":
                self.generations.setdefault(text_id(o.get("traceId")), []).append(o)
        for calls in self.generations.values():
            calls.sort(key=lambda o: str(o.get("startTime")))

    def rated(self, score: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(message_id, the observation or trace holding input and output) of a score.

        Raises:
            Skip: a session or dataset-run score, or its observation / trace not read.
        """
        trace_id, observation_id = (
            text_id(score.get("traceId")),
            text_id(score.get("observationId")),
        )
        if observation_id:
            found = self.observations.get(observation_id)
            if found is None:
                raise Skip(
                    "observation_not_found",
                    f"observation {observation_id} is not among those read; export it too",
                )
            return observation_id, found
        if trace_id is None:
            raise Skip("not_an_answer", "the score rates a session or dataset run, not an answer")
        calls = self.generations.get(trace_id)
        if calls:
            return trace_id, calls[-1]
        if trace_id in self.traces:
            return trace_id, self.traces[trace_id]
        raise Skip("trace_not_found", f"trace {trace_id} is not among those read; export it too")


def map_export(
    records: Iterable[tuple[str, Any] | Unmapped], options: ImportOptions
) -> Iterator[Mapped | Unmapped]:
    """One event, or the reason for none, per score; traces and observations are read
    first (held in memory for the join), what the reader could not read passes
    through."""
    scores: list[tuple[str, dict[str, Any]]] = []
    found: dict[str, list[dict[str, Any]]] = {"trace": [], "observation": []}
    for item in records:
        if isinstance(item, Unmapped):
            yield item
            continue
        kind = record_kind(item[1])
        if kind == "score":
            scores.append(item)
        elif kind is not None:
            found[kind].append(item[1])
        else:
            yield Unmapped(
                item[0], "unknown_record", "neither a Langfuse score, trace nor observation"
            )
    traces = Traces(found["trace"], found["observation"])
    for where, score in scores:
        yield guarded(where, _event, score, traces, options)


def _event(score: dict[str, Any], traces: Traces, options: ImportOptions) -> dict[str, Any]:
    name = score.get("name")
    if options.keys is not None and name not in options.keys:
        raise Skip("other_key", f"score name {name!r} is not a thumbs name (see --key)")
    score_id = text_id(score.get("id"))
    if score_id is None:
        raise Skip("no_id", "the score has no id")
    feedback = _vote(score, options)
    message_id, rated = traces.rated(score)
    trace = traces.traces.get(text_id(score.get("traceId"))) or {}
    updated = score.get("updatedAt")
    ts = timestamp(updated or score.get("timestamp") or score.get("createdAt"))
    if ts is None:
        raise Skip("no_timestamp", "the score has no readable updatedAt, timestamp or createdAt")
    user = (
        text_id(score.get("authorUserId"))
        or text_id((score.get("trace") or {}).get("userId"))
        or text_id(trace.get("userId"))
    )
    return {
        "schema": 1,
        "event_id": f"langfuse:{score_id}:{updated}" if updated else f"langfuse:{score_id}",
        "ts": ts,
        "conversation_id": text_id(trace.get("sessionId"))
        or text_id(score.get("sessionId"))
        or text_id(score.get("traceId"))
        or message_id,
        "message_id": message_id,
        "user_id": user or f"langfuse:{score_id}",
        "feedback": feedback,
        "messages": _prompt(rated.get("input")),
        "response": _response(rated.get("output")),
        "model": require_model(rated.get("model"), options, f"{message_id}"),
    }


def _vote(score: dict[str, Any], options: ImportOptions) -> str:
    kind, value, label = score.get("dataType"), score.get("value"), score.get("stringValue")
    if kind == "CATEGORICAL":
        vote = options.categories.get(str(label).strip().lower())
        if vote is None:
            raise Skip(
                "categorical_unmapped",
                f"categorical value {label!r} maps to no vote; pass --category {label}=like "
                "(or =dislike)",
            )
        return vote
    if kind == "BOOLEAN":
        vote = word_vote(value if value is not None else label, options)
        if vote not in ("like", "dislike"):
            raise Skip("no_score", f"boolean score has value {value!r}")
        return vote
    return score_vote(value, options)


def _prompt(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    if isinstance(value, dict):
        value = next(
            (value[k] for k in ("input", "query", "question", "prompt") if k in value), None
        )
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}]
    return chat_messages(value, "input")


def _response(value: Any) -> str:
    if isinstance(value, dict) and isinstance(value.get("choices"), list) and value["choices"]:
        value = (
            value["choices"][0].get("message") if isinstance(value["choices"][0], dict) else None
        )
    if isinstance(value, dict) and "role" in value:
        return answer_text(chat_message(value, "output"), "output")
    if isinstance(value, dict):
        value = next(
            (value[k] for k in ("content", "text", "output", "completion") if k in value), None
        )
    if isinstance(value, str):
        return value
    raise Skip("no_response", "the output holds no assistant text")
