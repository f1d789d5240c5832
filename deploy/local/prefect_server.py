"""A local Prefect server that ends with the command that started it.

`kto-loop schedule` serves on one (schedules need a server: docs/architecture.md,
Prefect); `kto-loop run` and the demo run their flow against a temporary one when
PREFECT_API_URL names none.
Prefect's own ephemeral mode would start a server process too, but one nothing ties to
our process: a killed command leaves it running. This one is a child from
deploy/local/processes.py.

    with prefect_api(log_path, home=DIR) as api_url:
        ...     # Prefect clients in this process talk to api_url: PREFECT_API_URL when
                # set, else a local server started for this block
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.local.broker import free_port
from deploy.local.processes import start_child, stop_child


@dataclass
class PrefectServer:
    """A running `prefect server start`."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        """Its API URL, what PREFECT_API_URL must say to use it."""
        return f"http://127.0.0.1:{self.port}/api"

    def stop(self) -> None:
        stop_child(self.process, timeout=15)


def start_prefect_server(
    log_path: Path,
    *,
    port: int | None = None,
    home: Path | None = None,
    ui: bool = True,
    timeout: float = 120.0,
) -> PrefectServer:
    """Start `prefect server start` on 127.0.0.1:port (a free one by default) and return
    once it answers /health.

    Args:
        log_path: the server's output, appended.
        home: its PREFECT_HOME (and so its SQLite database); default: the inherited one.
        ui: serve the web UI too (it costs a few seconds at start).

    Raises:
        RuntimeError: the server exited or did not answer /health within `timeout` s;
            the message holds the end of its log.
    """
    port = port or free_port()
    env = {
        **os.environ,
        # Offline, its telemetry errors on a locked SQLite database (docs/architecture.md).
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true" if ui else "false",
    }
    env.pop("PREFECT_API_URL", None)
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        env["PREFECT_HOME"] = str(home)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    process = start_child([*cmd, "--port", str(port)], log_path=log_path, env=env)
    server = PrefectServer(process, port, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(server.url):
            if process.poll() is not None:
                state = f"exited ({process.returncode})"
            elif time.monotonic() > deadline:
                state = f"did not answer {server.url}/health in {timeout:.0f} s"
            else:
                time.sleep(0.5)  # the poll interval of a deadline loop
                continue
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the local Prefect server {state}:\n{tail}")
    except BaseException:  # also Ctrl-C while it starts: nothing half-started stays
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_prefect_server(
    log_path: Path,
    *,
    port: int | None = None,
    home: Path | None = None,
    ui: bool = True,
    timeout: float = 120.0,
) -> Iterator[str]:
    """Start a server with `start_prefect_server`, point this process's Prefect settings
    at it (PREFECT_API_URL) until the block ends, then stop it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = start_prefect_server(log_path, port=port, home=home, ui=ui, timeout=timeout)
    try:
        with temporary_settings({PREFECT_API_URL: server.url}):
            try:
                yield server.url
            finally:
                _drain_clients()
    finally:
        server.stop()


@contextlib.contextmanager
def prefect_api(log_path: Path, *, home: Path | None = None, ui: bool = True) -> Iterator[str]:
    """The Prefect API to run against: PREFECT_API_URL when set (the team's server,
    Prefect Cloud), else a local server from `running_prefect_server` for the block."""
    configured = configured_api()
    if configured:
        yield configured
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with running_prefect_server(log_path, home=home, ui=ui) as url:
        yield url


def configured_api() -> str | None:
    """PREFECT_API_URL when it names a server (the team's, Prefect Cloud), else None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _drain_clients() -> None:
    """Send the run logs and events that Prefect's background workers in this process
    still hold while the server is up (as prefect_test_harness does); at exit they
    would find it gone."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    return False
