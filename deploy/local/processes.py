"""Child processes that end with the command that started them, and commands that hear
Ctrl-C however they were started.

Every long-lived process our commands start (the broker, vLLM, a Prefect server) goes
through `start_child` and `stop_child`:

- it runs in a process group of its own, so a Ctrl-C at the terminal reaches our
  command alone, which then stops its children in order. It stays in our session: with
  the kernel's autogroup scheduling (on by default) each session shares the CPU as one
  group, so a child in a session of its own would take half the machine from our
  command and the niceness given to its busiest threads would not count against ours
  (measured with vLLM's spinning engine: clients in another session got no CPU for up
  to 3 s);
- on Linux it gets a parent-death signal (prctl PR_SET_PDEATHSIG), so it also ends when
  our command is killed with SIGKILL and has no chance to clean up;
- it hears SIGINT whatever our command inherited (exec keeps an ignored signal ignored);
- `stop_child` sends SIGTERM, waits up to a deadline, SIGKILLs the child if it is still
  there, and then SIGKILLs what is left of its process group (whatever it started).

`interruptible()` wraps a long-running command's body: a command started as a
background job (`cmd &` in a script) or by a service manager inherits SIGINT ignored,
Python then installs no KeyboardInterrupt handler, and Ctrl-C never reaches it; and the
default SIGTERM ends a process without running a single `finally`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl(2) on Linux (loaded once, in the parent: a child between fork and
    exec should do as little as possible), else None."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Have the calling process get `signum` when its parent dies (Linux; elsewhere
    nothing). If the parent `parent_pid` is already gone, the signal comes at once.

    Linux sends it when the parent *thread* that started this process exits, so the
    parent must start it from a thread that lives as long as the child should.
    """
    prctl = _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, int(signum))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)


SCHEDULER_PID_ENV = "KTO_LOOP_SCHEDULER_PID"


def die_with_scheduler(*_: object) -> None:
    """A flow's on_running hook, in the run's own process: a run that `kto-loop
    schedule` started (its pid is in KTO_LOOP_SCHEDULER_PID, which the runs inherit)
    gets SIGKILL when that scheduler dies, even by SIGKILL (its server goes too, so
    nothing could record the run's end anyway; the next run reports it crashed).
    Anywhere else (`kto-loop run`, a work pool's worker) it does nothing.

    The hook is the flow's own, not added with `with_options`: Prefect's runner loads a
    served deployment's flow from its entrypoint, without options added in the
    scheduler. Linux signals when the thread that started the process ends: Prefect
    3.9's runner starts runs from its event loop, in the main thread of `schedule`."""
    value = os.environ.get(SCHEDULER_PID_ENV, "")
    if not value.isdigit():
        return
    scheduler = int(value)
    if os.getppid() == scheduler:
        die_with_parent(scheduler, signal.SIGKILL)
        return
    try:
        os.kill(scheduler, 0)
    except ProcessLookupError:  # the scheduler died before this run got here
        os.kill(os.getpid(), signal.SIGKILL)
    except PermissionError:  # a pid reused by another user's process: not ours
        return


def dies_with_this_process(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets `signum` when this process
    dies, however it dies (Linux; elsewhere nothing). Start the child from the main
    thread (see `die_with_parent`)."""
    parent = os.getpid()
    _prctl()  # loaded here, not in the child
    return lambda: die_with_parent(parent, signum)


def start_child(
    args: Sequence[str],
    *,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    death_signal: int = signal.SIGTERM,
) -> subprocess.Popen:
    """Start a long-lived child that never outlives this process: in its own process group,
    SIGINT at its default, and `death_signal` sent to it when this process dies, however
    it dies. Its stdout and stderr go to `log_path` (appended), else nowhere.

    SIGTERM as the parent-death signal lets a child that has children of its own (vLLM's
    engine core) take them down with it. Call this from the main thread (or one that
    lives as long as the child): Linux sends the parent-death signal when the thread
    that started the child exits.
    """
    parent = os.getpid()
    main = threading.current_thread() is threading.main_thread()
    if not main:
        log.warning("%s started off the main thread: it will not die with a killed parent", args[0])
    _prctl()  # loaded here, not in the child

    def in_child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if main:
            die_with_parent(parent, death_signal)

    out = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            process_group=0,
            # Not thread-safe in general; this one calls only signal() and prctl().
            preexec_fn=in_child,
        )
    finally:
        if log_path is not None:
            out.close()  # the child holds its own copy


def stop_child(process: subprocess.Popen, timeout: float = 10.0) -> int:
    """Stop a child from `start_child`: SIGTERM, SIGKILL after `timeout` seconds, then
    SIGKILL to whatever is left in its process group. Returns its exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s: killing it", process.pid, timeout)
            _kill_group(process.pid)
            process.wait()
    # A grandchild its parent did not take down. The group id stays reserved while a
    # member lives, so this cannot reach an unrelated group.
    _kill_group(process.pid)
    return process.returncode


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _terminated(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within it, SIGINT raises KeyboardInterrupt and SIGTERM raises SystemExit(143) in
    the main thread, whatever this process inherited, so that `finally` blocks stop
    what the command started. The previous handlers come back on the way out; off the
    main thread it changes nothing (Python handles signals there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
