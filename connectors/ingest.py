"""Ingestion: feedback events from a Kafka consumer group into the feedback store.

The loop, per batch (closed by count or by time):

    poll -> parse each message (pipeline.events) -> rows or dead letters
    -> dead letters acknowledged by the DLQ topic -> dead-letter files -> feedback files
    -> commit offset+1 per partition

Offsets are committed only after the batch is durable, so a crash at any point
re-delivers at most the uncommitted batch. Re-delivery cannot duplicate rows: when
a partition is assigned, the store is asked which offsets it already holds
(`FeedbackStore.recover_partition`) and the consumer seeks past them.

Rebalance callbacks run on kafka-python's IO thread; they only record what changed,
and the consuming thread acts on it after poll returns (discarding the unstored
batch of a revoked partition, which its next owner reads again).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from connectors import kafka_clients
from connectors.config import Settings
from connectors.dead_letters import DeadLetterError, DeadLetterTopic
from connectors.store import DEAD_LETTERS, FEEDBACK, FeedbackStore, StoreError
from pipeline.events import EventError, RatingPolicy, parse_event
from pipeline.records import DeadLetterRows, FeedbackRows, Provenance

log = logging.getLogger(__name__)

# Produce requests must fit the largest dead letter plus its headers.
_PRODUCE_OVERHEAD = 64 * 1024


class IngestError(RuntimeError):
    """Ingestion cannot go on; the message says why and what to check."""


@dataclass
class IngestStats:
    """Counters of one ingest process; read by the CLI's status line and by tests."""

    consumed: int = 0
    stored: int = 0
    dead_lettered: int = 0
    batches: int = 0
    skipped_already_stored: int = 0
    lag: int | None = None
    assigned: tuple[str, ...] = ()
    state: str = "starting"
    started: float = field(default_factory=time.monotonic)


@dataclass
class _PartitionBatch:
    first: int
    last: int = -1
    rows: FeedbackRows = field(default_factory=FeedbackRows)
    dead: DeadLetterRows = field(default_factory=DeadLetterRows)
    dead_letters: list = field(default_factory=list)


class _RebalanceLog(ConsumerRebalanceListener):
    """Records assignment changes from kafka-python's IO thread, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes: list[tuple[str, set[TopicPartition]]] = []

    def on_partitions_revoked(self, revoked):  # type: ignore[override]
        with self._lock:
            self._changes.append(("revoked", set(revoked)))

    def on_partitions_assigned(self, assigned):  # type: ignore[override]
        with self._lock:
            self._changes.append(("assigned", set(assigned)))

    def drain(self) -> list[tuple[str, set[TopicPartition]]]:
        with self._lock:
            changes, self._changes = self._changes, []
        return changes


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter("ktoloop_ingest_consumed", "Messages consumed", registry=r)
        self.stored = Counter("ktoloop_ingest_stored", "Feedback rows stored", registry=r)
        self.dead = Counter("ktoloop_ingest_dead_lettered", "Messages dead-lettered", registry=r)
        self.batches = Counter("ktoloop_ingest_batches", "Batches committed", registry=r)
        self.lag = Gauge("ktoloop_ingest_lag", "Messages behind the high watermark", registry=r)


class Ingestor:
    """Consumes the feedback topic into the store until asked to stop."""

    def __init__(self, settings: Settings, store: FeedbackStore | None = None) -> None:
        events = settings.events
        if events.user_hash_key is None:
            raise IngestError(
                "[events] user_hash_key is not set: set KTO_LOOP_EVENTS__USER_HASH_KEY to a "
                "random secret (e.g. `openssl rand -hex 32`) and keep it stable; user ids "
                "are stored only as a hash keyed by it"
            )
        self.settings = settings
        self.store = store or FeedbackStore(settings.store.url, settings.store.storage_options)
        self.stats = IngestStats()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._key = events.user_hash_key.get_secret_value().encode()
        self._policy = RatingPolicy(events.rating_desirable_min, events.rating_undesirable_max)
        self._max_bytes = settings.ingest.max_event_bytes
        self._rebalances = _RebalanceLog()
        self._batches: dict[TopicPartition, _PartitionBatch] = {}
        self._batch_started: float | None = None
        self._next: dict[TopicPartition, int] = {}
        self._owned: set[TopicPartition] = set()
        self._metrics = _Metrics()

    # -- the loop ---------------------------------------------------------------

    def run(
        self, stop: threading.Event | None = None, idle_exit_seconds: float | None = None
    ) -> IngestStats:
        """Consume until `stop` is set (or, with idle_exit_seconds, until the assigned
        partitions have been quiet that long), store the last batch, commit, close.

        Raises:
            BrokerUnavailable: the broker stayed away past [ingest] connect_timeout_seconds.
            IngestError: the store or the dead-letter topic kept failing.
        """
        stop = stop or threading.Event()
        cfg = self.settings
        if cfg.ingest.metrics_port:
            start_http_server(cfg.ingest.metrics_port, registry=self._metrics.registry)
        self.stats.state = "waiting for broker"
        wait = {"timeout_seconds": cfg.ingest.connect_timeout_seconds, "should_stop": stop.is_set}
        if cfg.kafka.create_topics:
            topics = [cfg.kafka.topic, cfg.kafka.dead_letter_topic]
            kafka_clients.wait_for_broker(
                lambda: kafka_clients.ensure_topics(cfg.kafka, topics), cfg.kafka, **wait
            )
        consumer = kafka_clients.wait_for_broker(
            lambda: kafka_clients.consumer(
                cfg.kafka,
                max_partition_fetch_bytes=max(1 << 20, cfg.ingest.max_event_bytes),
                fetch_max_bytes=max(64 << 20, 2 * cfg.ingest.max_event_bytes),
            ),
            cfg.kafka,
            **wait,
        )
        producer = kafka_clients.producer(
            cfg.kafka, max_request_size=cfg.ingest.dlq_max_message_bytes + _PRODUCE_OVERHEAD
        )
        dlq = DeadLetterTopic(
            producer, cfg.kafka.dead_letter_topic, cfg.ingest.dlq_max_message_bytes
        )
        log.info(
            "ingesting %s (group %s) into %s; dead letters to %s",
            cfg.kafka.topic, cfg.kafka.group_id, self.store.url, dlq.topic,
        )  # fmt: skip
        try:
            consumer.subscribe([cfg.kafka.topic], listener=self._rebalances)
            self.stats.state = "joining group"
            self._consume(consumer, dlq, stop, idle_exit_seconds)
            self.stats.state = "stopping"
            self._flush(consumer, dlq)
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=10)
            self.stats.state = "stopped"
        log.info(
            "stopped: consumed=%d stored=%d dead_lettered=%d batches=%d",
            self.stats.consumed, self.stats.stored, self.stats.dead_lettered, self.stats.batches,
        )  # fmt: skip
        return self.stats

    def _consume(
        self,
        consumer: KafkaConsumer,
        dlq: DeadLetterTopic,
        stop: threading.Event,
        idle_exit_seconds: float | None,
    ) -> None:
        cfg = self.settings.ingest
        last_activity = time.monotonic()
        next_log = time.monotonic() + cfg.log_interval_seconds
        next_lag = 0.0
        while not stop.is_set():
            timeout = 0.5
            if self._batch_started is not None:
                left = self._batch_started + cfg.batch_max_seconds - time.monotonic()
                timeout = max(0.0, min(timeout, left))
            polled = consumer.poll(timeout_ms=int(timeout * 1000), max_records=cfg.batch_max_events)
            if self._apply_rebalances(consumer):
                last_activity = time.monotonic()
            for tp, messages in polled.items():
                self._add(tp, messages)
                last_activity = time.monotonic()
            now = time.monotonic()
            if self._batches and (
                self._pending() >= cfg.batch_max_events
                or now - (self._batch_started or now) >= cfg.batch_max_seconds
            ):
                self._flush(consumer, dlq)
            if now >= next_lag:
                self._update_lag(consumer)
                next_lag = now + 1.0
            if now >= next_log:
                self._log_progress()
                next_log = now + cfg.log_interval_seconds
            if (
                idle_exit_seconds is not None
                and self._owned
                and not self._batches
                and now - last_activity >= idle_exit_seconds
            ):
                log.info("no new events for %.1f s; exiting as asked", idle_exit_seconds)
                return

    # -- per message --------------------------------------------------------------

    def _add(self, tp: TopicPartition, messages: list) -> None:
        if tp not in self._owned:
            return
        floor = self._next.get(tp, -1)
        batch = self._batches.get(tp)
        key, policy, max_bytes = self._key, self._policy, self._max_bytes
        for m in messages:
            offset = m.offset
            if offset < floor:
                self.stats.skipped_already_stored += 1
                continue
            if batch is None:
                batch = self._batches[tp] = _PartitionBatch(first=offset)
                if self._batch_started is None:
                    self._batch_started = time.monotonic()
            source = Provenance(tp.topic, tp.partition, offset, m.timestamp)
            try:
                event = parse_event(
                    m.value, user_hash_key=key, rating_policy=policy, max_bytes=max_bytes
                )
            except EventError as exc:
                headers = list(m.headers or [])
                batch.dead.append(
                    source, m.key, m.value, _headers_json(headers), exc.kind, exc.message
                )
                batch.dead_letters.append((source, m.key, m.value, headers, exc.kind, exc.message))
            else:
                batch.rows.append(event, source)
            batch.last = offset
        if batch is not None and batch.last >= 0:
            self._next[tp] = batch.last + 1
        self.stats.consumed += len(messages)
        self._metrics.consumed.inc(len(messages))

    def _pending(self) -> int:
        return sum(b.last - b.first + 1 for b in self._batches.values())

    # -- durability ---------------------------------------------------------------

    def _flush(self, consumer: KafkaConsumer, dlq: DeadLetterTopic) -> None:
        batches = {tp: b for tp, b in self._batches.items() if b.last >= b.first}
        if not batches:
            self._batches.clear()
            self._batch_started = None
            return
        retrying = Retrying(
            retry=retry_if_exception_type((StoreError, DeadLetterError, OSError, KafkaError)),
            wait=wait_exponential(multiplier=0.5, max=10),
            stop=stop_after_attempt(6),
            before_sleep=lambda s: log.warning(
                "storing a batch failed (%s); retrying", s.outcome.exception() if s.outcome else "?"
            ),
            reraise=True,
        )
        try:
            retrying(self._make_durable, batches, dlq)
        except (StoreError, DeadLetterError, OSError, KafkaError) as exc:
            raise IngestError(
                f"could not store a batch after 6 attempts: {exc}. Nothing was committed; "
                "restarting re-reads it. Check the store URL and credentials and the "
                "dead-letter topic."
            ) from exc
        self._commit(consumer, {tp: b.last + 1 for tp, b in batches.items()})
        stored = sum(len(b.rows) for b in batches.values())
        dead = sum(len(b.dead) for b in batches.values())
        self.stats.stored += stored
        self.stats.dead_lettered += dead
        self.stats.batches += 1
        self._metrics.stored.inc(stored)
        self._metrics.dead.inc(dead)
        self._metrics.batches.inc()
        self._batches.clear()
        self._batch_started = None

    def _make_durable(
        self, batches: dict[TopicPartition, _PartitionBatch], dlq: DeadLetterTopic
    ) -> None:
        now = dt.datetime.now(dt.UTC)
        dlq.discard()
        for batch in batches.values():
            for letter in batch.dead_letters:
                dlq.add(*letter)
        dlq.flush()
        for tp, b in batches.items():
            if len(b.dead):
                table = b.dead.to_table(now, self.name)
                self.store.write_batch(DEAD_LETTERS, tp.topic, tp.partition, b.first, b.last, table)
        # Feedback files last: their presence marks the whole batch durable.
        for tp, b in batches.items():
            table = b.rows.to_table(now, self.name)
            self.store.write_batch(FEEDBACK, tp.topic, tp.partition, b.first, b.last, table)

    def _commit(self, consumer: KafkaConsumer, positions: dict[TopicPartition, int]) -> None:
        offsets = {tp: OffsetAndMetadata(pos, "", -1) for tp, pos in positions.items()}
        retrying = Retrying(
            retry=retry_if_exception_type(KafkaError),
            wait=wait_exponential(multiplier=0.5, max=5),
            stop=stop_after_attempt(8),
            reraise=True,
        )
        try:
            retrying(consumer.commit, offsets)
        except CommitFailedError:
            # The group moved the partitions elsewhere mid-batch. The batch is stored;
            # the new owner finds it in the store and starts after it.
            log.warning("offset commit refused after a rebalance; the batch is stored")
        except KafkaError as exc:
            log.warning(
                "offset commit failed (%s); the stored batch will be skipped on restart", exc
            )

    # -- assignment ---------------------------------------------------------------

    def _apply_rebalances(self, consumer: KafkaConsumer) -> bool:
        changes = self._rebalances.drain()
        for kind, partitions in changes:
            if kind == "revoked":
                for tp in partitions:
                    # Not stored, not committed: the partition's next owner reads it again.
                    self._batches.pop(tp, None)
                    self._next.pop(tp, None)
                self._owned -= partitions
                if not self._batches:
                    self._batch_started = None
            else:
                for tp in sorted(partitions):
                    self._take_partition(consumer, tp)
                self._owned |= partitions
        if changes:
            self.stats.assigned = tuple(f"{tp.topic}[{tp.partition}]" for tp in sorted(self._owned))
            self.stats.state = "consuming" if self._owned else "no partitions assigned"
            log.info("assigned partitions: %s", ", ".join(self.stats.assigned) or "none")
        return bool(changes)

    def _take_partition(self, consumer: KafkaConsumer, tp: TopicPartition) -> None:
        durable_next = self.store.recover_partition(tp.topic, tp.partition)
        committed = consumer.committed(tp)
        self._next.pop(tp, None)
        if durable_next is not None and (committed is None or durable_next > committed):
            log.info(
                "%s[%d]: store holds offsets up to %d beyond the committed %s; seeking past them",
                tp.topic, tp.partition, durable_next - 1, committed,
            )  # fmt: skip
            consumer.seek(tp, durable_next)
            self._next[tp] = durable_next
            self._commit(consumer, {tp: durable_next})

    # -- reporting ----------------------------------------------------------------

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        lag = 0
        known = False
        for tp in self._owned:
            high = consumer.highwater(tp)
            if high is None:
                continue
            position = self._next.get(tp)
            if position is None:
                continue
            lag += max(0, high - position)
            known = True
        self.stats.lag = lag if known else None
        if known:
            self._metrics.lag.set(lag)

    def _log_progress(self) -> None:
        s = self.stats
        log.info(
            "consumed=%d stored=%d dead_lettered=%d batches=%d lag=%s partitions=%s",
            s.consumed, s.stored, s.dead_lettered, s.batches, s.lag, ",".join(s.assigned),
        )  # fmt: skip


def _headers_json(headers: list[tuple[str, bytes]]) -> str:
    return json.dumps([[k, v.decode("utf-8", "replace") if v else None] for k, v in headers])
