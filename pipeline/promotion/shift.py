"""Has the users' taste shifted? The served version's liked share against its own past.

A version's answers do not change while it serves, so when its liked share falls, the
users changed: a new kind of question, or a change of mind about the same answers. Votes
then contradict the older ones the loop still learns from, and a night should weigh the
new ones more (pipeline/promotion/cycle.py decides how).

The served version's votes are split at a time (the start of the last judged run): the
past before it, the recent after. The taste shifted when the always-valid interval of
recent minus past (pipeline/promotion/canary.py, with the variance between voters) lies
wholly below zero at `alpha`: the same evidence a canary asks before a rollback.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.feedback.records import TS
from pipeline.promotion.canary import MIXTURE_SCALE, Arm, arm_votes, interval

# Fewer votes than this on either side say nothing about a shift.
MIN_VOTES = 30


@dataclass(frozen=True)
class Shift:
    """The served version's liked share, past against recent, and whether it fell.

    Attributes:
        version: the served version's name (`alias@vN`).
        past, recent: its votes before and after the split.
        estimate, upper: recent minus past, and the interval's upper end (None: too
            few votes to say).
        shifted: the interval lies below zero.
        reason: one sentence for people.
    """

    version: str
    past: Arm
    recent: Arm
    estimate: float | None
    upper: float | None
    shifted: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "past": {"liked": self.past.liked, "votes": self.past.votes},
            "recent": {"liked": self.recent.liked, "votes": self.recent.votes},
            "estimate": None if self.estimate is None else round(self.estimate, 4),
            "upper": None if self.upper is None else round(self.upper, 4),
            "shifted": self.shifted,
            "reason": self.reason,
        }


def detect_shift(votes: pa.Table, served: str, since: dt.datetime, alpha: float) -> Shift:
    """Whether the liked share of `served` (`alias@vN`) fell after `since` against
    before it, in a vote table (each voter's latest vote per answer)."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    before = votes.filter(pc.less(votes[TS], pa.scalar(since, votes.schema.field(TS).type)))
    past, _ = arm_votes(before, served, served, epoch)
    recent, _ = arm_votes(votes, served, served, since)
    if min(past.votes, recent.votes) < MIN_VOTES:
        return Shift(
            served, past, recent, None, None, False,
            f"{served} has {past.votes} votes before and {recent.votes} after "
            f"{since.isoformat(timespec='seconds')}: fewer than {MIN_VOTES} on a side",
        )  # fmt: skip
    estimate, _, upper = interval(past, recent, alpha, MIXTURE_SCALE)
    shifted = upper < 0
    said = (
        f"{served} liked {recent.liked / recent.votes:.1%} of {recent.votes} recent votes "
        f"against {past.liked / past.votes:.1%} of {past.votes} before: {estimate:+.1%}, "
        f"upper end {upper:+.1%} at alpha {alpha:g}"
    )
    return Shift(served, past, recent, estimate, upper, shifted,
                 said + ("; the taste shifted" if shifted else "; no shift"))  # fmt: skip
