"""The store's vote table on disk: the votes that count, folded in night by night
(pipeline/feedback/votes.py), so that a snapshot reads the store files added since the last one
and not the whole history.

Layout, beside the store's tables:

    <root>/votes/state-<g:08d>.json              generation g: its VoteState and its files
    <root>/votes/table-<g:08d>-<fold>.arrow      the vote table of generation g
    <root>/votes/texts-<n:08d>-<fold>.parquet    the texts of examples first seen by fold n
    <root>/votes/seen-<n:08d>-<fold>.arrow       the event ids first seen by fold n
    <root>/votes/fold.lock                       held by the fold on a local store

<fold> is a random id of the fold that wrote the file. The current generation is the
highest state file, and it names its files (the table, and every texts and seen file up
to it): a file no state names is never read. A table from before numbered states has a
state.json and files without a fold id; it is read as it is and folded on.

The table and the ids are Arrow IPC files, uncompressed: read back by mapping them
into memory, without decoding (a night reads them whole); the texts are Parquet.

A fold reads generation g, writes its files (each atomically, like the store's
batches), then commits g+1 by creating state-<g+1>.json, which must not exist yet:
locally a temp file hard-linked to that name, on object storage one PUT with
If-None-Match: * (s3fs `mode="create"`). Then it removes what no state names any more:
older tables and state files, and files of folds that never committed, of generations
up to its own (a later one may be a fold still running).

Two folds at once (the cycle and `kto-loop snapshot`, or two aliases' cycles on one
store): of two folds on generation g, one commits g+1 and the other's commit is
refused (GenerationMoved, as is a read of files the winner removed meanwhile); the
loser folds again from g+1, at most FOLD_ATTEMPTS times, with a warning in the log.
Its files are never mixed into the winner's generation: they carry its own fold id.
On a local store a fold also holds fold.lock (a FileLock; the kernel frees it when its
process dies) from reading the state to removing what is stale, so the second fold
waits for the first and folds only what came since: the refusal is for object
storage, where a lock would outlive a killed holder. A crash before the commit leaves
generation g whole and valid; one after it leaves only stale files, which the next fold
removes. The crash points are "votes.fold.N" (N = 1..3 after each file, 4 after the
commit) and "votes.state.1/2" inside the commit of a local store. Readers (`kto-loop
status`, the metrics collector) take `read()`: the stored table, with what the store
gained since folded in memory, nothing written, and no lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from connectors.faults import crash_point
from connectors.feedback.store import FEEDBACK, FeedbackStore, StoreError, write_local_atomic
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
LOCK_FILE = "fold.lock"
# How long a fold of a local store waits for another one to finish.
LOCK_WAIT_S = 3600.0
# Folds in a row that another fold may overtake before this one gives up.
FOLD_ATTEMPTS = 5
# Store rows a fold reads at a time (its memory grows with them, and their texts).
FOLD_CHUNK_ROWS = 100_000
_LEGACY_STATE = "state.json"
_STATE = re.compile(r"^state-(\d{8})\.json$")
_FILE = re.compile(r"^(table|texts|seen)-(\d{8})(-[0-9a-f]+)?\.(arrow|parquet)$")
_SUFFIX = {"table": "arrow", "seen": "arrow", "texts": "parquet"}
T = TypeVar("T")


class GenerationMoved(StoreError):
    """Another fold committed while this one worked from an older generation: what it
    built is not committed; fold again from the current generation."""


class VoteTableBusy(StoreError):
    """Another fold held the lock of a local vote table past the wait."""


@dataclass(frozen=True)
class Generation:
    """A committed generation of the vote table: its state and the names of its files
    in the votes directory (no table at generation 0)."""

    state: VoteState = field(default_factory=VoteState)
    table: str | None = None
    texts: tuple[str, ...] = ()
    seen: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        files = {"table": self.table, "texts": list(self.texts), "seen": list(self.seen)}
        return {**self.state.as_dict(), "files": files}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Generation:
        state = VoteState.from_dict(data)
        files = data.get("files")
        if files is None:  # a state.json, written before the files had fold ids
            g = state.generation
            return cls(
                state,
                f"table-{g:08d}.arrow" if g else None,
                tuple(f"texts-{n:08d}.parquet" for n in range(1, g + 1)),
                tuple(f"seen-{n:08d}.arrow" for n in range(1, g + 1)),
            )
        return cls(state, files["table"], tuple(files["texts"]), tuple(files["seen"]))


class VoteTable:
    """The vote table of a feedback store."""

    def __init__(self, store: FeedbackStore, lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.store = store
        self.fs = store.fs
        self.dir = f"{store.root}/{VOTES}"
        self.lock_wait_s = lock_wait_s

    def current(self) -> Generation:
        """The current generation: the highest state file's (generation 0, empty,
        before any fold).

        Raises:
            StoreError: the directory or the state could not be read.
        """
        for _ in range(FOLD_ATTEMPTS):
            names = self._names()
            numbers = [int(m.group(1)) for m in map(_STATE.match, names) if m]
            if numbers:
                name = f"state-{max(numbers):08d}.json"
            elif _LEGACY_STATE in names:
                name = _LEGACY_STATE
            else:
                return Generation()
            path = f"{self.dir}/{name}"
            try:
                with self.fs.open(path, "rb") as f:
                    return Generation.from_dict(json.loads(f.read()))
            except FileNotFoundError:
                continue  # removed by a fold that committed after the listing
            except OSError as exc:
                raise StoreError.from_os_error("read", path, exc) from exc
        raise GenerationMoved(
            f"the state of the vote table in {self.dir} changed {FOLD_ATTEMPTS} times while "
            "it was read; read it again"
        )

    def state(self) -> VoteState:
        """The state of the current vote table (generation 0, empty, before any fold)."""
        return self.current().state

    def fold(self) -> VoteState:
        """Fold the store files past the state into the table; return the new state
        (the old one when nothing was added).

        Raises:
            StoreError: a file could not be read or written.
            GenerationMoved: other folds committed first FOLD_ATTEMPTS times in a row.
            VoteTableBusy: another fold held a local table's lock past the wait.
        """
        return self.folded()[1]

    def folded(self) -> tuple[pa.Table, VoteState]:
        """fold(), and the table of the state it returns: what `snapshot` and the
        selections of pipeline/feedback/continual.py take."""
        with self._lock():
            return self._at_current(self._fold_onto)

    def read(self) -> tuple[pa.Table, VoteState]:
        """The table and state a fold would leave, with nothing written: the stored
        table when it is current, else it with the store files added since folded in,
        in memory. For readers beside the folds (status, metrics): no lock.

        Raises:
            StoreError: a file could not be read.
        """

        def read(base: Generation) -> tuple[pa.Table, VoteState]:
            table = self.table(base)
            files = self._new_files(base.state)
            if not files:
                return table, base.state
            table, now, _, _ = self._fold_files(table, base, files)
            return table, now

        return self._at_current(read)

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
        # The current generation names every texts file of the one folded, and more
        # when another fold committed since: texts files are never removed.
        texts = self.texts(self.current(), counted_keys(table))
        return snapshot_from_votes(table, texts, state, options)

    # -- one fold -------------------------------------------------------------------

    def _fold_onto(self, base: Generation) -> tuple[pa.Table, VoteState]:
        """Fold the store files past `base` into its table and commit the next
        generation (nothing when no file is new)."""
        table = self.table(base)
        files = self._new_files(base.state)
        if not files:
            self._remove_stale(base)  # what a fold killed after its commit left
            return table, base.state
        table, now, texts, fresh = self._fold_files(table, base, files)
        fold_id = uuid.uuid4().hex[:12]
        new = Generation(
            now,
            self._name("table", now.generation, fold_id),
            (*base.texts, self._name("texts", now.generation, fold_id)),
            (*base.seen, self._name("seen", now.generation, fold_id)),
        )
        self._write(new.table, table)
        crash_point("votes.fold.1")
        self._write(new.texts[-1], pa.concat_tables(texts))
        crash_point("votes.fold.2")
        self._write(new.seen[-1], pa.concat_tables(fresh))
        crash_point("votes.fold.3")
        self._commit(new)
        crash_point("votes.fold.4")
        self._remove_stale(new)
        log.info(
            "folded %d store files into the vote table (generation %d, %d votes)",
            len(files),
            now.generation,
            table.num_rows,
        )
        return table, now

    def _at_current(self, work: Callable[[Generation], T]) -> T:
        """work(the current generation); again from the new one when another fold
        committed meanwhile, at most FOLD_ATTEMPTS times in all."""
        for attempt in range(1, FOLD_ATTEMPTS + 1):
            base = self.current()
            try:
                try:
                    return work(base)
                except GenerationMoved:
                    raise
                except StoreError as exc:
                    # A fold that committed meanwhile removed a file this one read.
                    moved = self.current().state.generation
                    if moved == base.state.generation:
                        raise
                    raise GenerationMoved(
                        f"the vote table moved to generation {moved} while this fold read "
                        f"generation {base.state.generation} ({exc})"
                    ) from exc
            except GenerationMoved as exc:
                if attempt == FOLD_ATTEMPTS:
                    raise
                log.warning(
                    "%s; again from the current generation (attempt %d of %d)",
                    exc,
                    attempt + 1,
                    FOLD_ATTEMPTS,
                )
        raise AssertionError("unreachable")

    def _commit(self, new: Generation) -> None:
        """Create the state file of `new`, refused (GenerationMoved) when another fold
        created it first."""
        path = f"{self.dir}/state-{new.state.generation:08d}.json"
        data = (json.dumps(new.as_dict(), indent=1) + "\n").encode()
        try:
            if self.store._local:
                write_local_atomic(path, data, crash_points="votes.state", exclusive=True)
            else:
                # One PUT with If-None-Match: *: the store creates the object once.
                self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise GenerationMoved(
                f"another fold (a cycle, or `kto-loop snapshot`) committed generation "
                f"{new.state.generation} of {self.dir} while this one folded onto "
                f"generation {new.state.generation - 1}; nothing of this fold is committed"
            ) from None
        except OSError as exc:
            raise StoreError.from_os_error("write", path, exc) from exc

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold a local table's fold lock; on object storage the commit's condition
        alone keeps folds apart."""
        if not self.store._local:
            yield
            return
        with _os_errors("create", self.dir):
            os.makedirs(self.dir, exist_ok=True)
        lock = FileLock(f"{self.dir}/{LOCK_FILE}", timeout=self.lock_wait_s, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise VoteTableBusy(
                f"another fold (a cycle, or `kto-loop snapshot`) has held {lock.lock_file} "
                f"for over {self.lock_wait_s:g} s; run this again when it has finished",
                path=lock.lock_file,
            ) from None
        try:
            yield
        finally:
            lock.release()

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
        self, table: pa.Table, base: Generation, files: list[tuple[str, int, int, int]]
    ) -> tuple[pa.Table, VoteState, list[pa.Table], list[pa.Table]]:
        """The table and state (of the next generation) with `files` folded in, and the
        texts and event ids they added."""
        state = base.state
        seen = self._seen(base)
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

    def _name(self, kind: str, generation: int, fold_id: str) -> str:
        return f"{kind}-{generation:08d}-{fold_id}.{_SUFFIX[kind]}"

    def table(self, generation: Generation) -> pa.Table:
        """The vote table of a generation."""
        if generation.table is None:
            return VOTE_TABLE_SCHEMA.empty_table()
        return self._read([generation.table], VOTE_TABLE_SCHEMA)

    def texts(self, generation: Generation, keys: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The texts of `keys` among those stored up to `generation` (with repeats when
        a text was stored twice)."""
        return self._read(generation.texts, TEXT_SCHEMA, ds.field(records.EXAMPLE_KEY).isin(keys))

    def _seen(self, generation: Generation) -> pa.ChunkedArray:
        return self._read(generation.seen, SEEN_SCHEMA)[records.EVENT_ID]

    def _read(
        self, names: Sequence[str], schema: pa.Schema, filter: ds.Expression | None = None
    ) -> pa.Table:
        if not names:
            return schema.empty_table()
        paths = [f"{self.dir}/{name}" for name in names]
        with _os_errors("read", self.dir):
            if paths[0].endswith(".arrow"):
                return pa.concat_tables([self._read_arrow(p) for p in paths])
            dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=self.fs)
            return dataset.to_table(filter=filter)

    def _read_arrow(self, path: str) -> pa.Table:
        if self.store._local:
            # Mapped, not read: the columns are the file's pages, never copied.
            return pa.ipc.open_file(pa.memory_map(path)).read_all()
        with self.fs.open(path, "rb") as f:
            return pa.ipc.open_file(pa.BufferReader(f.read())).read_all()

    def _write(self, name: str, table: pa.Table) -> None:
        path = f"{self.dir}/{name}"
        if path.endswith(".arrow"):

            def encode(sink: Any) -> None:
                with pa.ipc.new_file(sink, table.schema) as writer:
                    for batch in _rebatched(table, 1 << 16):
                        writer.write_batch(batch)

        else:

            def encode(sink: Any) -> None:
                pq.write_table(table, sink, compression="zstd")

        with _os_errors("write", path):
            if self.store._local:
                # Straight into the temp file: the encoding is never all in memory.
                write_local_atomic(path, encode)
                return
            sink = pa.BufferOutputStream()
            encode(sink)
            self.fs.pipe_file(path, sink.getvalue().to_pybytes())

    def _names(self) -> list[str]:
        """The names in the votes directory, listed afresh (not from fsspec's cache:
        another process may have committed since)."""
        self.fs.invalidate_cache(self.dir)
        try:
            paths = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError.from_os_error("list", self.dir, exc) from exc
        return [path.rsplit("/", 1)[-1] for path in paths]

    def _remove_stale(self, current: Generation) -> None:
        """Remove what no state names any more: tables and state files of older
        generations, files of folds that never committed (or lost the commit) up to
        `current`'s generation, temp files of interrupted writes. Later generations'
        files are left alone: a fold may be writing them."""
        named = {current.table, *current.texts, *current.seen}
        g = current.state.generation
        names = self._names()
        numbered = any(map(_STATE.match, names))
        for name in names:
            state, data = _STATE.match(name), _FILE.match(name)
            if name in named:
                stale = False
            elif state:
                stale = int(state.group(1)) < g
            elif data:
                stale = int(data.group(2)) <= g
            else:
                stale = ".tmp-" in name or (name == _LEGACY_STATE and numbered)
            if stale:
                path = f"{self.dir}/{name}"
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
