"""The vote table: which feedback votes count, the one place that decides it.

Every snapshot of feedback is built here: store rows are folded into a vote table (the
store's persisted one, night by night, or an empty one in memory for rows read whole:
an import's events, a file of stored rows), and `snapshot_from_votes` builds the
snapshot from the table. Measures that count votes (the liked share per adapter, the
votes since a run) read the same table.

The rule, as `fold_votes` applies it:

1. An event stored twice (at-least-once delivery: same event_id, another offset)
   counts once, at its first position.
2. Per (voter, message) only the latest event counts, ordered by ts, then Kafka
   position (topic, partition, offset), then event_id; an event without a user is its
   own voter. A retraction as the latest event withdraws that voter's vote; a neutral
   rating carries no label. Both stay in the table (a later vote may supersede them),
   and so does each row's key to its example's text: the text itself is kept once per
   example, beside the table (`TEXT_SCHEMA`).
3. A vote whose row holds no prompt (or messages) and response counts as a vote, but
   has nothing to train on: a snapshot leaves it out.

`fold_votes` folds new store rows into the table; the `VoteState` it returns says, per
topic partition, the last offset folded in and what the rows read so far hold (their
offsets, how many, when the newest was stored), and how many distinct events were seen:
what a snapshot's stats and feedback window need of the rows it no longer reads.
`select_votes` takes part of a table (a window of days, the votes since a run) with the
state a fold of that part alone would give.

One order of events gives another result folded night by night than folded at once: a
redelivery of the latest vote of a voter and message that lands at an earlier Kafka
position (another partition) than its first delivery, with the same ts as an older vote
of theirs on it. Folded at once, the older vote is then the latest (the redelivery's
position is the event's); folded after the first delivery, the table no longer holds
the older vote, and the latest stays the latest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.feedback.lineage import AdapterVotes, FeedbackWindow, PartitionWindow
from pipeline.feedback.records import (
    ADAPTER,
    COMPLETION,
    CONVERSATION_ID,
    DESIRABLE,
    EVENT_ID,
    EXAMPLE_KEY,
    FEEDBACK,
    FEEDBACK_SCHEMA,
    INGESTED_AT,
    KAFKA_OFFSET,
    KAFKA_PARTITION,
    KAFKA_TOPIC,
    MESSAGE_ID,
    MESSAGES_JSON,
    PROMPT,
    RESPONSE,
    TS,
    USER_HASH,
    VOTER_KEY,
    VOTES_DESIRABLE,
    VOTES_UNDESIRABLE,
)
from pipeline.feedback.snapshot import (
    RECENCY,
    SOURCE_FEEDBACK,
    WEIGHTED_DESIRABLE,
    WEIGHTED_UNDESIRABLE,
    NothingToSnapshot,
    Snapshot,
    SnapshotError,
    SnapshotOptions,
    SnapshotStats,
    label_examples,
)

# The order in which events happened.
ORDER = (TS, KAFKA_TOPIC, KAFKA_PARTITION, KAFKA_OFFSET, EVENT_ID)
_VOTE_FIELDS = (
    *ORDER,
    USER_HASH,
    MESSAGE_ID,
    CONVERSATION_ID,
    FEEDBACK,
    DESIRABLE,
    ADAPTER,
    INGESTED_AT,
)
VOTE_TABLE_SCHEMA = pa.schema(
    [FEEDBACK_SCHEMA.field(c) for c in _VOTE_FIELDS]
    + [pa.field(EXAMPLE_KEY, pa.binary(16)), pa.field(VOTER_KEY, pa.int64(), nullable=False)]
)
TEXT_SCHEMA = pa.schema(
    [pa.field(EXAMPLE_KEY, pa.binary(16), nullable=False)]
    + [FEEDBACK_SCHEMA.field(c) for c in (PROMPT, MESSAGES_JSON, RESPONSE)]
)
SEEN_SCHEMA = pa.schema([FEEDBACK_SCHEMA.field(EVENT_ID)])
# What a fold reads of the new store rows.
FOLD_COLUMNS = (*_VOTE_FIELDS, PROMPT, MESSAGES_JSON, RESPONSE)
_RETRACT = "retract"


@dataclass(frozen=True)
class PartitionFold:
    """One topic partition as folded so far: the last offset of the store files folded
    in (-1: none yet), and the offsets and number of the rows read from them."""

    topic: str
    partition: int
    folded_to: int
    first_read: int | None
    last_read: int | None
    rows_read: int


@dataclass(frozen=True)
class VoteState:
    """What the vote table of `generation` holds: the partitions folded in, when the
    newest row read was stored (microseconds since the epoch, UTC), and how many
    distinct events the rows read hold, and the ts of the oldest."""

    generation: int = 0
    partitions: tuple[PartitionFold, ...] = ()
    ingested_to_us: int | None = None
    events: int = 0
    read_from_us: int | None = None

    @property
    def rows_read(self) -> int:
        return sum(p.rows_read for p in self.partitions)

    def folded_to(self, topic: str, partition: int) -> int:
        """The last offset of `topic` partition `partition` folded in, -1 if none."""
        for p in self.partitions:
            if (p.topic, p.partition) == (topic, partition):
                return p.folded_to
        return -1

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "partitions": [asdict(p) for p in self.partitions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VoteState:
        return cls(
            generation=int(data["generation"]),
            partitions=tuple(PartitionFold(**p) for p in data["partitions"]),
            ingested_to_us=data.get("ingested_to_us"),
            events=int(data["events"]),
            read_from_us=data.get("read_from_us"),
        )


@dataclass(frozen=True)
class Fold:
    """A fold's result: the new vote table, the texts of examples it had no key for,
    the event ids seen for the first time, and the state of the new table."""

    table: pa.Table
    texts: pa.Table
    seen: pa.Table
    state: VoteState


def example_key(
    prompt: str | None, messages_json: str | None, response: str | None
) -> bytes | None:
    """The key of an example's text, as a snapshot groups votes into examples: the
    prompt (or the messages, when there is no prompt) and the completion; None when
    there is nothing to train on. 16 bytes of sha256."""
    if response is None or (prompt is None and messages_json is None):
        return None
    kind, text = ("p", prompt) if prompt is not None else ("m", messages_json)
    digest = hashlib.sha256()
    for part in (kind, text, response):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()[:16]


_TEXTS = (PROMPT, MESSAGES_JSON, RESPONSE)


def _keys(frame: pd.DataFrame) -> list[bytes | None]:
    columns = [frame[c].astype(object).where(frame[c].notna(), None) for c in _TEXTS]
    return [example_key(p, m, r) for p, m, r in zip(*columns, strict=True)]


def _voters(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(voter, message) per row: an event without a user is its own voter."""
    return [
        (u if isinstance(u, str) else "event:" + e, m)
        for u, e, m in zip(frame[USER_HASH], frame[EVENT_ID], frame[MESSAGE_ID], strict=True)
    ]


def _voter_keys(voters: Iterable[tuple[str, str]]) -> list[int]:
    """A 64-bit hash of each (voter, message): finds a group's rows in the table fast.
    Only a filter: two groups may share one, rows are told apart by their values."""
    out = []
    for voter, message in voters:
        digest = hashlib.blake2b(digest_size=8)
        digest.update(voter.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
        digest.update(message.encode("utf-8", "surrogatepass"))
        out.append(int.from_bytes(digest.digest(), "big", signed=True))
    return out


def _mask(values: pa.ChunkedArray | pa.Array, among: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Which of `values` are in `among`."""
    if len(values) == 0 or len(among) == 0:
        return np.zeros(len(values), dtype=bool)
    if len(among) > 4 * len(values):
        # Hash the few, not the many: the table's millions against a night's thousands.
        among = among.filter(pc.is_in(among, value_set=values))
        if len(among) == 0:
            return np.zeros(len(values), dtype=bool)
    return pc.is_in(values, value_set=among).to_numpy(zero_copy_only=False)


def fold_votes(
    table: pa.Table,
    seen: pa.ChunkedArray | pa.Array,
    rows: pa.Table,
    files: Iterable[tuple[str, int, int, int]],
    state: VoteState,
) -> Fold:
    """Fold new store rows into the vote table.

    Args:
        table: the vote table (VOTE_TABLE_SCHEMA) of `state`, sorted by ORDER (as
            fold_votes keeps it).
        seen: every event id the rows folded so far hold.
        rows: the new store rows (FOLD_COLUMNS at least): those of the store files
            `files` at offsets past each partition's `state.folded_to`.
        files: (topic, partition, first, last) of the store files read.
        state: the state of `table`.
    """
    frame = rows.select(list(FOLD_COLUMNS)).to_pandas()
    frame[EXAMPLE_KEY] = pd.Series(_keys(frame), index=frame.index, dtype=object)
    frame = frame.sort_values(list(ORDER), kind="mergesort")
    firsts = frame.drop_duplicates(EVENT_ID, keep="first")
    ids = pa.array(firsts[EVENT_ID], pa.string())
    known = _mask(ids, seen)
    latest = np.zeros(len(ids), dtype=bool)
    latest[known] = _mask(ids.filter(pa.array(known)), table[EVENT_ID])
    # A redelivery of a superseded event stays superseded; one of a latest vote is
    # merged with it below, and the earlier of the two deliveries kept.
    candidates = firsts[~known | latest]
    candidates = candidates.assign(**{VOTER_KEY: _voter_keys(_voters(candidates))})
    new_table = _merge(table, candidates)
    fresh = firsts[~known]
    texts = _new_texts(fresh, table)
    seen_now = pa.table({EVENT_ID: pa.array(fresh[EVENT_ID], pa.string())}, schema=SEEN_SCHEMA)
    return Fold(new_table, texts, seen_now, _next_state(state, rows, files, len(fresh)))


def fold_rows(rows: pa.Table) -> Fold:
    """Fold store rows into an empty vote table: the table of these rows alone (an
    import's events, a file of stored rows, a rebuild of the whole store).

    Args:
        rows: store rows (FOLD_COLUMNS at least), in any order.
    """
    empty = VOTE_TABLE_SCHEMA.empty_table()
    return fold_votes(empty, empty[EVENT_ID], rows, _spans(rows), VoteState())


def select_votes(table: pa.Table, keep: pa.ChunkedArray | pa.Array) -> tuple[pa.Table, VoteState]:
    """The votes of the table that `keep` (a boolean mask) selects, and the state that a
    fold of their rows alone into an empty table gives: a snapshot of part of the votes
    (the last days', those stored since a run) counts and describes that part only.

    Args:
        table: a vote table (VOTE_TABLE_SCHEMA), sorted by ORDER.
    """
    part = table.filter(keep)
    # The table holds each event once, the latest of its voter and message: a fold of
    # its rows gives them back as they are, so only the state is left to work out (in
    # Arrow: the part may be most of a table of millions).
    return part, _next_state(VoteState(), part, _spans(part), part.num_rows)


def _spans(rows: pa.Table) -> list[tuple[str, int, int, int]]:
    """(topic, partition, first, last) of the offsets of the rows, per partition."""
    spans = rows.group_by([KAFKA_TOPIC, KAFKA_PARTITION], use_threads=False).aggregate(
        [(KAFKA_OFFSET, "min"), (KAFKA_OFFSET, "max")]
    )
    columns = (KAFKA_TOPIC, KAFKA_PARTITION, f"{KAFKA_OFFSET}_min", f"{KAFKA_OFFSET}_max")
    return list(zip(*(spans[c].to_pylist() for c in columns), strict=True))


def _merge(table: pa.Table, candidates: pd.DataFrame) -> pa.Table:
    """The table with the candidates' groups (voter, message) resolved again: rows that
    stop being the latest of their group removed, new latest rows added, ORDER kept."""
    columns = list(VOTE_TABLE_SCHEMA.names)
    touched = _mask(table[VOTER_KEY], pa.array(candidates[VOTER_KEY].unique(), pa.int64()))
    (where,) = np.nonzero(touched)
    old = table.take(pa.array(where)).to_pandas()
    both = pd.concat(
        [old.assign(_old=True), candidates[columns].assign(_old=False)], ignore_index=True
    )
    both = both.sort_values(list(ORDER), kind="mergesort").drop_duplicates(EVENT_ID, keep="first")
    both = both[~pd.Series(_voters(both), index=both.index).duplicated(keep="last")]
    stays = both.loc[both["_old"], EVENT_ID]
    added = pa.Table.from_pandas(
        both.loc[~both["_old"], columns], schema=VOTE_TABLE_SCHEMA, preserve_index=False
    )
    kept = _drop_rows(table, where[~old[EVENT_ID].isin(stays).to_numpy(bool)])
    if not (kept.num_rows and added.num_rows) or _position(kept, -1) < _position(added, 0):
        return pa.concat_tables([kept, added])
    # Votes older than the newest kept (a partition lagging behind): sort the kept rows
    # from the oldest added vote's time on with them, not the whole table.
    times = pc.cast(kept[TS], pa.int64()).to_numpy()
    cut = int(np.searchsorted(times, pc.cast(added[TS], pa.int64())[0].as_py(), side="left"))
    tail = pa.concat_tables([kept.slice(cut), added]).sort_by([(c, "ascending") for c in ORDER])
    return pa.concat_tables([kept.slice(0, cut), tail])


def _drop_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """The table without `rows` (sorted positions): slices of its record batches
    between them, not a copy (a night removes thousands of rows from millions)."""
    if not len(rows):
        return table
    pieces = []
    start = 0
    for batch in table.to_batches():
        end = start + batch.num_rows
        lo, hi = np.searchsorted(rows, [start, end])
        local = rows[lo:hi] - start
        starts = np.concatenate([[0], local + 1])
        ends = np.concatenate([local, [batch.num_rows]])
        pieces += [batch.slice(a, b - a) for a, b in zip(starts, ends, strict=True) if b > a]
        start = end
    return pa.Table.from_batches(pieces, schema=table.schema)


def _position(table: pa.Table, row: int) -> tuple:
    row = row % table.num_rows
    return tuple(table[c][row].as_py() for c in ORDER)


def _new_texts(fresh: pd.DataFrame, table: pa.Table) -> pa.Table:
    """The texts of the new events' examples that the table has no key for yet."""
    with_key = fresh[fresh[EXAMPLE_KEY].notna()].drop_duplicates(EXAMPLE_KEY)
    keys = pa.array(with_key[EXAMPLE_KEY], pa.binary(16))
    texts = with_key[~_mask(keys, table[EXAMPLE_KEY])]
    prompt = texts[PROMPT]
    # As a snapshot keeps them: the messages only when there is no prompt.
    texts = texts.assign(**{MESSAGES_JSON: texts[MESSAGES_JSON].where(prompt.isna())})
    return pa.Table.from_pandas(
        texts[list(TEXT_SCHEMA.names)], schema=TEXT_SCHEMA, preserve_index=False
    )


def _next_state(
    state: VoteState, rows: pa.Table, files: Iterable[tuple[str, int, int, int]], fresh: int
) -> VoteState:
    """The state after folding in `rows` (ORDER and INGESTED_AT at least), read from
    `files`, of which `fresh` are events not seen before."""
    parts = {(p.topic, p.partition): p for p in state.partitions}
    for topic, partition, _first, last in files:
        old = parts.get((topic, partition)) or PartitionFold(topic, partition, -1, None, None, 0)
        parts[(topic, partition)] = replace(old, folded_to=max(old.folded_to, last))
    read = rows.group_by([KAFKA_TOPIC, KAFKA_PARTITION], use_threads=False).aggregate(
        [
            (KAFKA_OFFSET, "min"),
            (KAFKA_OFFSET, "max"),
            (KAFKA_OFFSET, "count", pc.CountOptions(mode="all")),
        ]
    )
    aggregates = (f"{KAFKA_OFFSET}_{f}" for f in ("min", "max", "count"))
    columns = [KAFKA_TOPIC, KAFKA_PARTITION, *aggregates]
    for topic, partition, lo, hi, size in zip(*(read[c].to_pylist() for c in columns), strict=True):
        old = parts[(topic, partition)]
        parts[(topic, partition)] = replace(
            old,
            first_read=lo if old.first_read is None else min(old.first_read, lo),
            last_read=hi if old.last_read is None else max(old.last_read, hi),
            rows_read=old.rows_read + size,
        )
    ingested, oldest = state.ingested_to_us, state.read_from_us
    if rows.num_rows:
        # Both are microseconds since the epoch (records.FEEDBACK_SCHEMA).
        newest = pc.max(rows[INGESTED_AT].cast(pa.int64())).as_py()
        ingested = newest if ingested is None else max(ingested, newest)
        first = pc.min(rows[TS].cast(pa.int64())).as_py()
        oldest = first if oldest is None else min(oldest, first)
    return VoteState(
        generation=state.generation + 1,
        partitions=tuple(sorted(parts.values(), key=lambda p: (p.topic, p.partition))),
        ingested_to_us=ingested,
        events=state.events + fresh,
        read_from_us=oldest,
    )


def counted_keys(table: pa.Table) -> pa.Array:
    """The example keys the table's counted votes name: the texts a snapshot needs."""
    mask = pc.and_(is_counted(table), pc.is_valid(table[EXAMPLE_KEY]))
    return pc.unique(table[EXAMPLE_KEY].filter(mask).combine_chunks())


def is_counted(table: pa.Table) -> pa.ChunkedArray:
    """Which of the table's votes count: neither retracted nor unlabelled (a neutral
    rating), with a text to train on or not."""
    retracted = pc.fill_null(pc.equal(table[FEEDBACK], _RETRACT), False)
    return pc.and_(pc.invert(retracted), pc.is_valid(table[DESIRABLE]))


def snapshot_from_votes(
    table: pa.Table, texts: pa.Table, state: VoteState, options: SnapshotOptions | None = None
) -> Snapshot:
    """The snapshot of the votes of a vote table: one labelled example per (prompt or
    messages, completion) of its counted votes with a text, its stats and the feedback
    window of `state`.

    Args:
        table: the vote table (VOTE_TABLE_SCHEMA) of `state`, sorted by ORDER.
        texts: rows of TEXT_SCHEMA holding at least the texts of `counted_keys(table)`
            (more, and repeats, are fine).

    Raises:
        NothingToSnapshot: nothing folded yet, or no labelled example left.
    """
    options = options or SnapshotOptions()
    if state.rows_read == 0:
        raise NothingToSnapshot("no feedback rows to build a snapshot from; ingest feedback first")
    retracted = pc.fill_null(pc.equal(table[FEEDBACK], _RETRACT), False)
    labelled = pc.is_valid(table[DESIRABLE])
    counted_mask = is_counted(table)
    has_text = pc.is_valid(table[EXAMPLE_KEY])
    # The table is kept in ORDER: its counted votes come oldest first. They are found
    # by position, not copied: a night's table holds millions.
    rows = np.flatnonzero(pc.and_(counted_mask, has_text).to_numpy(zero_copy_only=False))
    stats = SnapshotStats(
        rows_read=state.rows_read,
        duplicates=state.rows_read - state.events,
        superseded=state.events - table.num_rows,
        retracted=_count(retracted),
        unlabelled=_count(pc.and_(pc.invert(retracted), pc.invert(labelled)))
        + _count(pc.and_(counted_mask, pc.invert(has_text))),
        votes=len(rows),
    )
    liked = pc.fill_null(table[DESIRABLE], False).to_numpy(zero_copy_only=False)[rows]
    examples = _examples(table, rows, liked, texts, options)
    snapshot = label_examples(examples, SOURCE_FEEDBACK, options, stats)
    return replace(snapshot, window=_window(state, table, rows, liked))


def snapshot_of_rows(rows: pa.Table, options: SnapshotOptions | None = None) -> Snapshot:
    """The snapshot of store rows read whole (an import's events, a file of stored
    rows): folded into an empty vote table, then built from it.

    Args:
        rows: store rows (records.FEEDBACK_SCHEMA), in any order.

    Raises:
        SnapshotError: the rows lack a column the fold reads.
        NothingToSnapshot: no rows, or no labelled example in them.
    """
    missing = [c for c in FOLD_COLUMNS if c not in rows.column_names]
    if missing:
        raise SnapshotError(
            f"feedback rows lack the columns {missing} (found {sorted(rows.column_names)}); "
            "pass the store's rows as FeedbackStore.read_arrow() gives them"
        )
    fold = fold_rows(rows)
    return snapshot_from_votes(fold.table, fold.texts, fold.state, options)


def _count(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Per row, the index of its value among the distinct ones; and those values."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary


def _examples(
    table: pa.Table,
    rows: np.ndarray,
    liked: np.ndarray,
    texts: pa.Table,
    options: SnapshotOptions | None = None,
) -> pd.DataFrame:
    """One row per example of the votes at `rows` (oldest first): the conversation is
    the first vote's, the adapter the latest vote's. With a half-life in `options`,
    also each example's votes weighted by age and the weight of its newest vote."""
    codes, keys = _codes(table[EXAMPLE_KEY].take(pa.array(rows)))
    n = len(keys)
    first = np.empty(n, dtype=np.int64)
    first[codes[::-1]] = rows[::-1]  # the last write wins: the first vote
    last = np.empty(n, dtype=np.int64)
    last[codes] = rows
    votes_liked = np.bincount(codes, liked.astype(np.int64), n).astype(np.int64)
    keep_nulls = pc.ScalarAggregateOptions(skip_nulls=False, min_count=0)
    unique_texts = texts.group_by(EXAMPLE_KEY, use_threads=False).aggregate(
        [(c, "first", keep_nulls) for c in (PROMPT, MESSAGES_JSON, RESPONSE)]
    )
    at = pc.index_in(keys, value_set=unique_texts[EXAMPLE_KEY])
    if at.null_count:
        raise ValueError(f"the texts of {at.null_count} examples were not given")
    text = unique_texts.take(at)
    weighted = {}
    if options is not None and options.weighs_recency:
        weight = recency_weights(table, rows, options)
        newest = np.empty(n, dtype=np.int64)
        newest[codes] = np.arange(len(rows))  # the last write wins: the newest vote
        liked_weight = np.bincount(codes, weight * liked, n)
        weighted = {
            WEIGHTED_DESIRABLE: liked_weight,
            WEIGHTED_UNDESIRABLE: np.bincount(codes, weight, n) - liked_weight,
            RECENCY: weight[newest],
        }
    return pd.DataFrame(
        {
            **weighted,
            PROMPT: text[f"{PROMPT}_first"].to_pandas(),
            MESSAGES_JSON: text[f"{MESSAGES_JSON}_first"].to_pandas(),
            COMPLETION: text[f"{RESPONSE}_first"].to_pandas(),
            CONVERSATION_ID: table[CONVERSATION_ID].take(pa.array(first)).to_pandas(),
            ADAPTER: table[ADAPTER].take(pa.array(last)).to_pandas(),
            VOTES_DESIRABLE: votes_liked,
            VOTES_UNDESIRABLE: np.bincount(codes, minlength=n).astype(np.int64) - votes_liked,
        }
    )


def recency_weights(table: pa.Table, rows: np.ndarray, options: SnapshotOptions) -> np.ndarray:
    """Each counted vote's weight, 2^(-age / half-life): its age in days before the
    newest vote, or in votes cast after it (`rows` oldest first, as the table keeps them)."""
    if options.half_life_votes is not None:
        age = np.arange(len(rows) - 1, -1, -1, dtype=np.float64)
        return np.exp2(-age / options.half_life_votes)
    assert options.half_life_days is not None
    times = table[TS].take(pa.array(rows)).cast(pa.int64()).to_numpy(zero_copy_only=False)
    days = (times[-1] - times).astype(np.float64) / 86_400e6 if len(times) else times
    return np.exp2(-days / options.half_life_days)


def _window(
    state: VoteState, table: pa.Table, rows: np.ndarray, liked: np.ndarray
) -> FeedbackWindow:
    """The feedback window of the rows read (as the state says) and the votes counted."""
    topics, topic_names = _codes(table[KAFKA_TOPIC])
    topics = topics[rows]
    partition_of = table[KAFKA_PARTITION].to_numpy()[rows]
    offsets = table[KAFKA_OFFSET].to_numpy()[rows]
    partitions = []
    for p in state.partitions:
        if not p.rows_read:
            continue
        names = topic_names.to_pylist()
        code = names.index(p.topic) if p.topic in names else -1
        mine = offsets[(topics == code) & (partition_of == p.partition)]
        partitions.append(
            PartitionWindow(
                topic=p.topic,
                partition=p.partition,
                first_read=int(p.first_read or 0),
                last_read=int(p.last_read or 0),
                rows_read=p.rows_read,
                first_counted=int(mine.min()) if len(mine) else None,
                last_counted=int(mine.max()) if len(mine) else None,
                votes=len(mine),
            )
        )
    times = table[TS]
    return FeedbackWindow(
        partitions=tuple(partitions),
        # In ORDER, the first counted vote is the oldest and the last the newest.
        votes_from=_iso_us(times[int(rows[0])].as_py()) if len(rows) else None,
        votes_to=_iso_us(times[int(rows[-1])].as_py()) if len(rows) else None,
        ingested_to=_iso_us(state.ingested_to_us),
        read_from=_iso_us(state.read_from_us),
        votes_desirable=int(liked.sum()),
        votes_undesirable=len(rows) - int(liked.sum()),
        by_adapter=_by_adapter(table, rows, liked),
    )


def _by_adapter(table: pa.Table, rows: np.ndarray, liked: np.ndarray) -> tuple[AdapterVotes, ...]:
    # A missing or empty adapter is the base model, as votes_window counts it.
    codes, names = _codes(pc.fill_null(table[ADAPTER], ""))
    codes = codes[rows]
    total = np.bincount(codes, minlength=len(names))
    liked_by = np.bincount(codes, liked.astype(np.int64), len(names)).astype(np.int64)
    votes = (
        AdapterVotes(name or None, int(liked_by[i]), int(total[i] - liked_by[i]))
        for i, name in enumerate(names.to_pylist())
        if total[i]
    )
    return tuple(sorted(votes, key=lambda a: (-a.votes, a.adapter or "")))


def _iso_us(value: Any) -> str | None:
    """ISO 8601 of a time (a datetime, or microseconds since the epoch)."""
    if value is None:
        return None
    stamp = pd.Timestamp(value, unit="us", tz="UTC") if isinstance(value, int) else value
    return pd.Timestamp(stamp).to_pydatetime().isoformat()
