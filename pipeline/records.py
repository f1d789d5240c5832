"""The stored tables: feedback rows and dead letters, their columns and Arrow schemas.

Every column name used anywhere in kto-loop is defined here once. Rows carry their
Kafka provenance (topic, partition, offset), which is what makes the store
idempotent: an offset is stored in exactly one file.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.events import FeedbackEvent

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

_EVENT_FIELDS = (
    EVENT_ID, TS, CONVERSATION_ID, MESSAGE_ID, USER_HASH, PROMPT, MESSAGES_JSON,
    RESPONSE, FEEDBACK, RATING, DESIRABLE, MODEL, ADAPTER, SCHEMA,
)  # fmt: skip


@dataclass
class Provenance:
    """Where a message came from in Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None


@dataclass
class FeedbackRows:
    """Column-wise accumulator of feedback rows for one partition's batch; building
    columns directly is what keeps ingestion near the raw consume rate."""

    columns: dict[str, list] = field(
        default_factory=lambda: {name: [] for name in FEEDBACK_SCHEMA.names}
    )

    def __len__(self) -> int:
        return len(self.columns[EVENT_ID])

    def append(self, event: FeedbackEvent, source: Provenance) -> None:
        cols = self.columns
        for name in _EVENT_FIELDS:
            cols[name].append(getattr(event, name))
        _append_provenance(cols, source)

    def to_table(self, ingested_at: dt.datetime, ingested_by: str) -> pa.Table:
        return _finish(self.columns, FEEDBACK_SCHEMA, ingested_at, ingested_by)


@dataclass
class DeadLetterRows:
    """Column-wise accumulator of dead letters for one partition's batch."""

    columns: dict[str, list] = field(
        default_factory=lambda: {name: [] for name in DEAD_LETTER_SCHEMA.names}
    )

    def __len__(self) -> int:
        return len(self.columns[REASON])

    def append(
        self,
        source: Provenance,
        key: bytes | None,
        value: bytes | None,
        headers_json: str,
        error_kind: str,
        reason: str,
    ) -> None:
        cols = self.columns
        _append_provenance(cols, source)
        cols[KEY].append(key)
        cols[VALUE].append(value)
        cols[HEADERS_JSON].append(headers_json)
        cols[ERROR_KIND].append(error_kind)
        cols[REASON].append(reason)

    def to_table(self, ingested_at: dt.datetime, ingested_by: str) -> pa.Table:
        return _finish(self.columns, DEAD_LETTER_SCHEMA, ingested_at, ingested_by)


def _append_provenance(cols: dict[str, list], source: Provenance) -> None:
    cols[KAFKA_TOPIC].append(source.topic)
    cols[KAFKA_PARTITION].append(source.partition)
    cols[KAFKA_OFFSET].append(source.offset)
    cols[KAFKA_TIMESTAMP].append(source.timestamp_ms)


def _finish(
    cols: dict[str, list], schema: pa.Schema, ingested_at: dt.datetime, ingested_by: str
) -> pa.Table:
    n = len(cols[KAFKA_OFFSET])
    arrays = []
    for f in schema:
        if f.name == INGESTED_AT:
            arrays.append(pa.array([ingested_at] * n, type=f.type))
        elif f.name == INGESTED_BY:
            arrays.append(pa.array([ingested_by] * n, type=f.type))
        else:
            arrays.append(pa.array(cols[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)
