"""The feedback store: atomic, idempotent batch files, and recovery after a crash or a
lost partition leaves every offset in exactly one file."""

from __future__ import annotations

import datetime as dt
import itertools
import multiprocessing
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from connectors.faults import FAULT_EXIT_CODE, FAULT_POINT_ENV
from connectors.feedback.store import DEAD_LETTERS, FEEDBACK, FeedbackStore
from pipeline.feedback import records
from pipeline.feedback.events import FeedbackEvent
from pipeline.feedback.records import DeadLetter, DeadLetterRows, FeedbackRows, Provenance
from tests.rows import feedback_range, feedback_rows

NOW = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


def dead_letters(offsets: list[int]) -> pa.Table:
    rows = DeadLetterRows()
    for offset in offsets:
        rows.append(
            DeadLetter(Provenance("fb", 0, offset, None), b"k", b"oops", (), "not_json", "bad")
        )
    return rows.to_table(NOW, "test")


def offsets(store: FeedbackStore, table: str = FEEDBACK) -> list[int]:
    return sorted(store.read_arrow(table)[records.KAFKA_OFFSET].to_pylist())


def test_batches_are_named_for_their_offsets_and_rewrites_replace_them(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    path = store.write_batch(FEEDBACK, "fb", 0, 0, 9, feedback_range(0, 9))
    assert path.endswith(
        "feedback/topic=fb/partition=0/00000000000000000000-00000000000000000009.parquet"
    )
    store.write_batch(FEEDBACK, "fb", 0, 0, 9, feedback_range(0, 9))
    assert store.count() == 10
    assert [f.path for f in store.batch_files(FEEDBACK, "fb", 0)] == [path]
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".")]


def test_rows_round_trip(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    table = feedback_range(0, 49)
    store.write_batch(FEEDBACK, "fb", 0, 0, 49, table)
    back = store.read_arrow()
    assert back.equals(table)
    df = store.read()
    assert df[records.EVENT_ID].is_unique and len(df) == 50


def test_a_read_of_some_columns_and_rows_reads_only_those(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    store.write_batch(FEEDBACK, "fb", 0, 0, 19, feedback_range(0, 19))
    store.write_batch(FEEDBACK, "fb", 0, 20, 29, feedback_range(20, 29))
    wanted = [records.EVENT_ID, records.KAFKA_OFFSET]
    late = ds.field(records.KAFKA_OFFSET) >= 15
    back = store.read(columns=wanted, filter=late)
    assert list(back.columns) == wanted
    assert back[records.KAFKA_OFFSET].tolist() == list(range(15, 30))
    full = store.read()
    assert back[records.EVENT_ID].tolist() == full[records.EVENT_ID].tolist()[15:]
    empty = FeedbackStore(str(tmp_path / "none")).read_arrow(DEAD_LETTERS, [records.ERROR_KIND])
    assert empty.schema.names == [records.ERROR_KIND] and empty.num_rows == 0
    with pytest.raises(ValueError, match="no columns"):
        store.read(columns=["nope"])


def test_event_fields_are_feedback_columns() -> None:
    assert set(FeedbackEvent.__struct_fields__) <= set(records.FEEDBACK_SCHEMA.names)
    assert FeedbackRows("fb", 0).to_table(NOW, "x").schema.equals(records.FEEDBACK_SCHEMA)


def test_empty_store_reads_as_empty_tables(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path / "nothing-yet"))
    assert store.read_arrow().schema.equals(records.FEEDBACK_SCHEMA)
    assert store.count(DEAD_LETTERS) == 0
    assert store.recover_partition("fb", 0) is None


def test_wrong_schema_is_refused(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    with pytest.raises(ValueError, match="do not match the feedback schema"):
        store.write_batch(FEEDBACK, "fb", 0, 0, 0, dead_letters([0]))


def test_recovery_returns_the_offset_after_the_last_durable_batch(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    store.write_batch(FEEDBACK, "fb", 0, 0, 9, feedback_range(0, 9))
    store.write_batch(FEEDBACK, "fb", 0, 10, 24, feedback_range(10, 24))
    assert store.recover_partition("fb", 0) == 25
    assert store.recover_partition("fb", 1) is None


def test_recovery_removes_temp_files_of_interrupted_writes(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    store.write_batch(FEEDBACK, "fb", 0, 0, 9, feedback_range(0, 9))
    directory = store.partition_dir(FEEDBACK, "fb", 0)
    leftover = Path(directory) / ".00000000000000000010-00000000000000000019.parquet.tmp-dead"
    leftover.write_bytes(b"PAR1 half a file")
    assert store.count() == 10  # readers never see temp files
    store.recover_partition("fb", 0)
    assert not leftover.exists()


def test_dead_letters_of_an_unfinished_batch_are_dropped(tmp_path: Path) -> None:
    # The crash came after the dead letters landed but before the batch's feedback
    # file: the batch is read again, so its dead letters must not stay twice.
    store = FeedbackStore(str(tmp_path))
    store.write_batch(DEAD_LETTERS, "fb", 0, 0, 9, dead_letters([3]))
    store.write_batch(FEEDBACK, "fb", 0, 0, 9, feedback_range(0, 9))
    store.write_batch(DEAD_LETTERS, "fb", 0, 10, 19, dead_letters([12, 15]))
    assert store.recover_partition("fb", 0) == 10
    assert offsets(store, DEAD_LETTERS) == [3]


def test_overlapping_batches_are_resolved_to_one_file_per_offset(tmp_path: Path) -> None:
    # A consumer that lost its partitions mid-batch may land a file after the new
    # owner started: contained ranges are removed, partial overlaps trimmed.
    store = FeedbackStore(str(tmp_path))
    store.write_batch(FEEDBACK, "fb", 0, 0, 19, feedback_range(0, 19))
    store.write_batch(FEEDBACK, "fb", 0, 5, 9, feedback_range(5, 9))
    store.write_batch(FEEDBACK, "fb", 0, 10, 29, feedback_range(10, 29))
    store.write_batch(FEEDBACK, "fb", 0, 30, 39, feedback_range(30, 39))
    # Readers skip the file inside another (it may be what a compaction covered); the
    # partial overlap 10..19 counts twice until recovery trims it.
    assert store.count() == 50
    assert store.recover_partition("fb", 0) == 40
    assert offsets(store) == list(range(40))
    ranges = [(f.first, f.last) for f in store.batch_files(FEEDBACK, "fb", 0)]
    assert ranges == [(0, 19), (20, 29), (30, 39)]


def test_fsspec_urls_work_the_same(tmp_path: Path) -> None:
    store = FeedbackStore("memory://kto-loop-test-store")
    try:
        store.write_batch(FEEDBACK, "fb", 0, 0, 9, feedback_range(0, 9))
        store.write_batch(FEEDBACK, "fb", 0, 0, 9, feedback_range(0, 9))
        store.write_batch(FEEDBACK, "fb", 0, 5, 14, feedback_range(5, 14))
        assert store.recover_partition("fb", 0) == 15
        assert offsets(store) == list(range(15))
    finally:
        store.fs.rm(store.root, recursive=True)


# -- crashes: real files, real child processes killed with os._exit at named steps ----

# A partition of 50 messages, these ones malformed (dead-lettered, no feedback row).
N_MESSAGES = 50
BAD = frozenset({3, 12, 22, 27, 33, 38, 46})


def _good(first: int, last: int) -> list[int]:
    return [o for o in range(first, last + 1) if o not in BAD]


def _bad(first: int, last: int) -> list[int]:
    return [o for o in range(first, last + 1) if o in BAD]


def write_batch_files(store: FeedbackStore, first: int, last: int) -> None:
    """One batch, as ingest writes it: its dead letters (if any), then its feedback file."""
    if _bad(first, last):
        store.write_batch(DEAD_LETTERS, "fb", 0, first, last, dead_letters(_bad(first, last)))
    store.write_batch(FEEDBACK, "fb", 0, first, last, feedback_rows(_good(first, last)))


def consume_partition(root: str, batch: int = 10) -> None:
    """What a (re)started consumer does with files: settle the partition, then store
    the rest of it in batches from the first offset not durable."""
    store = FeedbackStore(root)
    start = store.recover_partition("fb", 0) or 0
    for first in range(start, N_MESSAGES, batch):
        write_batch_files(store, first, min(first + batch, N_MESSAGES) - 1)


def recover(root: str) -> None:
    FeedbackStore(root).recover_partition("fb", 0)


def _child(target: Callable[[str], None], root: str, fault: str) -> None:
    os.environ[FAULT_POINT_ENV] = fault
    target(root)


def run_killed_at(target: Callable[[str], None], root: Path, fault: str) -> bool:
    """Run target(root) in a child process that dies at crash point `fault`; True if it
    was killed there, False if it finished without reaching it."""
    # forkserver: children fork from a fresh process that has imported the store
    # (quick, and no threads of ours to inherit).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pytest", "connectors.feedback.store", "pipeline.feedback.sample"])
    child = ctx.Process(target=_child, args=(target, str(root), fault))
    child.start()
    child.join(60)
    assert child.exitcode in (0, FAULT_EXIT_CODE), f"{fault}: exit code {child.exitcode}"
    return child.exitcode == FAULT_EXIT_CODE


def assert_every_offset_stored_once(store: FeedbackStore, last: int) -> None:
    """Offsets 0..last: each good one in exactly one feedback row, each bad one in
    exactly one dead letter, the files' ranges neither overlap nor leave gaps."""
    assert offsets(store) == _good(0, last)
    assert offsets(store, DEAD_LETTERS) == _bad(0, last)
    ranges = [(f.first, f.last) for f in store.batch_files(FEEDBACK, "fb", 0)]
    assert ranges[0][0] == 0 and ranges[-1][1] == last, ranges
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert start == end + 1, ranges
    for f in store.batch_files(DEAD_LETTERS, "fb", 0):
        rows = store._read_files([f.path], DEAD_LETTERS)[records.KAFKA_OFFSET].to_pylist()
        assert rows == _bad(f.first, f.last), f.path
    assert not [
        name
        for table in (FEEDBACK, DEAD_LETTERS)
        for name in os.listdir(store.partition_dir(table, "fb", 0))
        if name.startswith(".")
    ]


def messy_partition(root: Path) -> None:
    """What crashes and a consumer that lost its partition mid-batch leave: temp files,
    a batch inside another, a partial overlap (feedback and dead letters), dead letters
    of a batch whose feedback file never landed, one of them reaching into durable
    offsets."""
    store = FeedbackStore(str(root))
    write_batch_files(store, 0, 19)
    write_batch_files(store, 5, 9)
    write_batch_files(store, 10, 29)
    write_batch_files(store, 30, 39)
    store.write_batch(DEAD_LETTERS, "fb", 0, 35, 44, dead_letters(_bad(35, 44)))
    store.write_batch(DEAD_LETTERS, "fb", 0, 40, 49, dead_letters(_bad(40, 49)))
    for table in (FEEDBACK, DEAD_LETTERS):
        directory = Path(store.partition_dir(table, "fb", 0))
        (directory / f".{'4' * 20}-{'9' * 20}.parquet.tmp-dead").write_bytes(b"PAR1 half")


def test_dead_letters_reaching_past_the_durable_offsets_keep_their_durable_head(
    tmp_path: Path,
) -> None:
    # A consumer that lost the partition landed dead letters of 0..29 while a settling
    # was under way, and that settling removed the new owner's dead letters of 0..19 as
    # contained in them; the feedback of 20..29 never landed. The file is then the only
    # copy of the dead letters of durable offsets: trimmed to them, not removed.
    store = FeedbackStore(str(tmp_path))
    store.write_batch(FEEDBACK, "fb", 0, 0, 19, feedback_rows(_good(0, 19)))
    store.write_batch(DEAD_LETTERS, "fb", 0, 0, 29, dead_letters(_bad(0, 29)))
    assert store.recover_partition("fb", 0) == 20
    assert_every_offset_stored_once(store, 19)


def test_the_recovery_of_a_messy_partition_leaves_every_offset_once(tmp_path: Path) -> None:
    messy_partition(tmp_path)
    store = FeedbackStore(str(tmp_path))
    assert store.recover_partition("fb", 0) == 40
    assert_every_offset_stored_once(store, 39)
    assert store.recover_partition("fb", 0) == 40  # a second run changes nothing
    assert_every_offset_stored_once(store, 39)


def test_a_recovery_killed_at_any_step_and_again_in_the_next_loses_nothing(
    tmp_path: Path,
) -> None:
    # Before, a recovery killed between writing a trimmed copy and removing its
    # original made the next one remove the copy too: offsets 20-29 were lost.
    messy = tmp_path / "messy"
    messy_partition(messy)
    steps = 0
    for n in itertools.count(1):
        once = tmp_path / f"once-{n}"
        shutil.copytree(messy, once)
        if not run_killed_at(recover, once, f"store.recover.{n}"):
            break
        steps = n
        for m in itertools.count(1):
            twice = tmp_path / f"twice-{n}-{m}"
            shutil.copytree(once, twice)
            killed = run_killed_at(recover, twice, f"store.recover.{m}")
            store = FeedbackStore(str(twice))
            assert store.recover_partition("fb", 0) == 40, (n, m)
            assert_every_offset_stored_once(store, 39)
            shutil.rmtree(twice)
            if not killed:
                break
        store = FeedbackStore(str(once))
        assert store.recover_partition("fb", 0) == 40, n
        assert_every_offset_stored_once(store, 39)
    assert steps >= 10, "the messy partition should take at least 10 file changes to settle"
    # Killed inside the writes of trimmed copies: a temp file is left, or the copy
    # landed without its directory synced.
    kills = 0
    for fault in (f"store.write.{s}@{k}" for k in range(1, 10) for s in (1, 2)):
        killed_in_write = tmp_path / fault
        shutil.copytree(messy, killed_in_write)
        if run_killed_at(recover, killed_in_write, fault):
            kills += 1
        store = FeedbackStore(str(killed_in_write))
        assert store.recover_partition("fb", 0) == 40, fault
        assert_every_offset_stored_once(store, 39)
    assert kills >= 6, "the messy partition should need at least 3 trimmed copies"


def test_a_consumer_killed_at_any_step_of_a_batch_write_restarts_storing_each_offset_once(
    tmp_path: Path,
) -> None:
    writes = 0
    for k in itertools.count(1):
        killed = False
        for s in (1, 2):
            root = tmp_path / f"store.write.{s}@{k}"
            if not run_killed_at(consume_partition, root, f"store.write.{s}@{k}"):
                continue
            killed = True
            # Killed again in the restart's recovery, if it has anything to settle.
            run_killed_at(consume_partition, root, "store.recover.1")
            consume_partition(str(root))
            assert_every_offset_stored_once(FeedbackStore(str(root)), N_MESSAGES - 1)
        if not killed:
            break
        writes = k
    # 5 batches of 10, each with dead letters: 10 files, each killed at both steps.
    assert writes == 10


# -- compaction -----------------------------------------------------------------------


def partly_consumed(root: str) -> None:
    """Offsets 0..29 stored in batches of 5, dead letters among them: six small files."""
    store = FeedbackStore(root)
    for first in range(0, 30, 5):
        write_batch_files(store, first, first + 4)


def compact(root: str) -> None:
    FeedbackStore(root).compact(target_bytes=1 << 20)


def test_compaction_merges_small_files_and_reads_the_same(tmp_path: Path) -> None:
    partly_consumed(str(tmp_path))
    store = FeedbackStore(str(tmp_path))
    before = store.read_arrow()
    assert store.compact(target_bytes=1 << 20) == {"files_merged": 6, "files_written": 1}
    assert [(f.first, f.last) for f in store.batch_files(FEEDBACK, "fb", 0)] == [(0, 29)]
    assert store.read_arrow().equals(before)
    assert store.compact(target_bytes=1 << 20) == {"files_merged": 0, "files_written": 0}
    # A consumer resumes after the compacted range.
    consume_partition(str(tmp_path), batch=5)
    assert_every_offset_stored_once(store, N_MESSAGES - 1)


def test_compaction_keeps_files_under_the_target_size(tmp_path: Path) -> None:
    partly_consumed(str(tmp_path))
    store = FeedbackStore(str(tmp_path))
    size = max(os.path.getsize(f.path) for f in store.batch_files(FEEDBACK, "fb", 0))
    store.compact(target_bytes=2 * size + 1)
    ranges = [(f.first, f.last) for f in store.batch_files(FEEDBACK, "fb", 0)]
    assert ranges == [(0, 9), (10, 19), (20, 29)]


def test_a_reader_that_sees_a_compacted_file_and_the_files_it_covers_counts_rows_once(
    tmp_path: Path,
) -> None:
    partly_consumed(str(tmp_path))
    store = FeedbackStore(str(tmp_path))
    rows = store.read_arrow()
    store.write_batch(FEEDBACK, "fb", 0, 0, 29, rows)  # landed; the small ones not removed
    assert offsets(store) == _good(0, 29)
    assert store.count() == len(_good(0, 29))
    assert store.read_ranges([("fb", 0, 10, 14)], [records.KAFKA_OFFSET]).num_rows == len(
        _good(10, 14)
    )
    assert store.recover_partition("fb", 0) == 30
    assert [(f.first, f.last) for f in store.batch_files(FEEDBACK, "fb", 0)] == [(0, 29)]


def test_a_compaction_killed_at_any_step_loses_nothing_and_ingest_resumes(
    tmp_path: Path,
) -> None:
    # One step to write the merged file, then one per small file it removes.
    faults = [f"store.compact.{n}" for n in range(1, 8)] + ["store.write.1", "store.write.2"]
    for fault in faults:
        root = tmp_path / fault
        partly_consumed(str(root))
        assert run_killed_at(compact, root, fault), fault
        store = FeedbackStore(str(root))
        assert offsets(store) == _good(0, 29), fault  # readers count each row once
        # Killed again in the next compaction, when it has something left to do.
        run_killed_at(compact, root, "store.compact.1")
        consume_partition(str(root), batch=5)
        assert_every_offset_stored_once(store, N_MESSAGES - 1)
    partly_consumed(str(tmp_path / "all-steps"))
    assert not run_killed_at(compact, tmp_path / "all-steps", "store.compact.8")
