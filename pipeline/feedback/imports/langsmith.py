"""LangSmith feedback, joined with its runs -> feedback events.

Follows the LangSmith SDK 0.3 schemas (`Client.list_feedback`, `Client.list_runs`):

    Feedback {id, run_id, trace_id, key, score (bool or number), value, comment,
              correction, created_at, modified_at,
              feedback_source: {type, user_id, user_name, metadata}}
    Run      {id, name, run_type: "llm" | "chain" | ..., trace_id, parent_run_id,
              dotted_order, start_time, session_id,
              inputs:  {messages: [...] or [[...]]} (OpenAI dicts, LangChain dicts or
                       serialized {"lc": 1, "id": [..., "HumanMessage"], "kwargs"}),
              outputs: {generations: [[{text, message}]]} or {choices: [{message}]}
                       or {output: ...},
              extra:   {metadata: {ls_model_name, thread_id, session_id, ...},
                        invocation_params: {model, model_name}}}

Feedback is on a run; when that run is not an LLM call (feedback on a trace's
root chain), the rated answer is the last LLM call below it in the trace. Only
feedback keys in `ImportOptions.keys` are thumbs (default: user_score, thumbs,
feedback and their spellings); a score is a bool, -1/0/1 or a number in [0, 1]
against the threshold, or without a score a thumbs word in `value`. The rated turn
(message_id) is the feedback's run; the conversation is the run's thread
(metadata thread_id / session_id / conversation_id), else its trace. Feedback is
updated in place, so the event_id names the feedback id and modified_at.
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
    get_path,
    guarded,
    require_model,
    score_vote,
    text_id,
    timestamp,
    word_vote,
)

_ROLES = {
    "human": "user", "user": "user", "ai": "assistant", "assistant": "assistant",
    "system": "system", "tool": "tool", "function": "function", "developer": "developer",
}  # fmt: skip
_THREAD_KEYS = ("thread_id", "session_id", "conversation_id")


def record_kind(record: Any) -> str | None:
    """ "feedback" or "run" for a LangSmith record, told apart by its fields; None
    for anything else."""
    if not isinstance(record, dict):
        return None
    if "key" in record and ("run_id" in record or "trace_id" in record):
        return "feedback"
    if "run_type" in record or ("inputs" in record and "start_time" in record):
        return "run"
    return None


class Runs:
    """Runs by id, and each trace's LLM calls in execution order."""

    def __init__(self, runs: Iterable[dict[str, Any]]) -> None:
        self.by_id: dict[str, dict[str, Any]] = {}
        self.llm_by_trace: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            run_id = text_id(run.get("id"))
            if run_id is None:
                continue
            self.by_id[run_id] = run
            if run.get("run_type") == "llm":
                trace = text_id(run.get("trace_id")) or run_id
                self.llm_by_trace.setdefault(trace, []).append(run)
        for calls in self.llm_by_trace.values():
            calls.sort(key=lambda r: (str(r.get("dotted_order") or ""), str(r.get("start_time"))))

    def rated(self, run_id: str | None, trace_id: str | None) -> dict[str, Any]:
        """The LLM call whose answer a feedback on `run_id` (or `trace_id`) rates.

        Raises:
            Skip: the run and its trace's LLM calls are not among the runs given.
        """
        run = self.by_id.get(run_id) if run_id else None
        if run is not None and run.get("run_type") == "llm":
            return run
        trace = (text_id(run.get("trace_id")) if run else None) or trace_id or run_id
        calls = self.llm_by_trace.get(trace or "", [])
        if run is not None and run.get("dotted_order"):
            calls = [
                c for c in calls if str(c.get("dotted_order", "")).startswith(run["dotted_order"])
            ]
        if calls:
            return calls[-1]
        if run is not None:
            return run
        raise Skip(
            "run_not_found",
            f"run {run_id or trace_id} is not among the runs read; export the runs of "
            "its trace with the feedback",
        )


def map_export(
    records: Iterable[tuple[str, Any] | Unmapped], options: ImportOptions
) -> Iterator[Mapped | Unmapped]:
    """One event, or the reason for none, per feedback record; runs are read first
    (held in memory for the join), what the reader could not read passes through."""
    feedback: list[tuple[str, dict[str, Any]]] = []
    runs: list[dict[str, Any]] = []
    for item in records:
        if isinstance(item, Unmapped):
            yield item
            continue
        kind = record_kind(item[1])
        if kind == "feedback":
            feedback.append(item)
        elif kind == "run":
            runs.append(item[1])
        else:
            yield Unmapped(item[0], "unknown_record", "neither a LangSmith feedback nor a run")
    index = Runs(runs)
    for where, record in feedback:
        yield guarded(where, _event, record, index, options)


def _event(record: dict[str, Any], runs: Runs, options: ImportOptions) -> dict[str, Any]:
    key = record.get("key")
    if options.keys is not None and key not in options.keys:
        raise Skip("other_key", f"feedback key {key!r} is not a thumbs key (see --key)")
    feedback_id = text_id(record.get("id"))
    if feedback_id is None:
        raise Skip("no_id", "the feedback has no id")
    feedback = _vote(record, options)
    run_id, trace_id = text_id(record.get("run_id")), text_id(record.get("trace_id"))
    run = runs.rated(run_id, trace_id)
    modified = record.get("modified_at") or record.get("created_at")
    ts = timestamp(modified)
    if ts is None:
        raise Skip("no_timestamp", f"modified_at {modified!r} is not a timestamp")
    metadata = get_path(run, "extra.metadata") or {}
    thread = next(
        (text_id(metadata.get(k)) for k in _THREAD_KEYS if text_id(metadata.get(k))), None
    )
    rated_id = run_id or trace_id or ""
    return {
        "schema": 1,
        "event_id": f"langsmith:{feedback_id}:{modified}",
        "ts": ts,
        "conversation_id": thread or text_id(run.get("trace_id")) or rated_id,
        "message_id": rated_id,
        "user_id": text_id(get_path(record, "feedback_source.user_id"))
        or f"langsmith:{feedback_id}",
        "feedback": feedback,
        "messages": _prompt(run.get("inputs")),
        "response": answer_text(_answer(run.get("outputs")), "the run's output"),
        "model": require_model(_model(run), options, f"run {run.get('id')}"),
    }


def _vote(record: dict[str, Any], options: ImportOptions) -> str:
    score = record.get("score")
    if score is not None:
        return score_vote(score, options)
    vote = word_vote(record.get("value"), options)
    if vote is None or vote == "retract":
        raise Skip("no_score", f"feedback has no score and value {record.get('value')!r}")
    return vote


def _prompt(inputs: Any) -> list[dict[str, Any]]:
    if not isinstance(inputs, dict):
        raise Skip("no_prompt", "the run has no inputs")
    turns = inputs.get("messages")
    if isinstance(turns, list) and len(turns) == 1 and isinstance(turns[0], list):
        turns = turns[0]  # a chat model's batch of one
    if isinstance(turns, list) and turns:
        return [_message(t, f"inputs.messages[{i}]") for i, t in enumerate(turns)]
    for name in ("prompts", "input", "question", "query", "prompt"):
        text = inputs.get(name)
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if isinstance(text, str) and text:
            return [{"role": "user", "content": text}]
    raise Skip("no_prompt", f"the run's inputs hold no messages (keys: {sorted(inputs)[:8]})")


def _answer(outputs: Any) -> dict[str, Any]:
    """The rated assistant message of a run's outputs."""
    if not isinstance(outputs, dict):
        raise Skip("no_response", "the run has no outputs")
    generation = get_path(outputs, "generations")
    while isinstance(generation, list) and generation:
        generation = generation[0]
    if isinstance(generation, dict):
        if generation.get("message") is not None:
            return _message(generation["message"], "outputs.generations")
        return {"role": "assistant", "content": generation.get("text")}
    choices = outputs.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return _message(choices[0].get("message"), "outputs.choices[0].message")
    for name in ("output", "answer", "content", "text"):
        value = outputs.get(name)
        if isinstance(value, dict):
            return _message(value, f"outputs.{name}")
        if isinstance(value, str):
            return {"role": "assistant", "content": value}
    raise Skip("no_response", f"the run's outputs hold no answer (keys: {sorted(outputs)[:8]})")


def _message(turn: Any, where: str) -> dict[str, Any]:
    """A LangChain message (serialized, dict or OpenAI-style) as an OpenAI chat turn."""
    if not isinstance(turn, dict):
        raise Skip("bad_message", f"{where} is not a message object")
    if "kwargs" in turn and isinstance(turn.get("id"), list) and turn["id"]:
        body = dict(turn["kwargs"])
        cls = str(turn["id"][-1]).removesuffix("Chunk").removesuffix("Message").lower()
        role = body.get("role") if cls == "chat" else _ROLES.get(cls, cls)
    else:
        body = turn.get("data") if isinstance(turn.get("data"), dict) else turn
        role = body.get("role") or turn.get("role") or _ROLES.get(str(turn.get("type")))
        role = _ROLES.get(role, role)
    extra = body.get("additional_kwargs") or {}
    calls = body.get("tool_calls") or extra.get("tool_calls")
    return chat_message(
        {
            "role": role,
            "content": body.get("content"),
            "tool_calls": calls,
            "tool_call_id": body.get("tool_call_id"),
            "name": body.get("name") if role in ("tool", "function") else None,
        },
        where,
    )


def _model(run: dict[str, Any]) -> Any:
    for path in (
        "extra.metadata.ls_model_name",
        "extra.invocation_params.model",
        "extra.invocation_params.model_name",
        "inputs.model",
        "outputs.model",
        "outputs.llm_output.model_name",
    ):
        value = get_path(run, path)
        if isinstance(value, str) and value:
            return value
    return None
