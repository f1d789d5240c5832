"""How often does the canary's sequential test promote a candidate that is no better?

    python -m bench.canary [--canaries 1000] [--look-every 10] [--seed 0]

A/A canaries: the candidate is the served version, so every promotion is a false one.
Each canary draws a true liked share in [0.1, 0.9] and a canary share from {0.1, 0.3,
0.5}; votes arrive one at a time, and the verdict (pipeline/promotion/canary.py, the
default [canary] rules) is asked after every `--look-every` votes, as a Prefect flow
checking every few minutes would, until it is final or max_votes is reached. Two
kinds of voters:

- independent: every vote is a fresh voter;
- sticky: 200 voters per canary, each with a liking of their own (Beta(2, 2) around the
  true share), routed to one arm for the whole canary and voting many times: the
  clustering a real canary has, which the test does not model.

Then A/B canaries with the candidate better by 10 and 20 points, and worse by 20, to
say how many votes a verdict takes when there is something to find. The false-promotion
rate of a fixed-sample z-test asked at the same looks is printed beside it: the
inflation the sequential test exists to avoid.

Results go to bench/results/canary.{json,png}; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.progress import track

from pipeline.promotion.canary import Arm, CanaryRules, verdict

RESULTS = Path("bench/results")
SHARES = (0.1, 0.3, 0.5)


def run_canary(
    rng: np.random.Generator,
    p_served: float,
    effect: float,
    share: float,
    rules: CanaryRules,
    look_every: int,
    sticky: bool,
) -> dict[str, Any]:
    """One canary to its verdict (or max_votes): decision, votes, and whether a plain
    z-test at the same looks would have called the candidate better at some look."""
    p_candidate = min(max(p_served + effect, 0.0), 1.0)
    n = rules.max_votes
    on_candidate = rng.random(n) < share
    if sticky:
        voters = 200
        arm_of = rng.random(voters) < share
        liking = rng.beta(2, 2, voters)
        cand, serv = np.flatnonzero(arm_of), np.flatnonzero(~arm_of)
        if len(cand) == 0 or len(serv) == 0:
            return run_canary(rng, p_served, effect, share, rules, look_every, sticky)
        who = np.empty(n, dtype=np.int64)
        who[on_candidate] = rng.choice(cand, on_candidate.sum())
        who[~on_candidate] = rng.choice(serv, (~on_candidate).sum())
        # Each voter likes more or less than the arm's true share, for the whole canary.
        base = np.where(on_candidate, p_candidate, p_served)
        p = np.clip(base + (liking[who] - 0.5), 0.0, 1.0)
    else:
        p = np.where(on_candidate, p_candidate, p_served)
        who = np.arange(n)
    liked = rng.random(n) < p
    cand_votes = np.cumsum(on_candidate)
    cand_liked = np.cumsum(liked & on_candidate)
    serv_votes = np.arange(1, n + 1) - cand_votes
    serv_liked = np.cumsum(liked & ~on_candidate)
    z_promoted = False
    for t in range(look_every - 1, n, look_every):
        if sticky:
            served, candidate = (
                _voters(name, who[: t + 1], liked[: t + 1], arm[: t + 1])
                for name, arm in (("served", ~on_candidate), ("candidate", on_candidate))
            )
        else:
            served = Arm("served", int(serv_liked[t]), int(serv_votes[t]))
            candidate = Arm("candidate", int(cand_liked[t]), int(cand_votes[t]))
        v = verdict(served, candidate, 0.0, rules)
        z_promoted = z_promoted or _z_better(served, candidate, rules)
        if v.final or t + look_every >= n:
            decision = v.decision if v.final else "inconclusive"
            return {"decision": decision, "votes": t + 1, "z_promoted": z_promoted}
    return {"decision": "inconclusive", "votes": n, "z_promoted": z_promoted}


def _voters(name: str, who: np.ndarray, liked: np.ndarray, mine: np.ndarray) -> Arm:
    """An arm's votes by voter, as the canary check counts them from the vote table."""
    votes = np.bincount(who[mine])
    return Arm.of_voters(name, np.bincount(who[mine], liked[mine], len(votes)), votes)


def _z_better(served: Arm, candidate: Arm, rules: CanaryRules) -> bool:
    """A fixed-sample one-sided z-test at level alpha, as if this look were the only one."""
    if min(served.votes, candidate.votes) < rules.min_votes:
        return False
    ps, pc = served.liked / served.votes, candidate.liked / candidate.votes
    pooled = (served.liked + candidate.liked) / (served.votes + candidate.votes)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / served.votes + 1 / candidate.votes))
    return (pc - ps) / se > statistics.NormalDist().inv_cdf(1 - rules.alpha)


def scenario(
    name: str, effect: float, canaries: int, args: argparse.Namespace, rules: CanaryRules
) -> dict[str, Any]:
    rng = np.random.default_rng([args.seed, round(effect * 1000) + 1000, len(name)])
    runs = []
    for _ in track(range(canaries), description=name, transient=True):
        p = float(rng.uniform(0.1, 0.9))
        share = float(rng.choice(SHARES))
        run = run_canary(rng, p, effect, share, rules, args.look_every, "sticky" in name)
        runs.append({**run, "p_served": round(p, 3), "share": share})
    decisions = {
        d: sum(r["decision"] == d for r in runs) for d in ("promote", "rollback", "inconclusive")
    }
    decided = [r["votes"] for r in runs if r["decision"] != "inconclusive"]
    return {
        "scenario": name,
        "effect": effect,
        "canaries": canaries,
        **decisions,
        "promote_rate": round(decisions["promote"] / canaries, 4),
        "z_test_promote_rate": round(sum(r["z_promoted"] for r in runs) / canaries, 4),
        "median_votes_to_decision": statistics.median(decided) if decided else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--look-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rules = CanaryRules()
    rows = [
        scenario("A/A independent", 0.0, args.canaries, args, rules),
        scenario("A/A sticky voters", 0.0, args.canaries, args, rules),
        scenario("better by 20 pts", 0.2, args.canaries // 4, args, rules),
        scenario("better by 10 pts", 0.1, args.canaries // 4, args, rules),
        scenario("worse by 20 pts", -0.2, args.canaries // 4, args, rules),
    ]
    aa = rows[:2]
    result = {
        "bench": "canary",
        "alpha": rules.alpha,
        "look_every": args.look_every,
        "rules": {k: getattr(rules, k) for k in ("min_effect", "min_votes", "max_votes")},
        "aa_canaries": sum(r["canaries"] for r in aa),
        "aa_false_promotions": sum(r["promote"] for r in aa),
        "aa_false_promotion_rate": round(
            sum(r["promote"] for r in aa) / sum(r["canaries"] for r in aa), 4
        ),
        "aa_rate_at_most_alpha": all(r["promote_rate"] <= rules.alpha for r in aa),
        "scenarios": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "canary.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, rules, args.out / "canary.png")
    print(json.dumps(result))


def plot(rows: list[dict[str, Any]], rules: CanaryRules, path: Path) -> None:
    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = [r["scenario"] for r in rows]
    x = np.arange(len(rows))
    for k, (decision, colour) in enumerate(
        (("promote", "C2"), ("rollback", "C3"), ("inconclusive", "C7"))
    ):
        ax.bar(x + (k - 1) * 0.27, [100 * r[decision] / r["canaries"] for r in rows], 0.27,
               label=decision, color=colour)  # fmt: skip
    ax.scatter(x[:2] - 0.27, [100 * r["z_test_promote_rate"] for r in rows[:2]], marker="x",
               color="k", zorder=3, label="z-test at every look: promote")  # fmt: skip
    ax.axhline(100 * rules.alpha, color="C2", linestyle="--", linewidth=1)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("% of canaries")
    ax.set_title("canary verdicts (A/A: every promotion is false)")
    ax.set_ylim(0, 125)
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
