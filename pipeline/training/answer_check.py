"""Judge the adapter as it is now by what it answers: answers sampled for held-out
prompts, each given the probability that a user would like it by a judge, compared
prompt by prompt with the reference's answers to the same prompts.

The judge is a taste model fit on the run's training votes (pipeline/training/judge.py), trusted
only when it ranks the held-out votes well enough; or a judge the user supplies. The
reference's answers are sampled and judged once, at setup; each evaluation samples the
policy with the same seed, so two evaluations of the same weights agree, and the
comparison is paired (judge.compare).

Selecting the best of several evaluated steps on one set of samples favours the step
whose samples happened to please the judge most; so the step finally kept is judged
again on fresh samples (`confirm`), and kept only if that second look still finds it
better than the reference.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.training.encode import Encoded
from pipeline.training.judge import (
    Comparison,
    Featurizer,
    Judge,
    TrustOptions,
    by_prompt,
    compare,
    fit_taste_judge,
    judge_items,
)
from pipeline.training.options import TrainOptions
from pipeline.training.runtime import Runtime
from pipeline.training.scoring import reference, sampled_answers

# The training votes a taste model is fit on, at most (a seeded choice beyond that).
MAX_TASTE_VOTES = 4000
# Seeds of the answer samples, apart from the training RNG's: selection, confirmation.
SELECT_SEED, CONFIRM_SEED = 7_919, 104_729


@dataclass(frozen=True)
class Verdict:
    """The judge's view of one evaluated adapter against the reference."""

    share: float
    reference_share: float
    gain: float
    low: float
    high: float
    prompts: int
    answers: int
    better: bool
    worse: bool

    @classmethod
    def of(cls, c: Comparison) -> Verdict:
        return cls(
            c.candidate.share,
            c.serving.share,
            c.difference,
            c.low,
            c.high,
            c.prompts,
            c.candidate.answers,
            c.better,
            c.worse,
        )

    def as_row(self) -> dict[str, float]:
        return {
            "judge_share": self.share,
            "judge_gain": self.gain,
            "judge_low": self.low,
            "judge_high": self.high,
        }

    def sentence(self) -> str:
        verdict = "better" if self.better else "worse" if self.worse else "no clear difference"
        return (
            f"the judge estimates a liked share of {self.share:.1%} against the reference's "
            f"{self.reference_share:.1%}: {self.gain:+.1%} [{self.low:+.1%}, {self.high:+.1%}] "
            f"over {self.prompts} held-out prompts ({verdict})"
        )


class AnswerCheck:
    """Samples, judges and compares; built once per run, before the first step.

    Args:
        model: the peft model being trained (its reference: the adapter disabled, or
            the "reference" adapter of a continual round).
        train, heldout: the encoded votes; the taste model is fit on `train` and
            trusted on `heldout`; the prompts sampled are the held-out ones.
        judge: a user's judge; None fits a taste model.
        decode: token ids -> text, for judges that read text.
        baseline: activates what the adapter is compared against (default: the
            reference); the gate compares with the serving adapter.
    """

    def __init__(
        self,
        model: Any,
        train: Sequence[Encoded],
        heldout: Sequence[Encoded],
        options: TrainOptions,
        pad_id: int,
        eot: int,
        runtime: Runtime,
        judge: Judge | None = None,
        decode: Any = None,
        baseline: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        started, self.seconds = time.perf_counter(), 0.0
        self.model, self.options, self.pad_id, self.eot = model, options, pad_id, eot
        # Text judges read the answers' text; a taste model reads only the tokens.
        self.runtime, self.decode = runtime, decode or (lambda ids: "")
        # Votes as serving generates answers: ended by the end-of-turn token, nothing
        # after it (a template may render more, see encode.py's completion_tokens).
        train = [_as_served(e, eot) for e in train]
        heldout = [_as_served(e, eot) for e in heldout]
        # The held-out prompts first, then training prompts up to judge_prompts: a
        # held-out split of a few conversations alone gives too few prompts to tell a
        # gain from luck (each prompt's answers count as one observation). Answers to a
        # training prompt are sampled afresh, so they show what the policy now says to
        # what users asked, which is what the next users will mostly ask again.
        self.heldout_prompts = list(dict.fromkeys(e.prompt_ids for e in heldout))
        pool = self.heldout_prompts + [e.prompt_ids for e in train]
        self.prompts = list(dict.fromkeys(pool))[: options.judge_prompts]
        self.samples = max(2, -(-options.judge_answers // max(1, len(self.prompts))))
        longest = max((len(e.completion_ids) for e in [*heldout, *train]), default=1)
        room = options.max_length - max((len(p) for p in self.prompts), default=0)
        self.max_new_tokens = max(1, min(2 * longest, room))
        self.trusted, self.reason, self.auc, self.auc_se = True, "a judge of the user's", None, None
        if judge is None:
            taste = fit_taste_judge(
                Featurizer(model, pad_id, runtime.device, runtime.autocast),
                _subsample(train, options.seed),
                heldout,
                TrustOptions(min_auc=options.judge_min_auc),
            )
            judge = taste
            self.trusted, self.reason = taste.trusted, taste.reason
            self.auc, self.auc_se = taste.heldout_auc, taste.heldout_se
        if len(self.prompts) < 2 and self.trusted:
            self.trusted = False
            self.reason = (
                f"{len(self.prompts)} held-out prompt(s) to sample answers for: too few to "
                "compare; refusing to judge by answers"
            )
        self.judge = judge
        self.reference_probs: dict[int, dict] = {}
        if self.trusted:
            with (baseline or (lambda: reference(model)))():
                for seed in (SELECT_SEED, CONFIRM_SEED):
                    self.reference_probs[seed] = self._judged(seed)
        # What judging costs: the taste model, then every round of sampling and scoring.
        self.seconds = time.perf_counter() - started

    def evaluate(self, seed: int = SELECT_SEED) -> Verdict | None:
        """The adapter as it is now against the reference, or None when not judging."""
        if not self.trusted:
            return None
        return Verdict.of(compare(self._judged(seed), self.reference_probs[seed], self.z))

    def confirm(self) -> Verdict | None:
        """A second look on fresh samples (see the module docstring)."""
        return self.evaluate(CONFIRM_SEED)

    @property
    def z(self) -> float:
        return self.options.judge_z

    def record(self) -> dict[str, Any]:
        """What the manifest says of the judge."""
        return {
            "trusted": self.trusted,
            "reason": self.reason,
            "heldout_auc": self.auc,
            "heldout_auc_se": self.auc_se,
            "prompts": len(self.prompts),
            "heldout_prompts": min(len(self.heldout_prompts), len(self.prompts)),
            "samples_per_prompt": self.samples,
            "z": self.z,
            "seconds": round(self.seconds, 3),
        }

    def _judged(self, seed: int) -> dict:
        """The model's answers to the prompts (as it is now), judged, by prompt."""
        started = time.perf_counter()
        try:
            return self._sample_and_judge(seed)
        finally:
            self.seconds += time.perf_counter() - started

    def _sample_and_judge(self, seed: int) -> dict:
        was_training = self.model.training
        self.model.eval()
        try:
            answers = sampled_answers(
                self.model,
                self.prompts,
                self.max_new_tokens,
                self.eot,
                self.pad_id,
                self.runtime.device,
                seed,
                samples=self.samples,
            )
        finally:
            self.model.train(was_training)
        items = judge_items(answers, self.decode)
        probs = self.judge.probabilities(items) if items else []
        grouped = by_prompt([a.prompt_ids for a in answers], probs)
        # A prompt whose every sample came back empty still counts: as disliked answers.
        return {p: grouped.get(p, [0.0]) for p in self.prompts}


def _as_served(e: Encoded, eot: int) -> Encoded:
    if eot in e.completion_ids:
        end = e.completion_ids.index(eot) + 1
        if end < len(e.completion_ids):
            return Encoded(e.prompt_ids, e.completion_ids[:end], e.desirable, e.weight)
    return e


def _subsample(train: Sequence[Encoded], seed: int) -> list[Encoded]:
    if len(train) <= MAX_TASTE_VOTES:
        return list(train)
    return random.Random(seed).sample(list(train), MAX_TASTE_VOTES)


def verdict_dict(verdict: Verdict | None) -> dict[str, Any] | None:
    return asdict(verdict) if verdict is not None else None
