"""The promotion gate: may a candidate adapter replace the one serving now?

Both are scored on the same held-out records against the same reference (the base
model), so their numbers compare: implied-reward accuracy (desirable completions above
the reference point z_ref, undesirable ones below), the mean reward margin between the
classes, and the KL to the reference. The candidate is promoted only if it is at least
as good as the serving adapter on accuracy and margin, each by a configurable gain (a
negative gain tolerates a small loss), and if its KL stays under a bound. An optional
generation check adds a user scorer's mean over answers the two adapters gave.

When nothing serves yet, the serving side is the base model itself: its rewards are
all zero, so its accuracy and margin are 0 and a candidate must at least have learnt
the right direction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipeline.evaluate import HeldoutMetrics

# Accuracy is a ratio of counts; differences below this are float noise, not a loss.
_EPS = 1e-9


@dataclass(frozen=True)
class GateOptions:
    """What a candidate must show to be promoted.

    Attributes:
        min_accuracy_gain: candidate accuracy - serving accuracy must be at least this.
        min_margin_gain: candidate margin - serving margin must be at least this.
        max_kl: the candidate's KL to the reference must not exceed this.
        min_heldout: fewer held-out records than this cannot judge anything: refused.
        min_score_gain: with a generation check, candidate mean score - serving mean
            score must be at least this.
    """

    min_accuracy_gain: float = 0.0
    min_margin_gain: float = 0.0
    max_kl: float = 5.0
    min_heldout: int = 8
    min_score_gain: float = 0.0

    def __post_init__(self) -> None:
        if self.max_kl <= 0:
            raise ValueError(f"max_kl must be positive, got {self.max_kl}")
        if self.min_heldout < 1:
            raise ValueError(f"min_heldout must be at least 1, got {self.min_heldout}")


@dataclass(frozen=True)
class Check:
    """One comparison the gate made."""

    name: str
    candidate: float
    serving: float | None
    required: str
    passed: bool


@dataclass(frozen=True)
class GenerationScores:
    """Mean scorer value of answers from each adapter to the same prompts."""

    candidate: float
    serving: float
    prompts: int


@dataclass(frozen=True)
class GateDecision:
    """The verdict and every check behind it; `reason` is one sentence for people."""

    promote: bool
    reason: str
    checks: tuple[Check, ...]
    candidate: HeldoutMetrics | None
    serving: HeldoutMetrics | None
    serving_name: str

    def as_dict(self) -> dict:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "serving_name": self.serving_name,
            "checks": [asdict(c) for c in self.checks],
            "candidate": self.candidate.as_dict() if self.candidate else None,
            "serving": self.serving.as_dict() if self.serving else None,
        }


def judge(
    candidate: HeldoutMetrics,
    serving: HeldoutMetrics,
    options: GateOptions,
    serving_name: str,
    generation: GenerationScores | None = None,
) -> GateDecision:
    """Decide whether `candidate` may replace `serving` (named `serving_name` in the
    reasons: "chat@v3", or "the base model")."""
    reason = too_few_heldout(candidate.count, options)
    if reason is not None:
        return GateDecision(False, reason, (), candidate, serving, serving_name)

    checks = [
        _at_least("accuracy", candidate.accuracy, serving.accuracy, options.min_accuracy_gain),
        _at_least("margin", candidate.margin, serving.margin, options.min_margin_gain),
        Check(
            "kl",
            candidate.kl,
            serving.kl,
            f"<= {options.max_kl:g}",
            math.isfinite(candidate.kl) and candidate.kl <= options.max_kl,
        ),
    ]
    if generation is not None:
        checks.append(
            _at_least(
                "generation_score", generation.candidate, generation.serving, options.min_score_gain
            )
        )
    failed = [c for c in checks if not c.passed]
    if not failed:
        reason = f"candidate is at least as good as {serving_name} on every check"
        return GateDecision(True, reason, tuple(checks), candidate, serving, serving_name)
    parts = []
    for c in failed:
        if c.serving is None or c.name == "kl":
            parts.append(f"{c.name} {c.candidate:.4g} (needs {c.required})")
        else:
            parts.append(
                f"{c.name} {c.candidate:.4g} against {c.serving:.4g} from {serving_name} "
                f"(needs {c.required})"
            )
    reason = "candidate refused: " + "; ".join(parts)
    return GateDecision(False, reason, tuple(checks), candidate, serving, serving_name)


def too_few_heldout(count: int, options: GateOptions) -> str | None:
    """Why `count` held-out records cannot judge a candidate, or None when they can."""
    if count >= options.min_heldout:
        return None
    return (
        f"only {count} held-out records, fewer than gate.min_heldout={options.min_heldout}: "
        "too few to judge. Collect more feedback or raise snapshot.heldout_fraction"
    )


def _at_least(name: str, candidate: float, serving: float, gain: float) -> Check:
    if not math.isfinite(candidate) and not math.isfinite(serving):
        # e.g. the margin of a held-out set with one class: nothing to compare.
        return Check(name, candidate, serving, "n/a", True)
    required = serving + gain
    passed = math.isfinite(candidate) and (
        not math.isfinite(required) or candidate >= required - _EPS
    )
    sign = "+" if gain >= 0 else "-"
    return Check(name, candidate, serving, f">= serving {sign} {abs(gain):g}", passed)
