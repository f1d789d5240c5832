"""The promotion gate: may a candidate adapter replace the one serving now?

Both are scored on the same held-out records against the same reference (the base
model), so their numbers compare: implied-reward accuracy (desirable completions above
the reference point z_ref, undesirable ones below), the mean reward margin between the
classes, and the KL to the reference.

Equal is not better: publishing a candidate that only ties the serving adapter swaps
weights for nothing. So the candidate must beat the serving adapter's accuracy by more
than the held-out set's noise: gain > max(min_accuracy_gain, noise_z * SE) and gain > 0,
where SE is the standard error of the per-record difference in correctness between the
two on the same records (paired: records both get right or both get wrong add no
noise). The margin must be at least as good (serving + min_margin_gain; a negative gain
tolerates a small loss), and the KL must stay under a bound. An optional generation
check adds a user scorer's mean over answers the two adapters gave.

When nothing serves yet, the serving side is the base model itself: its rewards are
all zero, equal to its z_ref of 0, so no record is on the right side and its accuracy
is 0; the same rule then asks the candidate to get more records right than the noise
explains, and to have a margin of at least 0.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # For annotations only: the gate's rules need no torch, and the config reads them.
    from pipeline.training.evaluate import HeldoutMetrics

# Accuracy is a ratio of counts; differences below this are float noise, not a loss.
_EPS = 1e-9
# What decides: the answers each side samples for held-out prompts, judged (a taste
# model learnt from the votes); or the held-out votes' implied-reward accuracy.
JUDGES = ("answers", "likelihood")


@dataclass(frozen=True)
class AnswerScores:
    """The answers check: each side's answers to the same held-out prompts, judged, and
    the paired difference in liked share (pipeline/training/answer_check.py). `trusted` False:
    the judge was too weak to say anything, `reason` says why."""

    trusted: bool
    reason: str
    candidate: float | None = None
    serving: float | None = None
    gain: float | None = None
    low: float | None = None
    high: float | None = None
    prompts: int = 0
    better: bool = False
    worse: bool = False


@dataclass(frozen=True)
class GateOptions:
    """What a candidate must show to be promoted.

    Attributes:
        min_accuracy_gain: candidate accuracy - serving accuracy must exceed this (and
            always 0, and the noise bar below), in [0, 1].
        min_margin_gain: candidate margin - serving margin must be at least this.
        max_kl: the candidate's KL to the reference must not exceed this.
        min_heldout: fewer held-out records than this cannot judge anything: refused.
        min_score_gain: with a generation check, candidate mean score - serving mean
            score must be at least this.
        noise_z: the accuracy gain must exceed noise_z standard errors of the paired
            per-record difference in correctness. 1.0 (default) asks for a gain larger
            than one standard error: a tie or a win of a record or two on a small
            held-out set is refused. 2.0 is about a one-sided 98% test; 0 turns the noise
            bar off (the gain must still be above 0).
        max_drift: the candidate's KL to the serving adapter (the base model when
            nothing serves), per answer token, estimated on answers the candidate
            samples for held-out prompts, must not exceed this; None: not checked.
            Unlike max_kl (mismatched pairs, clamped at 0), this estimate is unbiased
            and bounds how far one publish moves what users see.
        judge: "answers" (default): the candidate's answers must be judged better
            than the serving side's beyond noise (AnswerScores), and a judge too weak
            to trust refuses; accuracy and margin are then reported, not required.
            "likelihood": the held-out accuracy and margin decide, as before answers
            were judged.
    """

    min_accuracy_gain: float = 0.0
    min_margin_gain: float = 0.0
    max_kl: float = 5.0
    min_heldout: int = 8
    min_score_gain: float = 0.0
    noise_z: float = 1.0
    max_drift: float | None = None
    judge: str = "answers"

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        if self.max_kl <= 0:
            raise ValueError(f"max_kl must be positive, got {self.max_kl}")
        if self.max_drift is not None and not self.max_drift > 0:
            raise ValueError(f"max_drift must be positive, got {self.max_drift}")
        if self.min_heldout < 1:
            raise ValueError(f"min_heldout must be at least 1, got {self.min_heldout}")
        if not 0 <= self.min_accuracy_gain <= 1:
            raise ValueError(
                f"min_accuracy_gain must be in [0, 1], got {self.min_accuracy_gain}: the "
                "candidate must always gain accuracy (a loss cannot be tolerated)"
            )
        if not (math.isfinite(self.noise_z) and self.noise_z >= 0):
            raise ValueError(f"noise_z must be a finite number >= 0, got {self.noise_z}")


@dataclass(frozen=True)
class Check:
    """One comparison the gate made; `noise` is the bar the held-out noise sets
    (noise_z standard errors), for the accuracy check only."""

    name: str
    candidate: float
    serving: float | None
    required: str
    passed: bool
    noise: float | None = None


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
    drift: float | None = None
    answers: AnswerScores | None = None

    def as_dict(self) -> dict:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "serving_name": self.serving_name,
            "drift": self.drift,
            "answers": asdict(self.answers) if self.answers else None,
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
    drift: float | None = None,
    answers: AnswerScores | None = None,
) -> GateDecision:
    """Decide whether `candidate` may replace `serving` (named `serving_name` in the
    reasons: "chat@v3", or "the base model"). Both must be scored on the same held-out
    records, with their per-record `correct` filled in (as heldout_metrics does).
    `drift` is the candidate's sampled KL to `serving` per answer token (checked
    against options.max_drift when both are set). `answers` is the answers check,
    which decides when options.judge is "answers" (none given: refused, unjudged).

    Raises:
        ValueError: the per-record correctness is missing or of different lengths.
    """
    reason = too_few_heldout(candidate.count, options)
    if reason is not None:
        return GateDecision(False, reason, (), candidate, serving, serving_name)
    by_answers = options.judge == "answers"
    if by_answers and (answers is None or not answers.trusted):
        why = answers.reason if answers is not None else "the answers were not judged"
        reason = f"candidate refused: its answers cannot be judged: {why}"
        return GateDecision(False, reason, (), candidate, serving, serving_name, drift, answers)
    accuracy, gain = _beats_on_accuracy(candidate.correct, serving.correct, options)
    margin = _at_least("margin", candidate.margin, serving.margin, options.min_margin_gain)
    checks = [accuracy, margin, *_bounds(candidate, serving, options, generation, drift)]
    if by_answers:
        assert answers is not None
        # Accuracy and margin are reported for people; the answers decide.
        checks = [
            _answers_check(answers),
            replace(accuracy, required=f"reported ({accuracy.required})", passed=True),
            replace(margin, required=f"reported ({margin.required})", passed=True),
            *checks[2:],
        ]
    failed = [c for c in checks if not c.passed]
    if not failed:
        if by_answers:
            assert answers is not None
            reason = (
                f"candidate's answers are judged better than {serving_name}'s: "
                f"{_shares(answers)} over {answers.prompts} held-out prompts, and it passes "
                "every other check"
            )
        else:
            reason = (
                f"candidate beats {serving_name} on held-out accuracy by {gain:.4g}, beyond "
                f"the held-out noise (±{accuracy.noise:.2g}), and is at least as good on "
                "every other check"
            )
        return GateDecision(
            True, reason, tuple(checks), candidate, serving, serving_name, drift, answers
        )
    parts = [_why_failed(c, gain, serving_name, answers) for c in failed]
    reason = "candidate refused: " + "; ".join(parts)
    return GateDecision(
        False, reason, tuple(checks), candidate, serving, serving_name, drift, answers
    )


def _bounds(
    candidate: HeldoutMetrics,
    serving: HeldoutMetrics,
    options: GateOptions,
    generation: GenerationScores | None,
    drift: float | None,
) -> list[Check]:
    """The checks every candidate must pass however it is judged: KL, drift, and the
    generation check's scores when there are any."""
    checks = [
        Check(
            "kl",
            candidate.kl,
            serving.kl,
            f"<= {options.max_kl:g}",
            math.isfinite(candidate.kl) and candidate.kl <= options.max_kl,
        )
    ]
    if options.max_drift is not None and drift is not None:
        checks.append(
            Check(
                "drift",
                drift,
                None,
                f"<= {options.max_drift:g} nats/token",
                math.isfinite(drift) and drift <= options.max_drift,
            )
        )
    if generation is not None:
        checks.append(
            _at_least(
                "generation_score", generation.candidate, generation.serving, options.min_score_gain
            )
        )
    return checks


def _answers_check(answers: AnswerScores) -> Check:
    assert answers.candidate is not None
    return Check(
        "answers",
        answers.candidate,
        answers.serving,
        "liked share > serving's beyond noise (paired, lower bound > 0)",
        answers.better,
    )


def _shares(answers: AnswerScores) -> str:
    return (
        f"liked share {answers.candidate:.1%} against {answers.serving:.1%}, "
        f"{answers.gain:+.1%} [{answers.low:+.1%}, {answers.high:+.1%}]"
    )


def _why_failed(c: Check, gain: float, serving_name: str, answers: AnswerScores | None) -> str:
    """One failed check, in words."""
    if c.name == "answers":
        assert answers is not None
        verdict = "worse" if answers.worse else "no better, within noise,"
        return f"its answers are judged {verdict} than {serving_name}'s: {_shares(answers)}"
    if c.name == "accuracy" and c.noise is not None and abs(gain) <= c.noise + _EPS:
        return (
            f"no better than {serving_name}: accuracy gain {gain:.4g} is within the "
            f"held-out noise (±{c.noise:.2g})"
        )
    if c.name == "drift":
        return (
            f"drift {c.candidate:.4g} nats/token from {serving_name} on its own sampled "
            f"answers (needs {c.required})"
        )
    if c.serving is None or c.name == "kl":
        return f"{c.name} {c.candidate:.4g} (needs {c.required})"
    return (
        f"{c.name} {c.candidate:.4g} against {c.serving:.4g} from {serving_name} "
        f"(needs {c.required})"
    )


def paired_standard_error(candidate: Sequence[bool], serving: Sequence[bool]) -> float:
    """The standard error of the mean per-record difference in correctness,
    candidate - serving (each difference -1, 0 or 1), on the same records: the noise of
    the accuracy gain that comes from which records happened to be held out. Infinite
    with fewer than two records (no spread to estimate).

    Raises:
        ValueError: the two are not per-record results of the same records.
    """
    if len(candidate) != len(serving) or not candidate:
        raise ValueError(
            f"the gate compares per-record correctness on the same held-out records, got "
            f"{len(candidate)} and {len(serving)} records: score both with "
            "pipeline.training.evaluate.heldout_metrics on the same records"
        )
    n = len(candidate)
    if n < 2:
        return math.inf
    diffs = [int(c) - int(s) for c, s in zip(candidate, serving, strict=True)]
    return statistics.stdev(diffs) / math.sqrt(n)


def too_few_heldout(count: int, options: GateOptions) -> str | None:
    """Why `count` held-out records cannot judge a candidate, or None when they can."""
    if count >= options.min_heldout:
        return None
    return (
        f"only {count} held-out records, fewer than gate.min_heldout={options.min_heldout}: "
        "too few to judge. Collect more feedback or raise snapshot.heldout_fraction"
    )


def _beats_on_accuracy(
    candidate: Sequence[bool], serving: Sequence[bool], options: GateOptions
) -> tuple[Check, float]:
    """The accuracy check and the gain: strictly above 0, min_accuracy_gain and the
    noise bar. The gain is counted from the records (exact), not from the rounded
    accuracies."""
    noise = options.noise_z * paired_standard_error(candidate, serving)
    if math.isnan(noise):  # noise_z 0 times an infinite SE: no bar from the noise
        noise = 0.0
    n = len(candidate)
    candidate_accuracy, serving_accuracy = sum(candidate) / n, sum(serving) / n
    gain = candidate_accuracy - serving_accuracy
    bar = max(options.min_accuracy_gain, noise, 0.0)
    check = Check(
        "accuracy",
        candidate_accuracy,
        serving_accuracy,
        f"> serving + {bar:.2g}",
        gain > bar + _EPS,
        noise,
    )
    return check, gain


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
