"""The vote table: hand-worked cases of the votes that survive a fold; a snapshot folded
night by night from the store files added since the last one is the snapshot of a fold
of every row at once, through redeliveries, superseding votes, retractions, ratings and
votes without a user, and through a crash at any step; the one order of events where
the two differ; two folds at once (the cycle's and a manual snapshot's, on a local
store and on S3), killed at random steps, counting every vote once; a table of the
earlier layout, folded on; the cycle's snapshot task, which folds once; and `kto-loop
status`, which reads the table without writing it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import random
import zlib
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from connectors.faults import FAULT_EXIT_CODE, FAULT_POINT_ENV
from connectors.feedback.store import FEEDBACK, FeedbackStore
from connectors.feedback.vote_table import LOCK_FILE, VoteTable
from pipeline.feedback import records
from pipeline.feedback.continual import new_votes
from pipeline.feedback.events import parse_event
from pipeline.feedback.records import FeedbackRows
from pipeline.feedback.sample import sample_events
from pipeline.feedback.snapshot import NothingToSnapshot, Snapshot
from pipeline.feedback.votes import FOLD_COLUMNS, fold_rows, is_counted, snapshot_of_rows
from tests.rows import event, stored

NOW = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


# -- which votes survive a fold: hand-worked cases ---------------------------------------


def _on(partition: int, row: dict) -> dict:
    return {**row, records.KAFKA_PARTITION: partition}


# (events, the votes the table keeps in ORDER, those of them that count)
FOLD_CASES = {
    "the latest by ts wins, whatever the row order": (
        [event("e2", feedback="dislike", t=10), event("e1", t=0)],
        ["e2"],
        ["e2"],
    ),
    "at the same ts, the later offset": (
        [event("a", feedback="dislike", offset=5), event("b", offset=7)],
        ["b"],
        ["b"],
    ),
    "at the same ts, a lower partition is earlier, whatever its offset": (
        [_on(1, event("a", offset=0)), _on(0, event("b", feedback="dislike", offset=9))],
        ["a"],
        ["a"],
    ),
    "a retraction as the latest event stays and withdraws the vote": (
        [
            event("e1", user="u1", t=0),
            event("e2", user="u2", feedback="dislike", t=1),
            event("e3", user="u1", feedback="retract", t=2),
        ],
        ["e2", "e3"],
        ["e2"],
    ),
    "a vote after a retraction counts again": (
        [event("e1", t=0), event("e2", feedback="retract", t=1), event("e3", t=2)],
        ["e3"],
        ["e3"],
    ),
    "a neutral rating replaces a vote with none": (
        [event("e1", t=0), event("e2", rating=3, t=1)],
        ["e2"],
        [],
    ),
    "a redelivered event counts once": (
        [event("e1", user=None, offset=1), event("e1", user=None, offset=2)],
        ["e1"],
        ["e1"],
    ),
    "events without a user are each their own voter": (
        [event("e1", user=None, t=0), event("e2", user=None, feedback="dislike", t=1)],
        ["e1", "e2"],
        ["e1", "e2"],
    ),
    "a vote without its texts counts": (
        [event("e1", prompt=None, response=None)],
        ["e1"],
        ["e1"],
    ),
}


@pytest.mark.parametrize(("events", "kept", "counted"), FOLD_CASES.values(), ids=FOLD_CASES)
def test_a_fold_keeps_the_latest_event_per_voter_and_message(
    events: list[dict], kept: list[str], counted: list[str]
) -> None:
    fold = fold_rows(stored(events))
    assert fold.table[records.EVENT_ID].to_pylist() == kept
    assert fold.table.filter(is_counted(fold.table))[records.EVENT_ID].to_pylist() == counted
    assert (fold.state.rows_read, fold.state.events) == (len(events), len({*map(_id, events)}))


def _id(row: dict) -> str:
    return row[records.EVENT_ID]


def test_a_redelivery_keeps_its_first_position_and_a_vote_without_texts_no_example() -> None:
    rows = [
        event("e1", offset=7),
        event("e1", offset=3),
        event("e2", message="m2", t=9, prompt=None),
    ]
    fold = fold_rows(stored(rows))
    assert fold.table[records.KAFKA_OFFSET].to_pylist() == [3, 9]
    assert fold.table[records.EXAMPLE_KEY].is_valid().to_pylist() == [True, False]
    # Only the example with texts is written beside the table, once.
    assert fold.texts[records.RESPONSE].to_pylist() == ["Open Settings, then Security."]
    assert fold_rows(stored([])).table.num_rows == 0


def test_a_redelivery_at_an_earlier_position_wins_only_when_folded_at_once(
    tmp_path: Path,
) -> None:
    """The order of events pipeline/feedback/votes.py names. One voter on one message,
    every event at the same ts:

        night 1, partition 1:  offset 0  "old" like;  offset 1  "new" dislike
        night 2, partition 0:  offset 0  "new" again (redelivered on another partition)

    Folded night by night, night 1 keeps "new" (the later offset) and drops "old";
    night 2's redelivery is "new" again, kept at its earlier position: disliked.
    Folded at once, "new" is first seen at partition 0 (before all of partition 1), so
    "old" at partition 1 offset 0 comes after it and is the latest: liked."""
    old = _on(1, event("old", offset=0))
    new = _on(1, event("new", feedback="dislike", offset=1))
    store = FeedbackStore(str(tmp_path))
    store.write_batch(FEEDBACK, "fb", 1, 0, 1, stored([old, new]))
    votes = VoteTable(store)
    votes.fold()
    store.write_batch(FEEDBACK, "fb", 0, 0, 0, stored([_on(0, {**new, records.KAFKA_OFFSET: 0})]))
    table, _ = votes.folded()
    assert table[records.EVENT_ID].to_pylist() == ["new"]
    assert table[records.KAFKA_PARTITION].to_pylist() == [0]
    assert votes.snapshot().table[records.DESIRABLE].tolist() == [False]
    at_once = fold_rows(store.read_arrow(FEEDBACK, columns=FOLD_COLUMNS))
    assert at_once.table[records.EVENT_ID].to_pylist() == ["old"]
    assert full_rebuild(store).table[records.DESIRABLE].tolist() == [True]


# -- a store grown night by night ------------------------------------------------------


def messy_events(n: int, seed: int) -> list[dict]:
    """Sample events (likes, dislikes, ratings, retractions), then: votes without a
    user, a user changing their vote on a message, redeliveries of earlier events
    (also of superseded ones, and at the same ts as the vote superseding them)."""
    rng = random.Random(seed)
    events = list(sample_events(n, seed=seed, start=START))
    for e in events[::7]:
        e.pop("user_id", None)
    out: list[dict] = []
    for i, e in enumerate(events):
        out.append(e)
        if i % 5 == 0 and "user_id" in e:
            # The same user on the same message, later (or at the very same ts).
            later = dict(e, event_id=e["event_id"] + "-again")
            later.pop("rating", None)
            later["feedback"] = rng.choice(["like", "dislike", "retract"])
            if i % 10 == 0:
                later["ts"] = e["ts"]
            out.append(later)
        if i % 3 == 0 and out:
            out.append(dict(rng.choice(out)))  # a redelivery: same event, later offset
    return out


def write_batches(store: FeedbackStore, events: list[dict], partitions: int, batch: int) -> None:
    """Store the events as ingest would, partitioned by conversation, `batch` a file."""
    by_partition: dict[int, list[dict]] = {}
    for e in events:
        by_partition.setdefault(zlib.crc32(e["conversation_id"].encode()) % partitions, []).append(
            e
        )
    for partition, evs in by_partition.items():
        done = sum(f.last - f.first + 1 for f in store.batch_files(FEEDBACK, "fb", partition))
        for start in range(0, len(evs), batch):
            rows = FeedbackRows("fb", partition)
            chunk = evs[start : start + batch]
            for k, e in enumerate(chunk):
                parsed = parse_event(json.dumps(e).encode(), user_hash_key=b"k")
                rows.append(parsed, done + start + k, None)
            table = rows.to_table(NOW + dt.timedelta(seconds=done + start), "test")
            first = done + start
            store.write_batch(FEEDBACK, "fb", partition, first, first + len(chunk) - 1, table)


def full_rebuild(store: FeedbackStore) -> Snapshot:
    """Every stored row folded at once into an empty vote table."""
    return snapshot_of_rows(store.read_arrow(FEEDBACK, columns=FOLD_COLUMNS))


def assert_same(folded: Snapshot, full: Snapshot) -> None:
    assert folded.id == full.id
    assert folded == full  # counts, stats and options too
    assert folded.window == full.window
    assert folded.table.equals(full.table)


def grown_in_steps(root: Path, steps: int = 4, seed: int = 1) -> list[list[dict]]:
    events = messy_events(600, seed)
    # Later steps also redeliver events of earlier ones.
    chunks = [events[i::steps] for i in range(steps)]
    return [c + events[: 5 * k : 3] for k, c in enumerate(chunks)]


def test_a_snapshot_folded_step_by_step_is_the_full_rebuilds(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    votes = VoteTable(store)
    for step, events in enumerate(grown_in_steps(tmp_path)):
        write_batches(store, events, partitions=3, batch=25)
        assert_same(votes.snapshot(), full_rebuild(store))
        assert votes.state().generation == step + 1
    assert votes.fold() == votes.state()  # nothing new: nothing written
    full = full_rebuild(store)
    assert full.stats.duplicates and full.stats.superseded and full.stats.retracted
    assert full.stats.unlabelled


def test_a_table_folded_once_equals_one_folded_in_many_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import connectors.feedback.vote_table

    # A fold of many files reads them a few at a time.
    monkeypatch.setattr(connectors.feedback.vote_table, "FOLD_CHUNK_ROWS", 70)
    steps = grown_in_steps(tmp_path, seed=2)
    once, often = FeedbackStore(str(tmp_path / "once")), FeedbackStore(str(tmp_path / "often"))
    for events in steps:
        write_batches(once, events, partitions=2, batch=40)
        write_batches(often, events, partitions=2, batch=40)
        VoteTable(often).fold()
    assert_same(VoteTable(once).snapshot(), VoteTable(often).snapshot())


def test_an_empty_store_has_nothing_to_snapshot(tmp_path: Path) -> None:
    with pytest.raises(NothingToSnapshot, match="no feedback rows"):
        VoteTable(FeedbackStore(str(tmp_path))).snapshot()


# -- crashes -------------------------------------------------------------------------


def _fold_killed(root: str, fault: str) -> None:
    os.environ[FAULT_POINT_ENV] = fault
    VoteTable(FeedbackStore(root)).fold()


def run_killed_at(root: Path, fault: str) -> bool:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pytest", "connectors.feedback.vote_table"])
    child = ctx.Process(target=_fold_killed, args=(str(root), fault))
    child.start()
    child.join(60)
    assert child.exitcode in (0, FAULT_EXIT_CODE), f"{fault}: exit code {child.exitcode}"
    return child.exitcode == FAULT_EXIT_CODE


FAULTS = [*(f"votes.fold.{n}" for n in (1, 2, 3, 4)), "votes.state.1", "votes.state.2"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fold_killed_at_any_step_leaves_a_table_the_next_fold_completes(
    tmp_path: Path, fault: str
) -> None:
    steps = grown_in_steps(tmp_path, seed=4)
    store = FeedbackStore(str(tmp_path))
    write_batches(store, steps[0], partitions=2, batch=30)
    votes = VoteTable(store)
    before = votes.snapshot()
    write_batches(store, steps[1], partitions=2, batch=30)
    assert run_killed_at(tmp_path, fault)
    # Killed before the commit, the old table is whole and still gives its snapshot.
    current = votes.current()
    if current.state.generation == 1:
        table = votes.table(current)
        assert table.num_rows and before.stats.rows_read == current.state.rows_read
    assert_same(votes.snapshot(), full_rebuild(store))
    names = os.listdir(tmp_path / "votes")
    assert not [n for n in names if n.startswith(".")]
    current = votes.current()
    assert [n for n in names if n.startswith("table")] == [current.table]
    assert current.table.startswith("table-00000002-")
    assert [n for n in names if n.startswith("state")] == ["state-00000002.json"]


def test_a_fold_killed_twice_in_a_row_still_completes(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    steps = grown_in_steps(tmp_path, seed=5)
    write_batches(store, steps[0], partitions=1, batch=50)
    for fault in ("votes.fold.2", "votes.fold.1", "votes.state.1"):
        assert run_killed_at(tmp_path, fault)
    write_batches(store, steps[1], partitions=1, batch=50)
    assert run_killed_at(tmp_path, "votes.fold.4")
    write_batches(store, steps[2], partitions=1, batch=50)
    assert_same(VoteTable(store).snapshot(), full_rebuild(store))


# -- two folds at once ---------------------------------------------------------------


def _fold_beside(
    root: str, storage: dict | None, fault: str | None, go: Any, as_cycle: bool
) -> None:
    """Once `go` is set, fold as the cycle does (the snapshot and the new votes from one
    fold) or as `kto-loop snapshot` does, killed at crash point `fault` if given."""
    if fault:
        os.environ[FAULT_POINT_ENV] = fault
    go.wait(60)
    votes = VoteTable(FeedbackStore(root, storage))
    if not as_cycle:
        votes.snapshot()
        return
    table, state = votes.folded()
    votes.snapshot(None, (table, state))
    with suppress(NothingToSnapshot):
        votes.snapshot(None, new_votes(table, {("fb", 0): state.folded_to("fb", 0) // 2}))


def fold_together(root: str, storage: dict | None, rounds: int, seed: int) -> int:
    """`rounds` times: store some events, start a cycle's fold and a manual snapshot's
    together, each killed at a random crash point or not, while more events are stored
    beside them; then check that the next fold counts every stored vote once, as a
    rebuild does. Returns how many folds were killed."""
    rng = random.Random(seed)
    store = FeedbackStore(root, storage)
    events = messy_events(30 * rounds, seed)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pytest", "connectors.feedback.vote_table"])
    killed = 0
    for n in range(rounds):
        batch = events[n::rounds]
        write_batches(store, batch[: len(batch) // 2], partitions=2, batch=5)
        go = ctx.Event()
        faults = [rng.choice([None, None, *FAULTS]) for _ in range(2)]
        children = [
            ctx.Process(target=_fold_beside, args=(root, storage, fault, go, as_cycle))
            for fault, as_cycle in zip(faults, (True, False), strict=True)
        ]
        try:
            for child in children:
                child.start()
            go.set()
            # Ingest goes on meanwhile: the two folds may find different store files.
            write_batches(store, batch[len(batch) // 2 :], partitions=2, batch=5)
            for child in children:
                child.join(120)
        finally:
            for child in children:
                if child.is_alive():
                    child.kill()
                    child.join()
        codes = [child.exitcode for child in children]
        said = f"round {n}: crash points {faults}, exit codes {codes}"
        assert all(code in (0, FAULT_EXIT_CODE) for code in codes), said
        assert_same(VoteTable(store).snapshot(), full_rebuild(store)), said
        killed += codes.count(FAULT_EXIT_CODE)
    return killed


def test_two_folds_at_once_killed_at_random_steps_count_every_vote_once(
    tmp_path: Path,
) -> None:
    """The cycle and `kto-loop snapshot` on one local store, 20 times: the second waits
    for the first's lock, and whichever dies, the next fold completes the table."""
    assert fold_together(str(tmp_path), None, rounds=20, seed=7) >= 5
    names = os.listdir(tmp_path / "votes")
    assert not [n for n in names if n.startswith(".")], names
    assert len([n for n in names if n.startswith("state-")]) == 1, names


def test_two_folds_at_once_on_object_storage_commit_one_generation_each(
    s3_bucket: tuple[str, dict],
) -> None:
    """The same on S3 (10 times: each call is an HTTP request), where no lock holds them
    apart: of two folds of one generation, the commit (a PUT with If-None-Match) takes
    one; the other folds again from it."""
    url, options = s3_bucket
    assert fold_together(f"{url}/store", options, rounds=10, seed=8) >= 3


def test_a_table_from_before_numbered_states_is_read_and_folded_on(tmp_path: Path) -> None:
    """The earlier layout: state.json, and table-, texts- and seen- files named for
    their generation alone. It is read as it is; the next fold commits state-2 naming
    the old texts and ids beside its own, and removes the old table and state.json."""
    store = FeedbackStore(str(tmp_path))
    steps = grown_in_steps(tmp_path, seed=6)
    write_batches(store, steps[0], partitions=2, batch=40)
    votes = VoteTable(store)
    votes.fold()
    folder = tmp_path / "votes"
    one = votes.current()
    for name in (one.table, *one.texts, *one.seen):
        kind, _, _ = name.split("-")
        (folder / name).rename(folder / f"{kind}-00000001.{name.rsplit('.', 1)[1]}")
    state = json.loads((folder / "state-00000001.json").read_text())
    (folder / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "files"}))
    (folder / "state-00000001.json").unlink()
    assert votes.current().table == "table-00000001.arrow"
    assert_same(votes.snapshot(), full_rebuild(store))  # nothing new: read as it is
    write_batches(store, steps[1], partitions=2, batch=40)
    assert_same(votes.snapshot(), full_rebuild(store))
    two = votes.current()
    assert two.texts[0] == "texts-00000001.parquet" and two.seen[0] == "seen-00000001.arrow"
    assert sorted(os.listdir(folder)) == sorted(
        [LOCK_FILE, "state-00000002.json", two.table, *two.texts, *two.seen]
    )


def test_state_round_trips() -> None:
    from pipeline.feedback.votes import PartitionFold, VoteState

    state = VoteState(3, (PartitionFold("fb", 0, 9, 0, 9, 10),), 1_767_225_600_000_000, 8)
    assert VoteState.from_dict(json.loads(json.dumps(state.as_dict()))) == state
    assert dataclasses.replace(state, events=9) != state
    assert state.folded_to("fb", 1) == -1 and state.folded_to("fb", 0) == 9


# -- the cycle's snapshot task ---------------------------------------------------------


def _night(store: FeedbackStore, first: int, rows: list[dict]) -> None:
    at = [{**r, records.KAFKA_OFFSET: first + i} for i, r in enumerate(rows)]
    store.write_batch(FEEDBACK, "fb", 0, first, first + len(rows) - 1, stored(at))


def _labels(snap: Snapshot) -> dict[str, bool]:
    table = snap.table
    return dict(zip(table[records.COMPLETION], table[records.DESIRABLE], strict=True))


def _vote(
    event_id: str, user: str, message: str, answer: str, feedback: str, ago: dt.timedelta
) -> dict:
    row = event(event_id, user=user, message=message, response=answer, feedback=feedback)
    return {**row, records.TS: dt.datetime.now(dt.UTC) - ago}


def test_the_cycles_snapshot_task_builds_the_store_the_window_and_the_new_votes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Night 1 (offsets 0-1, three days ago): u1 likes answer A, u2 dislikes B; the last
    judged run read up to offset 1. Night 2 (offsets 2-4, an hour ago): u3 dislikes A,
    u1 retracts their like of A, u4 likes C.

    The store: A disliked 0-1 (u1's like withdrawn), B disliked, C liked. The votes
    since the run, and the last two days' votes: u3's dislike of A and u4's like of C
    (u1's retraction counts nothing): A undesirable, C desirable. One fold serves all
    three: the vote table and the new store files are each read once."""
    from connectors.config import load_settings
    from flows.alignment import snapshot_store

    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\nurl = "{tmp_path / "store"}"\n[snapshot]\nout_dir = "{tmp_path / "snaps"}"\n'
        "heldout_fraction = 0.0\n"
    )
    settings = load_settings(config)
    store = FeedbackStore(str(tmp_path / "store"))
    assert "no feedback" in snapshot_store.fn(settings)
    days, hour = dt.timedelta(days=3), dt.timedelta(hours=1)
    _night(
        store,
        0,
        [_vote("a1", "u1", "m1", "A", "like", days), _vote("b", "u2", "m2", "B", "dislike", days)],
    )
    read_up_to = {("fb", 0): 1}
    night_2 = [
        _vote("a2", "u3", "m3", "A", "dislike", hour),
        _vote("a3", "u1", "m1", "A", "retract", hour),
        _vote("c", "u4", "m4", "C", "like", hour),
    ]
    _night(store, 2, night_2)
    reads: list[str] = []
    for cls, name in ((VoteTable, "table"), (FeedbackStore, "read_ranges")):
        original = getattr(cls, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
    snap, path, new = snapshot_store.fn(settings, {"run_id": "r1"}, None, read_up_to)
    assert sorted(reads) == ["read_ranges", "table"]
    assert _labels(snap) == {"A": False, "B": False, "C": True}
    assert (snap.stats.votes, snap.stats.retracted, snap.stats.superseded) == (3, 1, 1)
    assert path.name == snap.id and snap.window.builds_on == {"run_id": "r1"}
    assert new is not None and _labels(new) == {"A": False, "C": True}
    assert new.stats.rows_read == 3 and new.window.partitions[0].first_read == 2

    windowed, _, none_new = snapshot_store.fn(settings, None, 2.0, {("fb", 0): 4})
    assert _labels(windowed) == {"A": False, "C": True} and none_new is None
    assert "no feedback rows" in snapshot_store.fn(settings, None, 0.01)


def test_status_reads_the_liked_share_from_the_vote_table_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """Folded: u1 likes A on v1 (offset 0), u2 dislikes A on v1 (1). Stored since, not
    folded: u1 changes to a dislike (2), u3 likes B on v2 (3). v1: 2 votes, 0 liked;
    v2: 1 vote, liked. The table on disk stays as the last fold left it."""
    from connectors.config import load_settings
    from connectors.serving.adapter_registry import AdapterRegistry
    from flows.cycle_cli import _liked_share

    config = tmp_path / "c.toml"
    config.write_text(f'[store]\nurl = "{tmp_path / "store"}"\n')
    store = FeedbackStore(str(tmp_path / "store"))
    _night(store, 0, [event("a", user="u1", t=0), event("b", user="u2", feedback="dislike", t=1)])
    VoteTable(store).fold()
    on_disk = sorted(os.listdir(tmp_path / "store" / "votes"))
    _night(
        store,
        2,
        [
            event("c", user="u1", feedback="dislike", t=2),
            event("d", user="u3", message="m2", t=3, adapter="chat@v2"),
        ],
    )
    rows = _liked_share(load_settings(config), AdapterRegistry(str(tmp_path / "reg")), [])
    assert [(r["adapter"], r["votes"], r["liked"]) for r in rows] == [
        ("chat@v1", 2, 0),
        ("chat@v2", 1, 1),
    ]
    assert sorted(os.listdir(tmp_path / "store" / "votes")) == on_disk
    assert VoteTable(store).state().generation == 1
