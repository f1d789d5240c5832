"""The vote table: a snapshot folded night by night from the store files added since
the last one is the snapshot of a full rebuild, through redeliveries, superseding votes,
retractions, ratings and votes without a user, and through a crash at any step."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import random
import zlib
from pathlib import Path

import pytest

from connectors.faults import FAULT_EXIT_CODE, FAULT_POINT_ENV
from connectors.feedback.store import FEEDBACK, FeedbackStore
from connectors.feedback.vote_table import VoteTable
from pipeline.feedback.events import parse_event
from pipeline.feedback.records import FeedbackRows
from pipeline.feedback.sample import sample_events
from pipeline.feedback.snapshot import SNAPSHOT_COLUMNS, NothingToSnapshot, Snapshot, build_snapshot

NOW = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


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
    return build_snapshot(store.read(FEEDBACK, columns=SNAPSHOT_COLUMNS))


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


def test_the_vote_rows_give_the_cycle_the_same_examples_and_new_keys(tmp_path: Path) -> None:
    from pipeline.feedback.continual import new_example_keys, new_votes, votes_since

    store = FeedbackStore(str(tmp_path))
    steps = grown_in_steps(tmp_path, seed=3)
    for events in steps[:2]:
        write_batches(store, events, partitions=2, batch=30)
    read_up_to = {("fb", p): f.last for p in (0, 1) for f in store.batch_files(FEEDBACK, "fb", p)}
    for events in steps[2:]:
        write_batches(store, events, partitions=2, batch=30)
    feedback = store.read(FEEDBACK, columns=SNAPSHOT_COLUMNS)
    rows = VoteTable(store).rows()
    assert new_example_keys(rows, read_up_to) == new_example_keys(feedback, read_up_to)
    assert build_snapshot(new_votes(rows, read_up_to)).id == (
        build_snapshot(new_votes(feedback, read_up_to)).id
    )
    assert build_snapshot(rows).id == full_rebuild(store).id
    now = START + dt.timedelta(seconds=400)
    since = votes_since(feedback, 0.002, now)
    windowed = VoteTable(store).rows(since=since["ts"].min())
    assert build_snapshot(windowed).id == build_snapshot(since).id


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
    state = votes.state()
    if state.generation == 1:
        table = votes.table(state)
        assert table.num_rows and before.stats.rows_read == state.rows_read
    assert_same(votes.snapshot(), full_rebuild(store))
    names = os.listdir(tmp_path / "votes")
    assert not [n for n in names if n.startswith(".")]
    assert [n for n in names if n.startswith("table")] == ["table-00000002.arrow"]


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


def test_state_round_trips() -> None:
    from pipeline.feedback.votes import PartitionFold, VoteState

    state = VoteState(3, (PartitionFold("fb", 0, 9, 0, 9, 10),), 1_767_225_600_000_000, 8)
    assert VoteState.from_dict(json.loads(json.dumps(state.as_dict()))) == state
    assert dataclasses.replace(state, events=9) != state
    assert state.folded_to("fb", 1) == -1 and state.folded_to("fb", 0) == 9


def test_the_cycles_snapshot_task_builds_from_the_vote_table(tmp_path: Path) -> None:
    from connectors.config import load_settings
    from flows.alignment import snapshot_store
    from pipeline.feedback.continual import new_votes

    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\nurl = "{tmp_path / "store"}"\n[snapshot]\nout_dir = "{tmp_path / "snaps"}"\n'
    )
    settings = load_settings(config)
    store = FeedbackStore(str(tmp_path / "store"))
    assert "no feedback" in snapshot_store.fn(settings)
    steps = grown_in_steps(tmp_path, seed=6)
    write_batches(store, steps[0], partitions=2, batch=30)
    read_up_to = {("fb", p): f.last for p in (0, 1) for f in store.batch_files(FEEDBACK, "fb", p)}
    write_batches(store, steps[1], partitions=2, batch=30)
    snap, path, new = snapshot_store.fn(settings, {"run_id": "r1"}, None, read_up_to)
    feedback = store.read(FEEDBACK, columns=SNAPSHOT_COLUMNS)
    assert snap.id == full_rebuild(store).id and path.name == snap.id
    assert snap.window.builds_on == {"run_id": "r1"}
    assert new is not None and new.id == build_snapshot(new_votes(feedback, read_up_to)).id
    # Votes of 2026 are all older than a day: nothing in the window.
    assert "no feedback rows" in snapshot_store.fn(settings, None, 1.0)
