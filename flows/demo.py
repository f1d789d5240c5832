"""`make demo`: the loop so far, on one machine with embedded defaults.

Starts a local Kafka-protocol broker, sends synthetic thumbs up/down events (and one
message of every malformed kind), ingests them into a fresh local store with a live
status line, prints what landed where, and stops everything it started, also on
Ctrl-C. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from connectors.config import Settings, load_settings
from connectors.ingest import Ingestor
from connectors.produce import produce
from connectors.store import DEAD_LETTERS, FEEDBACK
from deploy.local.broker import running_broker
from flows.cli import _StatusLine
from pipeline import records
from pipeline.sample import sample_messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("data/demo"))
    args = parser.parse_args()

    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_dir = args.workdir / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Demo data is thrown away, so a fresh hash key per run is fine; production sets one.
    os.environ.setdefault("KTO_LOOP_EVENTS__USER_HASH_KEY", secrets.token_hex(32))

    with running_broker(log_path=run_dir / "broker.log") as broker:
        console.print(f"broker on {broker.bootstrap}; store in {run_dir / 'store'}")
        settings: Settings = load_settings(
            None,
            kafka={
                "bootstrap_servers": [broker.bootstrap],
                "topic": "chat-feedback",
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            },
            store={"url": str(run_dir / "store")},
            ingest={"batch_max_seconds": 1.0},
        )
        messages = sample_messages(args.events, args.seed, pad_to=350, malformed=True)
        with console.status(f"producing {len(messages):,} events"):
            sent = produce(settings.kafka, messages)

        ingestor = Ingestor(settings)
        with Live(_StatusLine(ingestor.stats), console=console, refresh_per_second=4):
            stats = ingestor.run(threading.Event(), idle_exit_seconds=2.0)

        rows = ingestor.store.read(FEEDBACK)
        dead = ingestor.store.read(DEAD_LETTERS)

    table = Table(title="feedback store after one ingest")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("events sent", f"{sent:,}")
    for name, count in rows[records.FEEDBACK].value_counts().sort_index().items():
        table.add_row(f"stored: {name}", f"{count:,}")
    for name, count in dead[records.ERROR_KIND].value_counts().sort_index().items():
        table.add_row(f"dead letter: {name}", f"{count:,}")
    Console().print(table)
    print(
        json.dumps(
            {
                "events": sent,
                "stored": len(rows),
                "distinct_events": int(rows[records.EVENT_ID].nunique()),
                "dead_lettered": len(dead),
                "consumed": stats.consumed,
                "store": str(run_dir / "store"),
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
