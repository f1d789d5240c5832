"""What a night trains on: the new votes since the last judged run, a seeded replay
sample of older ones, and the on-policy count (pipeline/feedback/continual.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.feedback.continual import (
    class_counts,
    continual_set,
    example_key,
    key_of,
    new_example_keys,
    new_votes,
    retrain_set,
    votes_since,
)
from pipeline.feedback.examples import Example
from pipeline.feedback.snapshot import build_snapshot
from tests.test_snapshot import T0, event, frame


def test_examples_voted_past_the_last_run_window_are_new() -> None:
    rows = [
        event("a", user="u1", message="m1", t=1, response="old answer"),
        event("b", user="u2", message="m2", t=2, response="kept answer"),
        # Past offset 2 on partition 0: new, also an old answer voted again.
        event("c", user="u3", message="m3", t=3, response="new answer"),
        event("d", user="u4", message="m4", t=4, response="kept answer"),
        # A retraction past the window withdraws u1's vote: nothing new to learn.
        event("e", user="u1", message="m1", t=5, feedback="retract"),
    ]
    keys = new_example_keys(frame(rows), {("fb", 0): 2})
    prompt = "How do I reset my password?"
    assert keys == {
        example_key(prompt, None, "new answer"),
        example_key(prompt, None, "kept answer"),
    }
    # A partition the last run never read is new throughout; nothing read: all new.
    assert len(new_example_keys(frame(rows), {("fb", 1): 10})) == 2
    assert new_example_keys(frame(rows), {("fb", 0): 5}) == set()


def test_history_prompts_key_by_their_messages() -> None:
    rows = [event("a", messages=[{"role": "user", "content": "hi"}], t=1)]
    (key,) = new_example_keys(frame(rows), {})
    assert key == (None, '[{"role": "user", "content": "hi"}]', "Open Settings, then Security.")


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
    rows = frame([event("a", t=0), event("b", t=3 * 86400)])
    kept = votes_since(rows, days=2, now=T0 + dt.timedelta(days=3, hours=1))
    assert list(kept["event_id"]) == ["b"]


def test_new_examples_are_labelled_by_the_new_votes_alone() -> None:
    # Three users liked an answer; after the window two dislike it: a change of taste.
    old = [event(f"o{i}", user=f"u{i}", message=f"m{i}", t=i) for i in range(3)]
    new = [
        event(f"n{i}", user=f"v{i}", message=f"n{i}", t=10 + i, feedback="dislike")
        for i in range(2)
    ]
    rows = frame(old + new)
    assert build_snapshot(rows).table["desirable"].tolist() == [True]  # 3 likes to 2
    fresh = new_votes(rows, {("fb", 0): 2})
    assert sorted(fresh["event_id"]) == ["n0", "n1"]
    assert build_snapshot(fresh).table["desirable"].tolist() == [False]
