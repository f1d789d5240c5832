"""The canary's verdict from live votes (pipeline/promotion/canary.py): the always-valid
interval, each decision and its limits, votes counted per arm and voter from a vote table."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.feedback.votes import fold_rows
from pipeline.promotion.canary import Arm, CanaryRules, arm_votes, interval, verdict
from pipeline.promotion.shift import detect_shift
from tests.rows import T0, event, stored

RULES = CanaryRules(alpha=0.05, min_effect=0.0, min_votes=50, max_votes=5000, max_hours=72)


def arms(served: tuple[int, int], candidate: tuple[int, int]) -> tuple[Arm, Arm]:
    return Arm("chat@v1", *served), Arm("chat@v2", *candidate)


def test_a_clearly_better_candidate_is_promoted_and_a_worse_one_rolled_back() -> None:
    v = verdict(*arms((300, 1000), (60, 100)), hours=1.0, rules=RULES)
    assert v.decision == "promote", v.reason
    assert v.lower is not None and v.lower > 0 and v.estimate == pytest.approx(0.3)
    v = verdict(*arms((600, 1000), (30, 100)), hours=1.0, rules=RULES)
    assert v.decision == "rollback", v.reason
    assert v.upper is not None and v.upper < 0


def test_nothing_is_decided_before_each_arm_has_min_votes() -> None:
    v = verdict(*arms((0, 1000), (49, 49)), hours=1.0, rules=RULES)
    assert v.decision == "continue"
    assert "50 votes on each arm" in v.reason
    assert v.lower is None


def test_a_small_difference_goes_on_then_stops_inconclusive_at_a_limit() -> None:
    v = verdict(*arms((500, 1000), (52, 100)), hours=1.0, rules=RULES)
    assert v.decision == "continue" and v.lower is not None and v.lower < 0 < v.upper
    v = verdict(*arms((500, 1000), (52, 100)), hours=80.0, rules=RULES)
    assert v.decision == "inconclusive" and "max_hours" in v.reason
    v = verdict(*arms((2500, 5000), (52, 100)), hours=1.0, rules=RULES)
    assert v.decision == "inconclusive" and "max_votes" in v.reason


def test_min_effect_stops_a_candidate_that_cannot_be_better_by_that_much() -> None:
    rules = CanaryRules(min_effect=0.1, min_votes=50)
    # Better by a point, measured well: not worse, but surely not 10 points better.
    v = verdict(*arms((5000, 10000), (5100, 10000)), hours=1.0, rules=rules)
    assert v.decision == "inconclusive" and "cannot be better" in v.reason
    # Far better, but the interval's low end is under min_effect: keep counting.
    v = verdict(*arms((300, 1000), (45, 100)), hours=1.0, rules=rules)
    assert v.decision == "continue"


def test_the_interval_widens_as_alpha_shrinks_and_narrows_with_votes() -> None:
    s, c = arms((300, 1000), (40, 100))
    _, lo_05, hi_05 = interval(s, c, 0.05, 0.1)
    _, lo_001, hi_001 = interval(s, c, 0.001, 0.1)
    assert lo_001 < lo_05 and hi_001 > hi_05
    s10, c10 = arms((3000, 10000), (400, 1000))
    _, lo, hi = interval(s10, c10, 0.05, 0.1)
    assert hi - lo < hi_05 - lo_05


def test_voters_who_vote_many_times_alike_widen_the_interval() -> None:
    # 100 votes each way on both arms, cast by 4 voters who each always vote alike,
    # against 100 voters voting once.
    once = Arm.of_voters("chat@v2", [1] * 60 + [0] * 40, [1] * 100)
    grouped = Arm.of_voters("chat@v2", [30, 30, 0, 0], [30, 30, 20, 20])
    served = Arm.of_voters("chat@v1", [1] * 400 + [0] * 600, [1] * 1000)
    assert (once.liked, once.votes) == (grouped.liked, grouped.votes) == (60, 100)
    _, lo_once, _ = interval(served, once, 0.05, 0.1)
    _, lo_grouped, _ = interval(served, grouped, 0.05, 0.1)
    assert lo_once > 0 > lo_grouped


def test_rules_out_of_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        CanaryRules(alpha=1.5)
    with pytest.raises(ValueError, match="min_votes"):
        CanaryRules(min_votes=100, max_votes=10)


def test_arm_votes_count_each_voters_latest_vote_since_the_start_per_version() -> None:
    start = T0 + dt.timedelta(seconds=100)
    rows = [
        # Before the canary: not counted.
        event("old", user="u0", message="m0", adapter="chat@v1", feedback="like", t=0),
        # u1 changes their mind on the candidate's answer: the dislike counts.
        event("a", user="u1", message="m1", adapter="chat@v2", feedback="like", t=110),
        event("b", user="u1", message="m1", adapter="chat@v2", feedback="dislike", t=120),
        event("c", user="u1", message="m2", adapter="chat@v2", feedback="like", t=130),
        event("d", user="u2", message="m3", adapter="chat@v1", feedback="like", t=140),
        # A retracted vote and another alias's answer are not counted.
        event("e", user="u3", message="m4", adapter="chat@v1", feedback="like", t=150),
        event("f", user="u3", message="m4", adapter="chat@v1", feedback="retract", t=160),
        event("g", user="u4", message="m5", adapter="other@v9", feedback="like", t=170),
        # No user: the conversation is the voter.
        event(
            "h",
            user=None,
            message="m6",
            conversation="cx",
            adapter="chat@v1",
            feedback="dislike",
            t=180,
        ),
    ]
    table = fold_rows(stored(rows)).table
    served, candidate = arm_votes(table, "chat@v1", "chat@v2", start)
    assert (candidate.liked, candidate.votes, candidate.voters) == (1, 2, 1)
    assert (served.liked, served.votes, served.voters) == (1, 2, 2)


# -- a shift of taste -----------------------------------------------------------------


def _votes_on(adapter: str, liked: int, disliked: int, t0: int, prefix: str) -> list:
    return [
        event(
            f"{prefix}{i}",
            user=f"{prefix}u{i}",
            message=f"{prefix}m{i}",
            adapter=adapter,
            feedback="like" if i < liked else "dislike",
            t=t0 + i,
        )
        for i in range(liked + disliked)
    ]


def test_a_served_version_liked_far_less_than_before_is_a_shift() -> None:
    since = T0 + dt.timedelta(seconds=1000)
    rows = _votes_on("chat@v2", 120, 80, 0, "p") + _votes_on("chat@v2", 40, 160, 1000, "r")
    shift = detect_shift(fold_rows(stored(rows)).table, "chat@v2", since, alpha=0.01)
    assert shift.shifted, shift.reason
    assert (shift.past.liked, shift.past.votes, shift.recent.liked) == (120, 200, 40)
    assert shift.upper is not None and shift.upper < 0


def test_noise_and_other_versions_are_no_shift() -> None:
    since = T0 + dt.timedelta(seconds=1000)
    rows = (
        _votes_on("chat@v2", 120, 80, 0, "p")
        + _votes_on("chat@v2", 110, 90, 1000, "r")
        # Another version's bad answers say nothing of the served one's.
        + _votes_on("chat@v3", 0, 200, 1000, "o")
    )
    shift = detect_shift(fold_rows(stored(rows)).table, "chat@v2", since, alpha=0.01)
    assert not shift.shifted and shift.upper is not None and shift.upper > 0, shift.reason


def test_too_few_votes_on_a_side_say_nothing() -> None:
    since = T0 + dt.timedelta(seconds=1000)
    rows = _votes_on("chat@v2", 120, 80, 0, "p") + _votes_on("chat@v2", 0, 10, 1000, "r")
    shift = detect_shift(fold_rows(stored(rows)).table, "chat@v2", since, alpha=0.01)
    assert not shift.shifted and shift.upper is None and "fewer than" in shift.reason
