"""The feedback store: Parquet files under a local directory or any fsspec URL.

Layout, one file per partition per ingest batch, named for the offsets it accounts for:

    <root>/feedback/topic=<t>/partition=<p>/<first:020d>-<last:020d>.parquet
    <root>/dead_letters/topic=<t>/partition=<p>/<first:020d>-<last:020d>.parquet

A feedback file is written for every batch, even one whose messages were all
dead-lettered, and always after that batch's dead letters: its presence is the proof
that offsets first..last are durable. Writes are atomic (temp file + rename locally,
a single PUT on object stores), so a reader never sees half a file and a batch
written twice lands on the same name. `recover_partition` settles what a crash or a
lost consumer left behind before a partition is consumed again.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import records

log = logging.getLogger(__name__)

FEEDBACK = "feedback"
DEAD_LETTERS = "dead_letters"
_SCHEMAS = {FEEDBACK: records.FEEDBACK_SCHEMA, DEAD_LETTERS: records.DEAD_LETTER_SCHEMA}
_NAME = re.compile(r"^(\d{20})-(\d{20})\.parquet$")


class StoreError(RuntimeError):
    """The store could not be read or written; the message says where and why."""


@dataclass(frozen=True)
class BatchFile:
    """A stored batch: the offsets first..last (inclusive) of one partition."""

    path: str
    first: int
    last: int


class FeedbackStore:
    """Append-only, idempotent Parquet store of feedback rows and dead letters."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)

    # -- layout -----------------------------------------------------------------

    def partition_dir(self, table: str, topic: str, partition: int) -> str:
        return f"{self.root}/{table}/topic={topic}/partition={partition}"

    def batch_path(self, table: str, topic: str, partition: int, first: int, last: int) -> str:
        return f"{self.partition_dir(table, topic, partition)}/{first:020d}-{last:020d}.parquet"

    # -- writing ----------------------------------------------------------------

    def write_batch(
        self, table: str, topic: str, partition: int, first: int, last: int, rows: pa.Table
    ) -> str:
        """Write one batch atomically; writing the same batch again replaces the file."""
        if first > last:
            raise ValueError(f"empty offset range {first}..{last}")
        if not rows.schema.equals(_SCHEMAS[table]):
            raise ValueError(f"rows do not match the {table} schema")
        path = self.batch_path(table, topic, partition, first, last)
        sink = pa.BufferOutputStream()
        pq.write_table(rows, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        try:
            if self._local:
                write_local_atomic(path, data)
            else:
                # One PUT: object stores make it visible whole or not at all.
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise StoreError(f"could not write {path}: {exc}") from exc
        return path

    # -- listing and recovery ---------------------------------------------------

    def batch_files(self, table: str, topic: str, partition: int) -> list[BatchFile]:
        """The stored batches of one partition, by first offset."""
        directory = self.partition_dir(table, topic, partition)
        try:
            names = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        files = []
        for path in names:
            match = _NAME.match(path.rsplit("/", 1)[-1])
            if match:
                files.append(BatchFile(path, int(match.group(1)), int(match.group(2))))
        return sorted(files, key=lambda f: (f.first, -f.last))

    def recover_partition(self, topic: str, partition: int) -> int | None:
        """Settle a partition before consuming it, and return the offset after the last
        durable batch (None if nothing is stored).

        Removes temp files of interrupted writes, dead letters of a batch whose
        feedback file never landed (the batch will be consumed again), and resolves
        overlapping batches (left by a consumer that lost its partitions mid-batch) so
        that every offset is stored in exactly one file.
        """
        for table in (FEEDBACK, DEAD_LETTERS):
            self._remove_temp_files(table, topic, partition)
        durable = self._resolve_overlaps(FEEDBACK, topic, partition)
        for f in self.batch_files(DEAD_LETTERS, topic, partition):
            if durable is None or f.last > durable:
                log.info("removing dead letters of an unfinished batch: %s", f.path)
                self.fs.rm(f.path)
        self._resolve_overlaps(DEAD_LETTERS, topic, partition)
        return None if durable is None else durable + 1

    def _resolve_overlaps(self, table: str, topic: str, partition: int) -> int | None:
        covered: int | None = None
        for f in self.batch_files(table, topic, partition):
            if covered is not None and f.last <= covered:
                log.warning("removing %s: its offsets are all in another file", f.path)
                self.fs.rm(f.path)
                continue
            if covered is not None and f.first <= covered:
                log.warning("rewriting %s without offsets already stored up to %d", f.path, covered)
                rows = self._read_files([f.path], table)
                rows = rows.filter(pc.greater(rows[records.KAFKA_OFFSET], covered))
                self.write_batch(table, topic, partition, covered + 1, f.last, rows)
                self.fs.rm(f.path)
            covered = f.last if covered is None else max(covered, f.last)
        return covered

    def _remove_temp_files(self, table: str, topic: str, partition: int) -> None:
        if not self._local:
            return
        directory = self.partition_dir(table, topic, partition)
        if not os.path.isdir(directory):
            return
        for name in os.listdir(directory):
            if name.startswith(".") and ".tmp-" in name:
                os.unlink(os.path.join(directory, name))

    # -- reading ----------------------------------------------------------------

    def files(self, table: str) -> list[str]:
        """Every stored batch file of a table, across topics and partitions."""
        try:
            paths = self.fs.glob(f"{self.root}/{table}/topic=*/partition=*/*.parquet")
        except FileNotFoundError:
            return []
        return sorted(p for p in paths if _NAME.match(p.rsplit("/", 1)[-1]))

    def read_arrow(self, table: str = FEEDBACK) -> pa.Table:
        """All rows of a table (empty with the right schema when nothing is stored)."""
        return self._read_files(self.files(table), table)

    def read(self, table: str = FEEDBACK) -> pd.DataFrame:
        """All rows of a table as a DataFrame."""
        return self.read_arrow(table).to_pandas()

    def count(self, table: str = FEEDBACK) -> int:
        """Rows in a table, from Parquet footers only."""
        total = 0
        for path in self.files(table):
            with self.fs.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def _read_files(self, paths: list[str], table: str) -> pa.Table:
        schema = _SCHEMAS[table]
        if not paths:
            return schema.empty_table()
        dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=self.fs)
        return dataset.to_table()


def write_local_atomic(path: str, data: bytes) -> None:
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new file in `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
