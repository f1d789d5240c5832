"""Our long-running commands as a test's children: started as a background job starts
them (SIGINT ignored), and every process they start watched, so that a test can check
that none outlives them, and a failed test can kill whatever is left."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import psutil

from deploy.local.processes import dies_with_this_process

ROOT = Path(__file__).resolve().parent.parent


def start_command(
    args: Sequence[str],
    *,
    stdout: int | IO[Any] | None,
    stderr: int | IO[Any] | None = subprocess.STDOUT,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start `args` in the repository root with SIGINT ignored, as `cmd &` in a script
    or a service manager does, whatever this test process inherited: the command must
    make itself hear Ctrl-C. It gets SIGTERM if the test session dies first (even by
    SIGKILL), so that it stops what it started."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through exec
    try:
        return subprocess.Popen(
            list(args),
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=ROOT,
            preexec_fn=dies_with_this_process(signal.SIGTERM),
        )
    finally:
        signal.signal(signal.SIGINT, previous)


class Descendants:
    """Every process a command started, seen while it runs: sampled in a thread, and
    once more by `record()` right before the test signals it (one killed with SIGKILL
    cannot be asked any more)."""

    def __init__(self, root: subprocess.Popen) -> None:
        self.root = root
        self.seen: dict[int, psutil.Process] = {}
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def record(self) -> list[psutil.Process]:
        """Add the processes under the command now; return every one seen so far."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.root.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        return list(self.seen.values())

    def running(self, text: str) -> list[psutil.Process]:
        """Those running now whose command line contains `text`."""
        self.record()
        return [p for p in self.alive() if text in _describe(p)]

    def _watch(self) -> None:
        while self.root.poll() is None:
            self.record()
            time.sleep(0.2)  # the sampling interval of a watcher, not a synchronisation

    def alive(self) -> list[psutil.Process]:
        return [p for p in list(self.seen.values()) if _running(p)]

    def wait_gone(self, timeout: float) -> None:
        """Poll until every process seen has exited; fail naming those left."""
        deadline = time.monotonic() + timeout
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the poll interval of a deadline loop
        assert not left, f"still running {timeout:.0f} s later: " + ", ".join(
            _describe(p) for p in left
        )

    def kill(self) -> None:
        """After a failed test: the command and everything it started, killed."""
        if self.root.poll() is None:
            self.record()
            self.root.kill()
            self.root.wait(timeout=30)
        for p in self.alive():
            with contextlib.suppress(psutil.Error):
                p.kill()


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return str(p.pid)
