"""The alignment cycle's local state, per alias: run records, reports, the candidate
being trained, and the lock that lets one run at a time.

    <work_dir>/<alias>/
        runs/<run_id>.json        one record per run, replaced atomically as it goes
        reports/<run_id>/         report.md and the plots beside it
        candidate/                the adapter in training (its checkpoint survives a crash)
        candidate/cycle.json      which snapshot the candidate is being trained on
        lock, lock.json           the run lock and who holds it

The lock is an OS file lock (flock): the kernel releases it when its process dies, so
a crashed run never leaves the alias locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from connectors.feedback.store import write_local_atomic
from pipeline.serving.registry import check_alias

CANDIDATE_MARKER = "cycle.json"
CANARY_LOG = "canary.jsonl"


class CycleBusy(RuntimeError):
    """Another run of the same alias holds the lock."""


class CycleRuns:
    """Run records and working directories of one alias's cycles."""

    def __init__(self, work_dir: str | Path, alias: str) -> None:
        self.alias = check_alias(alias)
        self.root = Path(work_dir) / self.alias
        self.runs_dir = self.root / "runs"
        self.candidate_dir = self.root / "candidate"

    # -- records ----------------------------------------------------------------------

    def save(self, record: dict[str, Any]) -> None:
        """Write (or replace) a run's record in one step."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        body = json.dumps(record, indent=2, default=str).encode()
        write_local_atomic(str(self.runs_dir / f"{record['run_id']}.json"), body)

    def recent(self, n: int = 10) -> list[dict[str, Any]]:
        """The newest n run records, newest first (records that cannot be read are
        reported as such rather than hidden)."""
        if not self.runs_dir.is_dir():
            return []
        records = []
        for path in self.runs_dir.glob("*.json"):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                records.append(
                    {
                        "run_id": path.stem,
                        "started_at": "",
                        "status": "unreadable",
                        "reason": str(exc),
                    }
                )
        records.sort(key=lambda r: (r.get("started_at") or "", r["run_id"]), reverse=True)
        return records[:n]

    def mark_crashed(self, current_run_id: str) -> list[str]:
        """Mark runs still recorded as running, other than the current one, as crashed:
        whoever holds the lock knows no other run is alive. Returns their ids."""
        marked = []
        for record in self.recent(n=10_000):
            if record.get("status") == "running" and record["run_id"] != current_run_id:
                record["status"] = "crashed"
                record["reason"] = (
                    f"its process died before it finished; run {current_run_id} found it "
                    "and took over its candidate"
                )
                self.save(record)
                marked.append(record["run_id"])
        return marked

    def last_judged(self) -> dict[str, Any] | None:
        """The newest run whose candidate the gate judged and that ended (published, put
        into a canary, or refused), or whose training kept its starting point ("no_gain":
        its data was judged too, by the trainer): its snapshot is what "new feedback" is counted
        against. A run that failed after the gate (a replica down while publishing) does
        not count, so the next run publishes the same candidate."""
        for record in self.recent(n=10_000):
            if record.get("status") == "no_gain" or (
                record.get("gate") and record.get("status") in ("published", "canary", "skipped")
            ):
                return record
        return None

    # -- canary checks ------------------------------------------------------------------

    def append_canary_check(self, check: dict[str, Any]) -> None:
        """Append one canary check to the alias's canary log (one JSON line each)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / CANARY_LOG).open("a") as f:
            f.write(json.dumps(check, default=str) + "\n")

    def canary_checks(self, n: int = 20) -> list[dict[str, Any]]:
        """The newest n canary checks, newest first (a line a crash cut short is left
        out)."""
        path = self.root / CANARY_LOG
        if not path.is_file():
            return []
        out = []
        for line in reversed(path.read_text().splitlines()):
            if len(out) == n:
                break
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def report_dir(self, run_id: str) -> Path:
        path = self.root / "reports" / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- the candidate ----------------------------------------------------------------

    def candidate_snapshot(self) -> str | None:
        """The snapshot the candidate directory holds a run of, if any."""
        marker = self.candidate_dir / CANDIDATE_MARKER
        if not marker.is_file():
            return None
        try:
            return json.loads(marker.read_text()).get("snapshot_id")
        except ValueError:
            return None

    def fresh_candidate(self, snapshot_id: str, run_id: str) -> Path:
        """An empty candidate directory marked for this snapshot."""
        self.clear_candidate()
        self.candidate_dir.mkdir(parents=True)
        marker = {"snapshot_id": snapshot_id, "run_id": run_id}
        write_local_atomic(str(self.candidate_dir / CANDIDATE_MARKER), json.dumps(marker).encode())
        return self.candidate_dir

    def clear_candidate(self) -> None:
        shutil.rmtree(self.candidate_dir, ignore_errors=True)

    # -- one run at a time --------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, run_id: str, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the alias for one run; raise CycleBusy naming the holder after wait_s."""
        self.root.mkdir(parents=True, exist_ok=True)
        holder_file = self.root / "lock.json"
        lock = FileLock(str(self.root / "lock"), timeout=wait_s, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise CycleBusy(
                f"another run of alias {self.alias!r} is in progress ({_describe(holder_file)}); "
                "this one did not start"
            ) from None
        try:
            holder = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname()}
            write_local_atomic(str(holder_file), json.dumps(holder).encode())
            yield
        finally:
            with contextlib.suppress(OSError):
                holder_file.unlink()
            lock.release()

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now, as it wrote itself down (None when free)."""
        try:
            return json.loads((self.root / "lock.json").read_text())
        except (OSError, ValueError):
            return None

    def live_holder(self) -> dict[str, Any] | None:
        """The run holding the lock, unless it was left by a run whose process died on
        this machine (a holder on another host is taken at its word)."""
        holder = self.holder()
        if holder is None:
            return None
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except (OSError, ValueError, KeyError):
                return None
        return holder


def aliases_with_runs(work_dir: str | Path) -> list[str]:
    """The aliases that have run records under `work_dir`, sorted."""
    root = Path(work_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "runs").is_dir())


def _describe(holder_file: Path) -> str:
    try:
        h = json.loads(holder_file.read_text())
    except (OSError, ValueError):
        return "holder unknown"
    return f"run {h.get('run_id')}, pid {h.get('pid')} on {h.get('host')}"
