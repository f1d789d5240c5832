"""Ingestion against a real Kafka-protocol broker: every event stored exactly once
through crashes, rebalances, bad messages and an absent broker."""

from __future__ import annotations

import gc
import json
import random
import re
import threading
import urllib.request
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from connectors.feedback.ingest import Ingestor
from connectors.feedback.produce import produce
from connectors.feedback.store import DEAD_LETTERS, FEEDBACK, FeedbackStore
from deploy.local.broker import free_port, start_broker
from pipeline.feedback import records
from pipeline.feedback.events import HASHED_USER_ID, hash_user
from pipeline.feedback.redact import SEALED, redact_value, unseal_value
from pipeline.feedback.sample import encode, malformed_samples, odd_valid_samples, sample_events
from tests.conftest import (
    HASH_KEY,
    KafkaSetup,
    assert_each_offset_in_exactly_one_file,
    committed_offsets,
    wait_until,
)

pytestmark = pytest.mark.broker


def send_events(setup: KafkaSetup, n: int, seed: int = 0) -> list[dict]:
    events = list(sample_events(n, seed))
    produce(setup.settings().kafka, [encode(e) for e in events])
    return events


def run_in_thread(ingestor: Ingestor) -> tuple[threading.Thread, threading.Event, list]:
    stop, errors = threading.Event(), []

    def target() -> None:
        try:
            ingestor.run(stop)
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, stop, errors


def test_n_events_in_exactly_n_rows_out(kafka_setup: KafkaSetup) -> None:
    events = send_events(kafka_setup, 3000)
    collector = gc.get_threshold()
    ingestor = Ingestor(kafka_setup.settings())
    thread, stop, errors = run_in_thread(ingestor)
    wait_until(lambda: ingestor.stats.stored >= 3000 or errors, 90, "3000 stored rows")
    stop.set()
    thread.join(30)
    assert not errors and not thread.is_alive()
    # The consumer loop collects young objects less often, and puts that back after.
    assert gc.get_threshold() == collector

    rows = ingestor.store.read()
    assert len(rows) == 3000
    assert set(rows[records.EVENT_ID]) == {e["event_id"] for e in events}
    assert rows[records.USER_HASH].str.len().eq(32).all()
    assert not rows[records.USER_HASH].isin({e["user_id"] for e in events}).any()
    assert ingestor.stats.dead_lettered == 0
    assert_each_offset_in_exactly_one_file(ingestor.store, kafka_setup.topic)
    per_partition = rows.groupby(records.KAFKA_PARTITION)[records.KAFKA_OFFSET].max() + 1
    assert committed_offsets(kafka_setup) == per_partition.to_dict()


def test_sigkilled_consumer_restarts_without_losing_or_duplicating(
    kafka_setup: KafkaSetup, ingest_processes, tmp_path: Path
) -> None:
    n = 6000
    events = send_events(kafka_setup, n, seed=1)
    config = kafka_setup.config_file(batch_max_events=200, batch_max_seconds=0.2)
    store = FeedbackStore(str(kafka_setup.tmp / "store"))
    rng = random.Random(7)
    # Kill points: once during the group join, then at random fill levels of the
    # store, i.e. right after a batch file landed, often before its commit.
    thresholds = sorted(rng.sample(range(200, n - 500), 4))
    proc = ingest_processes(config, tmp_path / "ingest-0.log")
    wait_until(lambda: "ingesting" in proc.log(), 60, "the consumer to start")
    proc.kill()
    for i, threshold in enumerate(thresholds, start=1):
        proc = ingest_processes(config, tmp_path / f"ingest-{i}.log")
        wait_until(lambda t=threshold: store.count() >= t, 120, f"{threshold} stored rows")
        proc.kill()
    proc = ingest_processes(config, tmp_path / "ingest-final.log")
    wait_until(lambda: store.count() >= n, 120, f"all {n} rows")
    code, _ = proc.terminate()
    assert code == 0, proc.log()

    rows = store.read()
    assert len(rows) == n, "events lost or stored twice"
    assert set(rows[records.EVENT_ID]) == {e["event_id"] for e in events}
    assert_each_offset_in_exactly_one_file(store, kafka_setup.topic)
    logs = "".join((tmp_path / f"ingest-{i}.log").read_text() for i in range(1, 5))
    assert "Traceback" not in logs


def test_two_consumers_in_one_group_split_the_partitions(
    kafka_setup: KafkaSetup, ingest_processes, tmp_path: Path
) -> None:
    config = kafka_setup.config_file()
    a = ingest_processes(config, tmp_path / "a.log")
    b = ingest_processes(config, tmp_path / "b.log")

    def assignments() -> list[set[str]] | None:
        found = []
        for p in (a, b):
            lines = re.findall(r"assigned partitions: (.*)", p.log())
            if not lines or lines[-1] == "none":
                return None
            found.append(set(lines[-1].split(", ")))
        return found if not found[0] & found[1] else None

    parts = wait_until(assignments, 90, "both consumers to hold disjoint partitions")
    assert len(parts[0] | parts[1]) == kafka_setup.partitions
    n = 3000
    events = send_events(kafka_setup, n, seed=2)
    store = FeedbackStore(str(kafka_setup.tmp / "store"))
    wait_until(lambda: store.count() >= n, 90, f"{n} stored rows")
    assert a.terminate()[0] == 0 and b.terminate()[0] == 0

    rows = store.read()
    assert len(rows) == n
    assert set(rows[records.EVENT_ID]) == {e["event_id"] for e in events}
    writers = rows.groupby(records.INGESTED_BY)[records.KAFKA_PARTITION].unique()
    assert len(writers) == 2, "both consumers stored a share"
    shares = [set(p) for p in writers]
    assert not shares[0] & shares[1]


def test_malformed_messages_are_dead_lettered_and_the_consumer_keeps_going(
    kafka_setup: KafkaSetup,
) -> None:
    kafka_setup.create_topics(partitions=1)
    bad = malformed_samples()
    odd = odd_valid_samples()
    good = list(sample_events(40, seed=3))
    # An event just under the size limit is stored like any other.
    big = {**good[0], "event_id": "big", "response": ""}
    big["response"] = "x" * ((1 << 20) - len(json.dumps(big).encode()))
    odd["just_under_max_event_bytes"] = json.dumps(big).encode()
    assert len(odd["just_under_max_event_bytes"]) == 1 << 20
    messages = [encode(e) for e in good[:20]]
    messages += [(f"bad-{kind}".encode(), raw) for kind, raw in bad.items()]
    messages += [(f"odd-{name}".encode(), raw) for name, raw in odd.items()]
    messages += [encode(e) for e in good[20:]]
    settings = kafka_setup.settings()
    produce(settings.kafka, messages, topic=kafka_setup.topic)

    ingestor = Ingestor(settings)
    thread, stop, errors = run_in_thread(ingestor)
    expected = len(good) + len(odd)
    wait_until(
        lambda: ingestor.stats.stored >= expected or errors, 90, "the good events after the bad"
    )
    stop.set()
    thread.join(30)
    assert not errors

    stored = ingestor.store.read().set_index(records.EVENT_ID)
    sent = {json.loads(raw.removeprefix(b"\xef\xbb\xbf"))["event_id"]: raw for raw in odd.values()}
    assert set(stored.index) == {e["event_id"] for e in good} | set(sent)
    for event_id, raw in sent.items():
        original = json.loads(raw.removeprefix(b"\xef\xbb\xbf"))
        row = stored.loc[event_id]
        assert row[records.RESPONSE] == original["response"], event_id
        if "messages" in original:
            assert json.loads(row[records.MESSAGES_JSON]) == original["messages"], event_id
    dead = ingestor.store.read(DEAD_LETTERS).set_index(records.ERROR_KIND)
    assert set(dead.index) == set(bad)
    for kind, raw in bad.items():
        row = dead.loc[kind]
        # The whole raw bytes, even 5 MB, with the user id hashed (or all sealed).
        assert _replayable(row[records.VALUE] or b"") == _replayable(redact_value(raw, KEY)), kind
        assert row[records.KEY] == f"bad-{kind}".encode()
        assert row[records.REASON]
        assert row[records.KAFKA_OFFSET] == 20 + list(bad).index(kind)
    assert ingestor.stats.dead_lettered == len(bad)

    consumer = KafkaConsumer(
        settings.kafka.dead_letter_topic,
        bootstrap_servers=kafka_setup.broker.bootstrap,
        auto_offset_reset="earliest",
        fetch_max_bytes=16 << 20,
    )
    letters: dict[str, object] = {}
    try:
        wait_until(
            lambda: (
                [
                    letters.update({dict(m.headers)["kto.error.kind"].decode(): m})
                    for batch in consumer.poll(500).values()
                    for m in batch
                ]
                and len(letters) == len(bad)
            ),
            60,
            "every dead letter on the DLQ topic",
        )
    finally:
        consumer.close()
    for kind, message in letters.items():
        headers = dict(message.headers)
        assert headers["kto.error.reason"]
        assert headers["kto.source.topic"].decode() == kafka_setup.topic
        assert int(headers["kto.source.offset"]) == 20 + list(bad).index(kind)
        assert message.key == f"bad-{kind}".encode()
        if kind == "too_large":
            assert headers["kto.truncated"] == b"true"
            assert redact_value(bad[kind], KEY).startswith(message.value)
        else:
            assert _replayable(message.value or b"") == _replayable(redact_value(bad[kind], KEY))


KEY = HASH_KEY.encode()


def _replayable(value: bytes) -> bytes:
    """A dead letter's value as replay sends it: unsealed when sealed (sealing draws a
    new nonce each time)."""
    return unseal_value(value, KEY)


def test_dead_letters_hold_no_plaintext_user_id_and_replay_as_the_same_user(
    kafka_setup: KafkaSetup,
) -> None:
    kafka_setup.create_topics(partitions=1)
    user = "ann@example.com"
    vote = next(sample_events(1, seed=5)) | {"user_id": user, "event_id": "good"}
    no_model = {k: v for k, v in vote.items() if k != "model"} | {"event_id": "fixed-later"}
    form = f"user_id={user}&feedback=like".encode()  # not JSON: sealed whole
    settings = kafka_setup.settings()
    messages = [encode(vote), (b"c", json.dumps(no_model, indent=1).encode()), (b"c", form)]
    produce(settings.kafka, messages, topic=kafka_setup.topic)
    ingestor = Ingestor(settings)
    thread, stop, errors = run_in_thread(ingestor)
    try:
        wait_until(
            lambda: (ingestor.stats.dead_lettered >= 2 and ingestor.stats.stored >= 1) or errors,
            90,
            "the vote stored and two dead letters",
        )
        dead = ingestor.store.read(DEAD_LETTERS).set_index(records.ERROR_KIND)
        values = {kind: bytes(v) for kind, v in dead[records.VALUE].items()}
        assert set(values) == {"missing_field", "not_json"}
        assert all(user.encode() not in v for v in values.values()), values
        assert values["not_json"].startswith(SEALED)
        assert unseal_value(values["not_json"], KEY) == form
        letter = json.loads(values["missing_field"])
        assert letter["user_id"] == HASHED_USER_ID + hash_user(user, KEY)
        # Replayed once its producer's bug is fixed: the same user as the vote sent whole.
        replay = json.dumps(letter | {"model": vote["model"]}).encode()
        produce(settings.kafka, [(b"c", replay)], topic=kafka_setup.topic)
        wait_until(lambda: ingestor.stats.stored >= 2 or errors, 90, "the replayed letter")
    finally:
        stop.set()
        thread.join(30)
    assert not errors and not thread.is_alive()
    users = ingestor.store.read().set_index(records.EVENT_ID)[records.USER_HASH]
    assert users["fixed-later"] == users["good"] == hash_user(user, KEY)


def test_crash_after_a_batch_is_stored_but_before_its_commit(kafka_setup: KafkaSetup) -> None:
    # Fake fault, named as such: the store raises right after the first feedback file
    # landed, so the process dies between "durable" and "committed". Random SIGKILLs
    # hit this window only sometimes; this test hits it every time.
    class CrashAfterFirstFeedbackFile(BaseException):
        pass

    real = FeedbackStore(str(kafka_setup.tmp / "store"))

    class CrashingStore:
        def __getattr__(self, name: str):
            return getattr(real, name)

        def write_batch(self, table, *args):
            path = real.write_batch(table, *args)
            if table == FEEDBACK:
                raise CrashAfterFirstFeedbackFile(path)
            return path

    kafka_setup.create_topics(partitions=1)
    settings = kafka_setup.settings(batch_max_events=100)
    events = send_events(kafka_setup, 1000, seed=4)
    with pytest.raises(CrashAfterFirstFeedbackFile):
        Ingestor(settings, store=CrashingStore()).run(threading.Event())
    assert real.count() == 100
    assert committed_offsets(kafka_setup)[0] is None

    ingestor = Ingestor(settings, store=real)
    thread, stop, errors = run_in_thread(ingestor)
    wait_until(lambda: real.count() >= 1000 or errors, 90, "1000 stored rows")
    stop.set()
    thread.join(30)
    assert not errors
    assert ingestor.stats.stored == 900, "the stored batch was not read again"
    rows = real.read()
    assert sorted(rows[records.EVENT_ID]) == sorted(e["event_id"] for e in events)
    assert_each_offset_in_exactly_one_file(real, kafka_setup.topic)
    assert committed_offsets(kafka_setup)[0] == 1000


def test_sigterm_finishes_the_batch_commits_and_exits_zero(
    kafka_setup: KafkaSetup, ingest_processes, tmp_path: Path
) -> None:
    metrics_port = free_port()
    config = kafka_setup.config_file(
        batch_max_events=100_000,
        batch_max_seconds=3600,
        log_interval_seconds=0.2,
        metrics_port=metrics_port,
    )
    proc = ingest_processes(config, tmp_path / "ingest.log")
    wait_until(lambda: "assigned partitions: fb" in proc.log(), 90, "partitions assigned")
    send_events(kafka_setup, 500, seed=5)
    wait_until(lambda: "consumed=500 stored=0" in proc.log(), 60, "500 consumed, none stored")

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    assert "ktoloop_ingest_consumed_total 500.0" in metrics
    assert "ktoloop_ingest_stored_total 0.0" in metrics

    code, out = proc.terminate()
    assert code == 0, proc.log()
    assert json.loads(out.strip().splitlines()[-1]) == {
        "consumed": 500,
        "stored": 500,
        "dead_lettered": 0,
        "batches": 1,
    }
    store = FeedbackStore(str(kafka_setup.tmp / "store"))
    assert store.count() == 500
    rows = store.read()
    per_partition = rows.groupby(records.KAFKA_PARTITION)[records.KAFKA_OFFSET].max() + 1
    assert committed_offsets(kafka_setup) == per_partition.to_dict()


def test_broker_down_at_start_is_logged_retried_then_consumed(
    ingest_processes, tmp_path: Path
) -> None:
    port = free_port()

    class Later:
        bootstrap = f"127.0.0.1:{port}"

    setup = KafkaSetup(Later(), tmp_path, "fb-late", "g-late")  # type: ignore[arg-type]
    proc = ingest_processes(setup.config_file(), tmp_path / "ingest.log")
    wait_until(
        lambda: proc.log().count(f"Kafka broker not reachable at 127.0.0.1:{port}") >= 2,
        60,
        "two logged connection retries",
    )
    assert proc.process.poll() is None, "gave up instead of retrying"

    late = start_broker(port, log_path=tmp_path / "late-broker.log")
    try:
        setup.broker = late
        wait_until(
            lambda: "assigned partitions: fb-late" in proc.log(), 120, "the consumer to join"
        )
        send_events(setup, 200, seed=6)
        store = FeedbackStore(str(tmp_path / "store"))
        wait_until(lambda: store.count() >= 200, 60, "200 stored rows")
        assert proc.terminate()[0] == 0
        assert store.count() == 200
    finally:
        late.stop()


def test_a_batch_closes_at_its_byte_limit_before_its_event_limit(kafka_setup: KafkaSetup) -> None:
    kafka_setup.create_topics(partitions=1)
    events = list(sample_events(120, seed=5, pad_to=1000))
    messages = [encode(e) for e in events]
    size = max(len(k) + len(v) for k, v in messages)
    limit = 10 * size
    settings = kafka_setup.settings(batch_max_bytes=limit, batch_max_events=10_000)
    produce(settings.kafka, messages, topic=kafka_setup.topic)

    ingestor = Ingestor(settings)
    thread, stop, errors = run_in_thread(ingestor)
    wait_until(lambda: ingestor.stats.stored >= 120 or errors, 90, "120 stored rows")
    stop.set()
    thread.join(30)
    assert not errors
    files = ingestor.store.batch_files(FEEDBACK, kafka_setup.topic, 0)
    sizes = [len(k) + len(v) for k, v in messages]
    assert sum(f.last - f.first + 1 for f in files) == 120
    assert len(files) >= 120 * min(sizes) // limit
    for f in files:
        # Under the limit until its last message, which took it to the limit (a batch
        # may also close on time, before it is full).
        assert sum(sizes[f.first : f.last]) < limit, (f.first, f.last)
    assert_each_offset_in_exactly_one_file(ingestor.store, kafka_setup.topic)
