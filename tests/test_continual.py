"""What a night trains on: the new votes since the last judged run and the last days'
votes, picked from the vote table, a seeded replay sample of older ones, and the
on-policy count (pipeline/feedback/continual.py)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from pipeline.feedback.continual import (
    class_counts,
    continual_set,
    key_of,
    new_votes,
    retrain_set,
    votes_since,
)
from pipeline.feedback.examples import Example
from pipeline.feedback.snapshot import NothingToSnapshot, Snapshot
from pipeline.feedback.votes import Fold, VoteState, example_key, fold_rows, snapshot_from_votes
from tests.rows import T0, event, stored


def folded(rows: list[dict]) -> Fold:
    return fold_rows(stored(rows))


def snapshot(fold: Fold, part: tuple[pa.Table, VoteState] | None = None) -> Snapshot:
    """The snapshot of the fold's votes, or of the part of them selected."""
    table, state = part or (fold.table, fold.state)
    return snapshot_from_votes(table, fold.texts, state)


def ids(part: tuple[pa.Table, VoteState]) -> list[str]:
    return part[0]["event_id"].to_pylist()


def test_votes_stored_past_the_last_run_window_are_new() -> None:
    """Offsets 1-5 of partition 0; the last run read up to offset 2. u1's like (1) is
    superseded by their retraction (5); c (3) and d (4) are new votes, b (2) is not.
    The new votes' snapshot: the new answer and the kept answer, liked by c and d."""
    fold = folded(
        [
            event("a", user="u1", message="m1", t=1, response="old answer"),
            event("b", user="u2", message="m2", t=2, response="kept answer"),
            event("c", user="u3", message="m3", t=3, response="new answer"),
            event("d", user="u4", message="m4", t=4, response="kept answer"),
            event("e", user="u1", message="m1", t=5, feedback="retract"),
        ]
    )
    new = new_votes(fold.table, {("fb", 0): 2})
    assert ids(new) == ["c", "d", "e"]
    (partition,) = new[1].partitions
    assert (partition.first_read, partition.last_read, partition.rows_read) == (3, 5, 3)
    table = snapshot(fold, new).table
    assert sorted(table["completion"]) == ["kept answer", "new answer"]
    assert table["votes_desirable"].tolist() == [1, 1]  # b's like of the kept answer is old
    # A partition the last run never read is new throughout; nothing read: all new.
    assert ids(new_votes(fold.table, {("fb", 1): 10})) == ["b", "c", "d", "e"]
    assert ids(new_votes(fold.table, {})) == ["b", "c", "d", "e"]
    nothing = new_votes(fold.table, {("fb", 0): 5})
    assert ids(nothing) == [] and nothing[1].rows_read == 0
    with pytest.raises(NothingToSnapshot, match="no feedback rows"):
        snapshot(fold, nothing)


def test_history_prompts_key_by_their_messages() -> None:
    fold = folded([event("a", messages=[{"role": "user", "content": "hi"}], t=1)])
    new = snapshot(fold, new_votes(fold.table, {}))
    (example,) = new.records("train") + new.records("heldout")
    assert example.prompt is None
    assert key_of(example) == example_key(
        None, '[{"role": "user", "content": "hi"}]', "Open Settings, then Security."
    )
    assert key_of(example) != example_key(
        None, '[{"role": "user", "content": "hello"}]', "Open Settings, then Security."
    )


def examples(n: int, tag: str, adapter: str | None = None) -> list[Example]:
    return [
        Example(f"{tag} {i}?", None, f"answer {i}", i % 2 == 0, adapter=adapter) for i in range(n)
    ]


def test_continual_takes_every_new_example_and_replays_a_seeded_share_of_old_ones() -> None:
    new, old = examples(10, "new", "chat@v2"), examples(40, "old", "chat@v1")
    # `everything` holds the new examples too (the whole snapshot), maybe otherwise labelled.
    everything = old + [Example(e.prompt, None, e.completion, not e.desirable) for e in new]
    chosen = continual_set(new, everything, 0.5, seed="snap-1", served="chat@v2")
    assert (chosen.new, chosen.replay, len(chosen.examples)) == (10, 10, 20)
    assert all(e in chosen.examples for e in new)
    assert chosen.on_policy == 10 and chosen.on_policy_share == 0.5
    assert chosen.by_adapter == {"chat@v2": 10, "chat@v1": 10}
    assert all(key_of(e) not in {key_of(n) for n in new} for e in chosen.examples[10:])
    again = continual_set(new, everything, 0.5, seed="snap-1", served="chat@v2")
    assert again.examples == chosen.examples
    other = continual_set(new, everything, 0.5, seed="snap-2", served="chat@v2")
    assert other.examples[10:] != chosen.examples[10:]
    # 80% replay wants 40 old examples for 10 new: all 40 there are.
    assert continual_set(new, everything, 0.8, "s", "chat@v2").replay == 40
    assert continual_set(new, everything, 0.0, "s", "chat@v2").replay == 0
    with pytest.raises(ValueError, match="replay_fraction"):
        continual_set(new, everything, 1.0, "s", None)


def test_retrain_takes_everything_and_counts_on_policy_against_what_serves() -> None:
    chosen = retrain_set(examples(4, "a", "chat@v1") + examples(2, "b"), served="chat@v1")
    assert (chosen.new, chosen.replay, chosen.on_policy) == (6, 0, 4)
    assert retrain_set(examples(3, "a", "chat@v1"), served=None).on_policy == 0
    assert chosen.summary()["on_policy_share"] == round(4 / 6, 4)


def test_class_counts_weigh_examples_by_their_votes() -> None:
    weighted = [Example("p", None, "a", True, weight=3.0), Example("p", None, "b", False)]
    assert class_counts(weighted) == (3, 1)


def test_the_retrain_window_keeps_recent_votes() -> None:
    """Votes at day 0 and day 3; two days back from day 3, one hour in: day 3's only."""
    fold = folded([event("a", user="u1", t=0), event("b", user="u2", t=3 * 86400)])
    kept = votes_since(fold.table, days=2, now=T0 + dt.timedelta(days=3, hours=1))
    assert ids(kept) == ["b"]
    assert (kept[1].rows_read, kept[1].events) == (1, 1)
    assert kept[1].read_from_us == int((T0 + dt.timedelta(days=3)).timestamp() * 1e6)


def test_new_examples_are_labelled_by_the_new_votes_alone() -> None:
    # Three users liked an answer; after the window two dislike it: a change of taste.
    old = [event(f"o{i}", user=f"u{i}", message=f"m{i}", t=i) for i in range(3)]
    new = [
        event(f"n{i}", user=f"v{i}", message=f"n{i}", t=10 + i, feedback="dislike")
        for i in range(2)
    ]
    fold = folded(old + new)
    assert snapshot(fold).table["desirable"].tolist() == [True]  # 3 likes to 2
    fresh = new_votes(fold.table, {("fb", 0): 2})
    assert ids(fresh) == ["n0", "n1"]
    assert snapshot(fold, fresh).table["desirable"].tolist() == [False]
