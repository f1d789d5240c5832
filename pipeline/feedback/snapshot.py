"""Training snapshots: labelled examples in, a frozen, content-addressed table out.

A snapshot holds one labelled example per (prompt or messages, completion):

1. The votes come from the vote table (pipeline/feedback/votes.py: which feedback
   events count) or from a TRL dataset (pipeline/feedback/imports/trl.py: each row a
   vote).
2. Per example the majority of its votes is the label; a tie follows
   `SnapshotOptions.tie_policy`. Vote counts are kept (`label_examples`). With a
   half-life (`half_life_days` or `half_life_votes`), each vote weighs 2^(-age /
   half-life): the weighted majority labels the example, the weight of its newest
   vote (its recency) scales its term in the loss, and an example whose newest vote
   weighs under `recency_floor` is left out. So a change of taste relabels and
   outweighs what the users said before, and old votes fade instead of being cut at
   a window's edge.
3. Each conversation lands on one side of the train / held-out split, decided by a
   salted hash of its id alone: no conversation is on both sides, and adding rows
   never moves one (`split_of`).

`from_snapshot_table` checks a snapshot table read back and passes it through.

The snapshot id is a sha256 of a canonical serialisation of the sorted rows, not of
Parquet bytes (those change with library versions): the same examples give the same
id on any machine. Reading and writing files is connectors/feedback/snapshots.py's job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any, Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from pipeline.feedback.examples import Example
from pipeline.feedback.lineage import FeedbackWindow
from pipeline.feedback.records import (
    ADAPTER,
    COMPLETION,
    CONVERSATION_ID,
    DESIRABLE,
    MESSAGES_JSON,
    PROMPT,
    SOURCE,
    SPLIT,
    TRAINING_COLUMNS,
    TRAINING_SCHEMA,
    VOTES_DESIRABLE,
    VOTES_UNDESIRABLE,
)

TiePolicy = Literal["drop", "desirable", "undesirable"]
RepeatPolicy = Literal["collapse", "keep", "weight"]
TRAIN = "train"
HELDOUT = "heldout"
SOURCE_FEEDBACK = "feedback"
# Bumping this changes every id: do it only when the serialisation itself changes.
# Columns a vote-table snapshot may add to its examples when it weighs votes by age.
WEIGHTED_DESIRABLE, WEIGHTED_UNDESIRABLE, RECENCY = (
    "weighted_desirable", "weighted_undesirable", "recency",
)  # fmt: skip
_ID_HEADER = b"kto-loop training snapshot v1\n" + json.dumps(TRAINING_COLUMNS).encode() + b"\n"


class SnapshotError(ValueError):
    """Input that cannot become a snapshot; the message says what was wrong and what
    to do about it."""


class NothingToSnapshot(SnapshotError):
    """Well-formed input with no labelled example in it (yet): no rows, or every vote
    retracted, neutral or tied away."""


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SnapshotOptions:
    """How votes become examples and how examples are split: the `[snapshot]`
    configuration section, less where snapshots are written (bounds checked whenever
    one is built)."""

    heldout_fraction: Annotated[
        float, Field(ge=0, lt=1, description="share of conversations held out for evaluation")
    ] = 0.1
    split_seed: Annotated[
        str,
        Field(min_length=1, description="salt of the split hash; changing it reshuffles"),
    ] = "kto-loop"
    tie_policy: Annotated[
        TiePolicy,
        Field(
            description="an example with as many likes as dislikes: dropped or labelled; "
            "applied at each snapshot, to every stored vote"
        ),
    ] = "drop"
    half_life_days: Annotated[
        float | None,
        Field(
            gt=0,
            description="votes weigh half as much every this many days (counted back from "
            "the newest vote); None: every vote weighs the same",
        ),
    ] = None
    half_life_votes: Annotated[
        int | None,
        Field(
            ge=1,
            description="votes weigh half as much every this many newer votes, for stores "
            "whose nights are short; None: by days, or not at all",
        ),
    ] = None
    recency_floor: Annotated[
        float,
        Field(
            gt=0,
            lt=1,
            description="with a half-life, an example whose newest vote weighs less than "
            "this is left out",
        ),
    ] = 1 / 16

    def __post_init__(self) -> None:
        if self.half_life_days is not None and self.half_life_votes is not None:
            raise ValueError("set half_life_days or half_life_votes, not both")

    @property
    def weighs_recency(self) -> bool:
        return self.half_life_days is not None or self.half_life_votes is not None

    def as_dict(self) -> dict[str, Any]:
        """These options alone, by name, as a snapshot's metadata records them (a
        configuration section that adds fields to them records only these)."""
        return {f.name: getattr(self, f.name) for f in fields(SnapshotOptions)}


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
    faded: examples left out because their newest vote weighs under recency_floor.
    retracted: (user, message) pairs whose latest event is a retraction.
    unlabelled: (user, message) pairs whose latest event has no label (a neutral
        rating) or nothing to train on (no prompt or response).
    votes: votes counted towards a label (a paired row gives two).
    ties: examples whose votes tied; ties_dropped of them were dropped.
    skipped_rows: dataset rows left out because a prompt, completion or label in them
        cannot be read (TRL datasets only).
    skipped_reasons: why, for the first few of them (imports/trl.py keeps
        MAX_SKIPPED_REASONS), each naming the row (counting from 1) and the column.
    """

    rows_read: int = 0
    duplicates: int = 0
    superseded: int = 0
    faded: int = 0
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
    # Per table row, the weight of its newest vote (a half-life set); None: all 1.
    recency: np.ndarray | None = field(default=None, compare=False, repr=False)

    def records(self, split: str, repeats: RepeatPolicy = "collapse") -> list[Example]:
        """The examples of one split ("train" or "heldout"), in table order.

        An answer the model gave many times carries many votes; `repeats` says what
        they count for: "collapse", one example whatever its votes; "keep", the example
        once per vote that agrees with its label (what a file of raw votes gives);
        "weight", one example weighing that number of votes in the loss. With a
        half-life, each example's weight is also scaled by its recency."""
        rows, votes_of = self._votes(split, repeats)
        recency = (
            self.recency[(self.table[SPLIT] == split).to_numpy()].tolist()
            if self.recency is not None
            else [1.0] * len(rows)
        )
        adapters = rows[ADAPTER].tolist() if ADAPTER in rows.columns else [None] * len(rows)
        columns = [rows[c].tolist() for c in (PROMPT, MESSAGES_JSON, COMPLETION, DESIRABLE)]
        out: list[Example] = []
        for (p, m, c, d), a, votes, weight in zip(
            zip(*columns, strict=True), adapters, votes_of.tolist(), recency, strict=True
        ):
            example = Example(
                None if is_missing(p) else p,
                None if is_missing(m) else m,
                c,
                bool(d),
                adapter=None if is_missing(a) else a,
                weight=float(weight),
            )
            if repeats == "keep":
                out += [example] * votes
            elif repeats == "weight":
                out.append(replace(example, weight=float(votes) * weight))
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


# -- snapshot tables -----------------------------------------------------------------


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


def is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


# -- examples -> labelled, split, canonical table -------------------------------------


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
    faded = 0
    if RECENCY in examples.columns:
        stale = examples[RECENCY] < options.recency_floor
        faded = int(stale.sum())
        examples = examples[~stale]
        liked, disliked = examples[WEIGHTED_DESIRABLE], examples[WEIGHTED_UNDESIRABLE]
        # Weights in floating point: a tie is one within rounding.
        tie = pd.Series(np.isclose(liked, disliked, rtol=1e-9, atol=1e-12), index=examples.index)
    else:
        liked, disliked = examples[VOTES_DESIRABLE], examples[VOTES_UNDESIRABLE]
        tie = liked == disliked
    examples[DESIRABLE] = (liked > disliked) | (tie & (options.tie_policy == "desirable"))
    if options.tie_policy == "drop":
        examples = examples[~tie]
    ties = int(tie.sum())
    stats = replace(
        stats, ties=ties, ties_dropped=ties if options.tie_policy == "drop" else 0, faded=faded
    )
    if examples.empty:
        unreadable = f", {stats.skipped_rows} unreadable" if stats.skipped_rows else ""
        raise NothingToSnapshot(
            f"no labelled examples left from {stats.rows_read} rows ({stats.duplicates} "
            f"duplicates, {stats.retracted} retracted, {stats.unlabelled} unlabelled, "
            f"{stats.ties_dropped} ties dropped, {faded} faded{unreadable}); collect more "
            "feedback, or set snapshot.tie_policy to keep ties"
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
    recency = None
    if RECENCY in frame.columns:
        # The canonical order sorts rows; an example is one (prompt, messages, completion).
        keys = [PROMPT, MESSAGES_JSON, COMPLETION]
        weights = frame[[*keys, RECENCY]].astype({PROMPT: object, MESSAGES_JSON: object})
        placed = table[keys].astype(object).merge(weights, on=keys, how="left", sort=False)
        recency = placed[RECENCY].to_numpy(np.float64)
    groups = table.groupby([SPLIT, DESIRABLE]).size().to_dict()
    counts = SnapshotCounts(
        train_desirable=groups.get((TRAIN, True), 0),
        train_undesirable=groups.get((TRAIN, False), 0),
        heldout_desirable=groups.get((HELDOUT, True), 0),
        heldout_undesirable=groups.get((HELDOUT, False), 0),
    )
    return Snapshot(content_id(table), table, counts, stats, options, recency=recency)


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
        values = [None if is_missing(v) else v for v in row]
        h.update(json.dumps(values, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
