"""Where ingest's time goes: the cost per event of each stage of our path.

    python -m bench.ingest_stages [--events 100000] [--event-bytes 700] [--repeats 3]

Starts a local Tansu broker and produces the events bench.ingest produces, then:

- fetch: a bare kafka-python consumer drains the topic (kafka-python's fetch and
  record decoding, which the bare loop and ours share); wall time of its polls and
  the CPU time of this process meanwhile.
- replays the fetched records, poll chunk by poll chunk and in batches of
  `[ingest] batch_max_events` per partition as the Ingestor cuts them, through each
  stage of ours on this thread:
  - parse: `EventParser` (UTF-8, typed decode, every check issue 12 added, the
    user hash), and for reference the UTF-8 check alone and the typed decode
    alone (both are part of parse);
  - columns: `FeedbackRows` append + seal (Arrow arrays per poll chunk);
  - table: `FeedbackRows.to_table` (the batch's table, constant columns added);
  - parquet: the store's Parquet encoding of that table;
  - write: the store's atomic write with fsync;
  - commit: one offset commit per batch to the broker.
- times the bare loop and the Ingestor end to end (as bench.ingest does), wall and
  this process's CPU time per event.

The stages on the consuming thread are fetch, parse, columns and commit; table,
parquet and write run on the writer thread, overlapped with the next batch. Each
figure is the median over the repeats, in microseconds per event. The last line of
stdout is one JSON object; it goes to bench/results/ingest-stages.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from bench.ingest import (
    POLL_RECORDS,
    RESULTS,
    BenchError,
    bare_consumer,
    broker_settings,
    choose_pad_to,
    console,
    ingest_settings,
    measure_ingest,
    measure_raw,
    produce_events,
    quiet_logs_and_hash_key,
)
from connectors.config import IngestConfig, KafkaConfig
from connectors.feedback.store import FEEDBACK, FeedbackStore, encode_parquet, write_local_atomic
from deploy.local.broker import running_broker
from pipeline.feedback.events import EventError, EventParser, WireEventV1
from pipeline.feedback.records import FeedbackRows
from pipeline.feedback.sample import sample_messages

# The stages in the order of the path, with the thread each runs on.
STAGES = {
    "fetch": "consumer",
    "parse": "consumer",
    "  utf8 check alone": "(in parse)",
    "  typed decode alone": "(in parse)",
    "columns": "consumer",
    "commit": "consumer",
    "table": "writer",
    "parquet": "writer",
    "write": "writer",
}


def _fetch_all(
    kafka: KafkaConfig, n: int
) -> tuple[list[tuple[TopicPartition, list]], dict[str, float]]:
    """Drain N records with a bare consumer; the poll chunks, and the wall and CPU
    seconds per record spent in poll (the first poll, which ends the group join, left
    out)."""
    consumer = bare_consumer(kafka, "bench-stages")
    try:
        consumer.subscribe([kafka.topic])
        chunks: list[tuple[TopicPartition, list]] = []
        deadline = time.monotonic() + 120
        while not chunks:
            if time.monotonic() > deadline:
                raise BenchError("no records within 120 s")
            chunks += consumer.poll(timeout_ms=500, max_records=POLL_RECORDS).items()
        untimed = count = sum(len(m) for _, m in chunks)
        wall = cpu = 0.0
        while count < n:
            if time.monotonic() > deadline:
                raise BenchError(f"fetched {count} of {n} records")
            w0, c0 = time.perf_counter(), time.process_time()
            polled = consumer.poll(timeout_ms=500, max_records=POLL_RECORDS)
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
            chunks += polled.items()
            count += sum(len(m) for m in polled.values())
        if count != n:
            raise BenchError(f"fetched {count} records, expected exactly {n}")
        timed = max(1, n - untimed)
        return chunks, {"fetch": wall / timed * n, "fetch cpu": cpu / timed * n}
    finally:
        consumer.close(autocommit=False)


def _batches(chunks: list[tuple[TopicPartition, list]], size: int) -> list[list[tuple]]:
    """The poll chunks cut into batches of `size` records, as the Ingestor cuts them."""
    out: list[list[tuple]] = [[]]
    room = size
    for tp, messages in chunks:
        start = 0
        while start < len(messages):
            take = messages[start : start + room]
            out[-1].append((tp, take))
            start += len(take)
            room -= len(take)
            if room == 0:
                out.append([])
                room = size
    return [b for b in out if b]


def _timed(fn: Callable[[], object]) -> float:
    gc.collect()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def replay_stages(
    batches: list[list[tuple]], parser: EventParser, store: FeedbackStore, skew: dt.timedelta
) -> dict[str, float]:
    """Seconds each stage of ours takes over the fetched records."""
    values = [m.value for batch in batches for _, messages in batch for m in messages]
    decoder = msgspec.json.Decoder(WireEventV1)
    seconds = {
        "  utf8 check alone": _timed(lambda: [v.decode("utf-8") for v in values]),
        "  typed decode alone": _timed(lambda: [decoder.decode(v) for v in values]),
    }
    totals = dict.fromkeys(("parse", "columns", "table", "parquet", "write"), 0.0)
    now = dt.datetime.now(dt.UTC)
    gc.collect()
    for batch_no, batch in enumerate(batches):
        rows_by_tp: dict[TopicPartition, FeedbackRows] = {}
        for tp, messages in batch:
            rows = rows_by_tp.setdefault(tp, FeedbackRows(tp.topic, tp.partition, skew, time.time))
            t0 = time.perf_counter()
            parsed = []
            for m in messages:
                try:
                    parsed.append((parser(m.value), m.offset, m.timestamp))
                except EventError as exc:
                    raise BenchError(f"offset {m.offset}: {exc.kind}: {exc}") from None
            t1 = time.perf_counter()
            for event, offset, timestamp in parsed:
                rows.append(event, offset, timestamp)
            if rows.seal():
                raise BenchError("a sample event could not be stored")
            t2 = time.perf_counter()
            totals["parse"] += t1 - t0
            totals["columns"] += t2 - t1
        for tp, rows in rows_by_tp.items():
            t0 = time.perf_counter()
            table = rows.to_table(now, "bench")
            t1 = time.perf_counter()
            data = encode_parquet(table)
            t2 = time.perf_counter()
            path = store.batch_path(FEEDBACK, tp.topic, tp.partition, batch_no, batch_no)
            write_local_atomic(path, data)
            t3 = time.perf_counter()
            totals["table"] += t1 - t0
            totals["parquet"] += t2 - t1
            totals["write"] += t3 - t2
    seconds.update(totals)
    return seconds


def commit_seconds(kafka: KafkaConfig, batches: list[list[tuple]]) -> float:
    """One commit per batch (the offsets it ends at), in a fresh group."""
    consumer = bare_consumer(kafka, "bench-stages-commit")
    try:
        total = 0.0
        for batch in batches:
            offsets = {tp: OffsetAndMetadata(ms[-1].offset + 1, "", -1) for tp, ms in batch}
            started = time.perf_counter()
            consumer.commit(offsets)
            total += time.perf_counter() - started
        return total
    finally:
        consumer.close(autocommit=False)


def end_to_end(kafka: KafkaConfig, workdir: Path, n: int, round_no: int) -> dict[str, float]:
    """Wall and CPU microseconds per event of the bare loop and of ours."""
    out = {}
    for side in ("raw", "ours"):
        c0 = time.process_time()
        if side == "raw":
            run = measure_raw(kafka, n, 60 + n / 1000, console.status(""))
        else:
            store_dir = workdir / f"e2e-{round_no}"
            run = measure_ingest(ingest_settings(kafka, store_dir), n, 60 + n / 1000, _Quiet())
            shutil.rmtree(store_dir, ignore_errors=True)
        cpu = time.process_time() - c0
        out[f"{side} wall"] = run.seconds / n * 1e6
        # CPU includes the group join (about 3 s of mostly waiting) and, for ours, the
        # writer thread; it is the whole measurement's CPU over N.
        out[f"{side} cpu"] = cpu / n * 1e6
    return out


class _Quiet:
    def update(self, *_: object) -> None:
        pass


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--event-bytes", type=int, default=700)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest-stages.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    quiet_logs_and_hash_key()
    n = args.events
    messages = sample_messages(n, args.seed, pad_to=choose_pad_to(args.event_bytes, n, args.seed))
    avg_bytes = sum(len(v) for _, v in messages) / n
    workdir = Path(tempfile.mkdtemp(prefix="kto-bench-stages-"))
    per_event: dict[str, list[float]] = {}
    try:
        with running_broker(log_path=workdir / "broker.log") as broker:
            settings = broker_settings(broker.bootstrap)
            kafka = settings.kafka
            produce_events(kafka, messages)
            messages.clear()
            events = settings.events
            assert events.user_hash_key is not None
            parser = EventParser(
                events.user_hash_key.get_secret_value().encode(),
                events,
                settings.ingest.max_event_bytes,
            )
            skew = dt.timedelta(seconds=events.clock_skew_seconds)
            for round_no in range(args.repeats):
                chunks, seconds = _fetch_all(kafka, n)
                batches = _batches(chunks, IngestConfig().batch_max_events)
                del chunks
                store = FeedbackStore(str(workdir / f"store-{round_no}"))
                seconds |= replay_stages(batches, parser, store, skew)
                seconds["commit"] = commit_seconds(kafka, batches)
                del batches
                shutil.rmtree(store.root, ignore_errors=True)
                micros = {k: v / n * 1e6 for k, v in seconds.items()}
                micros |= end_to_end(kafka, workdir, n, round_no)
                for k, v in micros.items():
                    per_event.setdefault(k, []).append(v)
                console.print(
                    f"round {round_no + 1}/{args.repeats}: "
                    + ", ".join(f"{k.strip()} {v:.2f}" for k, v in micros.items())
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    median = {k: round(statistics.median(v), 2) for k, v in per_event.items()}
    console.print(f"\n{n:,} events of {avg_bytes:.0f} B; microseconds per event (median)")
    console.print(f"{'stage':<22} {'thread':<11} {'us/event':>9}")
    for stage, thread in STAGES.items():
        console.print(f"{stage:<22} {thread:<11} {median[stage]:>9.2f}")
    consumer_side = sum(median[s] for s, t in STAGES.items() if t == "consumer")
    writer_side = sum(median[s] for s, t in STAGES.items() if t == "writer")
    console.print(f"{'consumer thread, sum':<34} {consumer_side:>9.2f}")
    console.print(f"{'writer thread, sum':<34} {writer_side:>9.2f}")
    for side in ("raw", "ours"):
        console.print(
            f"{side + ' end to end':<22} {'wall / cpu':<11} "
            f"{median[side + ' wall']:>9.2f} / {median[side + ' cpu']:.2f}"
        )
    result = {
        "events": n,
        "avg_event_bytes": round(avg_bytes, 1),
        "repeats": args.repeats,
        "us_per_event": median,
        "consumer_thread_us": round(consumer_side, 2),
        "writer_thread_us": round(writer_side, 2),
        "ratio_wall": round(median["raw wall"] / median["ours wall"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result)
    args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
