"""Named crash points, for tests that kill a process at a chosen step and restart it.

The store, the vote table and the ingest loop call `crash_point(name)` at each step
where a crash would leave a distinct state on disk or in Kafka (e.g. "store.write.1":
a batch's temp file is written but not renamed; "ingest.durable.1": dead letters are
on the DLQ topic but no file is written). Nothing happens unless the environment
variable KTO_LOOP_FAULT_POINT names that step; then the process exits at once with
os._exit(FAULT_EXIT_CODE): no `finally`, no flush, no commit, as with a SIGKILL or
a power cut. "NAME@N" exits the N-th time NAME is reached in this process. A test sets
the variable for the child process it starts, so the crash happens in that process.

This is the product code's only way to inject a fault. A fault in a process that is
not ours (a vLLM replica, the broker) is a test's own fake, e.g. an httpx transport
handed to VllmAdmin.

The variable is read here, at the I/O edge, and nowhere in pipeline/. Leave it unset
in production.
"""

from __future__ import annotations

import collections
import os
import sys
import threading

FAULT_POINT_ENV = "KTO_LOOP_FAULT_POINT"
# The exit status of a process killed at a crash point, so tests can tell it from
# any other exit.
FAULT_EXIT_CODE = 86

_lock = threading.Lock()
_reached: collections.Counter[str] = collections.Counter()


def crash_point(name: str) -> None:
    """Exit the process here if KTO_LOOP_FAULT_POINT names this step (and count)."""
    wanted = os.environ.get(FAULT_POINT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    with _lock:
        _reached[name] += 1
        count = _reached[name]
    if count == int(nth or 1):
        sys.stderr.write(f"kto-loop: killed at crash point {wanted} ({FAULT_POINT_ENV})\n")
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)
