"""`kto-loop import`: feedback exported from other tools -> the feedback topic or a
training snapshot.

The export is read (connectors/feedback/import_files.py), mapped to schema-1 events by the
format's importer (pipeline/feedback/imports/<format>.py), and every event is parsed by the
consumer's own `EventParser` (pipeline/feedback/imports/__init__.py `check`). Then either the events
go to the feedback topic, keyed by conversation_id, for `kto-loop ingest` to store,
or they become the rows a snapshot is built from, as `kto-loop snapshot` builds one
from the store. What could not be mapped goes to the report (JSON lines: where,
reason, detail); stderr gets a short summary and stdout ends with one JSON line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import typer
from kafka.errors import KafkaError

from connectors.config import Settings
from connectors.feedback.import_files import ImportInputError, export_files, read_records
from flows.console import err, fail, setup_logging
from pipeline.feedback.events import EventParser
from pipeline.feedback.imports import FORMATS, Checked, ImportOptions, Unmapped, check

SINKS = ("kafka", "snapshot")


def _importer(fmt: str) -> ModuleType:
    """The pipeline module of `fmt`; exit 2 naming the formats for any other."""
    if fmt == "trl":
        fail(
            ValueError(
                "TRL datasets need no import: build a snapshot from one with "
                "`kto-loop snapshot --data FILE`"
            ),
            2,
        )
    if fmt not in FORMATS:
        fail(ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}"), 2)
    from importlib import import_module

    return import_module(f"pipeline.feedback.imports.{fmt}")


def _parser(settings: Settings, to: str) -> EventParser:
    """The consumer's parser. A snapshot stores user hashes, so it needs the real key;
    events sent to Kafka carry raw user ids (ingest hashes them), so there the key
    only serves validation and a throwaway one does when none is set."""
    events = settings.events
    key = events.user_hash_key
    if key is None and to == "snapshot":
        fail(
            ValueError(
                "[events] user_hash_key is not set: a snapshot stores user ids as a hash "
                "keyed by it; set KTO_LOOP_EVENTS__USER_HASH_KEY (the one ingest uses)"
            ),
            2,
        )
    secret = key.get_secret_value().encode() if key else secrets.token_bytes(16)
    return EventParser(secret, events, settings.ingest.max_event_bytes)


def options_from(
    model: str | None,
    keys: list[str] | None,
    threshold: float,
    categories: list[str] | None,
    rating_fields: list[str] | None,
) -> dict[str, Any]:
    """ImportOptions' arguments from the command line's; exit 2 for a malformed
    --category."""
    words: dict[str, str] = {}
    for item in categories or ():
        value, sep, vote = item.rpartition("=")
        if not sep or not value or vote not in ("like", "dislike"):
            fail(ValueError(f"--category {item!r} must read VALUE=like or VALUE=dislike"), 2)
        words[value.strip().lower()] = vote
    options: dict[str, Any] = {"model": model, "threshold": threshold, "categories": words}
    if keys:
        options["keys"] = None if "*" in keys else frozenset(keys)
    if rating_fields:
        options["rating_fields"] = tuple(rating_fields)
    return options


class _Report:
    """Counts what was read, and writes each Unmapped to the report as it comes."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.read = 0
        self.events = 0
        self.unmapped: Counter[str] = Counter()

    def add(self, item: Unmapped) -> None:
        self.unmapped[item.reason] += 1
        self.out.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")

    def events_of(self, items: Iterable[Checked | Unmapped]) -> Iterator[Checked]:
        for item in items:
            self.read += 1
            if isinstance(item, Unmapped):
                self.add(item)
            else:
                self.events += 1
                yield item


def import_feedback(
    settings: Settings,
    fmt: str,
    source: Path,
    to: str,
    options: dict[str, Any],
    report_path: Path | None,
    out: Path | None,
) -> None:
    """Import the export at `source` in format `fmt` to `to` (kafka or snapshot); print
    the summary on stderr and the counts as JSON. Exit 2 for bad input or options, 3
    when the broker refused the events, 1 when the snapshot cannot be written."""
    setup_logging("WARNING", rich=False)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    importer = _importer(fmt)
    if to not in SINKS:
        fail(ValueError(f"--to must be one of {', '.join(SINKS)}, got {to!r}"), 2)
    try:
        import_options = ImportOptions(**options)
        export_files(source)
    except (ValueError, ImportInputError) as exc:
        fail(exc, 2)
    parser = _parser(settings, to)
    report_path = report_path or Path.cwd() / f"import-{fmt}-report.jsonl"
    try:
        report_file = report_path.open("w", encoding="utf-8")
    except OSError as exc:
        fail(RuntimeError(f"could not write the report {report_path}: {exc}"), 2)
    with report_file:
        report = _Report(report_file)
        mapped = importer.map_export(read_records(source), import_options)
        events = report.events_of(check(mapped, parser))
        try:
            result = _send(settings, events, report, fmt, to, out)
        except ImportInputError as exc:
            fail(exc, 2)
    _summary(report, fmt, source, result, report_path)
    typer.echo(
        json.dumps(
            {
                "format": fmt,
                "read": report.read,
                "events": report.events,
                **result,
                "unmapped": sum(report.unmapped.values()),
                "unmapped_by_reason": dict(sorted(report.unmapped.items())),
                "report": str(report_path),
            }
        )
    )


def _send(
    settings: Settings,
    events: Iterator[Checked],
    report: _Report,
    fmt: str,
    to: str,
    out: Path | None,
) -> dict[str, Any]:
    if to == "kafka":
        from connectors.feedback.produce import produce

        try:
            sent = produce(settings.kafka, ((e.key, e.value) for e in events))
        except KafkaError as exc:
            servers = ",".join(settings.kafka.bootstrap_servers)
            fail(RuntimeError(f"could not send to {settings.kafka.topic} at {servers}: {exc}"), 3)
        return {"sent": sent, "topic": settings.kafka.topic}
    return _snapshot(settings, events, report, fmt, out)


def _snapshot(
    settings: Settings, events: Iterator[Checked], report: _Report, fmt: str, out: Path | None
) -> dict[str, Any]:
    """Build and write the snapshot of the events, as `kto-loop snapshot` does from the
    store's rows (the same FeedbackRows, vote table fold and write_snapshot)."""
    from connectors.feedback.snapshots import write_snapshot
    from flows.ingest_cli import warn_skipped
    from pipeline.feedback.records import FeedbackRows
    from pipeline.feedback.snapshot import SnapshotError
    from pipeline.feedback.votes import snapshot_of_rows

    rows = FeedbackRows(f"import:{fmt}", 0)
    wheres: list[str] = []
    for offset, item in enumerate(events):
        rows.append(item.event, offset, None)
        wheres.append(item.where)
    for offset, reason in rows.seal():
        report.events -= 1
        report.add(Unmapped(wheres[offset], "unstorable", reason))
    now = dt.datetime.now(dt.UTC)
    try:
        snap = snapshot_of_rows(rows.to_table(now, f"kto-loop import {fmt}"), settings.snapshot)
    except SnapshotError as exc:
        fail(RuntimeError(f"no snapshot from this import: {exc}"), 2)
    out_dir = out or Path(settings.snapshot.out_dir)
    try:
        path = write_snapshot(snap, out_dir)
    except OSError as exc:
        fail(RuntimeError(f"could not write the snapshot under {out_dir}: {exc}"), 1)
    warn_skipped(snap)
    s = snap.stats
    return {
        "snapshot": snap.id,
        "path": str(path),
        "examples": snap.counts.total,
        "votes": s.votes,
        "superseded": s.superseded,
        "retracted": s.retracted,
        "duplicates": s.duplicates,
    }


def _summary(
    report: _Report, fmt: str, source: Path, result: dict[str, Any], report_path: Path
) -> None:
    where = (
        f"sent {result['sent']:,} to {result['topic']}"
        if "sent" in result
        else f"snapshot {result['snapshot']} ({result['examples']:,} examples)"
    )
    err.print(
        f"{fmt} {source}: {report.read:,} records, {report.events:,} events, {where}",
        markup=False,
        highlight=False,
    )
    if report.unmapped:
        reasons = ", ".join(f"{r} {n:,}" for r, n in report.unmapped.most_common())
        err.print(
            f"not imported: {sum(report.unmapped.values()):,} ({reasons}); see {report_path}",
            style="yellow",
            markup=False,
            highlight=False,
        )
