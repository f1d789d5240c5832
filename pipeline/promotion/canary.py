"""A canary's verdict from live votes: is the candidate liked more than the served version?

While a canary runs, a share of an alias's conversations is answered by the candidate and
the rest by the served version; each answer names its version, so each vote does too.
`verdict` compares the liked share of the two arms on the votes given to canary-period
answers, and may be asked as often as anyone likes: the test is always valid.

The test is a confidence sequence on the difference d = p_candidate - p_served (a
normal-mixture mSPRT, Johari et al. 2017 "Always valid inference"; Howard et al. 2021).
With the estimate d^ and its variance v (each arm's p(1 - p) / n, from smoothed shares),
and a normal mixture of scale tau over the effect,

    radius = sqrt(2 v (v + tau^2) / tau^2 * (log(1 / alpha) + log((v + tau^2) / v) / 2))

and [d^ - radius, d^ + radius] holds d at every look at once with probability at least
1 - alpha (asymptotically, as votes grow). So peeking every few minutes does not inflate
false promotions the way a fixed-sample z-test does; bench.canary measures the rate on
A/A canaries (candidate = served).

Decisions, once each arm has `min_votes`:

- promote: the whole interval is above `min_effect` (better by at least that much);
- rollback: the whole interval is below 0 (worse);
- inconclusive: the interval is below `min_effect` but not below 0 (it cannot be
  better by min_effect, and is not worse), or the canary reached `max_votes` or
  `max_hours` first; the served version stays;
- continue: none of these yet.

Votes are counted as the vote rule counts them (each voter's latest vote on an answer,
retractions and neutral ratings left out); a voter's votes fall in one arm (routing is
sticky), so a few very active voters weigh more than the test assumes: `min_votes`
guards the start, and the rate is measured, not only argued.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.feedback.records import ADAPTER, CONVERSATION_ID, DESIRABLE, TS, USER_HASH
from pipeline.feedback.votes import is_counted

Decision = Literal["promote", "rollback", "inconclusive", "continue"]
FINAL: tuple[Decision, ...] = ("promote", "rollback", "inconclusive")
# The effects a liked share moves by when a night's adapter helps: a few points to tens.
MIXTURE_SCALE = 0.1


@dataclass(frozen=True)
class CanaryRules:
    """When a canary stops, and which way ([canary] in the configuration)."""

    alpha: float = 0.05
    min_effect: float = 0.0
    min_votes: int = 50
    max_votes: int = 5000
    max_hours: float = 72.0
    mixture_scale: float = MIXTURE_SCALE

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 <= self.min_effect < 1:
            raise ValueError(f"min_effect must be in [0, 1), got {self.min_effect}")
        if self.min_votes < 1 or self.max_votes < self.min_votes:
            raise ValueError(
                f"need 1 <= min_votes <= max_votes, got {self.min_votes} and {self.max_votes}"
            )
        if self.max_hours <= 0 or self.mixture_scale <= 0:
            raise ValueError("max_hours and mixture_scale must be positive")


@dataclass(frozen=True)
class Arm:
    """One arm's counted votes, and how they fall by voter.

    Attributes:
        name: the version (`alias@vN`).
        liked, votes: the arm's liked and counted votes.
        voters: how many voters cast them (None: one vote each).
        liked_sq, liked_votes, votes_sq: sums over voters of liked^2, liked * votes and
            votes^2 (None: one vote each); they give the variance between voters.
    """

    name: str
    liked: int
    votes: int
    voters: int | None = None
    liked_sq: float | None = None
    liked_votes: float | None = None
    votes_sq: float | None = None

    @property
    def share(self) -> float | None:
        return self.liked / self.votes if self.votes else None

    @classmethod
    def of_voters(cls, name: str, liked: Any, votes: Any) -> Arm:
        """The arm of per-voter counts (two sequences: each voter's liked and votes)."""
        pairs = [(float(k), float(n)) for k, n in zip(liked, votes, strict=True) if n]
        return cls(
            name,
            int(sum(k for k, _ in pairs)),
            int(sum(n for _, n in pairs)),
            len(pairs),
            sum(k * k for k, _ in pairs),
            sum(k * n for k, n in pairs),
            sum(n * n for _, n in pairs),
        )


@dataclass(frozen=True)
class Verdict:
    """Where a canary stands: the decision, why, and the numbers behind it.

    Attributes:
        decision: promote, rollback, inconclusive (the served version stays) or
            continue (no decision yet).
        reason: one sentence for people.
        served, candidate: each arm's votes.
        estimate: candidate's liked share minus the served one's (None before votes).
        lower, upper: the always-valid interval on that difference (None before
            `min_votes` per arm).
        hours: how long the canary has run.
    """

    decision: Decision
    reason: str
    served: Arm
    candidate: Arm
    estimate: float | None
    lower: float | None
    upper: float | None
    hours: float
    alpha: float
    min_effect: float

    @property
    def final(self) -> bool:
        return self.decision in FINAL

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("estimate", "lower", "upper", "hours"):
            if out[key] is not None:
                out[key] = round(out[key], 5)
        return out


def interval(served: Arm, candidate: Arm, alpha: float, scale: float) -> tuple[float, float, float]:
    """(estimate, lower, upper) of the candidate's liked share minus the served one's,
    on the always-valid normal-mixture confidence sequence (module docstring).

    The variance uses shares smoothed by half a vote each way, so an arm whose votes
    all agree still has some: a few unanimous votes decide nothing.
    """
    estimate = candidate.liked / candidate.votes - served.liked / served.votes
    v = _variance(served) + _variance(candidate)
    t2 = scale * scale
    radius = math.sqrt(2 * v * (v + t2) / t2 * (math.log(1 / alpha) + 0.5 * math.log((v + t2) / v)))
    return estimate, estimate - radius, estimate + radius


def _variance(arm: Arm) -> float:
    """The variance of an arm's liked share: the larger of the binomial one (on a share
    smoothed by half a vote each way) and the one between voters (a voter's votes go
    together: routing is sticky, and people differ), which is what it is when the same
    voters vote many times."""
    p = (arm.liked + 0.5) / (arm.votes + 1)
    binomial = p * (1 - p) / arm.votes
    if arm.voters is None or arm.voters < 2 or arm.liked_sq is None:
        return binomial
    share = arm.liked / arm.votes
    assert arm.liked_votes is not None and arm.votes_sq is not None
    spread = arm.liked_sq - 2 * share * arm.liked_votes + share * share * arm.votes_sq
    between = arm.voters / (arm.voters - 1) * max(spread, 0.0) / arm.votes**2
    return max(binomial, between)


def verdict(served: Arm, candidate: Arm, hours: float, rules: CanaryRules) -> Verdict:
    """The canary's verdict on its arms' votes so far (module docstring)."""

    def out(decision: Decision, reason: str, bounds: tuple[float, float, float] | None) -> Verdict:
        estimate = lower = upper = None
        if bounds is not None:
            estimate, lower, upper = bounds
        elif served.votes and candidate.votes:
            estimate = candidate.liked / candidate.votes - served.liked / served.votes
        return Verdict(
            decision, reason, served, candidate, estimate, lower, upper, hours,
            rules.alpha, rules.min_effect,
        )  # fmt: skip

    total = served.votes + candidate.votes
    fewest = min(served.votes, candidate.votes)
    if fewest < rules.min_votes:
        if total >= rules.max_votes or hours >= rules.max_hours:
            return out("inconclusive", _limit(total, hours, rules) + f"; {fewest} votes on an "
                       f"arm, fewer than min_votes ({rules.min_votes})", None)  # fmt: skip
        return out("continue", f"waiting for {rules.min_votes} votes on each arm "
                   f"(served {served.votes}, candidate {candidate.votes})", None)  # fmt: skip
    bounds = interval(served, candidate, rules.alpha, rules.mixture_scale)
    estimate, lower, upper = bounds
    said = (
        f"liked {_pct(candidate)} on {candidate.name} against {_pct(served)} on {served.name}: "
        f"difference {estimate:+.1%}, always-valid {1 - rules.alpha:.0%} interval "
        f"[{lower:+.1%}, {upper:+.1%}]"
    )
    if lower > rules.min_effect:
        return out("promote", f"{said}, above min_effect {rules.min_effect:.1%}", bounds)
    if upper < 0:
        return out("rollback", f"{said}, below 0: the candidate is worse", bounds)
    if upper < rules.min_effect:
        return out("inconclusive", f"{said}: it cannot be better by min_effect "
                   f"{rules.min_effect:.1%}", bounds)  # fmt: skip
    if total >= rules.max_votes or hours >= rules.max_hours:
        return out("inconclusive", f"{said}; {_limit(total, hours, rules)}", bounds)
    return out("continue", said, bounds)


def _limit(total: int, hours: float, rules: CanaryRules) -> str:
    if total >= rules.max_votes:
        return f"{total} votes reached max_votes ({rules.max_votes})"
    return f"{hours:.1f} h reached max_hours ({rules.max_hours:g})"


def _pct(arm: Arm) -> str:
    return f"{arm.share:.1%} of {arm.votes}" if arm.votes else "no votes"


def arm_votes(votes: pa.Table, served: str, candidate: str, since: Any) -> tuple[Arm, Arm]:
    """Each arm's counted votes, by voter, in a vote table: the votes cast at or after
    `since` (a timezone-aware datetime: the canary's start) on answers of `served` and
    of `candidate` (`alias@vN` names, as answers name them).

    The vote table holds each voter's latest vote per answer, so a changed mind counts
    once, as it ends. A vote with no user is its conversation's (routing is sticky by
    conversation when no user is named).
    """
    recent = pc.and_(
        is_counted(votes),
        pc.greater_equal(votes[TS], pa.scalar(since, votes.schema.field(TS).type)),
    )
    recent = votes.filter(pc.fill_null(recent, False))
    voter = pc.coalesce(
        recent[USER_HASH], pc.binary_join_element_wise("conversation:", recent[CONVERSATION_ID], "")
    )
    liked = pc.fill_null(recent[DESIRABLE], False).to_numpy(zero_copy_only=False).astype(np.float64)
    arms = []
    for name in (served, candidate):
        mine = pc.fill_null(pc.equal(recent[ADAPTER], name), False).to_numpy(zero_copy_only=False)
        codes = pc.dictionary_encode(voter.filter(pa.array(mine)).combine_chunks()).indices
        who = codes.to_numpy(zero_copy_only=False)
        counts = np.bincount(who)
        arms.append(Arm.of_voters(name, np.bincount(who, liked[mine], len(counts)), counts))
    return arms[0], arms[1]


def counted_since(votes: pa.Table, since: Any) -> int:
    """How many counted votes of a vote table were cast at or after `since`."""
    recent = pc.greater_equal(votes[TS], pa.scalar(since, votes.schema.field(TS).type))
    return int(pc.sum(pc.and_(is_counted(votes), recent)).as_py() or 0)
