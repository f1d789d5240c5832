"""When a run stops before its planned steps, and which evaluated step it keeps.

Each guard reads one evaluation and answers `check(metrics) -> reason | None`: the
reason, written for the run's report, why training should stop now. The trainer then
keeps the best step evaluated before (the starting point counts), never the step that
turned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from pipeline.training.evaluate import HeldoutMetrics


class Evaluated(Protocol):
    """What the guards read of an evaluation (HeldoutMetrics has it)."""

    @property
    def sampled_end_rate(self) -> float | None: ...

    @property
    def general_nll(self) -> float | None: ...


@dataclass(frozen=True)
class GeneralOnly:
    """An evaluation of the general held-out set alone (a run without a held-out split)."""

    general_nll: float | None
    sampled_end_rate: float | None = None


@dataclass(frozen=True)
class EndOfTurnGuard:
    """The collapse KTO is known for shows when sampling, not in teacher-forced scores:
    probability pushed off disliked answers goes to text that never ends its turn. Stop
    when the share of sampled answers that end their turn falls `tolerance` (a share of
    it) below the reference's."""

    reference_rate: float
    tolerance: float

    def check(self, metrics: Evaluated) -> str | None:
        rate = metrics.sampled_end_rate
        if self.tolerance <= 0 or rate is None:
            return None
        if rate >= self.reference_rate * (1 - self.tolerance):
            return None
        return (
            f"{rate:.0%} of answers sampled for held-out prompts end their turn, against "
            f"{self.reference_rate:.0%} from the reference (eos_guard={self.tolerance:g}): "
            "the policy is losing the habit of stopping"
        )


@dataclass(frozen=True)
class GeneralNllGuard:
    """The general held-out NLL (text unlike the feedback) may rise by at most
    `max_increase`, a share of where it started."""

    before: float | None
    max_increase: float | None

    def check(self, metrics: Evaluated) -> str | None:
        after = metrics.general_nll
        if self.max_increase is None or self.before is None or after is None:
            return None
        if after <= self.before * (1 + self.max_increase):
            return None
        return (
            f"the general held-out NLL rose from {self.before:.4f} to {after:.4f} "
            f"(+{after / self.before - 1:.1%}), past max_general_nll_increase="
            f"{self.max_increase:g}"
        )


def selection_score(metrics: HeldoutMetrics, selection: str) -> float:
    """What the best step minimises: the held-out KTO loss, minus the held-out margin or
    accuracy, or 0 for "final" (every step that passes the guards replaces the last)."""
    if selection == "heldout_loss":
        return metrics.loss
    if selection == "heldout_margin":
        return -metrics.margin if math.isfinite(metrics.margin) else 0.0
    if selection == "heldout_accuracy":
        return -metrics.accuracy
    return 0.0


def improves(score: float, best: float | None, selection: str) -> bool:
    """Whether an evaluation scoring `score` replaces the best one so far."""
    return best is None or selection == "final" or score < best - 1e-6


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row that did not improve on the best
    (0: never). Its counters are part of the run's resumable state."""

    patience: int
    selection: str
    best: float | None = None
    stale: int = 0

    def check(self, score: float) -> str | None:
        """`score`: the evaluation's selection score (lower is better)."""
        if improves(score, self.best, self.selection):
            self.best, self.stale = score, 0
            return None
        self.stale += 1
        if self.patience and self.stale >= self.patience:
            return (
                f"the selection signal ({self.selection}) has not improved for {self.stale} "
                "evaluations"
            )
        return None
