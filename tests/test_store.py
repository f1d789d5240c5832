"""The feedback store: atomic, idempotent batch files, and recovery after a crash or a
lost partition leaves every offset in exactly one file."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from connectors.store import DEAD_LETTERS, FEEDBACK, FeedbackStore
from pipeline import records
from pipeline.events import FeedbackEvent, parse_event
from pipeline.records import DeadLetterRows, FeedbackRows, Provenance
from pipeline.sample import sample_events

NOW = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


def feedback_range(first: int, last: int) -> pa.Table:
    events = list(sample_events(last + 1))
    rows = FeedbackRows("fb", 0)
    for offset in range(first, last + 1):
        parsed = parse_event(json.dumps(events[offset]).encode(), user_hash_key=b"k")
        rows.append(parsed, offset, 1_767_225_600_000 + offset)
    return rows.to_table(NOW, "test")


def dead_letters(offsets: list[int]) -> pa.Table:
    rows = DeadLetterRows()
    for offset in offsets:
        rows.append(Provenance("fb", 0, offset, None), b"k", b"oops", [], "not_json", "bad")
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
    assert store.count() == 55
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
