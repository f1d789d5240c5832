"""TRL datasets as snapshots, and the table of a data file recognised by its columns.

TRL's unpaired KTO (prompt, completion, label) and paired preference (prompt, chosen,
rejected) datasets, standard or conversational, carry no voter, message or time: each
row is a vote (a paired row two: chosen desirable, rejected undesirable), and the
majority of the votes on a (prompt or messages, completion) labels it. A row whose
prompt, completion or label cannot be read is left out and counted, with the first
reasons kept in the stats; only a file with no readable row is refused. An empty
completion is an answer (the model ended its turn at once) and is kept as "".

Unlike the other importers here, which map an export to wire events, a TRL dataset
becomes a snapshot directly: its rows are labelled examples already, not feedback.
`snapshot_from_table` also passes a kto-loop snapshot table through, and folds the
feedback store's rows (pipeline/feedback/votes.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.feedback.lineage import votes_window
from pipeline.feedback.records import (
    ADAPTER,
    CHOSEN,
    COMPLETION,
    CONVERSATION_ID,
    DESIRABLE,
    EVENT_ID,
    FEEDBACK_SCHEMA,
    LABEL,
    MESSAGE_ID,
    MESSAGES_JSON,
    PROMPT,
    REJECTED,
    TRAINING_COLUMNS,
    VOTES_DESIRABLE,
    VOTES_UNDESIRABLE,
)
from pipeline.feedback.snapshot import (
    Snapshot,
    SnapshotError,
    SnapshotOptions,
    SnapshotStats,
    from_snapshot_table,
    is_missing,
    label_examples,
)
from pipeline.feedback.votes import FOLD_COLUMNS, snapshot_of_rows

log = logging.getLogger(__name__)

SOURCE_TRL_UNPAIRED = "trl-unpaired"
SOURCE_TRL_PAIRED = "trl-paired"
_FORMATS = {
    "TRL unpaired KTO": (PROMPT, COMPLETION, LABEL),
    "TRL paired preference": (PROMPT, CHOSEN, REJECTED),
    "kto-loop snapshot": TRAINING_COLUMNS,
}
_LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False}
# How many reasons for skipped rows the stats keep: enough to see the pattern.
MAX_SKIPPED_REASONS = 5


def snapshot_from_table(frame: pd.DataFrame, options: SnapshotOptions | None = None) -> Snapshot:
    """Build a snapshot from a table recognised by its columns: a kto-loop snapshot
    (passed through, split kept), the feedback store's rows (folded into an empty vote
    table, as every feedback snapshot is built), TRL unpaired KTO (prompt, completion,
    label) or TRL paired preference (prompt, chosen, rejected). TRL rows may be
    standard (strings) or conversational (prompt a list of {"role", "content"},
    completion / chosen / rejected a list holding one assistant message). An optional
    conversation_id column decides the split; without it, a hash of the prompt does,
    so one prompt stays on one side. Extra columns are ignored.

    A TRL row whose prompt, completion (chosen, rejected) or label cannot be read is
    left out: counted in stats.skipped_rows, the first reasons in stats.skipped_reasons,
    and logged. An empty or whitespace-only completion is kept as "" (an answer that
    only ends the turn).

    Raises:
        SnapshotError: no rows, unrecognised columns, no readable TRL row (the message
            gives the first reasons, each naming the row, counting from 1, and the
            column), a bad value in a snapshot table, or store rows lacking a
            column a fold reads.
    """
    options = options or SnapshotOptions()
    columns = set(frame.columns)
    if set(TRAINING_COLUMNS) <= columns:
        _require_rows(frame)
        return from_snapshot_table(frame)
    if {EVENT_ID, MESSAGE_ID} <= columns:
        return snapshot_of_rows(_store_rows(frame), options)
    if {PROMPT, COMPLETION, LABEL} <= columns:
        _require_rows(frame)
        return _from_trl_unpaired(frame, options)
    if {PROMPT, CHOSEN, REJECTED} <= columns:
        _require_rows(frame)
        return _from_trl_paired(frame, options)
    raise SnapshotError(_unrecognised(sorted(map(str, columns))))


def _store_rows(frame: pd.DataFrame) -> pa.Table:
    """The store's columns of a file of its rows, with the store's types (a fold sorts
    and compares them); a column it lacks is named by snapshot_of_rows."""
    present = [c for c in FOLD_COLUMNS if c in frame.columns]
    schema = pa.schema([FEEDBACK_SCHEMA.field(c) for c in present])
    try:
        return pa.Table.from_pandas(frame[present], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SnapshotError(
            f"feedback rows have the wrong types ({exc}); pass the store's rows as "
            "FeedbackStore.read_arrow() gives them"
        ) from None


def _from_trl_unpaired(frame: pd.DataFrame, options: SnapshotOptions) -> Snapshot:
    kept, values, skipped = _readable_rows(
        frame, ((PROMPT, _prompt), (COMPLETION, _completion), (LABEL, _label))
    )
    prompts = values[PROMPT]
    votes = pd.DataFrame(
        {
            PROMPT: [p for p, _ in prompts],
            MESSAGES_JSON: [m for _, m in prompts],
            COMPLETION: values[COMPLETION],
            DESIRABLE: values[LABEL],
            CONVERSATION_ID: _conversation_ids(frame, kept, prompts),
            ADAPTER: None,
        }
    )
    stats = _with_skipped(SnapshotStats(rows_read=len(frame), votes=len(votes)), skipped)
    snapshot = _from_votes(votes, SOURCE_TRL_UNPAIRED, options, stats)
    return replace(snapshot, window=votes_window(votes))


def _from_trl_paired(frame: pd.DataFrame, options: SnapshotOptions) -> Snapshot:
    kept, values, skipped = _readable_rows(
        frame, ((PROMPT, _prompt), (CHOSEN, _completion), (REJECTED, _completion))
    )
    prompts = values[PROMPT]
    conversations = _conversation_ids(frame, kept, prompts)
    n = len(kept)
    # Row i gives two votes, chosen then rejected, kept in file order.
    votes = pd.DataFrame(
        {
            PROMPT: [p for p, _ in prompts] * 2,
            MESSAGES_JSON: [m for _, m in prompts] * 2,
            COMPLETION: values[CHOSEN] + values[REJECTED],
            DESIRABLE: [True] * n + [False] * n,
            CONVERSATION_ID: conversations * 2,
            ADAPTER: None,
            "_row": [*range(n), *range(n)],
        }
    ).sort_values("_row", kind="mergesort")
    stats = _with_skipped(SnapshotStats(rows_read=len(frame), votes=len(votes)), skipped)
    votes = votes.drop(columns="_row")
    snapshot = _from_votes(votes, SOURCE_TRL_PAIRED, options, stats)
    return replace(snapshot, window=votes_window(votes))


def _readable_rows(
    frame: pd.DataFrame, columns: tuple[tuple[str, Callable[[Any, str, int], Any]], ...]
) -> tuple[list[int], dict[str, list], list[str]]:
    """Parse each row's columns. A row with a value that cannot be read is left out, so
    that one odd row never costs the whole file.

    Returns:
        The positions of the rows kept, their parsed values per column, and one reason
        per row left out (its first unreadable value).

    Raises:
        SnapshotError: no row can be read; the message gives the first reasons.
    """
    cells = [frame[name].tolist() for name, _ in columns]
    kept: list[int] = []
    values: dict[str, list] = {name: [] for name, _ in columns}
    skipped: list[str] = []
    for i, row_cells in enumerate(zip(*cells, strict=True)):
        try:
            parsed = [
                parse(cell, name, i + 1)
                for (name, parse), cell in zip(columns, row_cells, strict=True)
            ]
        except SnapshotError as exc:
            skipped.append(str(exc))
            continue
        kept.append(i)
        for (name, _), value in zip(columns, parsed, strict=True):
            values[name].append(value)
    if not kept:
        first = skipped[:MAX_SKIPPED_REASONS]
        more = f" (and {len(skipped) - len(first)} more)" if len(skipped) > len(first) else ""
        raise SnapshotError(
            f"none of the {len(skipped)} rows can be read: " + "; ".join(first) + more
        )
    if skipped:
        log.warning(
            "%d of %d rows left out: a value in them cannot be read (first: %s)",
            len(skipped),
            len(frame),
            skipped[0],
        )
    return kept, values, skipped


def _with_skipped(stats: SnapshotStats, skipped: list[str]) -> SnapshotStats:
    return replace(
        stats,
        skipped_rows=len(skipped),
        skipped_reasons=tuple(skipped[:MAX_SKIPPED_REASONS]),
    )


def _require_rows(frame: pd.DataFrame) -> None:
    if frame.empty:
        raise SnapshotError(
            f"the data has columns {sorted(map(str, frame.columns))} but no rows; "
            "point at a file with examples"
        )


def _unrecognised(found: list[str]) -> str:
    accepted = "; ".join(f"{name} ({', '.join(cols)})" for name, cols in _FORMATS.items())
    # Name what the closest format lacks: usually a renamed column.
    closest = max(_FORMATS.items(), key=lambda kv: len(set(kv[1]) & set(found)))
    lacking = [c for c in closest[1] if c not in found]
    hint = ""
    if set(closest[1]) & set(found):
        hint = f"; for {closest[0]} it lacks {', '.join(lacking)}"
    return (
        f"unrecognised columns {found}{hint}. Accepted formats: {accepted}. "
        "Rename the columns to one of these."
    )


def _messages(value: Any) -> list[dict[str, str]] | None:
    """The {"role", "content"} turns of a conversational value, or None if it is not
    a list of such dicts (Parquet gives numpy arrays of dicts, JSON gives lists)."""
    if not isinstance(value, list | tuple | np.ndarray):
        return None
    turns = []
    for turn in value:
        if not isinstance(turn, dict):
            return None
        role, content = turn.get("role"), turn.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        turns.append({"role": role, "content": content})
    return turns


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _prompt(value: Any, column: str, row: int) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        if not value.strip():
            raise SnapshotError(f"{column} at row {row} is empty; every example needs a prompt")
        return value, None
    turns = _messages(value)
    if turns:
        # Compact, unescaped JSON: the same text the store keeps for a `messages` event.
        return None, json.dumps(turns, ensure_ascii=False, separators=(",", ":"))
    what = "missing" if is_missing(value) else _describe(value)
    raise SnapshotError(
        f"{column} at row {row} is {what}; expected a string or a non-empty list of "
        '{"role", "content"} messages'
    )


def _completion(value: Any, column: str, row: int) -> str:
    # An empty answer is still an answer: the model ended its turn at once. It is kept
    # as "", which encodes as the end-of-turn token alone.
    if isinstance(value, str):
        return value if value.strip() else ""
    turns = _messages(value)
    if turns is not None:
        if len(turns) == 1 and turns[0]["role"] == "assistant":
            content = turns[0]["content"]
            return content if content.strip() else ""
        roles = [t["role"] for t in turns]
        raise SnapshotError(
            f"conversational {column} at row {row} must be one assistant message, "
            f"got roles {roles}; put earlier turns in the prompt"
        )
    what = "missing" if is_missing(value) else _describe(value)
    raise SnapshotError(
        f"{column} at row {row} is {what}, not a string; expected the completion text or "
        'a list with one {"role": "assistant", "content": ...} message'
    )


def _label(value: Any, column: str, row: int) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | float | np.integer | np.floating) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABEL_WORDS:
        return _LABEL_WORDS[value.strip().lower()]
    what = "missing" if is_missing(value) else _describe(value)
    raise SnapshotError(
        f"{column} at row {row} is {what}; expected a boolean (true/false or 1/0), "
        "true for a desirable completion"
    )


def _conversation_ids(
    frame: pd.DataFrame, rows: list[int], prompts: list[tuple[str | None, str | None]]
) -> list[str]:
    """For the rows at `rows` (with their parsed prompts): the dataset's conversation_id
    where given, else a hash of the prompt, so that every example of one prompt falls on
    the same side of the split."""
    given = frame[CONVERSATION_ID].tolist() if CONVERSATION_ID in frame.columns else []
    ids = []
    for i, (prompt, messages) in zip(rows, prompts, strict=True):
        if given and not is_missing(given[i]):
            ids.append(str(given[i]))
        else:
            text = prompt if prompt is not None else f"messages:{messages}"
            ids.append("prompt-" + hashlib.sha256(text.encode()).hexdigest()[:16])
    return ids


def _from_votes(
    votes: pd.DataFrame, source: str, options: SnapshotOptions, stats: SnapshotStats
) -> Snapshot:
    """Majority label per (prompt or messages, completion) of votes given oldest first:
    the conversation is the first vote's, the adapter the latest vote's."""
    keyed = votes.assign(
        _kind=votes[PROMPT].notna(), _text=votes[PROMPT].fillna(votes[MESSAGES_JSON])
    )
    keys = ["_kind", "_text", COMPLETION]
    first = keyed.drop_duplicates(keys, keep="first").set_index(keys)
    last = keyed.drop_duplicates(keys, keep="last").set_index(keys)
    grouped = keyed.groupby(keys)[DESIRABLE]
    liked = grouped.sum().astype("int64")
    examples = first[[PROMPT, MESSAGES_JSON, CONVERSATION_ID]].assign(
        **{
            ADAPTER: last[ADAPTER],
            VOTES_DESIRABLE: liked,
            VOTES_UNDESIRABLE: grouped.size() - liked,
        }
    )
    examples = examples.reset_index(level=COMPLETION).reset_index(drop=True)
    return label_examples(examples, source, options, stats)
