"""The stored tables: feedback rows, dead letters and training snapshots, their columns
and Arrow schemas.

Every column name used anywhere in kto-loop is defined here once. Rows carry their
Kafka provenance (topic, partition, offset), which is what makes the store
idempotent: an offset is stored in exactly one file.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from msgspec.structs import astuple

from pipeline.feedback.events import FeedbackEvent

# Feedback columns.
EVENT_ID = "event_id"
TS = "ts"
CONVERSATION_ID = "conversation_id"
MESSAGE_ID = "message_id"
USER_HASH = "user_hash"
PROMPT = "prompt"
MESSAGES_JSON = "messages_json"
RESPONSE = "response"
FEEDBACK = "feedback"
RATING = "rating"
DESIRABLE = "desirable"
MODEL = "model"
ADAPTER = "adapter"
SCHEMA = "schema"
# Provenance, on both tables.
KAFKA_TOPIC = "kafka_topic"
KAFKA_PARTITION = "kafka_partition"
KAFKA_OFFSET = "kafka_offset"
KAFKA_TIMESTAMP = "kafka_timestamp"
INGESTED_AT = "ingested_at"
INGESTED_BY = "ingested_by"
# Dead-letter columns.
KEY = "key"
VALUE = "value"
HEADERS_JSON = "headers_json"
ERROR_KIND = "error_kind"
REASON = "reason"
# The vote table's key to an example's text (pipeline/feedback/votes.py).
EXAMPLE_KEY = "example_key"
# A 64-bit hash of a vote's (voter, message), to find a group's rows in the vote table.
VOTER_KEY = "voter_key"
# Training-snapshot columns (besides prompt, messages_json, desirable, conversation_id
# and adapter above): one row per (prompt, completion) with its majority label.
COMPLETION = "completion"
SPLIT = "split"
VOTES_DESIRABLE = "votes_desirable"
VOTES_UNDESIRABLE = "votes_undesirable"
SOURCE = "source"
# TRL's dataset columns: unpaired KTO (prompt, completion, label) and paired
# preference (prompt, chosen, rejected).
LABEL = "label"
CHOSEN = "chosen"
REJECTED = "rejected"

_UTC_US = pa.timestamp("us", tz="UTC")
_UTC_MS = pa.timestamp("ms", tz="UTC")

_PROVENANCE = [
    pa.field(KAFKA_TOPIC, pa.string(), nullable=False),
    pa.field(KAFKA_PARTITION, pa.int32(), nullable=False),
    pa.field(KAFKA_OFFSET, pa.int64(), nullable=False),
    pa.field(KAFKA_TIMESTAMP, _UTC_MS),
    pa.field(INGESTED_AT, _UTC_US, nullable=False),
    pa.field(INGESTED_BY, pa.string()),
]

FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field(EVENT_ID, pa.string(), nullable=False),
        pa.field(TS, _UTC_US, nullable=False),
        pa.field(CONVERSATION_ID, pa.string(), nullable=False),
        pa.field(MESSAGE_ID, pa.string(), nullable=False),
        pa.field(USER_HASH, pa.string()),
        pa.field(PROMPT, pa.string()),
        pa.field(MESSAGES_JSON, pa.string()),
        pa.field(RESPONSE, pa.string()),
        pa.field(FEEDBACK, pa.string(), nullable=False),
        pa.field(RATING, pa.int8()),
        pa.field(DESIRABLE, pa.bool_()),
        pa.field(MODEL, pa.string()),
        pa.field(ADAPTER, pa.string()),
        pa.field(SCHEMA, pa.int16(), nullable=False),
        *_PROVENANCE,
    ]
)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        *_PROVENANCE,
        pa.field(KEY, pa.binary()),
        pa.field(VALUE, pa.binary()),
        pa.field(HEADERS_JSON, pa.string()),
        pa.field(ERROR_KIND, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
    ]
)

# A frozen training snapshot. Exactly one of prompt / messages_json is set per row;
# messages_json is a JSON list of {"role", "content"} prompt turns. `split` is "train"
# or "heldout"; `source` is "feedback", "trl-unpaired" or "trl-paired".
TRAINING_SCHEMA = pa.schema(
    [
        pa.field(PROMPT, pa.string()),
        pa.field(MESSAGES_JSON, pa.string()),
        pa.field(COMPLETION, pa.string(), nullable=False),
        pa.field(DESIRABLE, pa.bool_(), nullable=False),
        pa.field(CONVERSATION_ID, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(VOTES_DESIRABLE, pa.int32(), nullable=False),
        pa.field(VOTES_UNDESIRABLE, pa.int32(), nullable=False),
        pa.field(ADAPTER, pa.string()),
        pa.field(SOURCE, pa.string(), nullable=False),
    ]
)
TRAINING_COLUMNS = tuple(TRAINING_SCHEMA.names)

# FeedbackEvent's fields, in its order.
_EVENT_FIELDS = FeedbackEvent.__struct_fields__
# The columns that vary per row, in a poll's chunk of a batch.
_CHUNK_SCHEMA = pa.schema(
    [FEEDBACK_SCHEMA.field(n) for n in (*_EVENT_FIELDS, KAFKA_OFFSET, KAFKA_TIMESTAMP)]
)


@dataclass
class Provenance:
    """Where a message came from in Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be stored: where it came from, its key, value and
    headers as received, and why (for the dead-letter topic and table)."""

    source: Provenance
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    error_kind: str  # a stable short code: not_json, missing_field, too_large, ...
    reason: str  # what was wrong, for a person


class FeedbackRows:
    """Feedback rows of one partition's batch.

    Events are turned into Arrow columns a poll's worth at a time (`seal`), while
    their strings are still in the CPU cache: converting a whole batch at write
    time reads every string back from memory and costs three times as much.

    With `clock_skew`, an event's ts is clamped to at most its Kafka record's timestamp,
    or `clock()` (Unix seconds) at the seal when that is earlier or absent, plus the
    skew: the producer's `ts` decides the order of a voter's votes only within it.
    """

    def __init__(
        self,
        topic: str,
        partition: int,
        clock_skew: dt.timedelta | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self._skew_ms = None if clock_skew is None else int(clock_skew.total_seconds() * 1000)
        self._clock = clock
        self._chunks: list[pa.RecordBatch] = []
        self._rows = 0
        self._events: list[FeedbackEvent] = []
        self._offsets: list[int] = []
        self._timestamps: list[int | None] = []

    def __len__(self) -> int:
        return self._rows + len(self._events)

    def append(self, event: FeedbackEvent, offset: int, timestamp_ms: int | None) -> None:
        self._events.append(event)
        self._offsets.append(offset)
        self._timestamps.append(timestamp_ms)

    def seal(self) -> list[tuple[int, str]]:
        """Convert the rows appended since the last seal into Arrow columns.

        Returns:
            (offset, reason) of each row the columns cannot hold (a value Arrow
            refuses); those rows are left out, for the caller to dead-letter. One odd
            event never sinks the rest of its batch.
        """
        if not self._events:
            return []
        events, offsets, timestamps = self._events, self._offsets, self._timestamps
        self._events, self._offsets, self._timestamps = [], [], []
        latest = None
        if self._skew_ms is not None and self._clock is not None:
            latest = (int(self._clock() * 1000), self._skew_ms)
        rejected: list[tuple[int, str]] = []
        try:
            chunks = [_chunk(events, offsets, timestamps, latest)]
        except _UNSTORABLE:
            chunks = []
            for row in zip(events, offsets, timestamps, strict=True):
                try:
                    chunks.append(_chunk([row[0]], [row[1]], [row[2]], latest))
                except _UNSTORABLE as exc:
                    rejected.append((row[1], f"the store cannot hold this event: {exc}"))
        self._chunks += chunks
        self._rows += sum(c.num_rows for c in chunks)
        return rejected

    def to_table(self, ingested_at: dt.datetime, ingested_by: str) -> pa.Table:
        rejected = self.seal()
        if rejected:
            # Never drop a row silently: callers that can dead-letter seal() first.
            raise ValueError(f"rows at offsets {[o for o, _ in rejected]} cannot be stored")
        rows = pa.Table.from_batches(self._chunks, schema=_CHUNK_SCHEMA)
        constants = {
            KAFKA_TOPIC: self.topic,
            KAFKA_PARTITION: self.partition,
            INGESTED_AT: ingested_at,
            INGESTED_BY: ingested_by,
        }
        return _assemble(FEEDBACK_SCHEMA, {n: rows[n] for n in rows.column_names}, constants)


# What Arrow raises for a value its column type cannot hold.
_UNSTORABLE = (pa.ArrowException, OverflowError, UnicodeError, ValueError, TypeError)


def _chunk(
    events: list[FeedbackEvent],
    offsets: list[int],
    timestamps: list[int | None],
    latest: tuple[int, int] | None,
) -> pa.RecordBatch:
    """The rows' columns; with `latest` = (now, skew) in ms, each ts clamped to at most
    min(its record's timestamp, now) + skew."""
    # One sequence per field, transposed in C (zip of the events' tuples).
    columns = dict(zip(_EVENT_FIELDS, zip(*map(astuple, events), strict=True), strict=True))
    columns[KAFKA_OFFSET] = offsets
    columns[KAFKA_TIMESTAMP] = timestamps
    arrays = {f.name: pa.array(columns[f.name], type=f.type) for f in _CHUNK_SCHEMA}
    if latest is not None:
        now_ms, skew_ms = latest
        # kafka-python gives -1 for a record without a timestamp.
        record_ms = arrays[KAFKA_TIMESTAMP].cast(pa.int64())
        record_ms = pc.if_else(pc.less(record_ms, 0), None, record_ms)
        bound_ms = pc.add(pc.min_element_wise(record_ms, now_ms), skew_ms)
        ts_us = pc.min_element_wise(arrays[TS].cast(pa.int64()), pc.multiply(bound_ms, 1000))
        arrays[TS] = ts_us.cast(_UTC_US)
    return pa.RecordBatch.from_arrays(list(arrays.values()), schema=_CHUNK_SCHEMA)


@dataclass
class DeadLetterRows:
    """Column-wise accumulator of dead letters for one partition's batch."""

    columns: dict[str, list] = field(
        default_factory=lambda: {name: [] for name in DEAD_LETTER_SCHEMA.names}
    )

    def __len__(self) -> int:
        return len(self.columns[REASON])

    def append(self, letter: DeadLetter) -> None:
        cols = self.columns
        _append_provenance(cols, letter.source)
        cols[KEY].append(letter.key)
        cols[VALUE].append(letter.value)
        cols[HEADERS_JSON].append(
            json.dumps(
                [[k, v.decode("utf-8", "replace") if v else None] for k, v in letter.headers]
            )
        )
        cols[ERROR_KIND].append(letter.error_kind)
        cols[REASON].append(letter.reason)

    def to_table(self, ingested_at: dt.datetime, ingested_by: str) -> pa.Table:
        constants = {INGESTED_AT: ingested_at, INGESTED_BY: ingested_by}
        columns = {**self.columns, VALUE: _binary_without_copies(self.columns[VALUE])}
        return _assemble(DEAD_LETTER_SCHEMA, columns, constants)


# A dead letter this large is not copied into Arrow: its column chunk is a view of the
# message's own bytes, so a batch of large letters is never held twice.
_VIEW_BYTES = 64 * 1024


def _binary_without_copies(values: list[bytes | None]) -> pa.ChunkedArray:
    """A binary column of `values`: small ones copied together into one chunk, each
    large one a zero-copy view of its bytes."""
    chunks: list[pa.Array] = []
    small: list[bytes | None] = []
    for value in values:
        if value is None or len(value) < _VIEW_BYTES:
            small.append(value)
            continue
        if small:
            chunks.append(pa.array(small, type=pa.binary()))
            small = []
        offsets = pa.array([0, len(value)], type=pa.int32()).buffers()[1]
        chunks.append(pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(value)]))
    if small or not chunks:
        chunks.append(pa.array(small, type=pa.binary()))
    return pa.chunked_array(chunks, type=pa.binary())


def _append_provenance(cols: dict[str, list], source: Provenance) -> None:
    cols[KAFKA_TOPIC].append(source.topic)
    cols[KAFKA_PARTITION].append(source.partition)
    cols[KAFKA_OFFSET].append(source.offset)
    cols[KAFKA_TIMESTAMP].append(source.timestamp_ms)


def _assemble(schema: pa.Schema, columns: dict, constants: dict[str, object]) -> pa.Table:
    """A table of `schema` from per-row columns (lists or Arrow arrays, with a
    kafka_offset column) and values that are the same on every row."""
    n = len(columns[KAFKA_OFFSET])
    arrays = [
        pa.repeat(pa.scalar(constants[f.name], type=f.type), n)
        if f.name in constants
        else _as_arrow(columns[f.name], f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _as_arrow(values: object, type_: pa.DataType) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values
    return pa.array(values, type=type_)
