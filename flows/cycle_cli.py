"""`kto-loop run / schedule / status`: the alignment cycle from the command line.

`run` runs one cycle now; `schedule` serves the nightly deployment (starting a local
Prefect server when PREFECT_API_URL names none); `status` shows the last runs and their
decisions, what each alias serves, and the liked share each adapter version earned in
production. Each prints tables on stderr and ends with one JSON line on stdout.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import typer
from rich.table import Table

from connectors.config import ConfigError, Settings
from connectors.cycle_runs import CycleRuns
from connectors.feedback.store import FeedbackStore, StoreError
from connectors.serving.adapter_registry import AdapterRegistry
from connectors.serving.publish import Publisher
from deploy.local.prefect_server import configured_api, prefect_api
from deploy.local.processes import SCHEDULER_PID_ENV, interruptible
from flows.console import err, fail, number
from flows.preflight import check_cycle
from flows.serving_cli import canary_cell, history_canary, replica_canaries, served_versions
from pipeline.serving.registry import parse_served_name

log = logging.getLogger("kto_loop.cycle")


def prefect_environment() -> None:
    """Prefect's settings for our runs, unless the environment sets them. Prefect reads
    them when it is first imported, so this runs before that; served runs inherit them."""
    # Prefect's telemetry errors on a locked SQLite database offline; opt in explicitly.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The trainer's, the publisher's and the cycle's own logs go to Prefect's run logs too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline,connectors,kto_loop")
    # Those loggers also run outside a flow run (before it starts, in ingest): there they
    # log to the console alone, not to the API with a warning that no run is there.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def run(settings: Settings, config: Path | None, alias: str | None) -> None:
    """Run one cycle; exit 0 when it completed (published, no_gain or skipped), 1 when it
    failed.

    Without PREFECT_API_URL the flow runs against a temporary local server (Prefect's
    default database, as its ephemeral mode would use) that ends with this command.
    """
    prefect_environment()
    from flows.alignment import FAILED, run_cycle

    _check(settings)
    alias = alias or settings.cycle.alias
    logs = Path(settings.cycle.work_dir).resolve() / "prefect"
    with interruptible(), prefect_api(logs / "temporary-server.log", ui=False) as api:
        log.info("running %s's alignment cycle on %s", alias, api)
        state = run_cycle(str(config) if config else None, alias)
    record = _record_of(settings, alias, state)
    _print_run(record)
    line = {
        "status": record.get("status", FAILED),
        "alias": alias,
        "run_id": record.get("run_id"),
        "reason": record.get("reason") or state.message,
        "version": record.get("version"),
        "snapshot": (record.get("snapshot") or {}).get("id"),
        "gate": (record.get("gate") or {}).get("promote"),
        "seconds": record.get("seconds"),
        "report": record.get("report"),
        "prefect_state": state.name,
    }
    typer.echo(json.dumps(line))
    if state.is_failed() or state.is_crashed():
        raise typer.Exit(1)


def _check(settings: Settings) -> None:
    """Exit 2 naming every key the cycle needs and lacks, before Prefect starts."""
    try:
        check_cycle(settings)
    except ConfigError as exc:
        fail(exc, 2)


def _record_of(settings: Settings, alias: str, state: Any) -> dict[str, Any]:
    flow_run_id = str(state.state_details.flow_run_id)
    for record in CycleRuns(settings.cycle.work_dir, alias).recent(20):
        if record.get("flow_run_id") == flow_run_id:
            return record
    return {"status": "failed", "reason": state.message}


def _print_run(record: dict[str, Any]) -> None:
    table = Table(title=f"alignment cycle {record.get('run_id', '?')}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    snap = record.get("snapshot") or {}
    gate = record.get("gate") or {}
    training = record.get("training") or {}
    after = training.get("heldout_after") or {}
    for what, value in [
        ("status", record.get("status")),
        ("reason", record.get("reason")),
        ("snapshot", f"{snap.get('id', '-')[:12]} ({snap.get('votes', 0)} votes)"),
        ("new votes", record.get("new_votes")),
        ("plan", _plan(record.get("plan") or {})),
        ("lambdas", _lambdas(record.get("balance") or {})),
        ("steps", training.get("steps")),
        ("held-out accuracy after", after.get("accuracy")),
        ("gate", gate.get("reason")),
        ("version", record.get("version")),
        ("report", record.get("report")),
    ]:
        if value not in (None, ""):
            table.add_row(what, str(value))
    err.print(table)


def _plan(plan: dict[str, Any]) -> str | None:
    if not plan:
        return None
    return (
        f"{plan['strategy']} ({plan['why']}): {plan['examples']} examples, {plan['new']} new, "
        f"{plan['replay']} replayed, on-policy share {plan['on_policy_share']:.2f}"
    )


def _lambdas(balance: dict[str, Any]) -> str | None:
    if not balance:
        return None
    d, u = balance["lambda_desirable"], balance["lambda_undesirable"]
    return f"D {number(d, 3)} / U {number(u, 3)}"


# ---------------------------------------------------------------- schedule


def schedule(
    settings: Settings,
    config: Path,
    alias: str | None,
    cron: str | None,
    interval: float | None,
    start_server: bool,
) -> None:
    """Serve the cycle as a Prefect deployment on the configured cron (or an interval),
    one run at a time, until interrupted."""
    prefect_environment()
    from prefect import serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron, Interval

    from flows.alignment import alignment_cycle

    _check(settings)
    alias = alias or settings.cycle.alias
    when = (
        Interval(interval)
        if interval is not None
        else Cron(cron or settings.cycle.cron, timezone=settings.cycle.timezone)
    )
    home = Path(settings.cycle.work_dir).resolve() / "prefect"
    # Each run is a process of its own, started by Prefect's runner in this one; it
    # dies with this one (deploy/local/processes.py: die_with_scheduler).
    os.environ[SCHEDULER_PID_ENV] = str(os.getpid())
    if not start_server and configured_api() is None:
        raise typer.BadParameter(
            "schedules need a Prefect server: set PREFECT_API_URL, or leave out "
            "--no-start-server to start a local one"
        )
    parameters = {"config": str(config.resolve()), "alias": alias}
    with interruptible(), prefect_api(home / "server.log", home=home) as api:
        err.print(
            f"serving {alias}'s alignment cycle ({_describe(when)}) on {api}; Ctrl-C stops",
            markup=False,
        )
        one_at_a_time = ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        )
        deployments = [
            alignment_cycle.to_deployment(
                name=f"{alias}-cycle",
                schedule=when,
                parameters=parameters,
                concurrency_limit=one_at_a_time,
                tags=["kto-loop", alias],
            )
        ]
        if settings.canary.enabled:
            from flows.canary import canary_check

            every = Interval(settings.canary.check_every_minutes * 60)
            err.print(f"and its canary check ({_describe(every)})", markup=False)
            deployments.append(
                canary_check.to_deployment(
                    name=f"{alias}-canary-check",
                    schedule=every,
                    parameters=parameters,
                    concurrency_limit=one_at_a_time,
                    tags=["kto-loop", alias, "canary"],
                )
            )
        serve(*deployments, print_starting_message=False)


def _describe(when: Any) -> str:
    if getattr(when, "cron", None):
        return f"cron {when.cron} {when.timezone or ''}".strip()
    return f"every {when.interval}"


# ---------------------------------------------------------------- status


def status(settings: Settings, aliases: list[str], n_runs: int) -> None:
    """Print the last runs, what each alias serves, and liked share per version."""
    registry = AdapterRegistry(settings.registry.url, settings.registry.storage_options)
    names = aliases or sorted({settings.cycle.alias, *registry.aliases()})
    served = Publisher(registry, settings.serving).served()
    summary: dict[str, Any] = {"aliases": {}, "liked_share": None}

    for alias in names:
        runs = CycleRuns(settings.cycle.work_dir, alias)
        records = runs.recent(n_runs)
        running = _running(runs)
        table = Table(title=f"last runs of {alias}" + (" (one running now)" if running else ""))
        for col in ("started", "status", "version", "new votes", "gate", "reason", "s"):
            table.add_column(col)
        for r in records:
            if r.get("status") == "running" and (running or {}).get("run_id") != r["run_id"]:
                # No live process holds the alias for it: it died (the next run says so too).
                r["status"] = "crashed"
            gate = r.get("gate")
            table.add_row(
                (r.get("started_at") or "")[:19],
                r.get("status", "?"),
                r.get("version") or "-",
                str(r.get("new_votes", "-")),
                "-" if not gate else ("promote" if gate["promote"] else "refuse"),
                (r.get("reason") or "")[:80],
                str(r.get("seconds") or "-"),
            )
        err.print(table)
        history = registry.history(alias)
        replicas = {}
        for url, state in served.items():
            if isinstance(state, str):
                replicas[url] = {"error": state}
                continue
            replicas[url] = {
                "serves": served_versions(state).get(alias),
                "canary": replica_canaries(state).get(alias),
            }
        summary["aliases"][alias] = {
            "current": history.current,
            "rollback_target": history.rollback_target,
            "canary": history_canary(history),
            "replicas": replicas,
            "running": running,
            "runs": [
                {
                    k: r.get(k)
                    for k in ("run_id", "started_at", "status", "reason", "version", "seconds")
                }
                | {"promote": (r.get("gate") or {}).get("promote")}
                for r in records
            ],
        }
        serving = Table(title=f"{alias} serves")
        for col in ("history", "rollback target", "canary", *served):
            serving.add_column(col)
        serving.add_row(
            history.current or "-",
            history.rollback_target or "-",
            canary_cell(history_canary(history)),
            *(_replica_cell(v) for v in replicas.values()),
        )
        err.print(serving)
        if history.canary is not None:
            summary["aliases"][alias]["canary_verdict"] = _canary_estimate(settings, alias)

    summary["liked_share"] = _liked_share(settings, registry, names)
    typer.echo(json.dumps(summary, default=str))


def _canary_estimate(settings: Settings, alias: str) -> dict[str, Any] | None:
    """The running canary's votes per arm and the test's estimate now, printed as a
    table; None when the votes cannot be read."""
    from flows.canary import canary_verdict

    try:
        found = canary_verdict(settings, alias)
    except (StoreError, OSError) as exc:
        err.print(f"[yellow]the canary's votes cannot be read: {exc}[/]")
        return None
    if found is None:
        return None
    verdict = found[1]
    table = Table(title=f"{alias}'s canary, by live votes")
    for col in ("arm", "version", "votes", "liked"):
        table.add_column(col)
    for arm, counts in (("served", verdict.served), ("candidate", verdict.candidate)):
        share = f"{counts.share:.1%}" if counts.share is not None else "-"
        table.add_row(arm, counts.name, str(counts.votes), share)
    err.print(table)
    err.print(f"{verdict.decision}: {verdict.reason}", markup=False)
    return verdict.as_dict()


def _replica_cell(replica: dict[str, Any]) -> str:
    """What one replica serves for an alias, and its canary, in a table cell."""
    if "error" in replica:
        return replica["error"][:60]
    cell = replica.get("serves") or "-"
    if replica.get("canary"):
        cell += f" + canary {canary_cell(replica['canary'])}"
    return cell


def _running(runs: CycleRuns) -> dict[str, Any] | None:
    """The run holding the lock, when its process is alive on this machine."""
    return runs.live_holder()


def _liked_share(
    settings: Settings, registry: AdapterRegistry, aliases: list[str]
) -> list[dict[str, Any]] | dict[str, str]:
    from connectors.feedback.vote_table import VoteTable
    from pipeline.feedback.production import liked_share_by_adapter

    try:
        store = FeedbackStore(settings.store.url, settings.store.storage_options)
        votes, _ = VoteTable(store).read()
        frame = liked_share_by_adapter(votes)
    except (StoreError, OSError) as exc:
        err.print(f"could not read the store {settings.store.url}: {exc}", style="red")
        return {"error": str(exc)}
    current = {registry.history(a).current: a for a in aliases}
    table = Table(title="liked share in production, per adapter version")
    for col in ("adapter", "votes", "liked", "liked share", "vs previous", "first vote",
                "last vote", "role"):  # fmt: skip
        table.add_column(col)
    rows = []
    for r in frame.itertuples(index=False):
        parsed = parse_served_name(r.adapter)
        role = "serving now" if parsed and current.get(parsed[1]) == parsed[0] else ""
        change = None if pd.isna(r.vs_previous_pts) else round(float(r.vs_previous_pts), 1)
        table.add_row(
            r.adapter,
            f"{r.votes:,}",
            f"{r.liked:,}",
            f"{r.liked_share:.1%}",
            "-" if change is None else f"{change:+.1f} pts",
            str(r.first_vote_ts)[:19],
            str(r.last_vote_ts)[:19],
            role,
        )
        rows.append(
            {
                "adapter": r.adapter,
                "votes": int(r.votes),
                "liked": int(r.liked),
                "liked_share": round(float(r.liked_share), 4),
                "vs_previous_pts": change,
            }
        )
    err.print(table)
    return rows
