"""Ingestion: feedback events from a Kafka consumer group into the feedback store.

The loop, per batch (closed by count or by time):

    poll -> parse each message (pipeline.feedback.events) -> rows or dead letters
    -> [writer thread] dead letters acknowledged by the DLQ topic
       -> dead-letter files -> feedback files
    -> commit offset+1 per partition, once the writer says the batch is durable

One batch is in flight on the writer thread while the next one is consumed, so
Parquet encoding, fsync and the DLQ round trip overlap with fetching. Offsets are
committed only after their batch is durable, so a crash at any point re-delivers
at most the uncommitted batches. Re-delivery cannot duplicate rows: when a
partition is assigned, the store is asked which offsets it already holds
(`FeedbackStore.recover_partition`) and the consumer seeks past them; so the
store, not the committed offset, is the record of what is done.

Rebalance callbacks run on kafka-python's IO thread. On revocation the callback
waits for the batch in flight to be durable (so the partition's next owner finds
it in the store); everything else is recorded and acted on by the consuming
thread after poll returns (discarding the unstored batch of a revoked partition,
which its next owner reads again).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import os
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from connectors.config import Settings
from connectors.faults import crash_point
from connectors.feedback import kafka_clients
from connectors.feedback.dead_letters import DeadLetterError, DeadLetterTopic
from connectors.feedback.store import DEAD_LETTERS, FEEDBACK, FeedbackStore, StoreError
from pipeline.feedback.events import EventError, EventParser
from pipeline.feedback.records import DeadLetter, DeadLetterRows, FeedbackRows, Provenance
from pipeline.feedback.redact import redact_value

log = logging.getLogger(__name__)

# Produce requests must fit the largest dead letter plus its headers.
_PRODUCE_OVERHEAD = 64 * 1024
# A revocation (or a failing run) waits this long for the batch in flight; the store
# write has its own retries, and kafka-python's heartbeats pause meanwhile.
_IN_FLIGHT_WAIT_SECONDS = 60.0
# Drain everything fetched in one poll: kafka-python sends the next fetch only once
# its buffer is empty, so the fetch then runs while this poll's records are parsed
# instead of after. The fetch size bounds what one poll brings.
_POLL_RECORDS = 1_000_000


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
    # time.monotonic() when partitions were last assigned to this process.
    assigned_at: float | None = None
    state: str = "starting"


@dataclass
class _InFlight:
    """A batch on the writer thread, and what to commit once it is durable."""

    future: Future
    positions: dict[TopicPartition, int]
    stored: int
    dead: int
    dead_kinds: Tally[str]


class _PartitionBatch:
    def __init__(self, tp: TopicPartition, first: int, clock_skew: dt.timedelta) -> None:
        self.first = first
        self.last = -1
        # Votes dated past their record's timestamp (or the clock) by more than the
        # skew are clamped to it (connectors/feedback/voters.py: the time model).
        self.rows = FeedbackRows(tp.topic, tp.partition, clock_skew, time.time)
        # Bytes of the keys and values taken into the batch.
        self.bytes = 0
        # For the DLQ topic and the table.
        self.dead_letters: list[DeadLetter] = []


class _RebalanceLog(ConsumerRebalanceListener):
    """Records assignment changes from kafka-python's IO thread, in order; a
    revocation first waits for the batch in flight to be durable."""

    def __init__(self, wait_in_flight: Callable[[], None], stats: IngestStats) -> None:
        self._lock = threading.Lock()
        self._changes: list[tuple[str, set[TopicPartition]]] = []
        self._wait_in_flight = wait_in_flight
        self._stats = stats

    def on_partitions_revoked(self, revoked):  # type: ignore[override]
        self._wait_in_flight()
        with self._lock:
            self._changes.append(("revoked", set(revoked)))

    def on_partitions_assigned(self, assigned):  # type: ignore[override]
        if assigned:
            self._stats.assigned_at = time.monotonic()
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
        self.dead_kinds = Counter(
            "ktoloop_ingest_dead_lettered_by_kind",
            "Messages dead-lettered, by kind (not_json, missing_field, too_large, ...)",
            ["kind"],
            registry=r,
        )
        self.batches = Counter("ktoloop_ingest_batches", "Batches committed", registry=r)
        self.lag = Gauge("ktoloop_ingest_lag", "Messages behind the high watermark", registry=r)


# Allocations between two collections of the youngest generation while consuming
# (Python's default is 700; see _young_collections_rarer).
_GC_YOUNG_THRESHOLD = 50_000


@contextlib.contextmanager
def _young_collections_rarer() -> Iterator[None]:
    """While consuming, collect the youngest generation every 50,000 allocations, not
    every 700. Each event allocates a dozen short-lived containers, freed by reference
    counting; with the default threshold the collector walks the young objects (and
    promotes the open batch's) every ~60 events. The threshold is the process's, and
    the process may do other work: it is put back when the loop ends."""
    before = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


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
        self._clock_skew = dt.timedelta(seconds=settings.events.clock_skew_seconds)
        self.store = store or FeedbackStore(settings.store.url, settings.store.storage_options)
        self.stats = IngestStats()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._parse = EventParser(
            events.user_hash_key.get_secret_value().encode(),
            events,
            settings.ingest.max_event_bytes,
        )
        self._user_hash_key = events.user_hash_key.get_secret_value().encode()
        self._rebalances = _RebalanceLog(self._wait_in_flight, self.stats)
        self._writer: ThreadPoolExecutor  # made by run()
        self._in_flight: _InFlight | None = None
        self._batches: dict[TopicPartition, _PartitionBatch] = {}
        self._batch_started: float | None = None
        # Messages and bytes taken into the open batches since the last close.
        self._pending_events = 0
        self._pending_bytes = 0
        self._next: dict[TopicPartition, int] = {}
        self._owned: set[TopicPartition] = set()
        self._metrics = _Metrics()

    # -- the loop ---------------------------------------------------------------

    def run(
        self,
        stop: threading.Event | None = None,
        idle_exit_seconds: float | None = None,
        until: Callable[[IngestStats], bool] | None = None,
    ) -> IngestStats:
        """Consume until `stop` is set, or `until(stats)` (asked after every poll, on
        this thread) is true, or with idle_exit_seconds until the assigned partitions
        have been quiet that long; then store the last batch, commit, close.

        Raises:
            BrokerUnavailable: the broker stayed away past [ingest] connect_timeout_seconds.
            IngestError: the store or the dead-letter topic kept failing.
        """
        stop = stop or threading.Event()
        cfg = self.settings
        if cfg.ingest.metrics_port:
            start_http_server(cfg.ingest.metrics_port, registry=self._metrics.registry)
        self.stats.state = "waiting for broker"
        patience = {
            "timeout_seconds": cfg.ingest.connect_timeout_seconds,
            "should_stop": stop.is_set,
        }
        if cfg.kafka.create_topics:
            topics = [cfg.kafka.topic, cfg.kafka.dead_letter_topic]
            kafka_clients.wait_for_broker(
                lambda: kafka_clients.ensure_topics(cfg.kafka, topics), cfg.kafka, **patience
            )
        consumer = kafka_clients.wait_for_broker(
            lambda: kafka_clients.consumer(
                cfg.kafka,
                max_partition_fetch_bytes=max(1 << 20, cfg.ingest.max_event_bytes),
                fetch_max_bytes=max(64 << 20, 2 * cfg.ingest.max_event_bytes),
            ),
            cfg.kafka,
            **patience,
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
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kto-loop-store")
        try:
            consumer.subscribe([cfg.kafka.topic], listener=self._rebalances)
            self.stats.state = "joining group"
            with _young_collections_rarer():
                self._consume(consumer, dlq, stop, idle_exit_seconds, until)
            self.stats.state = "stopping"
            self._close_batch(consumer, dlq)
            self._finish_in_flight(consumer)
        finally:
            in_flight, self._in_flight = self._in_flight, None
            if in_flight is not None:
                # Failing out: let the write end so no file lands after we return,
                # but commit nothing more.
                wait([in_flight.future], timeout=_IN_FLIGHT_WAIT_SECONDS)
            consumer.close(autocommit=False)
            producer.close(timeout=10)
            self._writer.shutdown(wait=True)
            self.stats.state = "stopped"
        s = self.stats
        log.info(
            "stopped: consumed=%d stored=%d dead_lettered=%d batches=%d skipped_already_stored=%d",
            s.consumed, s.stored, s.dead_lettered, s.batches, s.skipped_already_stored,
        )  # fmt: skip
        return self.stats

    def _consume(
        self,
        consumer: KafkaConsumer,
        dlq: DeadLetterTopic,
        stop: threading.Event,
        idle_exit_seconds: float | None,
        until: Callable[[IngestStats], bool] | None,
    ) -> None:
        cfg = self.settings.ingest
        last_activity = time.monotonic()
        next_log = time.monotonic() + cfg.log_interval_seconds
        next_lag = 0.0
        while not stop.is_set() and not (until is not None and until(self.stats)):
            # Short polls while a batch is in flight, so its commit follows promptly.
            timeout = 0.5 if self._in_flight is None else 0.02
            if self._batch_started is not None:
                left = self._batch_started + cfg.batch_max_seconds - time.monotonic()
                timeout = max(0.0, min(timeout, left))
            polled = consumer.poll(timeout_ms=int(timeout * 1000), max_records=_POLL_RECORDS)
            if self._apply_rebalances(consumer):
                last_activity = time.monotonic()
            while polled:
                # Popped, so a partition's raw messages are freed once parsed rather
                # than held until the whole poll is done.
                tp, messages = polled.popitem()
                last_activity = time.monotonic()
                # A poll may bring more than a batch: cut it where the batch is full.
                start = 0
                while start < len(messages):
                    start = self._add(tp, messages, start)
                    if self._batch_full():
                        self._close_batch(consumer, dlq)
                del messages
            if self._in_flight is not None and self._in_flight.future.done():
                self._finish_in_flight(consumer)
            now = time.monotonic()
            if self._batches and (
                self._batch_full() or now - (self._batch_started or now) >= cfg.batch_max_seconds
            ):
                self._close_batch(consumer, dlq)
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
                and self._in_flight is None
                and now - last_activity >= idle_exit_seconds
            ):
                log.info("no new events for %.1f s; exiting as asked", idle_exit_seconds)
                return

    # -- per message --------------------------------------------------------------

    def _add(self, tp: TopicPartition, messages: list, start: int = 0) -> int:
        """Parse messages[start:] into the partition's open batch until the batch is
        full (by events or bytes); return the index of the first message not taken."""
        if tp not in self._owned:
            return len(messages)
        cfg = self.settings.ingest
        room_events = cfg.batch_max_events - self._pending_events
        room_bytes = cfg.batch_max_bytes - self._pending_bytes
        floor = self._next.get(tp, -1)
        batch = self._batches.get(tp)
        parse = self._parse
        end = start
        # Offsets below the floor are stored already: skipped, counted, never parsed.
        while end < len(messages) and messages[end].offset < floor:
            end += 1
        self.stats.skipped_already_stored += end - start
        if end < len(messages) and room_events > 0 and room_bytes > 0:
            if batch is None:
                batch = self._batches[tp] = _PartitionBatch(
                    tp, messages[end].offset, self._clock_skew
                )
                if self._batch_started is None:
                    self._batch_started = time.monotonic()
            append = batch.rows.append
            first = end
            # Kafka hands a partition's records in offset order, so once past the
            # floor every message is taken until the batch is full.
            for m in messages[first : first + room_events]:
                value = m.value
                room_bytes -= len(value or b"") + len(m.key or b"")
                end += 1
                try:
                    append(parse(value), m.offset, m.timestamp)
                except EventError as exc:
                    self._dead_letter(batch, tp, m, exc.kind, exc.message)
                if room_bytes <= 0:
                    break
            room_events -= end - first
            batch.bytes = cfg.batch_max_bytes - room_bytes - self._pending_bytes + batch.bytes
            batch.last = messages[end - 1].offset
            rejected = batch.rows.seal()
            if rejected:
                by_offset = {m.offset: m for m in messages[first:end]}
                for offset, reason in rejected:
                    self._dead_letter(batch, tp, by_offset[offset], "unstorable", reason)
            self._next[tp] = batch.last + 1
        taken = end - start
        self._pending_events = cfg.batch_max_events - room_events
        self._pending_bytes = cfg.batch_max_bytes - room_bytes
        self.stats.consumed += taken
        self._metrics.consumed.inc(taken)
        return end

    def _dead_letter(
        self, batch: _PartitionBatch, tp: TopicPartition, m, kind: str, reason: str
    ) -> None:
        source = Provenance(tp.topic, tp.partition, m.offset, m.timestamp)
        # The user id never reaches the topic or the store in plaintext (redact.py).
        value = redact_value(m.value, self._user_hash_key)
        letter = DeadLetter(source, m.key, value, tuple(m.headers or ()), kind, reason)
        batch.dead_letters.append(letter)

    def _batch_full(self) -> bool:
        cfg = self.settings.ingest
        return (
            self._pending_events >= cfg.batch_max_events
            or self._pending_bytes >= cfg.batch_max_bytes
        )

    # -- durability ---------------------------------------------------------------

    def _close_batch(self, consumer: KafkaConsumer, dlq: DeadLetterTopic) -> None:
        """Hand the open batch to the writer thread, after the one before it is
        durable and committed (at most one batch in flight bounds memory)."""
        batches = {tp: b for tp, b in self._batches.items() if b.last >= b.first}
        self._batches = {}
        self._batch_started = None
        self._pending_events = self._pending_bytes = 0
        if not batches:
            return
        self._finish_in_flight(consumer)
        future = self._writer.submit(self._make_durable_with_retries, batches, dlq)
        self._in_flight = _InFlight(
            future,
            {tp: b.last + 1 for tp, b in batches.items()},
            sum(len(b.rows) for b in batches.values()),
            sum(len(b.dead_letters) for b in batches.values()),
            Tally(d.error_kind for b in batches.values() for d in b.dead_letters),
        )

    def _finish_in_flight(self, consumer: KafkaConsumer) -> None:
        """Wait for the batch in flight to be durable, then commit it."""
        in_flight = self._in_flight
        if in_flight is None:
            return
        in_flight.future.result()  # raises IngestError; run() then commits nothing more
        self._in_flight = None
        owned = {tp: pos for tp, pos in in_flight.positions.items() if tp in self._owned}
        if owned:
            self._commit(consumer, owned)
        self.stats.stored += in_flight.stored
        self.stats.dead_lettered += in_flight.dead
        self.stats.batches += 1
        self._metrics.stored.inc(in_flight.stored)
        self._metrics.dead.inc(in_flight.dead)
        for kind, n in in_flight.dead_kinds.items():
            self._metrics.dead_kinds.labels(kind).inc(n)
        self._metrics.batches.inc()

    def _wait_in_flight(self) -> None:
        in_flight = self._in_flight
        if in_flight is not None:
            wait([in_flight.future], timeout=_IN_FLIGHT_WAIT_SECONDS)

    def _make_durable_with_retries(
        self, batches: dict[TopicPartition, _PartitionBatch], dlq: DeadLetterTopic
    ) -> None:
        """Send the batch's dead letters to the DLQ topic, then write its files, each
        retried on its own (a failing store does not send the dead letters again).

        Raises:
            IngestError: either kept failing; nothing of the batch is committed.
        """
        attempts = self.settings.ingest.store_attempts
        try:
            self._retrying("sending dead letters", (DeadLetterError, KafkaError))(
                self._send_dead_letters, batches, dlq
            )
        except (DeadLetterError, KafkaError) as exc:
            raise IngestError(
                f"could not send a batch's dead letters to {dlq.topic} after {attempts} "
                f"attempts: {exc}. Nothing was stored or committed; restarting re-reads the "
                "batch. Check that the dead-letter topic exists and accepts this client's writes."
            ) from exc
        try:
            self._retrying("storing a batch", (StoreError, OSError))(self._make_durable, batches)
        except (StoreError, OSError) as exc:
            raise IngestError(
                f"could not store a batch in {self.store.url} after {attempts} attempts: "
                f"{exc}. Nothing was committed; once the store is fixed, restart: the batch "
                "is read again (its dead letters, if any, reach the dead-letter topic again)."
            ) from exc

    def _retrying(self, what: str, errors: tuple[type[BaseException], ...]) -> Retrying:
        cfg = self.settings.ingest
        return Retrying(
            retry=retry_if_exception_type(errors),
            wait=wait_exponential(
                multiplier=cfg.store_retry_wait_seconds, max=max(10.0, cfg.store_retry_wait_seconds)
            ),
            stop=stop_after_attempt(cfg.store_attempts),
            before_sleep=lambda s: log.warning(
                "%s failed (attempt %d of %d): %s; retrying",
                what,
                s.attempt_number,
                cfg.store_attempts,
                s.outcome.exception() if s.outcome else "?",
            ),
            reraise=True,
        )

    @staticmethod
    def _send_dead_letters(
        batches: dict[TopicPartition, _PartitionBatch], dlq: DeadLetterTopic
    ) -> None:
        dlq.discard()
        for batch in batches.values():
            for letter in batch.dead_letters:
                dlq.add(letter)
        dlq.flush()

    def _make_durable(self, batches: dict[TopicPartition, _PartitionBatch]) -> None:
        # Crash points for tests (connectors/faults.py): a crash here leaves dead
        # letters on the DLQ topic and no file; recovery and the re-read batch settle
        # the store, and the DLQ topic holds those dead letters twice (at-least-once).
        crash_point("ingest.durable.1")
        now = dt.datetime.now(dt.UTC)
        for tp, b in batches.items():
            if b.dead_letters:
                dead = DeadLetterRows()
                for letter in b.dead_letters:
                    dead.append(letter)
                table = dead.to_table(now, self.name)
                self.store.write_batch(DEAD_LETTERS, tp.topic, tp.partition, b.first, b.last, table)
        crash_point("ingest.durable.2")
        # Feedback files last: their presence marks the whole batch durable.
        for tp, b in batches.items():
            table = b.rows.to_table(now, self.name)
            self.store.write_batch(FEEDBACK, tp.topic, tp.partition, b.first, b.last, table)
        crash_point("ingest.durable.3")  # durable, offsets not committed yet

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
                self._pending_events = sum(b.last - b.first + 1 for b in self._batches.values())
                self._pending_bytes = sum(b.bytes for b in self._batches.values())
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
        attempts = self.settings.ingest.store_attempts
        try:
            durable_next = self._retrying(
                f"settling {tp.topic}[{tp.partition}] in the store", (StoreError, OSError)
            )(self.store.recover_partition, tp.topic, tp.partition)
        except (StoreError, OSError) as exc:
            raise IngestError(
                f"could not settle {tp.topic}[{tp.partition}] in the store {self.store.url} "
                f"after {attempts} attempts: {exc}. Nothing of it was consumed or committed; "
                "once the store is fixed, restart."
            ) from exc
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
