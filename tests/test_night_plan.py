"""What tonight does (pipeline/promotion/cycle.py): retrain or continue the served
adapter, on which votes, against which reference, judged on which held-out votes, and
why. Pure: snapshots are built from snapshot tables, nothing is read or trained."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.feedback.continual import key_of
from pipeline.feedback.records import (
    ADAPTER,
    COMPLETION,
    CONVERSATION_ID,
    DESIRABLE,
    MESSAGES_JSON,
    PROMPT,
    SOURCE,
    SPLIT,
    VOTES_DESIRABLE,
    VOTES_UNDESIRABLE,
)
from pipeline.feedback.snapshot import Snapshot, from_snapshot_table
from pipeline.promotion.cycle import NightPlan, continues, plan_night
from pipeline.promotion.gate import GateOptions

GATE = GateOptions(min_heldout=3)


def snapshot(*groups: tuple[str, str, int, int, str | None]) -> Snapshot:
    """A snapshot of (tag, split, examples, votes each, adapter) groups: example i of a
    group answers "tag i?" with "answer i", liked when i is even."""
    rows = [
        {
            PROMPT: f"{tag} {i}?",
            MESSAGES_JSON: None,
            COMPLETION: f"answer {i}",
            DESIRABLE: i % 2 == 0,
            CONVERSATION_ID: f"{tag}-{i}",
            SPLIT: split,
            VOTES_DESIRABLE: votes if i % 2 == 0 else 0,
            VOTES_UNDESIRABLE: 0 if i % 2 == 0 else votes,
            ADAPTER: adapter,
            SOURCE: "feedback",
        }
        for tag, split, n, votes, adapter in groups
        for i in range(n)
    ]
    return from_snapshot_table(pd.DataFrame(rows))


STORE = snapshot(("old", "train", 40, 2, "chat@v2"), ("old-eval", "heldout", 10, 2, "chat@v2"))


def plan(
    strategy: str = "continual",
    served: str | None = "v3",
    new: Snapshot | None = None,
    store: Snapshot = STORE,
) -> NightPlan:
    return plan_night(strategy, "chat", served, store, new, "keep", 0.5, GATE)  # type: ignore[arg-type]


def test_a_retrain_trains_on_the_whole_snapshot_from_the_base_model() -> None:
    night = plan("retrain")

    assert (night.strategy, night.why, night.reference) == ("retrain", "configured", None)
    assert night.served == "v3" and night.candidate_key == STORE.id
    # Training counts every vote (repeats "keep"); the gate judges each answer once.
    assert len(night.train.examples) == 80 and night.train.new == 80
    assert (len(night.heldout), len(night.gate_heldout)) == (20, 10)
    assert night.record()["heldout_judged"] == 10
    assert "new_votes_snapshot" not in night.record()


def test_a_continual_configuration_with_nothing_served_retrains() -> None:
    new = snapshot(("new", "train", 4, 1, None), ("new-eval", "heldout", 4, 1, None))

    night = plan(served=None, new=new)

    assert (night.strategy, night.why) == ("retrain", "nothing is served yet")
    assert night.reference is None and night.new_votes is None
    assert not continues("continual", None) and continues("continual", "v3")
    assert not continues("retrain", "v3")


def test_a_continual_night_continues_the_served_adapter_on_the_new_votes() -> None:
    new = snapshot(("new", "train", 10, 1, "chat@v3"), ("new-eval", "heldout", 5, 1, "chat@v3"))

    night = plan(new=new)

    assert night.strategy == "continual" and night.reference == "v3"
    assert night.why == "continues chat@v3, on the votes since the last judged run"
    # The new votes' examples, and as many older ones replayed (replay_fraction 0.5).
    assert (night.train.new, night.train.replay) == (10, 10)
    assert night.train.on_policy == 10
    # Judged on the new held-out votes: there are at least min_heldout of them.
    assert night.gate_heldout == new.records("heldout")
    assert night.candidate_key == f"{STORE.id}+v3" and night.new_votes == new.id
    record = night.record()
    assert (record["new_votes_snapshot"], record["heldout_judged"]) == (new.id, 5)
    assert (record["strategy"], record["on_policy_share"]) == ("continual", 0.5)


def test_replay_leaves_out_examples_voted_on_since_on_either_side_of_the_split() -> None:
    # The store's first two training examples got new votes: one now on the held-out
    # side of the new votes' own split.
    store = snapshot(("old", "train", 4, 1, None))
    new = snapshot(("old", "train", 1, 1, None), ("new-eval", "heldout", 3, 1, None))
    voted_elsewhere = store.records("train")[1]
    new = from_snapshot_table(
        pd.concat(
            [new.table, store.table.iloc[[1]].assign(**{SPLIT: "heldout"})], ignore_index=True
        )
    )

    night = plan(new=new, store=store)

    replayed = {key_of(e) for e in night.train.examples[night.train.new :]}
    assert key_of(voted_elsewhere) not in replayed
    assert key_of(store.records("train")[0]) not in replayed  # the new example itself
    assert night.train.replay == 1  # only two old examples were not voted on; 1 wanted


@pytest.mark.parametrize("new_heldout", [0, 2])
def test_too_few_new_heldout_votes_judge_on_every_heldout_vote(new_heldout: int) -> None:
    new = snapshot(("new", "train", 6, 1, None), ("new-eval", "heldout", new_heldout, 1, None))

    night = plan(new=new)

    assert night.strategy == "continual"
    assert night.gate_heldout == STORE.records("heldout")
    assert len(night.heldout) == 20  # training evaluates on them too, every vote counted
    assert night.why.endswith("(judged on every held-out vote: fewer than 3 new)")


def test_new_votes_that_label_nothing_leave_nothing_new_to_train_on() -> None:
    night = plan(new=None)

    assert night.strategy == "continual" and night.train.examples == []
    assert night.new_votes is None and "new_votes_snapshot" not in night.record()
    assert night.gate_heldout == STORE.records("heldout")
