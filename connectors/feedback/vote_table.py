"""The store's vote table on disk: the votes that count, folded in night by night
(pipeline/feedback/votes.py), so that a snapshot reads the store files added since the last one
and not the whole history.

Layout, beside the store's tables:

    <root>/votes/state.json                the VoteState of the current generation g
    <root>/votes/table-<g:08d>.arrow       the vote table of generation g
    <root>/votes/texts-<n:08d>.parquet     the texts of examples first seen by fold n
    <root>/votes/seen-<n:08d>.arrow        the event ids first seen by fold n

The table and the ids are Arrow IPC files, uncompressed: read back by mapping them
into memory, without decoding (a night reads them whole); the texts are Parquet.

A fold writes generation g+1's files (each atomically, like the store's batches), then
state.json (atomically: the commit), then removes generation g's table. A crash before
the state lands leaves generation g whole and valid (files of g+1 are ignored, then
rewritten by the next fold); one after it leaves only a stale table to remove. The
crash points are "votes.fold.N" (N = 1..3 after each file, 4 after the commit) and
"votes.state.1/2" inside the state's write. One process folds at a time: the cycle
and `kto-loop snapshot` are not run concurrently on one store. Readers beside them
(`kto-loop status`, the metrics collector) take `read()`: the stored table, with what
the store gained since folded in memory, and nothing written.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from connectors.faults import crash_point
from connectors.feedback.store import FEEDBACK, FeedbackStore, write_local_atomic
from connectors.feedback.store import os_errors as _os_errors
from pipeline.feedback import records
from pipeline.feedback.snapshot import Snapshot, SnapshotOptions
from pipeline.feedback.votes import (
    FOLD_COLUMNS,
    SEEN_SCHEMA,
    TEXT_SCHEMA,
    VOTE_TABLE_SCHEMA,
    VoteState,
    counted_keys,
    fold_votes,
    snapshot_from_votes,
)

log = logging.getLogger(__name__)

VOTES = "votes"
STATE_FILE = "state.json"
# Store rows a fold reads at a time (its memory grows with them, and their texts).
FOLD_CHUNK_ROWS = 100_000
_FILE = re.compile(r"^(table|texts|seen)-(\d{8})\.(arrow|parquet)$")
_SUFFIX = {"table": "arrow", "seen": "arrow", "texts": "parquet"}


class VoteTable:
    """The vote table of a feedback store."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self.fs = store.fs
        self.dir = f"{store.root}/{VOTES}"

    def _path(self, kind: str, generation: int) -> str:
        return f"{self.dir}/{kind}-{generation:08d}.{_SUFFIX[kind]}"

    def state(self) -> VoteState:
        """The state of the current vote table (generation 0, empty, before any fold)."""
        path = f"{self.dir}/{STATE_FILE}"
        with _os_errors("read", path):
            if not self.fs.exists(path):
                return VoteState()
            with self.fs.open(path, "rb") as f:
                return VoteState.from_dict(json.loads(f.read()))

    def fold(self) -> VoteState:
        """Fold the store files past the state into the table; return the new state
        (the old one when nothing was added).

        Raises:
            StoreError: a file could not be read or written.
        """
        return self.folded()[1]

    def folded(self) -> tuple[pa.Table, VoteState]:
        """fold(), and the table of the state it returns: what `snapshot` and the
        selections of pipeline/feedback/continual.py take."""
        state = self.state()
        table = self.table(state)
        files = self._new_files(state)
        if not files:
            self._remove_stale(state)  # what a fold killed after its commit left
            return table, state
        table, now, texts, fresh = self._fold_files(table, state, files)
        self._write(self._path("table", now.generation), table)
        crash_point("votes.fold.1")
        self._write(self._path("texts", now.generation), pa.concat_tables(texts))
        crash_point("votes.fold.2")
        self._write(self._path("seen", now.generation), pa.concat_tables(fresh))
        crash_point("votes.fold.3")
        self._write_state(now)
        crash_point("votes.fold.4")
        self._remove_stale(now)
        log.info(
            "folded %d store files into the vote table (generation %d, %d votes)",
            len(files),
            now.generation,
            table.num_rows,
        )
        return table, now

    def read(self) -> tuple[pa.Table, VoteState]:
        """The table and state a fold would leave, with nothing written: the stored
        table when it is current, else it with the store files added since folded in,
        in memory. For readers beside the cycle (status, metrics): one process folds.

        Raises:
            StoreError: a file could not be read.
        """
        state = self.state()
        table = self.table(state)
        files = self._new_files(state)
        if not files:
            return table, state
        table, now, _, _ = self._fold_files(table, state, files)
        return table, now

    def snapshot(
        self,
        options: SnapshotOptions | None = None,
        votes: tuple[pa.Table, VoteState] | None = None,
    ) -> Snapshot:
        """The snapshot of `votes` (a table and state from `folded()`, whole or the part
        that continual.new_votes or votes_since selects), by default of the whole store
        after folding in what is new.

        Raises:
            NothingToSnapshot: no feedback, or no labelled example in it.
            StoreError: a file could not be read or written.
        """
        table, state = votes if votes is not None else self.folded()
        texts = self.texts(self.state(), counted_keys(table))
        return snapshot_from_votes(table, texts, state, options)

    def _new_files(self, state: VoteState) -> list[tuple[str, int, int, int]]:
        """(topic, partition, first, last) of the store files past the state."""
        ranked = []
        for topic, partition in self.store.partitions(FEEDBACK):
            done = state.folded_to(topic, partition)
            live = self.store.live_batch_files(FEEDBACK, topic, partition)
            new = [f for f in live if f.last > done]
            ranked += [(i, (topic, partition, f.first, f.last)) for i, f in enumerate(new)]
        # The partitions' n-th new files together: partitions fill up side by side, so
        # each run of files folds in votes mostly newer than the table's (no re-sort).
        return [f for _, f in sorted(ranked)]

    def _fold_files(
        self, table: pa.Table, state: VoteState, files: list[tuple[str, int, int, int]]
    ) -> tuple[pa.Table, VoteState, list[pa.Table], list[pa.Table]]:
        """The table and state (of the next generation) with `files` folded in, and the
        texts and event ids they added."""
        seen = self._seen(state)
        texts, fresh, now = [], [], state
        # Some files at a time: the first fold of a large store reads all of it.
        for chunk in _chunks(files, state, FOLD_CHUNK_ROWS):
            rows = self.store.read_ranges(_ranges(chunk, state), FOLD_COLUMNS)
            fold = fold_votes(table, seen, rows, chunk, now)
            table, now = fold.table, replace(fold.state, generation=state.generation)
            seen = pa.chunked_array([*seen.chunks, *fold.seen[records.EVENT_ID].chunks])
            texts.append(fold.texts)
            fresh.append(fold.seen)
        return table, replace(now, generation=state.generation + 1), texts, fresh

    # -- files --------------------------------------------------------------------

    def table(self, state: VoteState) -> pa.Table:
        if state.generation == 0:
            return VOTE_TABLE_SCHEMA.empty_table()
        return self._read([self._path("table", state.generation)], VOTE_TABLE_SCHEMA)

    def texts(self, state: VoteState, keys: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The texts of `keys` among those stored up to `state` (with repeats when a
        text was stored twice)."""
        paths = [self._path("texts", n) for n in range(1, state.generation + 1)]
        return self._read(paths, TEXT_SCHEMA, ds.field(records.EXAMPLE_KEY).isin(keys))

    def _seen(self, state: VoteState) -> pa.ChunkedArray:
        paths = [self._path("seen", n) for n in range(1, state.generation + 1)]
        return self._read(paths, SEEN_SCHEMA)[records.EVENT_ID]

    def _read(
        self, paths: Sequence[str], schema: pa.Schema, filter: ds.Expression | None = None
    ) -> pa.Table:
        if not paths:
            return schema.empty_table()
        with _os_errors("read", self.dir):
            if paths[0].endswith(".arrow"):
                return pa.concat_tables([self._read_arrow(p) for p in paths])
            dataset = ds.dataset(list(paths), schema=schema, format="parquet", filesystem=self.fs)
            return dataset.to_table(filter=filter)

    def _read_arrow(self, path: str) -> pa.Table:
        if self.store._local:
            # Mapped, not read: the columns are the file's pages, never copied.
            return pa.ipc.open_file(pa.memory_map(path)).read_all()
        with self.fs.open(path, "rb") as f:
            return pa.ipc.open_file(pa.BufferReader(f.read())).read_all()

    def _write(self, path: str, table: pa.Table) -> None:
        if path.endswith(".arrow"):

            def encode(sink: Any) -> None:
                with pa.ipc.new_file(sink, table.schema) as writer:
                    for batch in _rebatched(table, 1 << 16):
                        writer.write_batch(batch)

        else:

            def encode(sink: Any) -> None:
                pq.write_table(table, sink, compression="zstd")

        if self.store._local:
            # Straight into the temp file: the encoding is never all in memory.
            with _os_errors("write", path):
                write_local_atomic(path, encode)
            return
        sink = pa.BufferOutputStream()
        encode(sink)
        self._put(path, memoryview(sink.getvalue()))

    def _write_state(self, state: VoteState) -> None:
        data = (json.dumps(state.as_dict(), indent=1) + "\n").encode()
        self._put(f"{self.dir}/{STATE_FILE}", data, crash_points="votes.state")

    def _put(self, path: str, data: bytes | memoryview, crash_points: str | None = None) -> None:
        with _os_errors("write", path):
            if self.store._local:
                write_local_atomic(path, data, crash_points=crash_points)
            else:
                self.fs.pipe_file(path, bytes(data))

    def _remove_stale(self, state: VoteState) -> None:
        """Remove the tables of other generations, files of folds that never committed
        and temp files of interrupted writes."""
        try:
            names = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return
        for path in names:
            name = path.rsplit("/", 1)[-1]
            match = _FILE.match(name)
            stale = ".tmp-" in name
            if match:
                kind, generation = match.group(1), int(match.group(2))
                stale = generation > state.generation or (
                    kind == "table" and generation != state.generation
                )
            if stale:
                with _os_errors("remove", path):
                    self.fs.rm(path)


def _chunks(
    files: list[tuple[str, int, int, int]], state: VoteState, rows: int
) -> Iterator[list[tuple[str, int, int, int]]]:
    """The files in runs of about `rows` offsets past the state, in offset order per
    partition (a run may span partitions)."""
    chunk: list[tuple[str, int, int, int]] = []
    size = 0
    for topic, partition, first, last in files:
        chunk.append((topic, partition, first, last))
        size += last - max(first, state.folded_to(topic, partition) + 1) + 1
        if size >= rows:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ranges(
    files: list[tuple[str, int, int, int]], state: VoteState
) -> list[tuple[str, int, int, int]]:
    """One (topic, partition, first, last) range per partition of the files, from the
    first offset past the state."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for topic, partition, first, last in files:
        lo, hi = spans.get((topic, partition), (first, last))
        spans[(topic, partition)] = (min(lo, first), max(hi, last))
    return [
        (topic, partition, max(lo, state.folded_to(topic, partition) + 1), hi)
        for (topic, partition), (lo, hi) in spans.items()
    ]


def _rebatched(table: pa.Table, rows: int) -> Iterator[pa.RecordBatch]:
    """The table in record batches of about `rows`: the slices a night leaves around
    removed rows joined again (a copy of one batch at a time), so that the table does
    not come back in ever more pieces night after night."""
    pending: list[pa.RecordBatch] = []
    size = 0
    for batch in table.to_batches(max_chunksize=rows):
        pending.append(batch)
        size += batch.num_rows
        if size >= rows:
            yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
            pending, size = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
