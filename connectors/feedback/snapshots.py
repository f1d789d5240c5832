"""Snapshot files: write and read frozen training snapshots, and read TRL dataset files.

A snapshot is a directory named for its content id, under a local directory:

    <out_dir>/<id>/records.parquet   the training table (records.TRAINING_SCHEMA)
    <out_dir>/<id>/snapshot.json     id, created_at, counts, stats, the options used and
                                     the feedback window it was built from

It is written into a temp directory beside it and renamed into place, so a reader
never sees half a snapshot; writing one whose id already exists is a no-op (same id,
same content): its snapshot.json keeps the first build's window and run ids, while
each adapter's version.json records the window of the build it was trained on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.feedback.imports.trl import snapshot_from_table
from pipeline.feedback.lineage import FeedbackWindow
from pipeline.feedback.records import TRAINING_SCHEMA
from pipeline.feedback.snapshot import (
    Snapshot,
    SnapshotError,
    SnapshotOptions,
    SnapshotStats,
    from_snapshot_table,
)

log = logging.getLogger(__name__)

RECORDS_FILE = "records.parquet"
METADATA_FILE = "snapshot.json"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def write_snapshot(snapshot: Snapshot, out_dir: str | Path) -> Path:
    """Write a snapshot to <out_dir>/<id>/ atomically and return that directory; if it
    already exists, leave it as it is (its created_at stays the first write's).

    Raises:
        OSError: the directory cannot be written.
    """
    out_dir = Path(out_dir)
    target = out_dir / snapshot.id
    if (target / METADATA_FILE).is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{snapshot.id}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        arrow = pa.Table.from_pandas(snapshot.table, schema=TRAINING_SCHEMA, preserve_index=False)
        pq.write_table(arrow, tmp / RECORDS_FILE, compression="zstd")
        # The metadata is written last: its presence marks a complete snapshot.
        _write_synced(tmp / METADATA_FILE, json.dumps(_metadata(snapshot), indent=2) + "\n")
        _fsync(tmp / RECORDS_FILE)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another writer landed the same id first: same content, keep theirs.
            if not (target / METADATA_FILE).is_file():
                raise
            log.info("snapshot %s was written concurrently; keeping the existing copy", target)
        _fsync(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def read_snapshot(path: str | Path) -> Snapshot:
    """Read a snapshot from its directory or its records.parquet, and check that the
    content still matches the id it was written under.

    Raises:
        SnapshotError: missing or unreadable files, or content that does not match its id.
    """
    path = Path(path)
    records = path / RECORDS_FILE if path.is_dir() else path
    if not records.is_file():
        raise SnapshotError(f"{records} does not exist; pass a snapshot directory or its parquet")
    snapshot = from_snapshot_table(_read_parquet(records))
    metadata_path = records.parent / METADATA_FILE
    if not metadata_path.is_file():
        return snapshot
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read {metadata_path}: {exc}") from None
    if metadata.get("id") != snapshot.id:
        raise SnapshotError(
            f"{records} holds content with id {snapshot.id}, but {metadata_path} says "
            f"{metadata.get('id')}: the snapshot was changed after it was written; rebuild it"
        )
    options = metadata.get("config")
    stats = dict(metadata.get("stats", {}))
    # JSON gives a list back; the stats hold a tuple.
    stats["skipped_reasons"] = tuple(stats.get("skipped_reasons", ()))
    window = metadata.get("window")  # absent in snapshots written before windows
    return dataclasses.replace(
        snapshot,
        stats=SnapshotStats(**stats),
        options=SnapshotOptions(**options) if options else None,
        window=FeedbackWindow.from_dict(window) if window else None,
    )


def load_training_data(path: str | Path, options: SnapshotOptions | None = None) -> Snapshot:
    """A snapshot from a data file: TRL unpaired or paired (.jsonl, .json as lines or one
    array, .parquet), a snapshot's records.parquet, or a snapshot directory.

    Raises:
        SnapshotError: the file is missing, unreadable, empty or not a known format.
    """
    path = Path(path)
    if path.is_dir():
        return read_snapshot(path)
    snapshot = snapshot_from_table(read_table_file(path), options)
    if snapshot.window is None:
        return snapshot
    window = dataclasses.replace(snapshot.window, file=str(path.resolve()))
    return dataclasses.replace(snapshot, window=window)


def read_table_file(path: str | Path) -> pd.DataFrame:
    """The rows of a .jsonl, .json or .parquet file as a DataFrame (JSON values kept as
    Python values: nested lists stay lists).

    Raises:
        SnapshotError: missing, unreadable, of another type, or with no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise SnapshotError(
            f"cannot read {path}: expected a {', '.join(DATA_SUFFIXES)} file, got {suffix!r}"
        )
    frame = _read_parquet(path) if suffix == ".parquet" else pd.DataFrame(_read_json_rows(path))
    if frame.empty:
        raise SnapshotError(f"{path} has no rows; point at a file with examples")
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise SnapshotError(f"cannot read {path} as Parquet: {exc}") from None


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise SnapshotError(f"{path} is not valid JSON: {exc}") from None
        numbered = list(enumerate(rows, start=1))
        where = "item"
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except ValueError as exc:
                raise SnapshotError(
                    f"{path} line {number} is not valid JSON ({exc}); expected JSON Lines, "
                    "one object per line"
                ) from None
        where = "line"
    for number, row in numbered:
        if not isinstance(row, dict):
            raise SnapshotError(
                f"{path} {where} {number} is a {type(row).__name__}, not an object with "
                "named fields"
            )
    return [row for _, row in numbered]


def _metadata(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "id": snapshot.id,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "rows": len(snapshot.table),
        "counts": dataclasses.asdict(snapshot.counts),
        "stats": dataclasses.asdict(snapshot.stats),
        "config": snapshot.options.as_dict() if snapshot.options else None,
        "window": snapshot.window.as_dict() if snapshot.window else None,
    }


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
