"""Lineage: which feedback a snapshot was built from, and the chain of adapter versions
that learned from it.

A `FeedbackWindow` describes the store rows a snapshot read and the votes it counted:
per Kafka topic and partition the offset ranges of both, the time range of the votes,
and the votes per class and per producing adapter (the events' `adapter` field; None is
the base model or an unknown producer). The vote table builds it for a feedback
snapshot (pipeline/feedback/votes.py); `votes_window` builds it for a TRL dataset,
which has no Kafka position (the file it came from is named by whoever read it). The
window describes a snapshot; it is not part of the training table, so it never changes
the snapshot's content id.

`lineage_chain` walks version.json records from one version back through its parents
to the first, as one plain list a script can read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd

from pipeline.feedback.records import ADAPTER, DESIRABLE
from pipeline.serving.registry import parse_served_name


@dataclass(frozen=True)
class PartitionWindow:
    """The offsets of one topic partition a snapshot read, and of the votes it counted
    (both inclusive; the counted ones are None when no vote of the partition counted)."""

    topic: str
    partition: int
    first_read: int
    last_read: int
    rows_read: int
    first_counted: int | None
    last_counted: int | None
    votes: int


@dataclass(frozen=True)
class AdapterVotes:
    """The counted votes on answers of one producing adapter (None: the base model, or
    a producer that did not say)."""

    adapter: str | None
    desirable: int
    undesirable: int

    @property
    def votes(self) -> int:
        return self.desirable + self.undesirable


@dataclass(frozen=True)
class FeedbackWindow:
    """What a snapshot learned from.

    partitions: per (topic, partition) read, sorted; empty for a TRL dataset.
    votes_from, votes_to: ISO-8601 times of the first and last vote counted (None for a
        TRL dataset, whose rows carry no time).
    read_from: the time of the oldest row read: a snapshot of the last N days read only
        the rows of its partitions' offset ranges from then on.
    ingested_to: when the newest row read was stored.
    votes_desirable, votes_undesirable: the votes counted, per class.
    by_adapter: the votes counted per producing adapter, most votes first.
    file: the data file a snapshot was read from, when it was (a TRL dataset).
    builds_on: the ids the caller knows this snapshot builds on: "run_id" (the cycle
        run), "alias" and "version" (what the alias served when the run began).
    """

    partitions: tuple[PartitionWindow, ...]
    votes_from: str | None
    votes_to: str | None
    ingested_to: str | None
    votes_desirable: int
    votes_undesirable: int
    by_adapter: tuple[AdapterVotes, ...]
    file: str | None = None
    builds_on: dict[str, str] = field(default_factory=dict)
    read_from: str | None = None

    def on_policy_votes(self, alias: str) -> int:
        """The counted votes on answers of any version of `alias` (alias@vN): on-policy
        for a candidate that continues that alias."""
        return sum(
            a.votes
            for a in self.by_adapter
            if a.adapter is not None and (parse_served_name(a.adapter) or ("",))[0] == alias
        )

    def built_on(self, **ids: str | None) -> FeedbackWindow:
        """The window with the ids the caller knows (run_id, alias, version) recorded;
        None values are left out."""
        known = {k: v for k, v in ids.items() if v is not None}
        return replace(self, builds_on={**self.builds_on, **known})

    def as_dict(self) -> dict[str, Any]:
        """The JSON object kept in snapshot.json and version.json; with an alias in
        `builds_on`, also its on-policy votes."""
        out = asdict(self)
        out["partitions"] = [asdict(p) for p in self.partitions]
        out["by_adapter"] = [asdict(a) for a in self.by_adapter]
        alias = self.builds_on.get("alias")
        if alias:
            total = self.votes_desirable + self.votes_undesirable
            out["on_policy"] = {"alias": alias, "votes": self.on_policy_votes(alias), "of": total}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeedbackWindow:
        """Read `as_dict`'s object back (derived keys such as on_policy are ignored)."""
        return cls(
            partitions=tuple(PartitionWindow(**p) for p in data.get("partitions", ())),
            votes_from=data.get("votes_from"),
            votes_to=data.get("votes_to"),
            ingested_to=data.get("ingested_to"),
            votes_desirable=int(data.get("votes_desirable", 0)),
            votes_undesirable=int(data.get("votes_undesirable", 0)),
            by_adapter=tuple(AdapterVotes(**a) for a in data.get("by_adapter", ())),
            file=data.get("file"),
            builds_on=dict(data.get("builds_on", {})),
            read_from=data.get("read_from"),
        )


def votes_window(votes: pd.DataFrame) -> FeedbackWindow:
    """The window of votes with no Kafka position (a TRL dataset): counts per class
    and per producing adapter only."""
    desirable = votes[DESIRABLE].astype(bool)
    adapters = votes[ADAPTER] if ADAPTER in votes.columns else pd.Series(None, index=votes.index)
    # A missing adapter (None or NaN) is the base model; groupby would drop it.
    names = adapters.astype(object).where(adapters.notna(), "")
    per = desirable.groupby(names).agg(["sum", "size"])
    by_adapter = sorted(
        (
            AdapterVotes(name or None, int(row["sum"]), int(row["size"] - row["sum"]))
            for name, row in per.iterrows()
        ),
        key=lambda a: (-a.votes, a.adapter or ""),
    )
    return FeedbackWindow(
        partitions=(),
        votes_from=None,
        votes_to=None,
        ingested_to=None,
        votes_desirable=int(desirable.sum()),
        votes_undesirable=int((~desirable).sum()),
        by_adapter=tuple(by_adapter),
    )


# -- the chain of versions ------------------------------------------------------------


def lineage_step(info: Mapping[str, Any]) -> dict[str, Any]:
    """One version's lineage from its version.json, with None for what an older record
    does not say."""
    reference = info.get("reference") or {}
    return {
        "version": info.get("version"),
        "created_at": info.get("created_at"),
        "run_id": info.get("run_id"),
        "parent": info.get("parent"),
        "init_adapter": info.get("init_adapter"),
        "reference": {
            "base_model": reference.get("base_model", info.get("base_model")),
            "path": reference.get("path"),
            "version": reference.get("version"),
        },
        "snapshot_id": info.get("snapshot_id"),
        "window": info.get("snapshot_window"),
    }


def lineage_chain(
    version: str, info_of: Callable[[str], Mapping[str, Any] | None]
) -> list[dict[str, Any]]:
    """The lineage of `version` and of each parent in turn, back to the first version.

    Args:
        info_of: a version's version.json, or None when the registry no longer has it
            (a parent removed by gc): the chain then ends with a step saying so.
    """
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = version
    while current is not None and current not in seen:
        seen.add(current)
        info = info_of(current)
        if info is None:
            chain.append({"version": current, "missing": True})
            break
        step = lineage_step({**info, "version": info.get("version", current)})
        chain.append(step)
        current = step["parent"]
    return chain
