"""What tonight's cycle does: retrain or continue the served adapter, on which votes,
against which reference, judged on which held-out votes, and why.

`plan_night` decides it from values (the configured strategy, what serves, the
snapshot and the votes since the last judged run); the flow reads the store before
and trains after. A continual night needs something served: the first one, with
nothing served, retrains (`continues`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.feedback.continual import TrainingSet, continual_set, key_of, retrain_set
from pipeline.feedback.examples import Example
from pipeline.feedback.snapshot import RepeatPolicy, Snapshot
from pipeline.promotion.gate import GateOptions, judged_on_new_heldout
from pipeline.serving.registry import served_name

# retrain: a fresh LoRA from the base model, which is the reference; continual: a warm
# start from the served adapter, which is the reference.
Strategy = Literal["retrain", "continual"]


def continues(strategy: Strategy, served: str | None) -> bool:
    """Whether tonight continues the served adapter: configured to, and something
    serves. The flow asks before reading the store (a continual night reads the votes
    since the last judged run, a retrain its window)."""
    return strategy == "continual" and served is not None


@dataclass(frozen=True)
class NightPlan:
    """What tonight trains on and how.

    Attributes:
        strategy: the strategy in effect (a continual configuration with nothing
            served retrains).
        why: one sentence for people.
        served: the version the alias serves (None: nothing yet); a continual night
            starts from it and measures against it.
        snapshot: the id of the snapshot of the store.
        new_votes: the id of the snapshot of the votes since the last judged run, on
            a continual night when they label anything.
        train: the examples trained on and where they came from.
        heldout: the held-out examples training evaluates on (counted as training
            counts votes).
        gate_heldout: the held-out examples the gate judges on, one per answer.
    """

    strategy: Strategy
    why: str
    served: str | None
    snapshot: str
    new_votes: str | None
    train: TrainingSet
    heldout: list[Example]
    gate_heldout: list[Example]

    @property
    def continual(self) -> bool:
        return self.strategy == "continual"

    @property
    def reference(self) -> str | None:
        """The version training starts from and measures against; None: a fresh LoRA
        against the base model."""
        return self.served if self.continual else None

    @property
    def candidate_key(self) -> str:
        """What a candidate directory's checkpoint was trained on (resumed only when
        tonight's is the same)."""
        return f"{self.snapshot}+{self.served}" if self.continual else self.snapshot

    def record(self) -> dict[str, Any]:
        """The plan as the run record keeps it."""
        out: dict[str, Any] = {"strategy": self.strategy, "why": self.why}
        out |= self.train.summary()
        out["heldout_judged"] = len(self.gate_heldout)
        if self.new_votes is not None:
            out["new_votes_snapshot"] = self.new_votes
        return out


def plan_night(
    strategy: Strategy,
    alias: str,
    served: str | None,
    snapshot: Snapshot,
    new: Snapshot | None,
    repeats: RepeatPolicy,
    replay_fraction: float,
    gate: GateOptions,
) -> NightPlan:
    """Tonight's plan.

    Args:
        strategy: the configured strategy ([cycle] strategy).
        alias: the alias the night trains for.
        served: the version it serves now (None: nothing).
        snapshot: the store's snapshot (a retrain's window of it).
        new: a continual night's snapshot of the votes since the last judged run
            (None: they label nothing, or a retrain).
        repeats: what the votes of an answer given many times count for in training.
        replay_fraction: a continual night's share of older examples replayed.
        gate: the gate's options (a continual night is judged on its new held-out
            votes only when the gate could judge on them alone).
    """
    name = served_name(alias, served) if served else None
    if not continues(strategy, served):
        why = "configured" if strategy == "retrain" else "nothing is served yet"
        train = retrain_set(snapshot.records("train", repeats), name)
        heldout = snapshot.records("heldout", repeats)
        return NightPlan(
            "retrain", why, served, snapshot.id, None, train, heldout, snapshot.records("heldout")
        )
    news = {split: new.records(split) if new else [] for split in ("train", "heldout")}
    # Replay only what got no vote since, on either side of the new votes' split.
    voted = {key_of(e) for examples in news.values() for e in examples}
    fresh = new.records("train", repeats) if new else []
    seed = f"{snapshot.id}+{served}"
    train = continual_set(
        fresh, snapshot.records("train", repeats), replay_fraction, seed, name, voted
    )
    why = f"continues {name}, on the votes since the last judged run"
    gate_heldout, heldout = news["heldout"], new.records("heldout", repeats) if new else []
    if not judged_on_new_heldout(len(gate_heldout), gate):
        gate_heldout, heldout = snapshot.records("heldout"), snapshot.records("heldout", repeats)
        why += f" (judged on every held-out vote: fewer than {gate.min_heldout} new)"
    new_id = new.id if new else None
    return NightPlan("continual", why, served, snapshot.id, new_id, train, heldout, gate_heldout)
