"""Prometheus metrics of the alignment loop, read from its records when scraped.

The cycle is a batch job: a run lives for minutes once a night, in a process Prefect
starts and ends, so counters kept in its memory would die with it, and a Pushgateway
would keep only the last push per group and serve it forever after the loop stops.
The durable truth is on disk already: every run leaves a record
(`connectors.cycle_runs`), every promotion and rollback is in the alias's history
(`connectors.serving.adapter_registry`), and every vote is in the feedback store. So
`LoopCollector` reads those when Prometheus scrapes, and holds what it built for
`cache_seconds` (concurrent or frequent scrapes read nothing twice). The votes are the
expensive part: the liked share is counted from the store's vote table
(`VoteTable.read()`: the table the cycle folded, with the store files added since
folded in memory), recomputed only when the store's files or the registered versions
changed, and at most once per `store_refresh_seconds`, whatever the scrape interval.
A read that fails is tried again after STORE_RETRY_SECONDS, then twice as long each
time up to `store_refresh_seconds`; meanwhile the last liked share is served, with
ktoloop_metrics_store_stale at 1 and a warning logged at each failed try.

The `adapter` label comes from the votes, that is from clients: only a version the
registry holds (`alias@vN` for a known alias) becomes a label, every other name is
counted as `other`, so no client can make the series grow without bound.

Served by `kto-loop metrics` (its own long-running process, one per deployment: every
value comes from shared files, so two of them would report the same numbers), or
attached to any process's registry:

    from prometheus_client import REGISTRY
    REGISTRY.register(LoopCollector(settings))

A source that cannot be read (a registry on an unreachable bucket) leaves its metrics
out of that scrape and sets ktoloop_metrics_source_up{source} to 0; the rest still
report. Counters here are counts of records on disk: they only grow as long as run
records and alias histories are kept, which nothing in kto-loop deletes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import pandas as pd
import pyarrow as pa
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from connectors.config import Settings
from connectors.cycle_runs import CycleRuns, aliases_with_runs
from connectors.feedback.store import FEEDBACK, FeedbackStore, StoreError
from connectors.feedback.vote_table import VoteTable
from connectors.serving.adapter_registry import AdapterRegistry
from pipeline.feedback.production import LIKED_SHARE, VOTES, liked_share_by_adapter
from pipeline.feedback.records import ADAPTER
from pipeline.promotion.loop_metrics import (
    AliasSummary,
    CycleSummary,
    histogram,
    registered_adapters,
    summarize_alias,
    summarize_runs,
)
from pipeline.serving.registry import RegistryError, parse_served_name, served_name

log = logging.getLogger(__name__)

DEFAULT_PORT = 9309
DEFAULT_HOST = "127.0.0.1"
# The first wait after a failed read of the votes; each further failure doubles it.
STORE_RETRY_SECONDS = 30.0
# Publishing loads and smoke-tests on every replica, then swaps: under a second on one
# idle replica, tens of seconds for many replicas or a slow smoke completion.
PUBLISH_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RUNS, REGISTRY, STORE = "runs", "registry", "store"

# The metrics `kto-loop serve-feedback` (connectors/feedback/feedback_http.py, the HTTP endpoint
# in front of the feedback topic) exports and the Grafana dashboard queries, as (family
# name, type) the way prometheus_client's parser reports them (a counter family is
# named without its _total suffix). tests/test_metrics.py checks them against that
# app's registry: change this tuple, the app and the dashboard together.
HTTP_METRICS = (
    ("ktoloop_feedback_http_requests", "counter"),  # label: code
    ("ktoloop_feedback_http_events_accepted", "counter"),
    ("ktoloop_feedback_http_events_rejected", "counter"),  # label: reason
    ("ktoloop_feedback_http_rate_limited", "counter"),  # label: limit
    ("ktoloop_feedback_http_produce_seconds", "histogram"),
)


@dataclass(frozen=True)
class _Scan:
    """What one scrape read: per alias, its runs and history; the store's liked share."""

    runs: dict[str, CycleSummary]
    running: dict[str, bool]
    aliases: dict[str, AliasSummary]
    liked_share: pd.DataFrame | None
    store_read_at: float | None
    up: dict[str, bool]
    store_stale: bool = False
    canary_checks: dict[str, dict] | None = None  # per alias, its newest canary check


class LoopCollector(Collector):
    """A prometheus_client collector of the loop's state: cycle outcomes, what each
    alias serves, liked share per adapter version, publish latency, and when each
    happened last.

    Args:
        settings: where the run records ([cycle] work_dir), the registry and the store
            are; [cycle] alias is reported even before its first run.
        cache_seconds: a scrape within this long of the last one reuses its values.
        store_refresh_seconds: the least time between two reads of the votes (and the
            longest wait before retrying a failed one).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        settings: Settings,
        cache_seconds: float = 10.0,
        store_refresh_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.cache_seconds = cache_seconds
        self.store_refresh_seconds = store_refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._families: list[Metric] | None = None
        self._built_at = 0.0
        self._store_files: list[str] | None = None
        self._store_next_at: float | None = None
        self._store_failures = 0
        self._liked_share: pd.DataFrame | None = None
        self._labelled: frozenset[str] | None = None
        self._store_read_at: float | None = None
        self._registered: frozenset[str] = frozenset()

    def describe(self) -> Iterable[Metric]:
        # The families this collector reports, without reading anything: registering
        # it must not scan the store.
        return _families(_Scan({}, {}, {}, None, None, {}))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = self._clock()
            if self._families is None or now - self._built_at >= self.cache_seconds:
                self._families = list(_families(self._scan(now)))
                self._built_at = now
            return list(self._families)

    # -- reading ---------------------------------------------------------------------

    def _scan(self, now: float) -> _Scan:
        s = self.settings
        up = {RUNS: True, REGISTRY: True, STORE: True}
        registry = AdapterRegistry(s.registry.url, s.registry.storage_options)
        try:
            registered = registry.aliases()
        except (OSError, ValueError) as exc:
            up[REGISTRY] = False
            log.warning("metrics: cannot list the registry at %s: %s", s.registry.url, exc)
            registered = []
        names = sorted({s.cycle.alias, *registered, *aliases_with_runs(s.cycle.work_dir)})
        try:
            versions = registry.versions()
            self._registered = frozenset(served_name(a, v) for a in names for v in versions)
        except (OSError, ValueError, RegistryError) as exc:
            # The versions last read stay the labels.
            up[REGISTRY] = False
            log.warning("metrics: cannot list the registry's versions: %s", exc)
        runs, running, aliases, checks = {}, {}, {}, {}
        for alias in names:
            try:
                cycle = CycleRuns(s.cycle.work_dir, alias)
                runs[alias] = summarize_runs(cycle.recent(n=1_000_000))
                running[alias] = cycle.live_holder() is not None
                checks[alias] = next(iter(cycle.canary_checks(1)), None)
            except (OSError, RegistryError) as exc:
                up[RUNS] = False
                log.warning("metrics: cannot read %s's run records: %s", alias, exc)
            try:
                aliases[alias] = summarize_alias(registry.history(alias))
            except (OSError, ValueError, KeyError, RegistryError) as exc:
                up[REGISTRY] = False
                log.warning("metrics: cannot read %s's history: %s", alias, exc)
        self._refresh_liked_share(now)
        up[STORE] = self._store_failures == 0
        return _Scan(
            runs,
            running,
            aliases,
            self._liked_share,
            self._store_read_at,
            up,
            not up[STORE],
            checks,
        )

    def _refresh_liked_share(self, now: float) -> None:
        """Recount the liked share from the vote table when the store's files or the
        registered versions changed, at most once per store_refresh_seconds; after a
        failed read, wait STORE_RETRY_SECONDS, doubled per failure, up to that."""
        if self._store_next_at is not None and now < self._store_next_at:
            return
        s = self.settings.store
        registered = self._registered
        try:
            store = FeedbackStore(s.url, s.storage_options)
            files = store.files(FEEDBACK)
            if files != self._store_files or registered != self._labelled:
                votes, _ = VoteTable(store).read()
                self._liked_share = liked_share_by_adapter(registered_adapters(votes, registered))
                self._store_files, self._labelled = files, registered
                self._store_read_at = time.time()
        except (StoreError, OSError, pa.ArrowException) as exc:  # a corrupt file too
            self._store_failures += 1
            wait = min(
                STORE_RETRY_SECONDS * 2 ** (self._store_failures - 1),
                max(self.store_refresh_seconds, STORE_RETRY_SECONDS),
            )
            self._store_next_at = now + wait
            log.warning(
                "metrics: cannot read the votes of the feedback store at %s: %s; the liked "
                "share served is stale (%s), next try in %.0f s",
                s.url,
                exc,
                "never read"
                if self._store_read_at is None
                else f"read at {self._store_read_at:.0f}",
                wait,
            )
            return
        self._store_failures = 0
        self._store_next_at = now + self.store_refresh_seconds


def _families(scan: _Scan) -> Iterator[Metric]:
    yield from _cycle_families(scan)
    yield from _alias_families(scan)
    yield from _liked_share_families(scan)
    up = GaugeMetricFamily(
        "ktoloop_metrics_source_up",
        "1 when the last scrape could read this source (runs, registry, store), else 0",
        labels=["source"],
    )
    for source, ok in sorted(scan.up.items()):
        up.add_metric([source], 1.0 if ok else 0.0)
    yield up
    read_at = GaugeMetricFamily(
        "ktoloop_metrics_store_read_timestamp_seconds",
        "When the liked share was last counted from the vote table (Unix time)",
    )
    if scan.store_read_at is not None:
        read_at.add_metric([], scan.store_read_at)
    yield read_at
    stale = GaugeMetricFamily(
        "ktoloop_metrics_store_stale",
        "1 while the last read of the votes failed and the liked share served is older "
        "(the read is retried with backoff), else 0",
    )
    stale.add_metric([], 1.0 if scan.store_stale else 0.0)
    yield stale


def _cycle_families(scan: _Scan) -> Iterator[Metric]:
    outcomes = CounterMetricFamily(
        "ktoloop_cycle_runs",
        "Finished alignment cycle runs by outcome: published, refused (by the gate or the "
        "generation check), skipped (too little new feedback, busy), no_gain, failed, "
        "crashed, unreadable",
        labels=["alias", "outcome"],
    )
    running = GaugeMetricFamily(
        "ktoloop_cycle_running", "1 while a cycle of the alias runs", labels=["alias"]
    )
    last_start = GaugeMetricFamily(
        "ktoloop_cycle_last_run_timestamp_seconds",
        "When the alias's newest cycle run started (Unix time)",
        labels=["alias"],
    )
    last_end = GaugeMetricFamily(
        "ktoloop_cycle_last_outcome_timestamp_seconds",
        "When the alias's newest run with this outcome finished (Unix time)",
        labels=["alias", "outcome"],
    )
    duration = GaugeMetricFamily(
        "ktoloop_cycle_last_run_seconds",
        "Wall time of the alias's newest finished cycle run",
        labels=["alias"],
    )
    publish = HistogramMetricFamily(
        "ktoloop_publish_seconds",
        "Time to publish a version on every replica (load, smoke test, switch), per "
        "cycle run that published",
        labels=["alias"],
    )
    last_publish = GaugeMetricFamily(
        "ktoloop_publish_last_seconds",
        "Time the alias's newest cycle publish took",
        labels=["alias"],
    )
    for alias, summary in sorted(scan.runs.items()):
        for outcome, count in summary.outcomes.items():
            outcomes.add_metric([alias, outcome], count)
        running.add_metric([alias], 1.0 if scan.running.get(alias) else 0.0)
        if summary.last_started is not None:
            last_start.add_metric([alias], summary.last_started)
        for outcome, at in sorted(summary.last_finished.items()):
            last_end.add_metric([alias, outcome], at)
        if summary.last_seconds is not None:
            duration.add_metric([alias], summary.last_seconds)
        seconds = summary.publish_seconds
        publish.add_metric([alias], histogram(seconds, PUBLISH_BUCKETS), sum(seconds))
        if seconds:
            last_publish.add_metric([alias], seconds[-1])
    yield from (outcomes, running, last_start, last_end, duration, publish, last_publish)


def _alias_families(scan: _Scan) -> Iterator[Metric]:
    served = GaugeMetricFamily(
        "ktoloop_alias_served_version",
        "N of the version vN the alias serves per its history (0: never published)",
        labels=["alias"],
    )
    events = CounterMetricFamily(
        "ktoloop_alias_events",
        "Promotions and rollbacks of the alias",
        labels=["alias", "action"],
    )
    changed = GaugeMetricFamily(
        "ktoloop_alias_last_change_timestamp_seconds",
        "When the alias last switched version, by publish or rollback (Unix time)",
        labels=["alias"],
    )
    canary_version = GaugeMetricFamily(
        "ktoloop_canary_version",
        "N of the version vN the alias runs as a canary beside the served one (0: none)",
        labels=["alias"],
    )
    canary_share = GaugeMetricFamily(
        "ktoloop_canary_share",
        "The share of the alias's conversations its canary answers (0: no canary)",
        labels=["alias"],
    )
    canary_ended = CounterMetricFamily(
        "ktoloop_canary_ended",
        "Canaries ended, by outcome (promoted, rolled_back, inconclusive, stopped, replaced)",
        labels=["alias", "outcome"],
    )
    for alias, summary in sorted(scan.aliases.items()):
        served.add_metric([alias], summary.served_version)
        for action, count in summary.events.items():
            events.add_metric([alias, action], count)
        if summary.last_changed is not None:
            changed.add_metric([alias], summary.last_changed)
        canary_version.add_metric([alias], summary.canary_version)
        canary_share.add_metric([alias], summary.canary_share)
        for outcome, count in summary.canary_outcomes.items():
            canary_ended.add_metric([alias, outcome], count)
    yield from (served, events, changed, canary_version, canary_share, canary_ended)
    yield from _canary_check_families(scan)


def _canary_check_families(scan: _Scan) -> Iterator[Metric]:
    """The newest canary check of each alias whose canary still runs: votes and liked
    share per arm, and the test's estimate with its interval."""
    votes = GaugeMetricFamily(
        "ktoloop_canary_votes",
        "Votes counted for each arm of the running canary at its last check",
        labels=["alias", "arm"],
    )
    share = GaugeMetricFamily(
        "ktoloop_canary_liked_share",
        "Liked share of each arm of the running canary at its last check",
        labels=["alias", "arm"],
    )
    estimate = GaugeMetricFamily(
        "ktoloop_canary_difference",
        "The candidate's liked share minus the served one's at the last check, and the "
        "always-valid interval's bounds",
        labels=["alias", "bound"],
    )
    for alias, check in sorted((scan.canary_checks or {}).items()):
        summary = scan.aliases.get(alias)
        if not check or summary is None or not summary.canary_version:
            continue
        if check.get("candidate") != served_name(alias, f"v{summary.canary_version}"):
            continue  # a check of an earlier canary
        verdict = check.get("verdict") or {}
        for arm in ("served", "candidate"):
            counts = verdict.get(arm) or {}
            n = counts.get("votes") or 0
            votes.add_metric([alias, arm], n)
            if n:
                share.add_metric([alias, arm], counts.get("liked", 0) / n)
        for bound in ("estimate", "lower", "upper"):
            if verdict.get(bound) is not None:
                estimate.add_metric([alias, bound], float(verdict[bound]))
    yield from (votes, share, estimate)


def _liked_share_families(scan: _Scan) -> Iterator[Metric]:
    labels = ["adapter", "alias", "version"]
    share = GaugeMetricFamily(
        "ktoloop_adapter_liked_share",
        "Share of production votes on the adapter version's answers that were likes "
        "(adapter=other: versions the registry does not hold)",
        labels=labels,
    )
    votes = GaugeMetricFamily(
        "ktoloop_adapter_votes",
        "Production votes counted for the adapter version (latest vote per user and "
        "message, retractions withdrawn)",
        labels=labels,
    )
    frame = scan.liked_share
    if frame is not None:
        for adapter, n, liked_share in zip(
            frame[ADAPTER], frame[VOTES], frame[LIKED_SHARE], strict=True
        ):
            alias, version = parse_served_name(adapter) or ("", "")
            share.add_metric([adapter, alias, version], float(liked_share))
            votes.add_metric([adapter, alias, version], int(n))
    yield from (share, votes)


def serve(
    collector: Collector, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `collector` alone on http://host:port/metrics from a daemon thread (on
    loopback by default; host "0.0.0.0" for every interface); return the server (call
    its shutdown() to stop) and its thread."""
    registry = CollectorRegistry()
    registry.register(collector)
    return start_http_server(port, addr=host, registry=registry)
