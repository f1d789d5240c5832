"""The dead-letter topic: messages kto-loop could not store, with the reason in headers.

Each dead letter keeps the original key and headers, and the value with its user ids
hashed in place or, when it is not JSON, sealed (pipeline/feedback/redact.py), plus:

    kto.error.kind       stable short code (not_json, missing_field, too_large, ...)
    kto.error.reason     what was wrong, for a person
    kto.source.topic / kto.source.partition / kto.source.offset / kto.source.timestamp
    kto.truncated        "true" when the value was cut to fit the topic's size limit
                         (the store's dead_letters table keeps it whole)

The store's dead-letter table holds the same records, so the topic is for alerting
and replay tooling, the table is the durable copy.

The topic is at-least-once: a batch's dead letters are sent before its files are
written, so a crash in between (or a batch whose store write kept failing) sends them
again when the batch is read again. Consumers of the topic should expect a dead
letter twice and key it by kto.source.topic/partition/offset; the store's table
holds each once.
"""

from __future__ import annotations

from kafka import KafkaProducer
from kafka.errors import KafkaError

from pipeline.feedback.records import DeadLetter

KIND = "kto.error.kind"
REASON = "kto.error.reason"
SOURCE_TOPIC = "kto.source.topic"
SOURCE_PARTITION = "kto.source.partition"
SOURCE_OFFSET = "kto.source.offset"
SOURCE_TIMESTAMP = "kto.source.timestamp"
TRUNCATED = "kto.truncated"

# Room left in a produce request for key, headers and batch framing.
_OVERHEAD = 16 * 1024


class DeadLetterError(RuntimeError):
    """Dead letters could not be written to the dead-letter topic."""


class DeadLetterTopic:
    """add() queues a dead letter; flush() returns once all are acknowledged, or raises."""

    def __init__(self, producer: KafkaProducer, topic: str, max_message_bytes: int) -> None:
        self._producer = producer
        self.topic = topic
        self._max_value = max(0, max_message_bytes - _OVERHEAD)
        self._pending: list = []

    def add(self, letter: DeadLetter) -> None:
        source = letter.source
        ours = [
            (KIND, letter.error_kind.encode()),
            (REASON, letter.reason.encode("utf-8", "replace")[:4096]),
            (SOURCE_TOPIC, source.topic.encode()),
            (SOURCE_PARTITION, str(source.partition).encode()),
            (SOURCE_OFFSET, str(source.offset).encode()),
        ]
        if source.timestamp_ms is not None:
            ours.append((SOURCE_TIMESTAMP, str(source.timestamp_ms).encode()))
        value = letter.value
        if value is not None and len(value) > self._max_value:
            value = value[: self._max_value]
            ours.append((TRUNCATED, b"true"))
        headers = [*letter.headers, *ours]
        self._pending.append(
            self._producer.send(self.topic, key=letter.key, value=value, headers=headers)
        )

    def flush(self, timeout_seconds: float = 30.0) -> int:
        """Wait until every queued dead letter is acknowledged; return how many."""
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        self._producer.flush(timeout=timeout_seconds)
        for future in pending:
            try:
                future.get(timeout=timeout_seconds)
            except KafkaError as exc:
                raise DeadLetterError(
                    f"could not write to dead-letter topic {self.topic}: {exc}"
                ) from exc
        return len(pending)

    def discard(self) -> None:
        """Forget queued dead letters of a batch that will be consumed again."""
        self._pending = []
