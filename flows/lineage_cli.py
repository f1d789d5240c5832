"""`kto-loop adapters --lineage VERSION [--votes]`: which feedback made a version.

`--lineage` prints the chain from the version back to the first (each one's snapshot,
feedback window, votes per class and per producing adapter, parent, reference, created
time and cycle run) as a table on stderr, and the whole chain as the last line of
stdout. `--votes` lists the store's feedback rows inside the version's own window, one
JSON line each on stdout, then a summary line. Only the registry (and, for --votes, the
store) is read; no server is asked. Exit 2 for an unknown version or one without a
window.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import typer
from rich.table import Table

from connectors.config import Settings
from connectors.feedback.store import FEEDBACK, FeedbackStore, StoreError
from connectors.serving.adapter_registry import AdapterRegistry
from flows.console import err, fail
from pipeline.feedback import records
from pipeline.feedback.lineage import lineage_chain
from pipeline.serving.registry import RegistryError, version_number

# The store columns a vote listing reads, and the names it prints them under.
VOTE_COLUMNS = {
    records.EVENT_ID: "event_id",
    records.KAFKA_TOPIC: "topic",
    records.KAFKA_PARTITION: "partition",
    records.KAFKA_OFFSET: "offset",
    records.TS: "ts",
    records.FEEDBACK: "feedback",
    records.ADAPTER: "adapter",
}
# How many votes the stderr table shows; stdout has them all.
SHOWN_VOTES = 20


def _known(registry: AdapterRegistry, version: str) -> dict[str, Any]:
    """The version's version.json, or exit 2 naming the versions there are."""
    versions = registry.versions()
    try:
        version_number(version)
        if version not in versions:
            raise RegistryError(f"no version {version} in {registry.url}")
    except RegistryError as e:
        there = ", ".join(versions) if versions else "none yet"
        fail(RegistryError(f"{e}; versions there are: {there}"), 2)
    return registry.info(version)


def lineage(settings: Settings, version: str) -> None:
    """Print the chain from `version` back to the first version."""
    registry = AdapterRegistry(settings.registry.url, settings.registry.storage_options)
    _known(registry, version)
    present = set(registry.versions())
    chain = lineage_chain(version, lambda v: registry.info(v) if v in present else None)

    table = Table(title=f"lineage of {version} in {registry.url}")
    for col in (
        "version",
        "created",
        "run",
        "snapshot",
        "feedback window",
        "votes at",
        "votes +/-",
        "by adapter (+/-)",
        "parent",
        "reference",
    ):
        table.add_column(col, overflow="fold")
    for step in chain:
        if step.get("missing"):
            table.add_row(step["version"], "[red]not in the registry (removed)[/red]")
            continue
        window = step["window"] or {}
        table.add_row(
            step["version"],
            (step["created_at"] or "-")[:19].replace("T", " "),
            step["run_id"] or "-",
            (step["snapshot_id"] or "-")[:12],
            _where(window),
            _when(window),
            f"{window['votes_desirable']} / {window['votes_undesirable']}" if window else "-",
            _by_adapter(window),
            step["parent"] or "-",
            _reference(step["reference"]),
        )
    err.print(table)
    typer.echo(json.dumps({"version": version, "chain": chain}))


def window_votes(settings: Settings, version: str) -> None:
    """List the store's feedback rows inside `version`'s feedback window."""
    registry = AdapterRegistry(settings.registry.url, settings.registry.storage_options)
    info = _known(registry, version)
    window = info.get("snapshot_window")
    if not window or not window.get("partitions"):
        source = f"the file {window['file']}" if window and window.get("file") else None
        why = (
            f"it was trained on {source}, not on the store"
            if source
            else "its version.json records no feedback window (registered before windows "
            "were, or without a trainer's manifest)"
        )
        fail(RegistryError(f"{version} has no votes to list: {why}"), 2)
    ranges = [
        (p["topic"], p["partition"], p["first_read"], p["last_read"]) for p in window["partitions"]
    ]
    store = FeedbackStore(settings.store.url, settings.store.storage_options)
    try:
        since = window.get("read_from")
        rows = store.read_ranges(
            ranges,
            list(VOTE_COLUMNS),
            FEEDBACK,
            since=dt.datetime.fromisoformat(since) if since else None,
        )
    except StoreError as e:
        fail(e, 1)
    order = (records.KAFKA_TOPIC, records.KAFKA_PARTITION, records.KAFKA_OFFSET)
    rows = rows.sort_by([(c, "ascending") for c in order])
    votes = [{VOTE_COLUMNS[k]: v for k, v in row.items()} for row in rows.to_pylist()]
    _votes_table(version, votes)
    for vote in votes:
        typer.echo(json.dumps(vote, default=lambda t: t.isoformat()))
    summary = {
        "version": version,
        "snapshot_id": info.get("snapshot_id"),
        "rows": len(votes),
        "rows_read_by_snapshot": sum(p["rows_read"] for p in window["partitions"]),
        "partitions": window["partitions"],
    }
    typer.echo(json.dumps(summary))


def _votes_table(version: str, votes: list[dict[str, Any]]) -> None:
    table = Table(title=f"votes in the feedback window of {version}")
    for col in VOTE_COLUMNS.values():
        table.add_column(col)
    for vote in votes[:SHOWN_VOTES]:
        table.add_row(
            *(str(vote[c])[:19] if c == "ts" else str(vote[c]) for c in VOTE_COLUMNS.values())
        )
    err.print(table)
    if len(votes) > SHOWN_VOTES:
        err.print(f"... and {len(votes) - SHOWN_VOTES} more (all of them on stdout)")


def _where(window: dict[str, Any]) -> str:
    if not window:
        return "-"
    if window.get("file"):
        return f"file {window['file']}"
    lines = []
    for p in window.get("partitions", ()):
        counted = (
            f"votes {p['first_counted']}..{p['last_counted']}"
            if p["first_counted"] is not None
            else "no votes"
        )
        lines.append(
            f"{p['topic']}[{p['partition']}] {p['first_read']}..{p['last_read']} ({counted})"
        )
    return "\n".join(lines) or "-"


def _when(window: dict[str, Any]) -> str:
    first, last = window.get("votes_from"), window.get("votes_to")
    if not first:
        return "-"
    return f"{first[:19]}\n{last[:19]}".replace("T", " ")


def _by_adapter(window: dict[str, Any]) -> str:
    if not window:
        return "-"
    lines = [
        f"{a['adapter'] or 'base'} {a['desirable']}/{a['undesirable']}"
        for a in window.get("by_adapter", ())
    ]
    policy = window.get("on_policy")
    if policy:
        lines.append(f"on-policy for {policy['alias']}: {policy['votes']} of {policy['of']}")
    return "\n".join(lines) or "-"


def _reference(reference: dict[str, Any]) -> str:
    if reference.get("version"):
        return reference["version"]
    if reference.get("path"):
        return reference["path"]
    return "base model"
