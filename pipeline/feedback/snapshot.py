"""Training snapshots: feedback votes or TRL datasets in, a frozen, content-addressed table out.

`build_snapshot` turns the store's feedback rows into one labelled example per
(prompt or messages, completion):

1. An event stored twice (at-least-once delivery: same event_id, another offset)
   counts once.
2. Per (user, message) only the latest event counts, ordered by ts, then Kafka
   position, then event_id. A retraction as the latest event withdraws that user's
   vote; a neutral rating carries no label. An event without a user is its own voter.
3. Per (prompt or messages, completion) the majority of the remaining votes is the
   label; a tie follows `SnapshotOptions.tie_policy`. Vote counts are kept.
4. Each conversation lands on one side of the train / held-out split, decided by a
   salted hash of its id alone: no conversation is on both sides, and adding rows
   never moves one.

`snapshot_from_table` does the same for TRL's unpaired KTO (prompt, completion, label)
and paired preference (prompt, chosen, rejected) datasets, standard or
conversational, and passes a snapshot table through unchanged. In those datasets a row
whose prompt, completion or label cannot be read is left out and counted, with the
first reasons kept in the stats; only a file with no readable row is refused. An empty
completion is an answer (the model ended its turn at once) and is kept as "".

`latest_votes` is steps 1 and 2 on their own, for measures that count votes rather
than examples (pipeline/feedback/production.py).

The snapshot id is a sha256 of a canonical serialisation of the sorted rows, not of
Parquet bytes (those change with library versions): the same examples give the same
id on any machine. Reading and writing files is connectors/feedback/snapshots.py's job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.feedback.examples import Example
from pipeline.feedback.lineage import FeedbackWindow, feedback_window, votes_window
from pipeline.feedback.records import (
    ADAPTER,
    CHOSEN,
    COMPLETION,
    CONVERSATION_ID,
    DESIRABLE,
    EVENT_ID,
    FEEDBACK,
    INGESTED_AT,
    KAFKA_OFFSET,
    KAFKA_PARTITION,
    KAFKA_TOPIC,
    LABEL,
    MESSAGE_ID,
    MESSAGES_JSON,
    PROMPT,
    REJECTED,
    RESPONSE,
    SOURCE,
    SPLIT,
    TRAINING_COLUMNS,
    TRAINING_SCHEMA,
    TS,
    USER_HASH,
    VOTES_DESIRABLE,
    VOTES_UNDESIRABLE,
)

log = logging.getLogger(__name__)

TiePolicy = Literal["drop", "desirable", "undesirable"]
RepeatPolicy = Literal["collapse", "keep", "weight"]
TRAIN = "train"
HELDOUT = "heldout"
SOURCE_FEEDBACK = "feedback"
SOURCE_TRL_UNPAIRED = "trl-unpaired"
SOURCE_TRL_PAIRED = "trl-paired"

# The feedback columns a snapshot reads; Kafka provenance is optional (a tie-break).
_FEEDBACK_COLUMNS = (
    EVENT_ID,
    TS,
    CONVERSATION_ID,
    MESSAGE_ID,
    USER_HASH,
    PROMPT,
    MESSAGES_JSON,
    RESPONSE,
    FEEDBACK,
    DESIRABLE,
    ADAPTER,
)
_KAFKA_ORDER = (KAFKA_TOPIC, KAFKA_PARTITION, KAFKA_OFFSET)
# The columns `latest_votes` needs: those deciding which votes count, and the adapter
# each vote was given on.
_VOTE_COLUMNS = (EVENT_ID, TS, MESSAGE_ID, USER_HASH, FEEDBACK, DESIRABLE, ADAPTER)
# What to read from the store, and no more: the store's text columns are most of its
# bytes, and only a snapshot needs them. The window needs the Kafka position and the
# ingest time of every row read.
SNAPSHOT_COLUMNS = (*_FEEDBACK_COLUMNS, *_KAFKA_ORDER, INGESTED_AT)
VOTE_COLUMNS = (*_VOTE_COLUMNS, *_KAFKA_ORDER)
_FORMATS = {
    "TRL unpaired KTO": (PROMPT, COMPLETION, LABEL),
    "TRL paired preference": (PROMPT, CHOSEN, REJECTED),
    "kto-loop snapshot": TRAINING_COLUMNS,
}
# Bumping this changes every id: do it only when the serialisation itself changes.
_ID_HEADER = b"kto-loop training snapshot v1\n" + json.dumps(TRAINING_COLUMNS).encode() + b"\n"
_LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False}
# How many reasons for skipped rows the stats keep: enough to see the pattern.
MAX_SKIPPED_REASONS = 5


class SnapshotError(ValueError):
    """Input that cannot become a snapshot; the message says what was wrong and what
    to do about it."""


class NothingToSnapshot(SnapshotError):
    """Well-formed input with no labelled example in it (yet): no rows, or every vote
    retracted, neutral or tied away."""


@dataclass(frozen=True)
class SnapshotOptions:
    """How votes become examples and how examples are split.

    heldout_fraction: share of conversations held out for evaluation, in [0, 1).
    split_seed: salt of the conversation hash; changing it reshuffles the split.
    tie_policy: what an example with as many likes as dislikes becomes: dropped, or
        labelled desirable or undesirable.
    """

    heldout_fraction: float = 0.1
    split_seed: str = "kto-loop"
    tie_policy: TiePolicy = "drop"

    def __post_init__(self) -> None:
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not self.split_seed:
            raise ValueError("split_seed must be a non-empty string")
        if self.tie_policy not in get_args(TiePolicy):
            raise ValueError(
                f"tie_policy must be one of {', '.join(get_args(TiePolicy))}, "
                f"got {self.tie_policy!r}"
            )


@dataclass(frozen=True)
class SnapshotCounts:
    """Examples per split and label."""

    train_desirable: int
    train_undesirable: int
    heldout_desirable: int
    heldout_undesirable: int

    @property
    def total(self) -> int:
        return (
            self.train_desirable
            + self.train_undesirable
            + self.heldout_desirable
            + self.heldout_undesirable
        )


@dataclass(frozen=True)
class SnapshotStats:
    """What went in and what was left out on the way, in rows and votes.

    rows_read: input rows (feedback events, or dataset rows).
    duplicates: rows whose event_id was already seen (redelivered events).
    superseded: votes replaced by the same user's later event on the same message.
    retracted: (user, message) pairs whose latest event is a retraction.
    unlabelled: (user, message) pairs whose latest event has no label (a neutral
        rating) or nothing to train on (no prompt or response).
    votes: votes counted towards a label (a paired row gives two).
    ties: examples whose votes tied; ties_dropped of them were dropped.
    skipped_rows: dataset rows left out because a prompt, completion or label in them
        cannot be read (TRL datasets only).
    skipped_reasons: why, for the first MAX_SKIPPED_REASONS of them, each naming the
        row (counting from 1) and the column.
    """

    rows_read: int = 0
    duplicates: int = 0
    superseded: int = 0
    retracted: int = 0
    unlabelled: int = 0
    votes: int = 0
    ties: int = 0
    ties_dropped: int = 0
    skipped_rows: int = 0
    skipped_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """A frozen training table and its content id.

    `table` has the columns of records.TRAINING_SCHEMA in a canonical order; treat it
    as read-only (the id describes it). `options` is None when the split was taken as
    stored (a snapshot read back) rather than computed here. `window` says which
    feedback it was built from (pipeline/feedback/lineage.py); it describes the snapshot and is
    not part of its content, so it leaves the id alone. None for a snapshot table
    passed through, or read back from before windows were recorded.
    """

    id: str
    table: pd.DataFrame = field(compare=False, repr=False)
    counts: SnapshotCounts
    stats: SnapshotStats
    options: SnapshotOptions | None
    window: FeedbackWindow | None = field(default=None, compare=False)

    def records(self, split: str, repeats: RepeatPolicy = "collapse") -> list[Example]:
        """The examples of one split ("train" or "heldout"), in table order.

        An answer the model gave many times carries many votes; `repeats` says what
        they count for: "collapse", one example whatever its votes; "keep", the example
        once per vote that agrees with its label (what a file of raw votes gives);
        "weight", one example weighing that number of votes in the loss."""
        rows, votes_of = self._votes(split, repeats)
        adapters = rows[ADAPTER].tolist() if ADAPTER in rows.columns else [None] * len(rows)
        columns = [rows[c].tolist() for c in (PROMPT, MESSAGES_JSON, COMPLETION, DESIRABLE)]
        out: list[Example] = []
        for (p, m, c, d), a, votes in zip(
            zip(*columns, strict=True), adapters, votes_of.tolist(), strict=True
        ):
            example = Example(
                None if _is_missing(p) else p,
                None if _is_missing(m) else m,
                c,
                bool(d),
                adapter=None if _is_missing(a) else a,
            )
            if repeats == "keep":
                out += [example] * votes
            elif repeats == "weight":
                out.append(replace(example, weight=float(votes)))
            else:
                out.append(example)
        return out

    def _votes(self, split: str, repeats: RepeatPolicy) -> tuple[pd.DataFrame, np.ndarray]:
        """The rows of a split and what each counts for under `repeats`: 1, or its
        votes that agree with its label (at least 1)."""
        if split not in (TRAIN, HELDOUT):
            raise ValueError(f"split must be {TRAIN!r} or {HELDOUT!r}, got {split!r}")
        if repeats not in get_args(RepeatPolicy):
            raise ValueError(f"repeats must be one of {get_args(RepeatPolicy)}, got {repeats!r}")
        rows = self.table[self.table[SPLIT] == split]
        if repeats == "collapse":
            return rows, np.ones(len(rows), dtype=np.int64)
        agreeing = np.where(rows[DESIRABLE], rows[VOTES_DESIRABLE], rows[VOTES_UNDESIRABLE])
        return rows, np.maximum(1, agreeing.astype(np.int64))

    def class_counts(self, split: str, repeats: RepeatPolicy = "collapse") -> tuple[int, int]:
        """(desirable, undesirable) of one split as training counts them under `repeats`:
        examples, or votes that agree with the labels."""
        rows, counts = self._votes(split, repeats)
        desirable = rows[DESIRABLE].to_numpy(bool)
        return int(counts[desirable].sum()), int(counts[~desirable].sum())


# -- feedback -----------------------------------------------------------------------


def build_snapshot(feedback: pd.DataFrame, options: SnapshotOptions | None = None) -> Snapshot:
    """Build the snapshot of the feedback store's rows (records.FEEDBACK_SCHEMA).

    Raises:
        SnapshotError: no rows, missing columns, or no labelled example left.
    """
    options = options or SnapshotOptions()
    missing = [c for c in _FEEDBACK_COLUMNS if c not in feedback.columns]
    if missing:
        raise SnapshotError(
            f"feedback rows lack the columns {missing} (found {sorted(feedback.columns)}); "
            "pass the store's feedback table as read by FeedbackStore.read()"
        )
    if feedback.empty:
        raise NothingToSnapshot("no feedback rows to build a snapshot from; ingest feedback first")

    voted, stats = latest_votes(feedback)
    has_text = (voted[PROMPT].notna() | voted[MESSAGES_JSON].notna()) & voted[RESPONSE].notna()
    counted = voted[has_text]

    votes = pd.DataFrame(
        {
            PROMPT: counted[PROMPT],
            # Exactly one of prompt / messages_json per example, prompt first.
            MESSAGES_JSON: counted[MESSAGES_JSON].where(counted[PROMPT].isna()),
            COMPLETION: counted[RESPONSE],
            DESIRABLE: counted[DESIRABLE].astype(bool),
            CONVERSATION_ID: counted[CONVERSATION_ID],
            ADAPTER: counted[ADAPTER],
        }
    )
    # A vote on a message whose text is not in the row has nothing to train on.
    stats = replace(stats, unlabelled=stats.unlabelled + int((~has_text).sum()), votes=len(votes))
    snapshot = _from_votes(votes, SOURCE_FEEDBACK, options, stats)
    return replace(snapshot, window=feedback_window(feedback, counted))


def latest_votes(feedback: pd.DataFrame) -> tuple[pd.DataFrame, SnapshotStats]:
    """The votes that count in the feedback store's rows (records.FEEDBACK_SCHEMA),
    with what was left out on the way.

    A redelivered event counts once; per (user, message) only the latest event counts,
    ordered by ts, then Kafka position (when its columns are present), then event_id;
    an event without a user is its own voter. A retraction as the latest event
    withdraws the vote; a neutral rating carries no label. A vote counts whether or not
    its row holds the prompt and response text: filter on those to train on it.

    Returns:
        The counted votes: the input rows (all their columns) of the latest labelled,
        non-retracted event per (voter, message), oldest first, with `desirable` set;
        and stats with rows_read, duplicates, superseded, retracted, unlabelled
        (neutral ratings only) and votes filled in.

    Raises:
        SnapshotError: a column needed to resolve votes is missing.
    """
    missing = [c for c in _VOTE_COLUMNS if c not in feedback.columns]
    if missing:
        raise SnapshotError(
            f"feedback rows lack the columns {missing} (found {sorted(feedback.columns)}); "
            "pass the store's feedback table as read by FeedbackStore.read()"
        )
    order = [TS, *(c for c in _KAFKA_ORDER if c in feedback.columns), EVENT_ID]
    events = feedback.sort_values(order, kind="mergesort")
    # The first delivery of an event is kept; a redelivery is the same event.
    events = events.drop_duplicates(EVENT_ID, keep="first")

    voter = events[USER_HASH].where(events[USER_HASH].notna(), "event:" + events[EVENT_ID])
    latest_mask = ~events.assign(_voter=voter).duplicated(["_voter", MESSAGE_ID], keep="last")
    latest = events[latest_mask]
    retracted = latest[FEEDBACK] == "retract"
    unlabelled = ~retracted & latest[DESIRABLE].isna()
    counted = latest[~retracted & ~unlabelled]
    stats = SnapshotStats(
        rows_read=len(feedback),
        duplicates=len(feedback) - len(events),
        superseded=int((~latest_mask).sum()),
        retracted=int(retracted.sum()),
        unlabelled=int(unlabelled.sum()),
        votes=len(counted),
    )
    return counted, stats


# -- TRL datasets and snapshot tables -------------------------------------------------


def snapshot_from_table(frame: pd.DataFrame, options: SnapshotOptions | None = None) -> Snapshot:
    """Build a snapshot from a table recognised by its columns: a kto-loop snapshot
    (passed through, split kept), feedback rows, TRL unpaired KTO (prompt, completion,
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
            column), or a bad value in a snapshot table.
    """
    options = options or SnapshotOptions()
    columns = set(frame.columns)
    if set(TRAINING_COLUMNS) <= columns:
        _require_rows(frame)
        return from_snapshot_table(frame)
    if set(_FEEDBACK_COLUMNS) <= columns:
        return build_snapshot(frame, options)
    if {PROMPT, COMPLETION, LABEL} <= columns:
        _require_rows(frame)
        return _from_trl_unpaired(frame, options)
    if {PROMPT, CHOSEN, REJECTED} <= columns:
        _require_rows(frame)
        return _from_trl_paired(frame, options)
    raise SnapshotError(_unrecognised(sorted(map(str, columns))))


def from_snapshot_table(frame: pd.DataFrame) -> Snapshot:
    """Check a snapshot table (records.TRAINING_SCHEMA) and recompute its id and counts;
    the split is kept as stored.

    Raises:
        SnapshotError: a wrong type, a missing value, an unknown split or a row with
            both or neither of prompt and messages_json.
    """
    missing = [c for c in TRAINING_COLUMNS if c not in frame.columns]
    if missing:
        raise SnapshotError(
            f"a snapshot table lacks the columns {missing} (found {sorted(frame.columns)}); "
            "rebuild it with `kto-loop snapshot`"
        )
    splits = set(frame[SPLIT].dropna().unique()) - {TRAIN, HELDOUT}
    if splits:
        raise SnapshotError(
            f"unknown {SPLIT} values {sorted(map(str, splits))}: expected {TRAIN!r} or "
            f"{HELDOUT!r}; rebuild the snapshot with `kto-loop snapshot`"
        )
    both_or_neither = frame[PROMPT].notna() == frame[MESSAGES_JSON].notna()
    if both_or_neither.any():
        row = int(np.flatnonzero(both_or_neither.to_numpy())[0]) + 1
        raise SnapshotError(
            f"row {row} has {'both' if frame[PROMPT].notna().iloc[row - 1] else 'neither'} "
            f"of {PROMPT} and {MESSAGES_JSON}: each example needs exactly one"
        )
    table = _canonical(frame)
    votes = int(table[VOTES_DESIRABLE].sum() + table[VOTES_UNDESIRABLE].sum())
    return _finish(table, SnapshotStats(rows_read=len(frame), votes=votes), None)


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


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


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
    what = "missing" if _is_missing(value) else _describe(value)
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
    what = "missing" if _is_missing(value) else _describe(value)
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
    what = "missing" if _is_missing(value) else _describe(value)
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
        if given and not _is_missing(given[i]):
            ids.append(str(given[i]))
        else:
            text = prompt if prompt is not None else f"messages:{messages}"
            ids.append("prompt-" + hashlib.sha256(text.encode()).hexdigest()[:16])
    return ids


# -- shared: votes -> labelled, split, canonical table ---------------------------------


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


def label_examples(
    examples: pd.DataFrame, source: str, options: SnapshotOptions, stats: SnapshotStats
) -> Snapshot:
    """The snapshot of examples with their votes counted: one row per (prompt or
    messages, completion) with prompt, messages_json, completion, conversation_id,
    adapter, votes_desirable and votes_undesirable. Labels them by majority and
    `options.tie_policy`, splits them by conversation and freezes the table.

    Raises:
        NothingToSnapshot: no example is left (every one a dropped tie, or none given).
    """
    liked, disliked = examples[VOTES_DESIRABLE], examples[VOTES_UNDESIRABLE]
    tie = liked == disliked
    examples[DESIRABLE] = (liked > disliked) | (tie & (options.tie_policy == "desirable"))
    if options.tie_policy == "drop":
        examples = examples[~tie]
    ties = int(tie.sum())
    stats = replace(stats, ties=ties, ties_dropped=ties if options.tie_policy == "drop" else 0)
    if examples.empty:
        unreadable = f", {stats.skipped_rows} unreadable" if stats.skipped_rows else ""
        raise NothingToSnapshot(
            f"no labelled examples left from {stats.rows_read} rows ({stats.duplicates} "
            f"duplicates, {stats.retracted} retracted, {stats.unlabelled} unlabelled, "
            f"{stats.ties_dropped} ties dropped{unreadable}); collect more feedback, or set "
            "snapshot.tie_policy to keep ties"
        )

    conversations = examples[CONVERSATION_ID]
    sides = {c: split_of(c, options) for c in conversations.unique()}
    examples = examples.assign(**{SPLIT: conversations.map(sides), SOURCE: source})
    return _finish(examples, stats, options)


def split_of(conversation_id: str, options: SnapshotOptions) -> str:
    """Which side of the split a conversation is on, "heldout" or "train": the first 64
    bits of sha256(seed, conversation_id) against heldout_fraction. It depends on
    nothing else, so a conversation never changes side as data grows."""
    digest = hashlib.sha256(f"{options.split_seed}\x00{conversation_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return HELDOUT if position < options.heldout_fraction else TRAIN


def _finish(frame: pd.DataFrame, stats: SnapshotStats, options: SnapshotOptions | None) -> Snapshot:
    table = _canonical(frame)
    groups = table.groupby([SPLIT, DESIRABLE]).size().to_dict()
    counts = SnapshotCounts(
        train_desirable=groups.get((TRAIN, True), 0),
        train_undesirable=groups.get((TRAIN, False), 0),
        heldout_desirable=groups.get((HELDOUT, True), 0),
        heldout_undesirable=groups.get((HELDOUT, False), 0),
    )
    return Snapshot(content_id(table), table, counts, stats, options)


def _canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """The training columns with the schema's types, sorted by every column (Arrow
    sorts strings by code point, the same on every platform)."""
    try:
        arrow = pa.Table.from_pandas(
            frame[list(TRAINING_COLUMNS)], schema=TRAINING_SCHEMA, preserve_index=False
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SnapshotError(
            f"snapshot columns have the wrong types ({exc}); expected "
            + ", ".join(f"{f.name}: {f.type}" for f in TRAINING_SCHEMA)
        ) from None
    for f in TRAINING_SCHEMA:
        if not f.nullable and arrow[f.name].null_count:
            raise SnapshotError(
                f"{f.name} is missing in {arrow[f.name].null_count} rows; every example needs one"
            )
    arrow = arrow.sort_by([(name, "ascending") for name in TRAINING_COLUMNS])
    return arrow.to_pandas()


def content_id(table: pd.DataFrame) -> str:
    """The 16-hex-digit id of a canonical table: sha256 over one compact JSON array per
    row (the training columns in schema order, nulls as null), after a header naming
    the columns."""
    h = hashlib.sha256(_ID_HEADER)
    columns = [table[name].tolist() for name in TRAINING_COLUMNS]
    for row in zip(*columns, strict=True):
        values = [None if _is_missing(v) else v for v in row]
        h.update(json.dumps(values, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
