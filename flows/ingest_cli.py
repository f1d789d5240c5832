"""`kto-loop ingest / produce-sample / store / snapshot`: feedback in, training data out.

`ingest` consumes the feedback topic into the store (a live status line on a terminal);
`produce-sample` sends synthetic events; `store` summarises the store; `snapshot`
freezes its feedback (or a TRL dataset) into a training snapshot. `store` and
`snapshot` print their tables on stdout; progress, warnings and failures go to stderr;
every command but `store` ends with one JSON line on stdout.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import typer
from kafka.errors import KafkaError
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from connectors.config import Settings
from connectors.feedback.ingest import IngestError, Ingestor, IngestStats
from connectors.feedback.kafka_clients import BrokerUnavailable
from connectors.feedback.store import DEAD_LETTERS, FEEDBACK, FeedbackStore
from flows.console import err, fail, setup_logging


class _StatusLine:
    """A one-line live view of an ingest process: rate, lag, dead letters."""

    def __init__(self, stats: IngestStats) -> None:
        self.stats = stats
        self._samples: deque[tuple[float, int]] = deque(maxlen=10)

    def __rich__(self) -> Text:
        s = self.stats
        now = time.monotonic()
        self._samples.append((now, s.consumed))
        t0, c0 = self._samples[0]
        rate = (s.consumed - c0) / (now - t0) if now > t0 else 0.0
        lag = "?" if s.lag is None else f"{s.lag:,}"
        return Text.assemble(
            (f"{s.state:<18}", "bold cyan"),
            f" consumed {s.consumed:>10,}  ",
            (f"{rate:>9,.0f}/s", "green"),
            f"  stored {s.stored:>10,}  lag {lag:>8}  ",
            (f"dead letters {s.dead_lettered:,}", "yellow" if s.dead_lettered else ""),
            f"  partitions {len(s.assigned)}",
        )


def ingest(settings: Settings, idle_exit: float | None, status: bool, log_level: str) -> None:
    """Consume into the store until SIGTERM or Ctrl-C (the batch finishes and is
    committed), or until `idle_exit` seconds without events; print the counts as JSON.
    Exit 2 without a user hash key, 3 when no broker answered, 1 when ingestion failed."""
    live = status and err.is_terminal
    setup_logging(log_level, rich=live)
    try:
        ingestor = Ingestor(settings)
    except IngestError as exc:
        fail(exc, 2)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("kto_loop").info(
            "%s: finishing the batch, then exiting", signal.Signals(signum).name
        )
        stop.set()
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if live:
            with Live(_StatusLine(ingestor.stats), console=err, refresh_per_second=2):
                stats = ingestor.run(stop, idle_exit_seconds=idle_exit)
        else:
            stats = ingestor.run(stop, idle_exit_seconds=idle_exit)
    except BrokerUnavailable as exc:
        fail(exc, 3)
    except IngestError as exc:
        fail(exc, 1)
    typer.echo(
        json.dumps(
            {
                "consumed": stats.consumed,
                "stored": stats.stored,
                "dead_lettered": stats.dead_lettered,
                "batches": stats.batches,
            }
        )
    )


def produce_sample(
    settings: Settings,
    events: int,
    seed: int,
    malformed: bool,
    pad_to: int,
    adapter: str | None = None,
) -> None:
    """Send `events` synthetic events (and with `malformed` one of each malformed kind),
    credited to `adapter` (alias@vN) when given; print how many were sent as JSON. Exit 2
    for an adapter that is not alias@vN, 3 when the broker refused them."""
    from rich.progress import Progress

    from connectors.feedback.produce import produce
    from pipeline.feedback.sample import sample_messages
    from pipeline.serving.registry import parse_served_name

    if adapter is not None and parse_served_name(adapter) is None:
        fail(ValueError(f"--adapter {adapter!r} is not a served version name: use alias@vN"), 2)
    setup_logging("WARNING", rich=False)
    # A failure is reported once below; kafka-python's per-retry lines add nothing.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    messages = sample_messages(events, seed, pad_to=pad_to, malformed=malformed, adapter=adapter)
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("producing", total=len(messages))
        try:
            sent = produce(settings.kafka, messages, on_sent=lambda n: progress.advance(task, n))
        except KafkaError as exc:
            servers = ",".join(settings.kafka.bootstrap_servers)
            fail(RuntimeError(f"could not send to {settings.kafka.topic} at {servers}: {exc}"), 3)
    typer.echo(json.dumps({"sent": sent, "topic": settings.kafka.topic}))


def store(settings: Settings, compact_mb: int | None = None) -> None:
    """Print a table of the store's rows, labels and dead letters by kind; with
    `compact_mb`, first compact its feedback files into files of about that many MB
    and say so on stderr as JSON. Exit 1 when the store cannot be compacted."""
    from connectors.feedback.store import StoreError
    from pipeline.feedback import records

    fs = FeedbackStore(settings.store.url, settings.store.storage_options)
    if compact_mb is not None:
        try:
            done = fs.compact(compact_mb << 20)
        except StoreError as exc:
            fail(exc, 1)
        err.print(json.dumps({"compacted": done}), markup=False, highlight=False)
    # Counts only: the text columns, most of the store's bytes, are never read.
    rows = fs.read(FEEDBACK, columns=[records.EVENT_ID, records.FEEDBACK])
    dead = fs.read(DEAD_LETTERS, columns=[records.ERROR_KIND])
    table = Table(title=f"feedback store {settings.store.url}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("feedback rows", f"{len(rows):,}")
    table.add_row("distinct events", f"{rows[records.EVENT_ID].nunique():,}")
    for name, count in rows[records.FEEDBACK].value_counts().sort_index().items():
        table.add_row(f"  {name}", f"{count:,}")
    table.add_row("dead letters", f"{len(dead):,}")
    for name, count in dead[records.ERROR_KIND].value_counts().sort_index().items():
        table.add_row(f"  {name}", f"{count:,}")
    Console().print(table)


def snapshot(settings: Settings, data: Path | None, out: Path | None) -> None:
    """Freeze the store's feedback (or the TRL file `data`) into a snapshot under `out`
    (default: [snapshot] out_dir); print its counts, then its summary as JSON. Exit 2
    for data that makes no snapshot, 1 when it cannot be read or written."""
    from connectors.feedback.snapshots import load_training_data, write_snapshot
    from connectors.feedback.store import StoreError
    from connectors.feedback.vote_table import VoteTable
    from pipeline.feedback.snapshot import SnapshotError

    options = settings.snapshot
    out_dir = out or Path(settings.snapshot.out_dir)
    try:
        if data is None:
            fs = FeedbackStore(settings.store.url, settings.store.storage_options)
            # Folds the store files added since the last snapshot into the vote table,
            # and builds from it what a rebuild from every row would.
            snap = VoteTable(fs).snapshot(options)
            source = settings.store.url
        else:
            snap = load_training_data(data, options)
            source = str(data)
    except SnapshotError as exc:
        fail(exc, 2)
    except (StoreError, OSError) as exc:
        fail(RuntimeError(f"could not read {data or settings.store.url}: {exc}"), 1)
    try:
        path = write_snapshot(snap, out_dir)
    except OSError as exc:
        fail(RuntimeError(f"could not write the snapshot under {out_dir}: {exc}"), 1)
    _print_counts(snap, source)
    warn_skipped(snap)
    c, s = snap.counts, snap.stats
    typer.echo(
        json.dumps(
            {
                "snapshot": snap.id,
                "path": str(path),
                "examples": c.total,
                "train_desirable": c.train_desirable,
                "train_undesirable": c.train_undesirable,
                "heldout_desirable": c.heldout_desirable,
                "heldout_undesirable": c.heldout_undesirable,
                "skipped_rows": s.skipped_rows,
            }
        )
    )


def _print_counts(snap: Any, source: str) -> None:
    """A table on stdout of what the snapshot read, counted, dropped and kept."""
    c, s = snap.counts, snap.stats
    table = Table(title=f"snapshot {snap.id} from {source}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for label, value in [
        ("rows read", s.rows_read),
        ("  duplicates (counted once)", s.duplicates),
        ("  superseded by a later vote", s.superseded),
        ("  retracted", s.retracted),
        ("  unlabelled (neutral rating)", s.unlabelled),
        ("votes counted", s.votes),
        ("  tied examples", s.ties),
        ("  ties dropped", s.ties_dropped),
        ("rows skipped (unreadable)", s.skipped_rows),
        ("train desirable", c.train_desirable),
        ("train undesirable", c.train_undesirable),
        ("heldout desirable", c.heldout_desirable),
        ("heldout undesirable", c.heldout_undesirable),
    ]:
        table.add_row(label, f"{value:,}")
    Console().print(table)


def warn_skipped(snap: Any) -> None:
    """Say on stderr which rows of the data were left out, and why (the first few)."""
    s = snap.stats
    if not s.skipped_rows:
        return
    err.print(
        f"warning: {s.skipped_rows} of {s.rows_read} rows skipped: a value in them cannot be "
        "read (the first reasons follow); correct those rows in the data to use them",
        style="yellow",
        markup=False,
    )
    for reason in s.skipped_reasons:
        err.print(f"  {reason}", style="yellow", markup=False, highlight=False)
