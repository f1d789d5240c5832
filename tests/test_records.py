"""Row building: one event the store's columns cannot hold never sinks its batch."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from pipeline.feedback import records
from pipeline.feedback.events import FeedbackEvent
from pipeline.feedback.records import FeedbackRows

NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


OK = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def event(i: int, prompt: str = "p", schema: int = 1) -> FeedbackEvent:
    return FeedbackEvent(
        f"e{i}", OK, "c", "m", None, prompt, None, "r", "like", None, True, "tiny", None, schema
    )


def test_an_event_the_columns_cannot_hold_is_handed_back_and_the_rest_are_kept() -> None:
    # Fake input, named as such: the parser refuses these, so they are built directly,
    # as a future field or parser bug would let them through.
    rows = FeedbackRows("t", 0)
    for i, (prompt, schema) in enumerate([("p", 1), ("a\ud800", 1), ("p", 1), ("p", 1 << 20)]):
        rows.append(event(i, prompt, schema), offset=10 + i, timestamp_ms=None)
    rejected = rows.seal()
    assert [offset for offset, _ in rejected] == [11, 13]
    assert all("cannot hold" in reason for _, reason in rejected)
    table = rows.to_table(NOW, "test")
    assert table[records.KAFKA_OFFSET].to_pylist() == [10, 12]
    assert len(rows) == 2


def test_to_table_never_drops_an_unsealed_row_silently() -> None:
    rows = FeedbackRows("t", 0)
    rows.append(event(0, "a\ud800"), offset=5, timestamp_ms=None)
    with pytest.raises(ValueError, match=r"offsets \[5\] cannot be stored"):
        rows.to_table(NOW, "test")


def test_a_large_dead_letter_is_stored_whole_from_a_view_of_its_own_bytes(tmp_path) -> None:
    import pyarrow.parquet as pq

    from connectors.feedback.store import DEAD_LETTERS, FeedbackStore
    from pipeline.feedback.records import DeadLetter, DeadLetterRows, Provenance

    big = bytes(range(256)) * (5 * 4096)  # 5 MiB
    letters = DeadLetterRows()
    for offset, value in enumerate([b"small", big, None, b"", big[:70_000]]):
        letters.append(
            DeadLetter(Provenance("t", 0, offset, None), None, value, (), "too_large", "r")
        )
    table = letters.to_table(NOW, "test")
    chunks = table[records.VALUE].chunks
    # The large values' chunks point at the bytes the consumer already holds.
    views = [c for c in chunks if len(c) == 1 and c.buffers()[2].size >= 70_000]
    assert len(views) == 2 and views[0].buffers()[2].address == pa_address(big)
    path = FeedbackStore(str(tmp_path)).write_batch(DEAD_LETTERS, "t", 0, 0, 4, table)
    back = pq.read_table(path)[records.VALUE].to_pylist()
    assert back == [b"small", big, None, b"", big[:70_000]]


def pa_address(value: bytes) -> int:
    import pyarrow as pa

    return pa.py_buffer(value).address


def test_a_vote_dated_past_its_record_and_the_clock_is_clamped_to_them() -> None:
    """The time model at ingest (connectors/feedback/voters.py): a ts later than the
    Kafka record's timestamp, or the ingest clock, by more than the skew takes that
    bound; an earlier one, or one within the skew, stays as sent."""
    clock = NOW.timestamp()
    ms = int(clock * 1000)
    rows = FeedbackRows("t", 0, dt.timedelta(seconds=300), lambda: clock)
    dated = {
        0: (dt.datetime(2262, 1, 1, tzinfo=dt.UTC), ms - 3_600_000),  # past the record
        1: (dt.datetime(2262, 1, 1, tzinfo=dt.UTC), None),  # no record time: the clock
        2: (dt.datetime(2262, 1, 1, tzinfo=dt.UTC), ms + 3_600_000),  # a record from ahead
        3: (NOW + dt.timedelta(seconds=100), ms),  # within the skew
        4: (dt.datetime(1970, 1, 2, tzinfo=dt.UTC), ms),  # the past is the voter's own
    }
    for offset, (ts, record_ms) in dated.items():
        rows.append(msgspec.structs.replace(event(offset), ts=ts), offset, record_ms)
    got = rows.to_table(NOW, "test")[records.TS].to_pylist()
    skew = dt.timedelta(seconds=300)
    assert got == [
        NOW - dt.timedelta(hours=1) + skew,
        NOW + skew,
        NOW + skew,
        NOW + dt.timedelta(seconds=100),
        dt.datetime(1970, 1, 2, tzinfo=dt.UTC),
    ]
    # Without a skew (imports into a snapshot), ts is kept as sent.
    plain = FeedbackRows("t", 0)
    plain.append(msgspec.structs.replace(event(0), ts=dated[0][0]), 0, ms)
    assert plain.to_table(NOW, "test")[records.TS].to_pylist() == [dated[0][0]]
