"""`kto-loop register / publish / end-canary / rollback / sync / adapters / gc`: the registry
and serving.

Each command prints a table or progress on stderr and ends with one JSON line on stdout.
Exit codes: 0 done, 1 a server failed (nothing changed), 2 bad input (a refused adapter,
an unknown version, a bad config).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from connectors.config import ConfigError, Settings
from connectors.serving.adapter_registry import AdapterRegistry
from connectors.serving.publish import Publisher, PublishError, PublishResult
from connectors.serving.vllm_admin import VllmError
from flows.console import err, fail, number
from flows.preflight import check_serving
from pipeline.serving.adapter_check import AdapterRefused
from pipeline.serving.registry import (
    AliasHistory,
    RegistryError,
    check_share,
    parse_served_name,
    retention,
    version_number,
)


def _registry(settings: Settings) -> AdapterRegistry:
    return AdapterRegistry(settings.registry.url, settings.registry.storage_options)


def _publisher(settings: Settings) -> Publisher:
    return Publisher(
        _registry(settings),
        settings.serving,
        progress=lambda line: err.print(line, markup=False, highlight=False),
    )


def _report(status: str, switch: Callable[[], PublishResult]) -> None:
    """Run a switch of an alias; print its JSON line, or exit 2 (bad input) or 1 (a
    server failed, nothing changed)."""
    try:
        result = switch()
    except (AdapterRefused, RegistryError) as e:
        fail(e, 2)
    except (PublishError, VllmError) as e:
        fail(e, 1)
    typer.echo(json.dumps({"status": status, **result.as_dict()}))


def register(settings: Settings, adapter_dir: Path, parent: str | None, note: str) -> None:
    """Register a directory, checked as a publish to [serving] would check it (exit 2 and
    nothing registered when refused)."""
    try:
        check_serving(settings)
        info = _publisher(settings).register(adapter_dir, parent=parent, note=note)
    except (AdapterRefused, RegistryError, ConfigError) as e:
        fail(e, 2)
    typer.echo(json.dumps({"status": "registered", **info}))


def publish(
    settings: Settings,
    adapter: str,
    alias: str,
    reason: str,
    canary: float | None = None,
    replace_canary: bool = False,
) -> None:
    """Publish a version or an adapter directory, or start a canary of it at the share
    `canary` (exit 2 before anything is read when [serving] base_model, which the checks
    compare with, names no model)."""
    try:
        check_serving(settings)
        if canary is not None:
            check_share(canary)
    except (ConfigError, RegistryError) as exc:
        fail(exc, 2)
    publisher = _publisher(settings)

    def switch() -> PublishResult:
        target = _adapter_target(adapter)
        if isinstance(target, Path):
            # Checked before it becomes a version: a refused adapter leaves no trace.
            version = publisher.register(target, note="registered by publish")["version"]
            err.print(f"registered {adapter} as {version}", markup=False, highlight=False)
        else:
            version = target
        if canary is not None:
            return publisher.start_canary(alias, version, canary, reason, replace_canary)
        return publisher.publish(alias, version, reason)

    _report("published" if canary is None else "canary_started", switch)


def _adapter_target(adapter: str) -> Path | str:
    """`--adapter` as an adapter directory (a Path) or a version name, or a
    RegistryError saying which of the two it failed to be."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        return path
    if "/" in adapter or adapter.startswith((".", "~")) or path.exists():
        what = "a file, not a directory" if path.exists() else "nothing there"
        raise RegistryError(f"no adapter directory at {adapter} ({what})")
    try:
        version_number(adapter)
    except RegistryError:
        raise RegistryError(
            f"{adapter!r} is neither an adapter directory nor a version name (v1, v2, ...)"
        ) from None
    return adapter  # the registry names the versions it has when it has no such one


def end_canary(settings: Settings, alias: str, outcome: str, reason: str) -> None:
    """End the alias's canary: promoted serves the candidate everywhere, any other outcome
    the served version."""
    _report("canary_ended", lambda: _publisher(settings).end_canary(alias, outcome, reason))


def rollback(settings: Settings, alias: str, reason: str) -> None:
    _report("rolled_back", lambda: _publisher(settings).rollback(alias, reason))


def sync(settings: Settings, alias: str) -> None:
    _report("synced", lambda: _publisher(settings).sync(alias))


def _version(name: str) -> str:
    parsed = parse_served_name(name)
    return parsed[1] if parsed else name


def served_versions(state: dict[str, Any] | str) -> dict[str, str]:
    """alias -> version a replica serves, from its swap-plugin state."""
    if isinstance(state, str):
        return {}
    return {alias: _version(entry["target"]) for alias, entry in state.get("aliases", {}).items()}


def replica_canaries(state: dict[str, Any] | str) -> dict[str, dict[str, Any]]:
    """alias -> the canary a replica runs (version, share, salt, since, requests routed per
    arm), from its swap-plugin state."""
    if isinstance(state, str):
        return {}
    out = {}
    for alias, entry in state.get("aliases", {}).items():
        canary = entry.get("canary")
        if canary:
            out[alias] = {
                "version": _version(canary["target"]),
                "share": canary["share"],
                "salt": canary["salt"],
                "since": canary["started_at"],
                "routed": canary["routed"],
            }
    return out


def history_canary(history: AliasHistory) -> dict[str, Any] | None:
    """The canary an alias's history says runs, for a JSON line."""
    c = history.canary
    if c is None:
        return None
    return {"version": c.version, "share": c.share, "since": c.started_at, "reason": c.reason}


def canary_cell(canary: dict[str, Any] | None) -> str:
    """A canary in a table cell: `v4 at 0.1 since 2026-12-08T01:02 (12 / 108 routed)`."""
    if not canary:
        return "-"
    cell = f"{canary['version']} at {canary['share']:g} since {canary['since'][:16]}"
    routed = canary.get("routed")
    if routed:
        cell += f" ({routed['candidate']} / {routed['served']} routed)"
    return cell


def out_of_sync(url: str, alias: str, history: AliasHistory, state: dict[str, Any]) -> str | None:
    """Why a replica does not serve what the alias's history says, or None when it does."""
    serves = served_versions(state).get(alias)
    canary = replica_canaries(state).get(alias)
    recorded = history.canary
    if history.current and serves != history.current:
        # A restarted or new replica knows no aliases until it is told again.
        return f"{url} serves {alias} as {serves or 'nothing'}, the history says {history.current}"
    running = (canary["version"], canary["salt"]) if canary else None
    if running != ((recorded.version, recorded.salt) if recorded else None):
        runs = f"a canary of {canary['version']}" if canary else "no canary"
        says = f"one of {recorded.version}" if recorded else "none"
        return f"{url} runs {runs} for {alias}, the history says {says}"
    return None


def adapters(settings: Settings) -> None:
    publisher = _publisher(settings)
    registry = publisher.registry
    served = publisher.served()
    histories = {a: registry.history(a) for a in registry.aliases()}

    table = Table(title=f"adapter versions in {registry.url}")
    for col in ("version", "parent", "created", "snapshot", "rank", "held-out acc", "serving"):
        table.add_column(col)
    versions = registry.versions()
    rows = []
    for v in versions:
        info = registry.info(v)
        after = (info.get("metrics") or {}).get("heldout_after") or {}
        roles = [f"{a} (current)" for a, h in histories.items() if h.current == v]
        roles += [
            f"{a} (canary at {h.canary.share:g})"
            for a, h in histories.items()
            if h.canary and h.canary.version == v
        ]
        roles += [f"{a} (rollback)" for a, h in histories.items() if h.rollback_target == v]
        acc = after.get("accuracy")
        table.add_row(
            v,
            info.get("parent") or "-",
            info.get("created_at", "")[:19],
            (info.get("snapshot_id") or "-")[:12],
            str((info.get("lora") or {}).get("r", "-")),
            number(acc, 3),
            ", ".join(roles) or "-",
        )
        rows.append({"version": v, "parent": info.get("parent"), "roles": roles})
    err.print(table)

    replicas = Table(title="replicas")
    for col in ("replica", "serves", "canary", "loaded", "retiring"):
        replicas.add_column(col)
    replica_rows = {}
    for url, state in served.items():
        if isinstance(state, str):
            replicas.add_row(url, f"[red]{state}[/red]", "", "", "")
            replica_rows[url] = {"error": state}
            continue
        serves = served_versions(state)
        canaries = replica_canaries(state)
        replicas.add_row(
            url,
            ", ".join(f"{a}={v}" for a, v in serves.items()) or "-",
            ", ".join(f"{a}: {canary_cell(c)}" for a, c in canaries.items()) or "-",
            ", ".join(a["name"] for a in state["adapters"]) or "-",
            ", ".join(state["retiring"]) or "-",
        )
        replica_rows[url] = {
            "serves": serves,
            "canaries": canaries,
            "loaded": [a["name"] for a in state["adapters"]],
        }
        for alias, h in histories.items():
            if why := out_of_sync(url, alias, h, state):
                err.print(
                    f"{why}: run `kto-loop sync --alias {alias}`", style="yellow", markup=False
                )
    err.print(replicas)
    summary = {
        "versions": rows,
        "aliases": {
            a: {
                "current": h.current,
                "rollback_target": h.rollback_target,
                "canary": history_canary(h),
                "events": len(h.events),
            }
            for a, h in histories.items()
        },
        "replicas": replica_rows,
    }
    typer.echo(json.dumps(summary))


def listed(publisher: Publisher) -> tuple[list[str], list[str]] | None:
    """(names, adapter paths) every replica lists in /v1/models, or None when one of
    them could not be asked."""
    names: list[str] = []
    paths: list[str] = []
    for admin in publisher.admins:
        try:
            cards = admin.model_cards()
        except VllmError as e:
            err.print(
                f"{admin.url} could not be asked ({e}): keeping every version",
                style="yellow",
                markup=False,
            )
            return None
        names += [c["id"] for c in cards]
        paths += [c["root"] for c in cards if c.get("parent") and c.get("root")]
    return names, paths


def gc(settings: Settings, dry_run: bool) -> None:
    publisher = _publisher(settings)
    registry = publisher.registry

    def waiting(alias: str) -> None:
        err.print(
            f"waiting for {alias}: a publish, rollback or sync of it is running",
            markup=False,
            highlight=False,
        )

    # Under every alias's lock: no version becomes served or loaded while this decides.
    with registry.lock_all(waiting=waiting):
        seen = listed(publisher)
        versions = registry.versions()
        plan = retention(
            versions,
            [registry.history(a) for a in registry.aliases()],
            seen[0] if seen else None,
            settings.registry.keep_last,
            server_paths=seen[1] if seen else (),
            version_paths={v: settings.serving.server_path(registry.path(v)) for v in versions},
            keep_rollbacks=settings.registry.keep_rollbacks,
        )
        for v in plan.delete:
            if not dry_run:
                registry.delete(v, settings.registry.keep_rollbacks)
            err.print(f"{'would delete' if dry_run else 'deleted'} {v}", markup=False)
        abandoned = [] if dry_run else registry.sweep()
        for v in abandoned:
            err.print(f"removed the abandoned upload of {v}", markup=False)
    typer.echo(
        json.dumps(
            {
                "deleted": list(plan.delete),
                "dry_run": dry_run,
                "kept": plan.keep,
                "abandoned_uploads": abandoned,
            }
        )
    )
