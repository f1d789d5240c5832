"""Metrics a team can watch: ingest's counters against a real broker, the loop's metrics
read from real run records, registry and store by `kto-loop metrics` over HTTP, and a
Grafana dashboard that queries nothing we do not export."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from connectors.config import Settings, load_settings
from connectors.cycle_runs import CycleRuns
from connectors.feedback.produce import produce
from connectors.feedback.store import FEEDBACK, FeedbackStore
from connectors.metrics import HTTP_METRICS, LoopCollector, serve
from connectors.serving.adapter_registry import AdapterRegistry, now_iso
from connectors.serving.publish import PublishResult
from deploy.local.broker import free_port
from pipeline.feedback.events import parse_event
from pipeline.feedback.records import FeedbackRows
from pipeline.feedback.sample import encode, malformed_samples, sample_events
from tests.children import start_command
from tests.conftest import HASH_KEY, KafkaSetup, _toml, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/kto-loop.json"
ALIAS = "chat"

# -------------------------------------------------------------------- scraping


def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics page: {'name{label="v",...}': value}, labels sorted."""
    text = httpx.get(url, timeout=5.0).raise_for_status().text
    return samples(text)


def samples(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def try_scrape(url: str) -> dict[str, float] | None:
    try:
        return scrape(url)
    except httpx.TransportError:
        return None


# -------------------------------------------------------------------- ingest


def test_ingest_counters_count_what_was_sent(
    kafka_setup: KafkaSetup, ingest_processes, tmp_path: Path
) -> None:
    port = free_port()
    config = kafka_setup.config_file(metrics_port=port, log_interval_seconds=0.2)
    proc = ingest_processes(config, tmp_path / "ingest.log")
    url = f"http://127.0.0.1:{port}/metrics"
    wait_until(lambda: "assigned partitions: fb" in proc.log(), 90, "partitions assigned")
    valid, bad = [encode(e) for e in sample_events(300, seed=7)], malformed_samples()
    produce(kafka_setup.settings().kafka, valid + [(b"bad", raw) for raw in bad.values()])

    def settled() -> dict[str, float] | None:
        got = try_scrape(url)
        done = got and got.get("ktoloop_ingest_stored_total") == len(valid)
        return got if done and got.get("ktoloop_ingest_dead_lettered_total") == len(bad) else None

    got = wait_until(settled, 90, "every message stored or dead-lettered")
    assert got["ktoloop_ingest_consumed_total"] == len(valid) + len(bad)
    assert got["ktoloop_ingest_batches_total"] >= 1
    by_kind = {
        k.split('"')[1]: v
        for k, v in got.items()
        if k.startswith("ktoloop_ingest_dead_lettered_by_kind_total{")
    }
    assert by_kind == {kind: 1.0 for kind in bad}
    # Exported; Tansu's high watermark counts record batches, so its value is wrong there
    # (docs/architecture.md): only its presence counts.
    assert got["ktoloop_ingest_lag"] >= 0
    code, _ = proc.terminate()
    assert code == 0, proc.log()


# -------------------------------------------------------------------- the loop


def _settings(tmp: Path) -> dict[str, Any]:
    return {
        "cycle": {"alias": ALIAS, "work_dir": str(tmp / "cycles")},
        "registry": {"url": str(tmp / "adapters")},
        "store": {"url": str(tmp / "store")},
    }


def _votes(adapter: str, likes: int, dislikes: int, first: int) -> list[dict]:
    """Votes on answers `adapter` wrote, each by its own user on its own message."""
    base = next(sample_events(1, seed=11))
    base.pop("rating", None)
    events = []
    for i in range(likes + dislikes):
        n = first + i
        events.append(
            base
            | {
                "event_id": f"m{n}",
                "user_id": f"u{n}",
                "message_id": f"msg{n}",
                "feedback": "like" if i < likes else "dislike",
                "adapter": adapter,
            }
        )
    return events


def _store_votes(store: FeedbackStore, events: list[dict], first_offset: int) -> None:
    """Write events to the store as ingest does: parsed, as one batch of offsets."""
    rows = FeedbackRows("fb", 0)
    for i, event in enumerate(events):
        parsed = parse_event(json.dumps(event).encode(), user_hash_key=HASH_KEY.encode())
        rows.append(parsed, first_offset + i, 1_767_225_600_000 + i)
    table = rows.to_table(dt.datetime.now(dt.UTC), "test")
    store.write_batch(FEEDBACK, "fb", 0, first_offset, first_offset + len(events) - 1, table)


def _record(runs: CycleRuns, run_id: str, status: str, **fields: Any) -> None:
    from flows.alignment import RunRecord

    started = f"2025-12-0{run_id[-1]}T02:00:00.000+00:00"  # day N for run rN
    record = RunRecord(run_id=run_id, alias=ALIAS, started_at=started, status=status)
    if status != "running":
        record.finished_at = started.replace("T02:00", "T02:30")
        record.seconds = 1800.0
    for k, v in fields.items():
        setattr(record, k, v)
    runs.save(record.as_dict())


def _published(version: str, previous: str | None, seconds: float) -> dict[str, Any]:
    result = PublishResult(ALIAS, version, previous, "promote", ("http://r1",), seconds)
    return result.as_dict()


@pytest.fixture(scope="module")
def loop_state(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A loop's files as its code writes them: two registered adapters, chat promoted to
    v1, then v2, then rolled back to v1; run records of every outcome; votes on both
    versions' answers in the store (v1: 1 of 3 liked; v2: 3 of 4)."""
    from prefect.testing.utilities import prefect_test_harness

    from deploy.local.adapters import make_random_adapter
    from flows.alignment import alignment_cycle

    tmp = tmp_path_factory.mktemp("loop")
    registry = AdapterRegistry(str(tmp / "adapters"))
    for seed in (1, 2):
        registry.add(make_random_adapter(tiny_model_dir, tmp / f"a{seed}", seed=seed))
    history = registry.history(ALIAS)
    history = history.promoted("v1", now_iso(), "cycle r1", ["http://r1"])
    history = history.promoted("v2", now_iso(), "cycle r3", ["http://r1"])
    registry.save_history(history.rolled_back(now_iso(), "operator", ["http://r1"]))

    runs = CycleRuns(tmp / "cycles", ALIAS)
    gate_yes, gate_no = {"promote": True, "reason": "better"}, {"promote": False, "reason": "no"}
    _record(
        runs, "r1", "published", gate=gate_yes, version="v1", published=_published("v1", None, 0.8)
    )
    _record(runs, "r2", "skipped", gate=gate_no)
    _record(
        runs, "r3", "published", gate=gate_yes, version="v2", published=_published("v2", "v1", 2.0)
    )
    _record(runs, "r4", "skipped", reason="12 new votes, fewer than cycle.min_new_votes=50")
    _record(runs, "r5", "no_gain")
    _record(runs, "r6", "running")  # its process is gone: no live holder of the lock
    # A real run, through the flow's own code: it marks r6 crashed (it holds the lock, so
    # no other run is alive), then fails before any work (no base model configured).
    config = tmp / "kto-loop.toml"
    config.write_text(_toml(_settings(tmp)))
    # The run's report is also a Prefect artifact, hence a (temporary) API.
    harness = prefect_test_harness(server_startup_timeout=120)
    with harness, pytest.raises(ValueError, match="base_model is not set"):
        alignment_cycle.fn(config=str(config), alias=ALIAS)

    store = FeedbackStore(str(tmp / "store"))
    _store_votes(store, _votes("chat@v1", 1, 2, 0), 0)
    _store_votes(store, _votes("chat@v2", 3, 1, 3), 3)
    return tmp


@pytest.mark.prefect  # loop_state runs its cycles under Prefect's test harness
def test_metrics_command_serves_outcomes_versions_liked_share_and_latency(
    loop_state: Path, watch, tmp_path: Path
) -> None:
    config = tmp_path / "kto-loop.toml"
    config.write_text(_toml(_settings(loop_state)))
    port = free_port()
    log = open(tmp_path / "metrics.log", "wb")  # noqa: SIM115
    args = ["metrics", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    proc = start_command(
        [sys.executable, "-m", "flows.cli", *args], stdout=subprocess.PIPE, stderr=log
    )
    watch(proc)
    got = wait_until(lambda: try_scrape(f"http://127.0.0.1:{port}/metrics"), 60, "/metrics")

    def runs(outcome: str) -> float:
        return got[f'ktoloop_cycle_runs_total{{alias="chat",outcome="{outcome}"}}']

    outcomes = ("published", "refused", "skipped", "no_gain", "failed", "crashed")
    assert {o: runs(o) for o in outcomes} == dict(zip(outcomes, (2, 1, 1, 1, 1, 1), strict=True))
    assert got['ktoloop_cycle_running{alias="chat"}'] == 0
    assert got['ktoloop_alias_served_version{alias="chat"}'] == 1  # rolled back to v1
    assert got['ktoloop_alias_events_total{action="promote",alias="chat"}'] == 2
    assert got['ktoloop_alias_events_total{action="rollback",alias="chat"}'] == 1
    share = 'ktoloop_adapter_liked_share{adapter="chat@v%d",alias="chat",version="v%d"}'
    assert got[share % (1, 1)] == pytest.approx(1 / 3)
    assert got[share % (2, 2)] == pytest.approx(3 / 4)
    assert got['ktoloop_adapter_votes{adapter="chat@v2",alias="chat",version="v2"}'] == 4
    assert got['ktoloop_publish_last_seconds{alias="chat"}'] == 2.0
    assert got['ktoloop_publish_seconds_count{alias="chat"}'] == 2
    assert got['ktoloop_publish_seconds_sum{alias="chat"}'] == pytest.approx(2.8)
    assert got['ktoloop_publish_seconds_bucket{alias="chat",le="1.0"}'] == 1
    last = 'ktoloop_cycle_last_outcome_timestamp_seconds{alias="chat",outcome="%s"}'
    published_at = got[last % "published"]  # r3's end
    assert published_at == dt.datetime(2025, 12, 3, 2, 30, tzinfo=dt.UTC).timestamp()
    assert got[last % "refused"] == dt.datetime(2025, 12, 2, 2, 30, tzinfo=dt.UTC).timestamp()
    # The failed run is the real one, started now: the newest start.
    assert got['ktoloop_cycle_last_run_timestamp_seconds{alias="chat"}'] > published_at
    assert all(
        got[f'ktoloop_metrics_source_up{{source="{s}"}}'] == 1
        for s in ("runs", "registry", "store")
    )

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    log.close()
    assert proc.returncode == 0, (tmp_path / "metrics.log").read_text()
    assert json.loads(out.decode().strip().splitlines()[-1]) == {
        "port": port,
        "stopped_by": "SIGTERM",
    }


def test_a_scrape_within_the_cache_reads_nothing_and_the_store_waits_its_refresh(
    tmp_path: Path,
) -> None:
    settings = load_settings(None, **_settings(tmp_path))
    now = [1000.0]
    collector = LoopCollector(
        settings, cache_seconds=10, store_refresh_seconds=60, clock=lambda: now[0]
    )
    registry = CollectorRegistry()
    registry.register(collector)
    runs, store = CycleRuns(tmp_path / "cycles", ALIAS), FeedbackStore(str(tmp_path / "store"))

    def read() -> dict[str, float]:
        return samples(generate_latest(registry).decode())

    published = 'ktoloop_cycle_runs_total{alias="chat",outcome="published"}'
    # No version is registered here, so the votes count as other.
    share = 'ktoloop_adapter_liked_share{adapter="other",alias="",version=""}'

    assert read()[published] == 0 and share not in read()
    _record(runs, "r1", "published", gate={"promote": True}, version="v1")
    _store_votes(store, _votes("chat@v1", 1, 1, 0), 0)
    now[0] += 5
    assert read()[published] == 0, "a scrape within cache_seconds reads again"
    now[0] += 10
    got = read()
    assert got[published] == 1 and share not in got, "the store was read before its refresh"
    now[0] += 60
    assert read()[share] == 0.5


def _exported(registry: CollectorRegistry) -> dict[str, float]:
    return samples(generate_latest(registry).decode())


def test_only_registered_versions_become_adapter_labels_the_rest_count_as_other(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from deploy.local.adapters import make_random_adapter

    settings = load_settings(None, **_settings(tmp_path))
    AdapterRegistry(str(tmp_path / "adapters")).add(
        make_random_adapter(tiny_model_dir, tmp_path / "a1", seed=1)
    )
    store = FeedbackStore(str(tmp_path / "store"))
    _store_votes(store, _votes("chat@v1", 1, 1, 0), 0)
    _store_votes(store, _votes("chat@v7", 1, 0, 2), 2)  # a version never registered
    for i in range(50):  # a client inventing a name per vote
        _store_votes(store, _votes(f"made-up-{i}", 0, 1, 3 + i), 3 + i)
    registry = CollectorRegistry()
    registry.register(LoopCollector(settings))
    got = _exported(registry)
    labels = {k for k in got if k.startswith("ktoloop_adapter_votes{")}
    other = '{adapter="other",alias="",version=""}'
    assert labels == {
        'ktoloop_adapter_votes{adapter="chat@v1",alias="chat",version="v1"}',
        f"ktoloop_adapter_votes{other}",
    }
    assert got[f"ktoloop_adapter_votes{other}"] == 51
    assert got[f"ktoloop_adapter_liked_share{other}"] == pytest.approx(1 / 51)


def test_a_failed_read_of_the_votes_backs_off_and_says_the_liked_share_is_stale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(None, **_settings(tmp_path))
    now = [1000.0]
    registry = CollectorRegistry()
    registry.register(
        LoopCollector(settings, cache_seconds=0, store_refresh_seconds=300, clock=lambda: now[0])
    )
    store = FeedbackStore(str(tmp_path / "store"))
    _store_votes(store, _votes("chat@v1", 1, 1, 0), 0)

    def votes() -> float:
        return sum(v for k, v in got.items() if k.startswith("ktoloop_adapter_votes{"))

    def tries() -> int:
        return sum("cannot read" in r.getMessage() for r in caplog.records)

    got = _exported(registry)
    assert votes() == 2
    # A batch file that cannot be opened (a link to itself) makes every read fail.
    broken = Path(store.batch_path(FEEDBACK, "fb", 0, 2, 2))
    broken.symlink_to(broken)
    now[0] += 300
    got = _exported(registry)
    assert tries() == 1
    assert votes() == 2, "the last liked share is served while the store fails"
    for step, expected_tries in ((10, 1), (10, 1), (15, 2), (50, 2), (15, 3)):
        now[0] += step  # retries 30 s, then 60 s after each failure
        got = _exported(registry)
        assert tries() == expected_tries, f"{now[0] - 1300:.0f} s after the first failure"
        assert got["ktoloop_metrics_store_stale"] == 1
        assert got['ktoloop_metrics_source_up{source="store"}'] == 0
        assert votes() == 2
    broken.unlink()
    now[0] += 120
    got = _exported(registry)
    assert tries() == 3
    assert got["ktoloop_metrics_store_stale"] == 0
    assert got['ktoloop_metrics_source_up{source="store"}'] == 1


def test_the_metrics_endpoint_listens_on_loopback_by_default(tmp_path: Path) -> None:
    from flows.cli import app

    settings = load_settings(None, **_settings(tmp_path))
    server, thread = serve(LoopCollector(settings), port=free_port())
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    command = typer.main.get_command(app).get_command(None, "metrics")  # type: ignore[attr-defined]
    host = next(p for p in command.params if p.name == "host")
    assert host.default == "127.0.0.1"


def test_metrics_command_stops_on_ctrl_c(tmp_path: Path, watch) -> None:
    config = tmp_path / "kto-loop.toml"
    config.write_text(_toml(_settings(tmp_path)))
    port = free_port()
    args = ["metrics", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    proc = start_command(
        [sys.executable, "-m", "flows.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    watch(proc)
    wait_until(lambda: try_scrape(f"http://127.0.0.1:{port}/metrics"), 60, "/metrics")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out.decode().strip().splitlines()[-1])["stopped_by"] == "SIGINT"


# -------------------------------------------------------------------- the dashboard

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip
# The series names a family of each type exposes (prometheus_client also writes _created).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "unknown": ("",),
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) selects."""
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "", expr)  # Grafana variables
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, arguments)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group().lower() not in _KEYWORDS:
            names.add(m.group())
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard: its panels' targets (rows included) and
    its query variables (label_values(metric, label) counts as selecting metric)."""
    out = []
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop()
        stack += panel.get("panels", [])
        out += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if var.get("type") == "query" and query:
            out.append(re.sub(r"label_values\(\s*([^,)]+)\s*,[^)]*\)", r"\1", query))
    return out


def exported_series(text: str) -> dict[str, str]:
    """{series name: family} of every series the families in a /metrics page can have
    (prometheus_client's X_created gauges, the creation times of counters and
    histograms, count as series of X)."""
    return {
        family.name + suffix: family.name
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")
        for suffix in _SUFFIXES[family.type]
    }


def _http_metrics_text() -> str:
    """serve-feedback's /metrics page, from its real registry."""
    from connectors.feedback.feedback_http import HttpMetrics

    return generate_latest(HttpMetrics().registry).decode()


def all_exported(settings: Settings) -> dict[str, str]:
    from connectors.feedback.ingest import _Metrics

    loop = CollectorRegistry()
    loop.register(LoopCollector(settings))
    pages = [generate_latest(_Metrics().registry), generate_latest(loop)]
    out: dict[str, str] = {}
    for text in [*(p.decode() for p in pages), _http_metrics_text()]:
        out |= exported_series(text)
    return out


def test_the_extractor_finds_metric_names_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, alias) (rate(a_bucket{x=~"$alias",y="b c"}'
        '[$__rate_interval]))) / on (alias) group_left b_total offset 5m + time() - c{d="e"}'
        " > 1e3 and sum(d) without (z)"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


def test_every_metric_the_dashboard_queries_is_exported(tmp_path: Path) -> None:
    exported = all_exported(load_settings(None, **_settings(tmp_path)))
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) > 20
    queried = {name: q for q in queries for name in promql_metric_names(q)}
    assert all(promql_metric_names(q) for q in queries), "an expression selects no metric"
    unknown = {name: q for name, q in queried.items() if name not in exported}
    assert not unknown, f"the dashboard queries metrics nobody exports: {unknown}"
    # Every family of ours appears on the dashboard.
    unused = set(exported.values()) - {exported[n] for n in queried}
    assert not unused, f"exported but on no panel: {sorted(unused)}"


def test_serve_feedback_exports_the_http_metrics_the_dashboard_expects() -> None:
    text = _http_metrics_text()
    families = {(f.name, f.type) for f in text_string_to_metric_families(text)}
    assert set(HTTP_METRICS) <= families


def test_a_running_canary_shows_its_share_arms_and_interval_and_ended_ones_count(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from deploy.local.adapters import make_random_adapter

    settings = load_settings(None, **_settings(tmp_path))
    adapters = AdapterRegistry(str(tmp_path / "adapters"))
    for seed in (1, 2, 3):
        adapters.add(make_random_adapter(tiny_model_dir, tmp_path / f"a{seed}", seed=seed))
    history = adapters.history(ALIAS).promoted("v1", now_iso(), "cycle", ["http://r1"])
    history = history.canary_started("v2", 0.1, now_iso(), "cycle", ["http://r1"])
    history = history.canary_ended("rolled_back", now_iso(), "worse", ["http://r1"])
    history = history.canary_started("v3", 0.25, now_iso(), "cycle", ["http://r1"])
    adapters.save_history(history)
    runs = CycleRuns(tmp_path / "cycles", ALIAS)
    check = {
        "candidate": "chat@v3",
        "verdict": {
            "served": {"name": "chat@v1", "liked": 30, "votes": 100},
            "candidate": {"name": "chat@v3", "liked": 20, "votes": 40},
            "estimate": 0.2,
            "lower": -0.05,
            "upper": 0.45,
        },
    }
    runs.append_canary_check({**check, "candidate": "chat@v2"})  # the ended canary's
    runs.append_canary_check(check)
    registry = CollectorRegistry()
    registry.register(LoopCollector(settings))
    got = _exported(registry)
    assert got['ktoloop_canary_share{alias="chat"}'] == 0.25
    assert got['ktoloop_canary_version{alias="chat"}'] == 3
    assert got['ktoloop_canary_ended_total{alias="chat",outcome="rolled_back"}'] == 1
    assert got['ktoloop_canary_ended_total{alias="chat",outcome="promoted"}'] == 0
    assert got['ktoloop_canary_votes{alias="chat",arm="candidate"}'] == 40
    assert got['ktoloop_canary_liked_share{alias="chat",arm="served"}'] == pytest.approx(0.3)
    assert got['ktoloop_canary_difference{alias="chat",bound="lower"}'] == pytest.approx(-0.05)
    # Promotions and rollbacks count switches of the served version only.
    assert got['ktoloop_alias_events_total{action="promote",alias="chat"}'] == 1
