"""What the alignment loop's records say, as numbers a monitoring system can watch.

Values in, values out: the cycle's run records (dicts, as `flows.alignment.RunRecord`
writes them), an alias's history and the vote table go in; counts, times and
latencies come out. `connectors.metrics` reads the records and exposes these numbers
to Prometheus.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.feedback.records import ADAPTER
from pipeline.serving.registry import ACTIONS, CANARY_END, AliasHistory, version_number
from pipeline.serving.registry import OUTCOMES as CANARY_OUTCOMES
from pipeline.training.manifest import NO_GAIN

# How a finished run ended. "refused" is a run the gate (or the generation check) judged
# and said no to; its record's status is "skipped", like a run that had too little new
# feedback, but a team watches the two differently.
PUBLISHED, REFUSED, SKIPPED, FAILED, CRASHED, UNREADABLE = (
    "published", "refused", "skipped", "failed", "crashed", "unreadable",
)  # fmt: skip
# A run whose candidate went into a canary: live votes, not the run, decide it.
CANARY = "canary"
OUTCOMES = (PUBLISHED, CANARY, REFUSED, SKIPPED, NO_GAIN, FAILED, CRASHED, UNREADABLE)
RUNNING = "running"
# The adapter label of votes on answers of a version the registry does not hold.
OTHER_ADAPTER = "other"


def run_outcome(record: Mapping[str, Any]) -> str:
    """How a run ended: one of OUTCOMES, or RUNNING while its record says it runs (a run
    whose process died stays "running" until the next run marks it crashed)."""
    status = record.get("status")
    if status == SKIPPED and (record.get("gate") or {}).get("promote") is False:
        return REFUSED
    if status in OUTCOMES or status == RUNNING:
        return str(status)
    return UNREADABLE


def timestamp(iso: str | None) -> float | None:
    """Seconds since the epoch of an ISO-8601 time (UTC when it names no zone), None for
    an empty or unparsable one."""
    if not iso:
        return None
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


@dataclass(frozen=True)
class CycleSummary:
    """One alias's cycle runs, summed up.

    Attributes:
        outcomes: finished runs per outcome (every outcome present, zeros included;
            runs still recorded as running are not counted).
        last_started: when the newest run started (epoch seconds), None before any.
        last_finished: per outcome, when the newest run with it finished.
        last_seconds: wall time of the newest finished run.
        publish_seconds: the publish step's time of every published run, oldest first
            (the publisher's own measure: loading, smoke test and switch on every
            replica, the last attempt only).
    """

    outcomes: dict[str, int]
    last_started: float | None = None
    last_finished: dict[str, float] = field(default_factory=dict)
    last_seconds: float | None = None
    publish_seconds: tuple[float, ...] = ()


def summarize_runs(records: Iterable[Mapping[str, Any]]) -> CycleSummary:
    """Sum up an alias's run records (in any order)."""
    ordered = sorted(records, key=lambda r: r.get("started_at") or "")
    outcomes: Counter[str] = Counter({o: 0 for o in OUTCOMES})
    last_finished: dict[str, float] = {}
    last_seconds = None
    publish_seconds = []
    for r in ordered:
        outcome = run_outcome(r)
        if outcome == RUNNING:
            continue
        outcomes[outcome] += 1
        finished = timestamp(r.get("finished_at"))
        if finished is not None:
            last_finished[outcome] = max(finished, last_finished.get(outcome, finished))
        if r.get("seconds") is not None:
            last_seconds = float(r["seconds"])
        published = r.get("published") or {}
        if outcome == PUBLISHED and published.get("seconds") is not None:
            publish_seconds.append(float(published["seconds"]))
    starts = [t for t in (timestamp(r.get("started_at")) for r in ordered) if t is not None]
    return CycleSummary(
        outcomes=dict(outcomes),
        last_started=max(starts, default=None),
        last_finished=last_finished,
        last_seconds=last_seconds,
        publish_seconds=tuple(publish_seconds),
    )


@dataclass(frozen=True)
class AliasSummary:
    """What an alias serves, from its history.

    Attributes:
        served_version: N of the version `vN` it serves, 0 before its first promotion.
        events: promotions and rollbacks so far (every action present).
        last_changed: when it last switched (epoch seconds), None before any event.
        canary_version: N of the canary's candidate, 0 when none runs.
        canary_share: the canary's share of conversations, 0 when none runs.
        canary_outcomes: canaries ended so far, per outcome (every outcome present).
    """

    served_version: int
    events: dict[str, int]
    last_changed: float | None
    canary_version: int = 0
    canary_share: float = 0.0
    canary_outcomes: dict[str, int] = field(default_factory=dict)


def summarize_alias(history: AliasHistory) -> AliasSummary:
    """Sum up an alias's history."""
    current = history.current
    events = Counter({a: 0 for a in ACTIONS}) + Counter(e.action for e in history.events)
    switches = (e for e in history.events if e.action in ACTIONS)
    times = [t for t in (timestamp(e.at) for e in switches) if t is not None]
    canary = history.canary
    ended = Counter(e.outcome for e in history.events if e.action == CANARY_END)
    return AliasSummary(
        served_version=version_number(current) if current else 0,
        events={a: events[a] for a in ACTIONS},
        last_changed=max(times, default=None),
        canary_version=version_number(canary.version) if canary else 0,
        canary_share=canary.share if canary else 0.0,
        canary_outcomes={o: ended[o] for o in CANARY_OUTCOMES},
    )


def histogram(values: Iterable[float], bounds: Iterable[float]) -> list[tuple[str, int]]:
    """Cumulative bucket counts of `values` for upper bounds `bounds` (ascending), with
    "+Inf" last, as Prometheus histograms count: [("0.5", 2), ..., ("+Inf", n)]."""
    values = list(values)
    buckets = [(_bound(b), sum(v <= b for v in values)) for b in bounds]
    return [*buckets, ("+Inf", len(values))]


def _bound(b: float) -> str:
    return repr(float(b))


def registered_adapters(votes: pa.Table, registered: Collection[str]) -> pa.Table:
    """`votes` with every adapter name not in `registered` (served names, `chat@v3`)
    replaced by OTHER_ADAPTER; votes without an adapter keep none.

    The client that sends a vote names its adapter, so a name becomes a label only
    when the registry holds that version: one client cannot make the series Prometheus
    keeps grow without bound.
    """
    names = votes[ADAPTER]
    known = pc.is_in(names, value_set=pa.array(sorted(registered), pa.string()))
    kept = pc.if_else(pc.or_(known, pc.is_null(names)), names, OTHER_ADAPTER)
    return votes.set_column(votes.schema.get_field_index(ADAPTER), ADAPTER, kept)
