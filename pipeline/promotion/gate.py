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

The flow measures (models, servers) and this module decides. `judge` takes what was
measured (`Measurements`) and the `[gate]` options: first the refusals that leave
nothing to compare (too few held-out records, answers that cannot be judged), then
each function of `CHECKS`, in the order the run record lists them. A check is one
function of (measurements, options) that returns a `Check`, with the sentence that says
why it failed, or None when it does not apply; a new one is added to CHECKS.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

if TYPE_CHECKING:
    # For annotations only: the gate's rules need no torch, and the config reads them.
    from pipeline.training.evaluate import HeldoutMetrics

# Accuracy is a ratio of counts; differences below this are float noise, not a loss.
_EPS = 1e-9
# What decides: the answers each side samples for held-out prompts, judged (a taste
# model learnt from the votes); or the held-out votes' implied-reward accuracy.
Judge = Literal["answers", "likelihood"]
JUDGES: tuple[str, ...] = get_args(Judge)
# max_drift's default, nats per answer token. Measured on the demo model: its whole
# learned change is 0.12 from the base model; in bench.nights a night's candidate moved
# 0.03-1.04 from the served adapter, and one following a reversed taste 0.69; so one
# night may follow a reversal, not jump further (docs/cycle.md: the gate's drift check).
DEFAULT_MAX_DRIFT = 1.0


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class GateOptions:
    """What a candidate must show to be promoted, and what the gate samples to see
    it: the `[gate]` configuration section (bounds checked whenever one is built)."""

    judge: Annotated[
        Judge,
        Field(
            description="answers: the candidate's answers to held-out prompts, judged by a "
            "taste model learnt from the votes, must beat the serving side's beyond noise "
            "(a taste model too weak to trust refuses; accuracy and margin are then "
            "reported, not required); likelihood: held-out accuracy and margin decide"
        ),
    ] = "answers"
    min_accuracy_gain: Annotated[
        float,
        Field(
            description="candidate - serving implied-reward accuracy must exceed this (and "
            "0, and the held-out noise bar), in [0, 1]"
        ),
    ] = 0.0
    noise_z: Annotated[
        float,
        Field(
            ge=0,
            allow_inf_nan=False,
            description="the accuracy gain must exceed this many standard errors of the "
            "paired per-record difference in correctness: 1 refuses a tie or a win of a "
            "record or two on a small held-out set, 2 is about a one-sided 98% test, 0 "
            "turns the bar off (the gain must still be above 0)",
        ),
    ] = 1.0
    min_margin_gain: Annotated[
        float,
        Field(description="candidate - serving reward margin, at least (negative: a loss)"),
    ] = 0.0
    max_kl: Annotated[
        float,
        Field(
            gt=0,
            description="the candidate's KL to the base model, at most (not on a continual "
            "night: its KL to the base grows by design, and its drift bounds it)",
        ),
    ] = 5.0
    min_heldout: Annotated[
        int,
        Field(
            ge=1,
            description="fewer held-out records cannot judge: refused; a continual night "
            "with fewer new ones is judged on every held-out vote",
        ),
    ] = 8
    max_drift: Annotated[
        float | None,
        Field(
            gt=0,
            description="the candidate's KL to the serving adapter (the base model when "
            "nothing serves) per answer token, on answers it samples for held-out prompts, "
            "at most; unlike max_kl (mismatched pairs, clamped at 0) this estimate is "
            "unbiased and bounds how far one publish moves what users see; a very large value "
            "effectively turns the check off",
        ),
    ] = DEFAULT_MAX_DRIFT
    drift_prompts: Annotated[
        int, Field(ge=1, description="held-out prompts the drift is sampled on")
    ] = 16
    drift_max_tokens: Annotated[
        int, Field(ge=1, description="longest answer sampled for the drift")
    ] = 64
    scorer: Annotated[
        str | None,
        Field(
            description='"module:function" scoring (prompt, answer) -> float; enables the '
            "generation check through vLLM"
        ),
    ] = None
    generation_prompts: Annotated[
        int, Field(ge=1, description="held-out prompts the generation check asks")
    ] = 16
    generation_max_tokens: Annotated[
        int, Field(ge=1, description="longest answer the generation check asks for")
    ] = 64
    min_score_gain: Annotated[
        float,
        Field(description="candidate - serving mean score of the generation check, at least"),
    ] = 0.0

    @field_validator("min_accuracy_gain")
    @classmethod
    def _a_gain(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(
                f"must be in [0, 1], got {value}: the candidate must always gain accuracy "
                "(a loss cannot be tolerated)"
            )
        return value

    @field_validator("scorer")
    @classmethod
    def _module_function(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError(
                f'scorer must be "module:function", got {value!r}, e.g. '
                '"my_team.scoring:politeness"'
            )
        return value

    @property
    def measures_drift(self) -> bool:
        """The candidate's drift from what serves must be measured."""
        return self.max_drift is not None

    @property
    def measures_answers(self) -> bool:
        """Each side's answers to held-out prompts must be sampled and judged."""
        return self.judge == "answers"


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
class GenerationScores:
    """Mean scorer value of answers from each adapter to the same prompts."""

    candidate: float
    serving: float
    prompts: int

    @classmethod
    def of(cls, candidate: Sequence[float], serving: Sequence[float]) -> GenerationScores:
        """The means of each side's scores of its answers to the same prompts (nan when
        there were none)."""
        if len(candidate) != len(serving):
            raise ValueError(
                f"the generation check scores both sides on the same prompts, got "
                f"{len(candidate)} and {len(serving)} scores"
            )
        n = len(candidate)
        if n == 0:
            return cls(math.nan, math.nan, 0)
        return cls(sum(candidate) / n, sum(serving) / n, n)


@dataclass(frozen=True)
class Measurements:
    """What the flow measured of a candidate and of the side serving now.

    Attributes:
        serving_name: the serving side in reasons: "chat@v3", or "the base model".
        heldout: held-out records the gate was given.
        candidate, serving: each side's held-out metrics, on the same records with
            their per-record `correct` filled in (as heldout_metrics does); None when
            too few records left nothing worth scoring.
        continual: the candidate continues the served adapter, which is its reference.
        drift: the candidate's sampled KL to the serving side, per answer token.
        answers: each side's answers to held-out prompts, judged.
        generation: the generation check's scores, once it has run.
    """

    serving_name: str
    heldout: int
    candidate: HeldoutMetrics | None = None
    serving: HeldoutMetrics | None = None
    continual: bool = False
    drift: float | None = None
    answers: AnswerScores | None = None
    generation: GenerationScores | None = None


@dataclass(frozen=True)
class Check:
    """One comparison the gate made; `noise` is the bar the held-out noise sets
    (noise_z standard errors), for the accuracy check only; `failure` says, for
    people, why it did not pass (not part of the record: the reason holds it)."""

    name: str
    candidate: float
    serving: float | None
    required: str
    passed: bool
    noise: float | None = None
    failure: str = field(default="", compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["failure"]
        return out


@dataclass(frozen=True)
class GateDecision:
    """The verdict, every check behind it and what they compared; `reason` is one
    sentence for people. `generation_due`: the candidate passed every check, and the
    generation check is still to run (judge again with its scores)."""

    promote: bool
    reason: str
    checks: tuple[Check, ...]
    measured: Measurements
    generation_due: bool = False

    def as_dict(self) -> dict:
        m = self.measured
        return {
            "promote": self.promote,
            "reason": self.reason,
            "serving_name": m.serving_name,
            "drift": m.drift,
            "answers": asdict(m.answers) if m.answers else None,
            "checks": [c.as_dict() for c in self.checks],
            "candidate": m.candidate.as_dict() if m.candidate else None,
            "serving": m.serving.as_dict() if m.serving else None,
        }


# ---------------------------------------------------------------- the verdict


def judge(measured: Measurements, options: GateOptions) -> GateDecision:
    """Decide whether the candidate may replace the serving side: refused outright when
    nothing can be compared (REFUSALS), otherwise by every applicable check of CHECKS.
    With a scorer configured and no generation scores yet, a candidate that passes is
    `generation_due`: judge again once the generation check has run.

    Raises:
        ValueError: held-out metrics missing, or their per-record correctness missing
            or of different lengths.
    """
    for refusal in REFUSALS:
        reason = refusal(measured, options)
        if reason is not None:
            return GateDecision(False, reason, (), measured)
    if measured.candidate is None or measured.serving is None:
        raise ValueError(
            "the gate compares both sides' held-out metrics: score the candidate and the "
            "serving side with pipeline.training.evaluate.heldout_metrics"
        )
    checks = tuple(c for rule in CHECKS if (c := rule(measured, options)) is not None)
    failed = [c for c in checks if not c.passed]
    if failed:
        reason = "candidate refused: " + "; ".join(c.failure for c in failed)
        return GateDecision(False, reason, checks, measured)
    due = options.scorer is not None and measured.generation is None
    return GateDecision(True, _why_promoted(measured, options, checks), checks, measured, due)


def _why_promoted(measured: Measurements, options: GateOptions, checks: Sequence[Check]) -> str:
    name = measured.serving_name
    if options.judge == "answers":
        answers = measured.answers
        assert answers is not None  # a refusal otherwise
        return (
            f"candidate's answers are judged better than {name}'s: {_shares(answers)} over "
            f"{answers.prompts} held-out prompts, and it passes every other check"
        )
    accuracy = next(c for c in checks if c.name == "accuracy")
    assert accuracy.serving is not None and accuracy.noise is not None
    return (
        f"candidate beats {name} on held-out accuracy by "
        f"{accuracy.candidate - accuracy.serving:.4g}, beyond the held-out noise "
        f"(±{accuracy.noise:.2g}), and is at least as good on every other check"
    )


# ---------------------------------------------------------------- refusals


def too_few_heldout(count: int, options: GateOptions) -> str | None:
    """Why `count` held-out records cannot judge a candidate, or None when they can (a
    flow need not measure anything when they cannot)."""
    if count >= options.min_heldout:
        return None
    return (
        f"only {count} held-out records, fewer than [gate] min_heldout={options.min_heldout}: "
        "too few to judge. Collect more feedback or raise [snapshot] heldout_fraction"
    )


def _enough_heldout(measured: Measurements, options: GateOptions) -> str | None:
    return too_few_heldout(measured.heldout, options)


def _answers_judgeable(measured: Measurements, options: GateOptions) -> str | None:
    """Judging by answers, a judge too weak to trust refuses rather than guesses."""
    answers = measured.answers
    if options.judge != "answers" or (answers is not None and answers.trusted):
        return None
    why = answers.reason if answers is not None else "the answers were not judged"
    return f"candidate refused: its answers cannot be judged: {why}"


REFUSALS: tuple[Callable[[Measurements, GateOptions], str | None], ...] = (
    _enough_heldout,
    _answers_judgeable,
)


# ---------------------------------------------------------------- checks


def answers_check(m: Measurements, options: GateOptions) -> Check | None:
    """Judging by answers: the candidate's judged liked share beats the serving side's
    beyond noise (the paired lower bound is above 0)."""
    if options.judge != "answers":
        return None
    a = m.answers
    assert a is not None and a.candidate is not None  # _answers_judgeable refused otherwise
    verdict = "worse" if a.worse else "no better, within noise,"
    return Check(
        "answers",
        a.candidate,
        a.serving,
        "liked share > serving's beyond noise (paired, lower bound > 0)",
        a.better,
        failure=f"its answers are judged {verdict} than {m.serving_name}'s: {_shares(a)}",
    )


def accuracy_check(m: Measurements, options: GateOptions) -> Check:
    """Held-out accuracy gained strictly above 0, min_accuracy_gain and the noise bar.
    The gain is counted from the records (exact), not from the rounded accuracies."""
    assert m.candidate is not None and m.serving is not None
    candidate, serving = m.candidate.correct, m.serving.correct
    noise = options.noise_z * paired_standard_error(candidate, serving)
    if math.isnan(noise):  # noise_z 0 times an infinite SE: no bar from the noise
        noise = 0.0
    n = len(candidate)
    candidate_accuracy, serving_accuracy = sum(candidate) / n, sum(serving) / n
    gain = candidate_accuracy - serving_accuracy
    bar = max(options.min_accuracy_gain, noise, 0.0)
    required = f"> serving + {bar:.2g}"
    if abs(gain) <= noise + _EPS:
        failure = (
            f"no better than {m.serving_name}: accuracy gain {gain:.4g} is within the "
            f"held-out noise (±{noise:.2g})"
        )
    else:
        failure = _versus("accuracy", candidate_accuracy, serving_accuracy, required, m)
    check = Check(
        "accuracy",
        candidate_accuracy,
        serving_accuracy,
        required,
        gain > bar + _EPS,
        noise,
        failure,
    )
    return _reported_when_judged_by_answers(check, options)


def margin_check(m: Measurements, options: GateOptions) -> Check:
    """The reward margin at least the serving side's plus min_margin_gain."""
    assert m.candidate is not None and m.serving is not None
    check = _at_least("margin", m.candidate.margin, m.serving.margin, options.min_margin_gain, m)
    return _reported_when_judged_by_answers(check, options)


def kl_check(m: Measurements, options: GateOptions) -> Check:
    """The KL to the base model at most max_kl. A continual candidate's KL to the base
    grows night after night by design: what bounds a night is its drift from the
    served adapter, so its KL need only be finite."""
    assert m.candidate is not None and m.serving is not None
    kl = m.candidate.kl
    if m.continual:
        required, passed = "finite (continual: the drift bounds it)", math.isfinite(kl)
    else:
        required, passed = f"<= {options.max_kl:g}", math.isfinite(kl) and kl <= options.max_kl
    return Check(
        "kl", kl, m.serving.kl, required, passed, failure=f"kl {kl:.4g} (needs {required})"
    )


def drift_check(m: Measurements, options: GateOptions) -> Check | None:
    """The candidate's sampled drift from the serving side at most max_drift, when both
    the limit and the measurement are there."""
    if options.max_drift is None or m.drift is None:
        return None
    required = f"<= {options.max_drift:g} nats/token"
    return Check(
        "drift",
        m.drift,
        None,
        required,
        math.isfinite(m.drift) and m.drift <= options.max_drift,
        failure=f"drift {m.drift:.4g} nats/token from {m.serving_name} on its own sampled "
        f"answers (needs {required})",
    )


def generation_score_check(m: Measurements, options: GateOptions) -> Check | None:
    """The generation check's mean score at least the serving side's plus
    min_score_gain, once it has run."""
    g = m.generation
    if g is None:
        return None
    if g.prompts == 0:
        return Check(
            "generation_score",
            g.candidate,
            g.serving,
            "a text prompt to ask",
            False,
            failure="the generation check found no held-out prompt with text to ask",
        )
    return _at_least("generation_score", g.candidate, g.serving, options.min_score_gain, m)


# The checks in the order the record lists them.
CHECKS: tuple[Callable[[Measurements, GateOptions], Check | None], ...] = (
    answers_check,
    accuracy_check,
    margin_check,
    kl_check,
    drift_check,
    generation_score_check,
)


# ---------------------------------------------------------------- policy


def judged_on_new_heldout(new_heldout: int, options: GateOptions) -> bool:
    """Whether a continual night is judged on the held-out votes cast since the last
    judged run alone: only when they are enough to judge; otherwise on every held-out
    vote, as a retrain is."""
    return new_heldout >= options.min_heldout


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


# ---------------------------------------------------------------- helpers


def _reported_when_judged_by_answers(check: Check, options: GateOptions) -> Check:
    """Judging by answers, the held-out votes' numbers are reported for people; the
    answers decide."""
    if options.judge != "answers":
        return check
    return replace(check, required=f"reported ({check.required})", passed=True)


def _at_least(name: str, candidate: float, serving: float, gain: float, m: Measurements) -> Check:
    if not math.isfinite(candidate) and not math.isfinite(serving):
        # e.g. the margin of a held-out set with one class: nothing to compare.
        return Check(name, candidate, serving, "n/a", True)
    required = serving + gain
    passed = math.isfinite(candidate) and (
        not math.isfinite(required) or candidate >= required - _EPS
    )
    sign = "+" if gain >= 0 else "-"
    needs = f">= serving {sign} {abs(gain):g}"
    return Check(
        name, candidate, serving, needs, passed, failure=_versus(name, candidate, serving, needs, m)
    )


def _versus(name: str, candidate: float, serving: float, required: str, m: Measurements) -> str:
    return f"{name} {candidate:.4g} against {serving:.4g} from {m.serving_name} (needs {required})"


def _shares(answers: AnswerScores) -> str:
    return (
        f"liked share {answers.candidate:.1%} against {answers.serving:.1%}, "
        f"{answers.gain:+.1%} [{answers.low:+.1%}, {answers.high:+.1%}]"
    )
