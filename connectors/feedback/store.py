"""The feedback store: Parquet files under a local directory or any fsspec URL.

Layout, one file per partition per ingest batch, named for the offsets it accounts for:

    <root>/feedback/topic=<t>/partition=<p>/<first:020d>-<last:020d>.parquet
    <root>/dead_letters/topic=<t>/partition=<p>/<first:020d>-<last:020d>.parquet

A feedback file is written for every batch, even one whose messages were all
dead-lettered, and always after that batch's dead letters: its presence is the proof
that offsets first..last are durable. Writes are atomic (temp file + rename locally,
a single PUT on object stores), so a reader never sees half a file and a batch
written twice lands on the same name. `recover_partition` settles what a crash or a
lost consumer left behind before a partition is consumed again; every step of it
is safe to interrupt and repeat (see its docstring).
"""

from __future__ import annotations

import datetime as dt
import errno
import itertools
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from connectors.faults import crash_point
from pipeline.feedback import records

log = logging.getLogger(__name__)

FEEDBACK = "feedback"
DEAD_LETTERS = "dead_letters"
_SCHEMAS = {FEEDBACK: records.FEEDBACK_SCHEMA, DEAD_LETTERS: records.DEAD_LETTER_SCHEMA}
_NAME = re.compile(r"^(\d{20})-(\d{20})\.parquet$")
_PARTITION_DIR = re.compile(r"/topic=([^/]+)/partition=(\d+)$")


class StoreError(RuntimeError):
    """The store could not be read or written; the message says where, why (the errno's
    name, e.g. EROFS or ENOSPC) and what to do. `path` and `errno` say it to code."""

    def __init__(self, message: str, path: str | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = code

    @classmethod
    def from_os_error(cls, action: str, path: str, exc: OSError) -> StoreError:
        """A StoreError naming the path, the errno's symbolic name and the remedy."""
        code = exc.errno
        if code is None:
            what = str(exc)
        else:
            what = f"{errno.errorcode.get(code, f'errno {code}')} ({exc.strerror or exc})"
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "make the store writable by this process (permissions, a read-only mount)"
        elif code in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space on the store's filesystem or raise its quota"
        else:
            fix = "check [store] url, its permissions and credentials"
        return cls(f"could not {action} {path}: {what}; {fix}", path=path, code=code)


@contextmanager
def os_errors(action: str, path: str) -> Iterator[None]:
    """Raise an OSError inside the block as the StoreError that names `action` on `path`
    and the remedy (the store's and the vote table's file operations)."""
    try:
        yield
    except OSError as exc:
        raise StoreError.from_os_error(action, path, exc) from exc


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
        data = encode_parquet(rows)
        with os_errors("write", path):
            if self._local:
                write_local_atomic(path, data, crash_points="store.write")
            else:
                # One PUT: object stores make it visible whole or not at all.
                self.fs.pipe_file(path, data.tobytes())
        return path

    # -- listing and recovery ---------------------------------------------------

    def batch_files(self, table: str, topic: str, partition: int) -> list[BatchFile]:
        """The stored batches of one partition, by first offset (longest first)."""
        directory = self.partition_dir(table, topic, partition)
        try:
            names = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError.from_os_error("list", directory, exc) from exc
        files = []
        for path in names:
            match = _NAME.match(path.rsplit("/", 1)[-1])
            if match:
                files.append(BatchFile(path, int(match.group(1)), int(match.group(2))))
        return sorted(files, key=lambda f: (f.first, -f.last))

    def live_batch_files(self, table: str, topic: str, partition: int) -> list[BatchFile]:
        """The batches of one partition a reader counts: without those whose offsets
        all lie in another file (the small files a compaction covered, before they are
        removed; a batch inside a lost consumer's longer one, before recovery)."""
        return _live(self.batch_files(table, topic, partition))

    def partitions(self, table: str = FEEDBACK) -> list[tuple[str, int]]:
        """The (topic, partition) pairs with a directory in a table, sorted."""
        try:
            dirs = self.fs.glob(f"{self.root}/{table}/topic=*/partition=*")
        except FileNotFoundError:
            return []
        out = []
        for path in dirs:
            match = _PARTITION_DIR.search(path)
            if match:
                out.append((match.group(1), int(match.group(2))))
        return sorted(out)

    def recover_partition(self, topic: str, partition: int) -> int | None:
        """Settle a partition before consuming it, and return the offset after the last
        durable batch (None if nothing is stored).

        Removes temp files of interrupted writes, dead letters of a batch whose
        feedback file never landed (the batch will be consumed again), and resolves
        overlapping batches (left by a consumer that lost its partitions mid-batch) so
        that every offset is stored in exactly one file.

        A crash at any point of it (each file change is crash point
        "store.recover.N", N counting from 1 per call) loses nothing, and running it
        again finishes the job: a file is removed only once the files that hold its
        offsets exist, and a trimmed copy is named for the offsets it keeps, so the
        next run recognises it and removes the original instead of trimming again.

        Raises:
            StoreError: a file could not be listed, read, written or removed.
        """
        steps = itertools.count(1)

        def step() -> None:
            crash_point(f"store.recover.{next(steps)}")

        for table in (FEEDBACK, DEAD_LETTERS):
            self._remove_temp_files(table, topic, partition, step)
        durable = self._resolve_overlaps(FEEDBACK, topic, partition, step)
        self._remove_unfinished_dead_letters(topic, partition, durable, step)
        self._resolve_overlaps(DEAD_LETTERS, topic, partition, step)
        return None if durable is None else durable + 1

    def compact(self, target_bytes: int = 128 << 20) -> dict[str, int]:
        """Merge each feedback partition's runs of small batch files into files of
        about `target_bytes`; return how many files were merged and written.

        See `compact_partition`. Safe beside a running consumer: files it writes later
        are left alone, and a batch it rewrites over a compacted range is settled by
        the next recovery like any other overlap.
        """
        merged = written = 0
        for topic, partition in self.partitions(FEEDBACK):
            m, w = self.compact_partition(topic, partition, target_bytes)
            merged, written = merged + m, written + w
        return {"files_merged": merged, "files_written": written}

    def compact_partition(
        self, topic: str, partition: int, target_bytes: int = 128 << 20
    ) -> tuple[int, int]:
        """Merge runs of adjacent feedback files of one partition (each run under
        `target_bytes`, at least two files) into one file named for the offsets of the
        run, then remove the files it covers; return (files merged, files written).

        Crash-safe: the merged file lands atomically before any file it covers is
        removed, and until then readers and recovery ignore the covered ones (their
        names say the merged file holds their offsets). Every file change is crash
        point "store.compact.N", N counting from 1 per call; running it again removes
        what a crash left covered.
        """
        steps = itertools.count(1)

        def step() -> None:
            crash_point(f"store.compact.{next(steps)}")

        every = self.batch_files(FEEDBACK, topic, partition)
        live = _live(every)
        for covered in (f for f in every if f not in live):
            self._remove(covered.path, step)
        merged = written = 0
        for run in _runs(live, self._sizes(FEEDBACK, topic, partition), target_bytes):
            rows = self._read_files([f.path for f in run], FEEDBACK)
            rows = rows.sort_by(records.KAFKA_OFFSET)
            step()
            self.write_batch(FEEDBACK, topic, partition, run[0].first, run[-1].last, rows)
            for f in run:
                self._remove(f.path, step)
            merged, written = merged + len(run), written + 1
        if written:
            log.info("compacted %d files of %s/%d into %d", merged, topic, partition, written)
        return merged, written

    def _sizes(self, table: str, topic: str, partition: int) -> dict[str, int]:
        directory = self.partition_dir(table, topic, partition)
        with os_errors("list", directory):
            return {i["name"]: int(i["size"]) for i in self.fs.ls(directory, detail=True)}

    def _resolve_overlaps(
        self, table: str, topic: str, partition: int, step: Callable[[], None]
    ) -> int | None:
        """Remove files whose offsets other files hold, trim partial overlaps from the
        front; return the last offset covered."""
        files = self.batch_files(table, topic, partition)
        ranges = {(f.first, f.last) for f in files}
        kept_copies: set[tuple[int, int]] = set()
        covered: int | None = None
        for f in files:
            if (f.first, f.last) in kept_copies:
                continue
            if covered is not None and f.last <= covered:
                log.warning("removing %s: its offsets are all in another file", f.path)
                self._remove(f.path, step)
                continue
            if covered is not None and f.first <= covered:
                trimmed = (covered + 1, f.last)
                if trimmed in ranges:
                    # Written by a recovery that stopped before removing the original.
                    log.warning("removing %s: a trimmed copy of it exists", f.path)
                    kept_copies.add(trimmed)
                else:
                    log.warning(
                        "rewriting %s without offsets already stored up to %d", f.path, covered
                    )
                    self._copy_range(table, topic, partition, f, *trimmed, step)
                self._remove(f.path, step)
            covered = f.last if covered is None else max(covered, f.last)
        return covered

    def _remove_unfinished_dead_letters(
        self, topic: str, partition: int, durable: int | None, step: Callable[[], None]
    ) -> None:
        """Remove dead letters of offsets past the last durable one: their batch is
        consumed again and dead-letters them again."""
        files = self.batch_files(DEAD_LETTERS, topic, partition)
        ranges = {(f.first, f.last) for f in files}
        for f in files:
            if durable is not None and f.last <= durable:
                continue
            if durable is not None and f.first <= durable and (f.first, durable) not in ranges:
                # Its head holds dead letters of durable offsets, maybe the only copy.
                self._copy_range(DEAD_LETTERS, topic, partition, f, f.first, durable, step)
            log.info("removing dead letters of an unfinished batch: %s", f.path)
            self._remove(f.path, step)

    def _copy_range(
        self,
        table: str,
        topic: str,
        partition: int,
        source: BatchFile,
        first: int,
        last: int,
        step: Callable[[], None],
    ) -> None:
        with os_errors("read", source.path):
            rows = self._read_files([source.path], table)
        offsets = rows[records.KAFKA_OFFSET]
        rows = rows.filter(pc.and_(pc.greater_equal(offsets, first), pc.less_equal(offsets, last)))
        if table == DEAD_LETTERS and rows.num_rows == 0:
            return  # only feedback files must exist for every range: they mark it durable
        step()
        self.write_batch(table, topic, partition, first, last, rows)

    def _remove(self, path: str, step: Callable[[], None]) -> None:
        step()
        with os_errors("remove", path):
            self.fs.rm(path)

    def _remove_temp_files(
        self, table: str, topic: str, partition: int, step: Callable[[], None]
    ) -> None:
        if not self._local:
            return
        directory = self.partition_dir(table, topic, partition)
        with os_errors("list", directory):
            if not os.path.isdir(directory):
                return
            names = os.listdir(directory)
        for name in names:
            if name.startswith(".") and ".tmp-" in name:
                path = os.path.join(directory, name)
                step()
                with os_errors("remove", path):
                    os.unlink(path)

    # -- reading ----------------------------------------------------------------

    def files(self, table: str) -> list[str]:
        """Every stored batch file of a table a reader counts, across topics and
        partitions (see `live_batch_files`)."""
        try:
            paths = self.fs.glob(f"{self.root}/{table}/topic=*/partition=*/*.parquet")
        except FileNotFoundError:
            return []
        by_dir: dict[str, list[BatchFile]] = {}
        for path in paths:
            directory, name = path.rsplit("/", 1)
            match = _NAME.match(name)
            if match:
                batch = BatchFile(path, int(match.group(1)), int(match.group(2)))
                by_dir.setdefault(directory, []).append(batch)
        return sorted(
            f.path
            for files in by_dir.values()
            for f in _live(sorted(files, key=lambda f: (f.first, -f.last)))
        )

    def read_arrow(
        self,
        table: str = FEEDBACK,
        columns: Sequence[str] | None = None,
        filter: ds.Expression | None = None,
    ) -> pa.Table:
        """The rows of a table (empty with the right schema when nothing is stored):
        only `columns` (all by default) of the rows `filter` keeps (all by default).
        Parquet is columnar, so the columns left out are never read from disk."""
        return self._read_files(self.files(table), table, columns, filter)

    def read(
        self,
        table: str = FEEDBACK,
        columns: Sequence[str] | None = None,
        filter: ds.Expression | None = None,
    ) -> pd.DataFrame:
        """The rows of a table as a DataFrame: only `columns` (all by default) of the
        rows `filter` keeps."""
        return self.read_arrow(table, columns, filter).to_pandas()

    def read_ranges(
        self,
        ranges: Iterable[tuple[str, int, int, int]],
        columns: Sequence[str],
        table: str = FEEDBACK,
        since: dt.datetime | None = None,
    ) -> pa.Table:
        """Only `columns` of the rows at the given offsets: (topic, partition, first,
        last) ranges, inclusive, and with `since`, only feedback rows whose ts is not
        before it. Only the batch files whose offsets overlap a range are opened (their
        names say their offsets), and a pyarrow filter keeps the rows in the ranges: a
        store grown since holds more."""
        schema = _SCHEMAS[table]
        paths: list[str] = []
        keep: ds.Expression | None = None
        for topic, partition, first, last in ranges:
            files = self.live_batch_files(table, topic, partition)
            paths += [f.path for f in files if f.first <= last and f.last >= first]
            inside = (
                (ds.field(records.KAFKA_TOPIC) == topic)
                & (ds.field(records.KAFKA_PARTITION) == partition)
                & (ds.field(records.KAFKA_OFFSET) >= first)
                & (ds.field(records.KAFKA_OFFSET) <= last)
            )
            keep = inside if keep is None else keep | inside
        if not paths:
            return pa.schema([schema.field(c) for c in columns]).empty_table()
        if since is not None and keep is not None:
            keep = keep & (ds.field(records.TS) >= pa.scalar(since, schema.field(records.TS).type))
        with os_errors("read", f"{self.root}/{table}"):
            dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=self.fs)
            return dataset.to_table(columns=list(columns), filter=keep)

    def count(self, table: str = FEEDBACK) -> int:
        """Rows in a table, from Parquet footers only."""
        total = 0
        for path in self.files(table):
            with self.fs.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def _read_files(
        self,
        paths: list[str],
        table: str,
        columns: Sequence[str] | None = None,
        filter: ds.Expression | None = None,
    ) -> pa.Table:
        schema = _SCHEMAS[table]
        wanted = list(schema.names if columns is None else columns)
        unknown = [c for c in wanted if c not in schema.names]
        if unknown:
            raise ValueError(f"the {table} table has no columns {unknown}")
        if not paths:
            return pa.schema([schema.field(c) for c in wanted]).empty_table()
        dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=self.fs)
        return dataset.to_table(columns=wanted, filter=filter)


def _runs(
    files: list[BatchFile], sizes: dict[str, int], target_bytes: int
) -> Iterator[list[BatchFile]]:
    """Runs of adjacent files (each starting right after the last one ends) whose sizes
    add up to at most target_bytes, of two files or more."""
    run: list[BatchFile] = []
    total = 0
    for f in files:
        size = sizes.get(f.path, 0)
        adjacent = bool(run) and f.first == run[-1].last + 1
        if not adjacent or total + size > target_bytes:
            if len(run) > 1:
                yield run
            run, total = [], 0
        if size <= target_bytes:
            run.append(f)
            total += size
    if len(run) > 1:
        yield run


def _live(files: list[BatchFile]) -> list[BatchFile]:
    """Files sorted by (first, -last), less those inside an earlier one."""
    out: list[BatchFile] = []
    covered = -1
    for f in files:
        # Sorted so, a file ending at or before the furthest end seen lies in the file
        # that reached it.
        if f.last <= covered:
            continue
        out.append(f)
        covered = f.last
    return out


def encode_parquet(rows: pa.Table) -> memoryview:
    """The Parquet file of `rows`, as the store writes it: a view of Arrow's buffer,
    not a second copy of a batch that may be tens of MB."""
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink, compression="zstd")
    return memoryview(sink.getvalue())


def write_local_atomic(
    path: str,
    data: bytes | memoryview | Callable[[BinaryIO], None],
    crash_points: str | None = None,
    exclusive: bool = False,
) -> None:
    """Write `path` whole or not at all: a temp file, fsync, rename, fsync of the
    directory. `data` is the bytes, or a function that writes them to the open file
    (a large file need not be held in memory first). With `crash_points`, the steps are
    crash points "<crash_points>.1" (temp file written, not renamed) and
    "<crash_points>.2" (renamed, directory not synced). With `exclusive`, the temp
    file is linked to `path` instead of renamed over it: FileExistsError if `path`
    exists (one of two writers wins, whole)."""
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if crash_points:
            crash_point(f"{crash_points}.1")
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if crash_points:
        crash_point(f"{crash_points}.2")
    fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new file in `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
