"""`kto-loop metrics`: the alignment loop's state on a Prometheus /metrics endpoint.

It serves `connectors.metrics.LoopCollector` until SIGTERM or Ctrl-C, then prints one
JSON line on stdout and exits 0. Ingestion serves its own counters on [ingest]
metrics_port; this process reports what the cycle's records, the registry and the
store say (see connectors/metrics.py for why they are read at scrape time).
"""

from __future__ import annotations

import json
import logging
import signal
import threading

import typer

from connectors.config import Settings
from connectors.metrics import LoopCollector, serve
from flows.console import err, fail, setup_logging

log = logging.getLogger("kto_loop.metrics")


def metrics(
    settings: Settings,
    port: int,
    host: str,
    cache_seconds: float,
    store_refresh_seconds: float,
    log_level: str,
) -> None:
    """Serve the loop's metrics on http://host:port/metrics until SIGTERM or Ctrl-C.
    Exit 1 when the port cannot be bound."""
    setup_logging(log_level, rich=err.is_terminal)
    collector = LoopCollector(settings, cache_seconds, store_refresh_seconds)
    try:
        server, thread = serve(collector, port, host)
    except OSError as exc:
        fail(OSError(f"cannot serve metrics on {host}:{port}: {exc}"), 1)
    stop = threading.Event()
    stopped_by: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopped_by.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("serving the loop's metrics on http://%s:%d/metrics", host, port)
        stop.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    typer.echo(json.dumps({"port": port, "stopped_by": stopped_by[0] if stopped_by else None}))
