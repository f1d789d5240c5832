"""What a night trains on, by strategy: all of a window of feedback (retrain), or the
votes gained since the last judged run plus a replay sample of older ones (continual).

The snapshot stays the whole store's, content-addressed as ever. A vote is new when it
was stored past the previous judged run's window: per topic partition, an offset above
the last one that run read (a partition it never read is new throughout). The new
votes, picked from the vote table (pipeline/feedback/votes.py) the whole snapshot was
built from, make a snapshot of their own, so that a new example is labelled by what
users say now; replay draws from the whole snapshot's other examples.

Votes about an adapter's own answers are on-policy for it; `on_policy` counts the
examples whose answer came from the version that serves now.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.feedback.examples import Example
from pipeline.feedback.records import KAFKA_OFFSET, KAFKA_PARTITION, KAFKA_TOPIC, TS
from pipeline.feedback.votes import VoteState, example_key, select_votes

# An example's identity is the vote table's: which answer a vote is about.
ExampleKey = bytes
Offsets = Mapping[tuple[str, int], int]


def key_of(example: Example) -> ExampleKey:
    key = example_key(example.prompt, example.messages_json, example.completion)
    if key is None:  # an Example always has a completion and a prompt or messages
        raise ValueError(f"an example with neither a prompt nor messages: {example!r}")
    return key


def new_votes(votes: pa.Table, read_up_to: Offsets) -> tuple[pa.Table, VoteState]:
    """The votes of the vote table stored past `read_up_to` ((topic, partition) -> the
    last offset the previous judged run read), with the state of a fold of them alone:
    what `snapshot_from_votes` takes, so that their own majority labels the new
    examples. The table holds the latest vote per voter and message over the whole
    store, so a later retraction or change still wins."""
    old = pa.array(np.zeros(votes.num_rows, dtype=bool))
    for (topic, partition), last in read_up_to.items():
        read = pc.and_(
            pc.and_(
                pc.equal(votes[KAFKA_TOPIC], topic), pc.equal(votes[KAFKA_PARTITION], partition)
            ),
            pc.less_equal(votes[KAFKA_OFFSET], last),
        )
        old = pc.or_(old, read)
    return select_votes(votes, pc.invert(old))


def votes_since(votes: pa.Table, days: float, now: dt.datetime) -> tuple[pa.Table, VoteState]:
    """The votes of the vote table cast within `days` before `now` (retrain's window),
    with the state of a fold of them alone."""
    since = pa.scalar(now - dt.timedelta(days=days), votes.schema.field(TS).type)
    return select_votes(votes, pc.greater_equal(votes[TS], since))


@dataclass(frozen=True)
class TrainingSet:
    """The examples a night trains on and where they came from.

    new: examples with a vote since the last judged run; replay: older ones drawn to
    keep what was learned; on_policy: examples answered by the version serving now;
    by_adapter: examples per producing adapter (None: the base model, or unknown).
    """

    examples: list[Example]
    strategy: str
    new: int
    replay: int
    on_policy: int
    by_adapter: dict[str | None, int] = field(default_factory=dict)

    @property
    def on_policy_share(self) -> float:
        return self.on_policy / len(self.examples) if self.examples else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "strategy": self.strategy,
            "examples": len(self.examples),
            "new": self.new,
            "replay": self.replay,
            "on_policy": self.on_policy,
            "on_policy_share": round(self.on_policy_share, 4),
            "by_adapter": {str(k): v for k, v in self.by_adapter.items()},
        }


def retrain_set(examples: Sequence[Example], served: str | None) -> TrainingSet:
    """Everything in the (windowed) snapshot's split."""
    return _training_set(list(examples), "retrain", len(examples), 0, served)


def continual_set(
    new: Sequence[Example],
    everything: Sequence[Example],
    replay_fraction: float,
    seed: str,
    served: str | None,
    voted_since: set[ExampleKey] | None = None,
) -> TrainingSet:
    """The new examples (labelled by the new votes alone: a change of taste shows at
    once) and a replay sample of the examples of `everything` with no vote since (not
    in `voted_since`, default the new examples' keys), so that replay makes up
    `replay_fraction` of the result (fewer when there are not that many old ones). The
    sample is a seeded draw without replacement: the same inputs, the same set."""
    if not 0 <= replay_fraction < 1:
        raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
    new = list(new)
    skip = voted_since if voted_since is not None else {key_of(e) for e in new}
    old = [e for e in everything if key_of(e) not in skip]
    wanted = math.ceil(len(new) * replay_fraction / (1 - replay_fraction))
    replay = random.Random(seed).sample(old, min(wanted, len(old)))
    return _training_set(new + replay, "continual", len(new), len(replay), served)


def _training_set(
    examples: list[Example], strategy: str, new: int, replay: int, served: str | None
) -> TrainingSet:
    by_adapter = Counter(e.adapter for e in examples)
    on_policy = by_adapter.get(served, 0) if served is not None else 0
    return TrainingSet(examples, strategy, new, replay, on_policy, dict(by_adapter.most_common()))


def class_counts(examples: Iterable[Example]) -> tuple[int, int]:
    """(desirable, undesirable) as training counts them: each example by its weight
    (1, or its votes under the "weight" repeat policy)."""
    desirable = undesirable = 0.0
    for e in examples:
        if e.desirable:
            desirable += e.weight
        else:
            undesirable += e.weight
    return round(desirable), round(undesirable)
