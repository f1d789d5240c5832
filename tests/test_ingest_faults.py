"""`kto-loop ingest` against a real broker and real files when the process dies at a
named step of a batch write or of recovery, and when the store fails under it (a
read-only filesystem, a full disk): every event ends stored exactly once."""

from __future__ import annotations

import collections
import errno
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from connectors.faults import FAULT_EXIT_CODE, FAULT_POINT_ENV
from connectors.feedback.produce import produce
from connectors.feedback.store import DEAD_LETTERS, FEEDBACK, FeedbackStore
from pipeline.feedback import records
from pipeline.feedback.redact import unseal_value
from pipeline.feedback.sample import encode, sample_events
from tests.conftest import (
    HASH_KEY,
    IngestProcess,
    KafkaSetup,
    assert_each_offset_in_exactly_one_file,
    committed_offsets,
    wait_until,
)

pytestmark = pytest.mark.broker

# Small waits between store retries, so a failing store ends a run in well under a second.
FAST_RETRIES = {"store_attempts": 3, "store_retry_wait_seconds": 0.05}


def _values(letters) -> set[bytes]:
    """The raw values of dead letters (stored sealed: they are not JSON)."""
    return {unseal_value(v, HASH_KEY.encode()) for v in letters[records.VALUE]}


def send(setup: KafkaSetup, n: int, seed: int, bad_every: int = 0) -> tuple[set, set]:
    """Send n messages, every `bad_every`-th one malformed; return the good event ids
    and the bad raw values."""
    messages, good, bad = [], set(), set()
    for i, event in enumerate(sample_events(n, seed)):
        if bad_every and i % bad_every == bad_every - 1:
            raw = f"not json {seed}-{i}".encode()
            messages.append((event["conversation_id"].encode(), raw))
            bad.add(raw)
        else:
            messages.append(encode(event))
            good.add(event["event_id"])
    produce(setup.settings().kafka, messages, topic=setup.topic)
    return good, bad


def settle_and_check(setup: KafkaSetup) -> int:
    """On a copy of the store (the next run finds the original as the crash left it):
    recover every partition, as a restarted consumer does first, then check that each
    stored offset is in exactly one feedback row or one dead letter, the offsets of a
    partition run from 0 without a gap, and no dead letter lies past them. Returns the
    number of offsets stored."""
    copy = setup.tmp / f"store-copy-{uuid.uuid4().hex[:8]}"
    shutil.copytree(setup.tmp / "store", copy, ignore=shutil.ignore_patterns("filler"))
    store = FeedbackStore(str(copy))
    for p in range(setup.partitions):
        store.recover_partition(setup.topic, p)
    feedback = store.read_arrow(FEEDBACK)
    dead = store.read_arrow(DEAD_LETTERS)
    stored = collections.Counter(
        zip(
            feedback[records.KAFKA_PARTITION].to_pylist()
            + dead[records.KAFKA_PARTITION].to_pylist(),
            feedback[records.KAFKA_OFFSET].to_pylist() + dead[records.KAFKA_OFFSET].to_pylist(),
            strict=True,
        )
    )
    twice = [k for k, v in stored.items() if v > 1]
    assert not twice, f"stored twice: {twice[:5]}"
    for p in range(setup.partitions):
        offsets = sorted(o for q, o in stored if q == p)
        assert offsets == list(range(len(offsets))), f"partition {p}: a gap"
        files = store.batch_files(FEEDBACK, setup.topic, p)
        durable = files[-1].last if files else -1
        assert all(f.last <= durable for f in store.batch_files(DEAD_LETTERS, setup.topic, p))
    if stored:
        assert_each_offset_in_exactly_one_file(store, setup.topic)
    shutil.rmtree(copy)
    return len(stored)


def dlq_copies(setup: KafkaSetup) -> collections.Counter[tuple[int, int]]:
    """How many times the DLQ topic holds the dead letter of each (partition, offset)."""
    consumer = KafkaConsumer(
        setup.settings().kafka.dead_letter_topic,
        bootstrap_servers=setup.broker.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=3000,
    )
    copies: collections.Counter[tuple[int, int]] = collections.Counter()
    try:
        for m in consumer:
            headers = dict(m.headers)
            key = (int(headers["kto.source.partition"]), int(headers["kto.source.offset"]))
            copies[key] += 1
    finally:
        consumer.close()
    return copies


def wait_for_exit(proc: IngestProcess, timeout: float, what: str) -> int:
    wait_until(lambda: proc.process.poll() is not None, timeout, what)
    return proc.process.returncode


def test_ingest_killed_at_each_step_of_a_batch_write_and_of_recovery_stores_each_offset_once(
    kafka_setup: KafkaSetup, ingest_processes, tmp_path: Path
) -> None:
    kafka_setup.create_topics(partitions=2)
    good, bad = send(kafka_setup, 3000, seed=11, bad_every=25)
    config = kafka_setup.config_file(batch_max_events=100, batch_max_seconds=0.2)
    store = FeedbackStore(str(kafka_setup.tmp / "store"))
    # Each run is killed at the next step in turn; each step is sure to be reached
    # (a recovery step only after a kill that left something to settle).
    kills = [
        "ingest.durable.1@2",  # dead letters on the DLQ topic, no file written
        "ingest.durable.2@1",  # dead-letter files written, no feedback file
        "store.recover.1",  # recovery removing those dead letters
        "store.write.1@2",  # a temp file written, not renamed
        "store.recover.1",  # recovery removing the temp file
        "store.write.2@2",  # a file renamed in, its directory not synced
        "ingest.durable.3@1",  # a batch durable, its offsets not committed
    ]
    for i, fault in enumerate(kills):
        proc = ingest_processes(config, tmp_path / f"ingest-{i}.log", env={FAULT_POINT_ENV: fault})
        code = wait_for_exit(proc, 120, f"ingest to die at {fault}")
        assert code == FAULT_EXIT_CODE, proc.log()
        assert f"killed at crash point {fault}" in proc.log()
        assert "Traceback" not in proc.log()
        stored = settle_and_check(kafka_setup)
        assert stored < 3000, f"{fault}: the run finished before reaching its crash point"

    proc = ingest_processes(config, tmp_path / "ingest-final.log")
    wait_until(lambda: store.count() >= len(good), 120, f"all {len(good)} feedback rows")
    code, _ = proc.terminate()
    assert code == 0, proc.log()

    assert settle_and_check(kafka_setup) == 3000
    rows = store.read()
    assert len(rows) == len(good) and set(rows[records.EVENT_ID]) == good
    letters = store.read(DEAD_LETTERS)
    assert len(letters) == len(bad) and _values(letters) == bad
    # The DLQ topic is at-least-once: every dead letter is there, and those of the
    # batches killed after the DLQ produce (and so read and sent again) more than once.
    copies = dlq_copies(kafka_setup)
    stored_letters = {
        (int(p), int(o))
        for p, o in zip(
            letters[records.KAFKA_PARTITION], letters[records.KAFKA_OFFSET], strict=True
        )
    }
    assert set(copies) == stored_letters
    assert max(copies.values()) >= 2


# -- the store fails under a running consumer ---------------------------------------


class StoreDisk:
    """The store's directory on a filesystem a test can break. As root (where chmod
    does not stop writes) it is a tmpfs of its own: remounted read-only, or filled up.
    As another user it is a plain directory made read-only with chmod."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.root = os.geteuid() == 0
        path.mkdir(parents=True, exist_ok=True)
        self.mounted = False
        if self.root:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                pytest.skip(
                    f"running as root, where chmod does not stop writes, and a tmpfs could "
                    f"not be mounted for the store: {done.stderr.strip()}"
                )
            self.mounted = True

    @property
    def read_only_errno(self) -> str:
        return "EROFS" if self.root else "EACCES"

    def read_only(self) -> None:
        if self.root:
            # Refused (EBUSY) while a file is open for writing: wait for a quiet moment.
            wait_until(lambda: self._remount("ro"), 30, "the store remounted read-only")
        else:
            for directory, _, _ in os.walk(self.path):
                os.chmod(directory, 0o555)

    def writable(self) -> None:
        if self.root:
            assert self._remount("rw")
        else:
            for directory, _, _ in os.walk(self.path):
                os.chmod(directory, 0o755)

    def fill(self) -> Path:
        """Fill the filesystem until a write fails with ENOSPC; return the filler file."""
        filler = self.path / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        return filler

    def _remount(self, mode: str) -> bool:
        done = subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)])
        return done.returncode == 0

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def store_disk(kafka_setup: KafkaSetup) -> Iterator[Callable[[str], StoreDisk]]:
    """The kafka_setup's store directory on a StoreDisk of the given size."""
    disks: list[StoreDisk] = []

    def make(size: str) -> StoreDisk:
        disks.append(StoreDisk(kafka_setup.tmp / "store", size))
        return disks[-1]

    yield make
    for disk in disks:
        disk.writable()
        disk.close()


def assert_failed_cleanly(proc: IngestProcess, what: str, errno_name: str, path: Path) -> None:
    """Ingest exited 1 after retrying, naming the path and the errno, without a traceback."""
    code = wait_for_exit(proc, 120, f"ingest to give up on {what}")
    log = proc.log()
    assert code == 1, log
    assert "failed (attempt 1 of 3)" in log and "failed (attempt 2 of 3)" in log, log
    assert errno_name in log and str(path) in log, log
    assert "Nothing" in log and "committed" in log, log
    assert "Traceback" not in log, log


def assert_committed_only_what_is_stored(setup: KafkaSetup, store: FeedbackStore) -> None:
    rows = store.read()
    durable = {p: None for p in range(setup.partitions)}
    for p in range(setup.partitions):
        files = store.batch_files(FEEDBACK, setup.topic, p)
        durable[p] = files[-1].last + 1 if files else None
    assert committed_offsets(setup) == durable, rows.groupby(records.KAFKA_PARTITION).size()


def test_a_read_only_store_stops_ingest_with_the_path_and_errno_and_a_restart_stores_all_once(
    kafka_setup: KafkaSetup, ingest_processes, store_disk, tmp_path: Path
) -> None:
    disk = store_disk("64m")
    store = FeedbackStore(str(disk.path))
    config = kafka_setup.config_file(**FAST_RETRIES)
    proc = ingest_processes(config, tmp_path / "ingest-0.log")
    good, bad = send(kafka_setup, 300, seed=12, bad_every=30)
    wait_until(lambda: store.count() >= len(good), 90, "the first events stored")
    wait_until(lambda: store.count(DEAD_LETTERS) >= len(bad), 30, "their dead letters")

    disk.read_only()
    more_good, more_bad = send(kafka_setup, 200, seed=13, bad_every=30)
    assert_failed_cleanly(proc, "a read-only store", disk.read_only_errno, disk.path)
    assert settle_and_check(kafka_setup) == 300
    assert_committed_only_what_is_stored(kafka_setup, store)

    # Restarted while still read-only, with an interrupted write left to clean up: the
    # recovery at partition assignment fails, is retried, and ends the same way.
    disk.writable()
    partition_dir = Path(store.partition_dir(FEEDBACK, kafka_setup.topic, 0))
    partition_dir.mkdir(parents=True, exist_ok=True)
    (partition_dir / f".{'9' * 20}-{'9' * 20}.parquet.tmp-dead").write_bytes(b"PAR1 half")
    disk.read_only()
    proc = ingest_processes(config, tmp_path / "ingest-1.log")
    assert_failed_cleanly(proc, "recovery", disk.read_only_errno, partition_dir)
    assert f"could not settle {kafka_setup.topic}[0]" in proc.log()

    disk.writable()
    restart_and_check_all_stored_once(
        kafka_setup, ingest_processes, config, tmp_path / "ingest-2.log", store,
        good | more_good, bad | more_bad,
    )  # fmt: skip


def test_a_full_disk_stops_ingest_with_the_path_and_enospc_and_a_restart_stores_all_once(
    kafka_setup: KafkaSetup, ingest_processes, store_disk, tmp_path: Path
) -> None:
    disk = store_disk("2m")
    if not disk.root:
        pytest.skip("a full disk needs a small filesystem of its own: mounting one needs root")
    store = FeedbackStore(str(disk.path))
    config = kafka_setup.config_file(**FAST_RETRIES)
    proc = ingest_processes(config, tmp_path / "ingest-0.log")
    good, bad = send(kafka_setup, 200, seed=14, bad_every=40)
    wait_until(lambda: store.count() >= len(good), 90, "the first events stored")

    filler = disk.fill()
    more_good, more_bad = send(kafka_setup, 300, seed=15, bad_every=40)
    assert_failed_cleanly(proc, "a full disk", "ENOSPC", disk.path)
    assert settle_and_check(kafka_setup) == 200
    assert_committed_only_what_is_stored(kafka_setup, store)

    filler.unlink()
    restart_and_check_all_stored_once(
        kafka_setup, ingest_processes, config, tmp_path / "ingest-1.log", store,
        good | more_good, bad | more_bad,
    )  # fmt: skip


def restart_and_check_all_stored_once(
    kafka_setup: KafkaSetup,
    ingest_processes,
    config: Path,
    log: Path,
    store: FeedbackStore,
    good: set,
    bad: set,
) -> None:
    """Once the store is fixed, a restarted ingest stores all 500 messages once: each
    good event a row, each bad one a dead letter, and commits only what is stored."""
    proc = ingest_processes(config, log)
    wait_until(lambda: store.count() >= 500 - len(bad), 90, "every event stored")
    code, _ = proc.terminate()
    assert code == 0, proc.log()
    assert settle_and_check(kafka_setup) == 500
    assert set(store.read()[records.EVENT_ID]) == good
    assert _values(store.read(DEAD_LETTERS)) == bad
    assert_committed_only_what_is_stored(kafka_setup, store)
