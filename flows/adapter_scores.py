"""The gate's held-out scores: the base model loaded once, each adapter attached to it
in turn and scored against the base; and how far the candidate drifted from what
serves, on answers it samples."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.training.models import attach_adapter, check_model_dir, load_base, load_tokenizer
from flows.training import runtime_for
from pipeline.feedback.examples import Example
from pipeline.promotion.compare import HeldoutComparison
from pipeline.promotion.gate import AnswerScores
from pipeline.promotion.sampling import drift_prompts
from pipeline.training.answer_check import AnswerCheck
from pipeline.training.encode import encode_records, end_of_turn_id
from pipeline.training.evaluate import HeldoutMetrics
from pipeline.training.options import TrainOptions
from pipeline.training.scoring import Drift, sampled_answers, sampled_drift, score_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftRequest:
    """Sample `prompts` held-out prompts' answers (up to `max_tokens`) from the adapter
    named `policy` and measure its KL to the one named `reference` (None: the base)."""

    policy: str
    reference: str | None
    prompts: int = 16
    max_tokens: int = 64
    seed: int = 0


@dataclass(frozen=True)
class AnswerRequest:
    """Compare the answers of the adapter named "candidate" with those of "serving"
    (the base when none) for the held-out prompts, judged by a taste model fit on
    `train` and trusted on the held-out votes (pipeline/training/answer_check.py)."""

    train: Sequence[Example]


@dataclass(frozen=True)
class GateScores:
    metrics: dict[str, HeldoutMetrics]
    drift: Drift | None = None
    answers: AnswerScores | None = None


def score_adapters(
    base_model: Path,
    adapters: Mapping[str, Path | None],
    heldout: Sequence[Example],
    options: TrainOptions,
    chat_template: str | None = None,
    drift: DriftRequest | None = None,
    answers: AnswerRequest | None = None,
) -> GateScores:
    """Held-out metrics of each named adapter (None = the base model itself), and with
    `drift`, the drift of one of them from another (or from the base).

    Args:
        base_model: the model every adapter was trained on.
        adapters: name -> adapter directory, or None for the base model.
        heldout: the examples to score, as in a snapshot's held-out split.
        options: beta, lengths, prompt format, batch size (the KL batches), device.

    Raises:
        TrainError: no held-out records, or a model or adapter that cannot be loaded.
    """
    check_model_dir(base_model)
    runtime = runtime_for(options)
    tokenizer = load_tokenizer(base_model, chat_template)
    base = load_base(base_model, runtime.weights_dtype).to(runtime.device)
    comparison = HeldoutComparison(base, tokenizer, heldout, options, runtime)
    out: dict[str, HeldoutMetrics] = {}
    model = base
    for name, path in adapters.items():
        if path is None:
            out[name] = comparison.reference_metrics()
            continue
        model = attach_adapter(model, name, path)
        out[name] = comparison.metrics(model.get_base_model())
        log.info(
            "%s: held-out accuracy %.3f, margin %.4f, KL %.4f",
            name,
            out[name].accuracy,
            out[name].margin,
            out[name].kl,
        )
    judged = None
    if answers is not None:
        serving = "serving" if adapters.get("serving") is not None else None
        judged = _answers(model, tokenizer, comparison, options, answers, serving)
        log.info("answers check: %s", judged.reason)
    if drift is None:
        return GateScores(out, None, judged)
    measured = _drift(model, tokenizer, comparison, options, drift)
    log.info(
        "%s drifted %.4f nats/token (%.3f per answer) from %s on %d sampled answers",
        drift.policy,
        measured.per_token,
        measured.per_answer,
        drift.reference or "the base model",
        measured.answers,
    )
    return GateScores(out, measured, judged)


def _answers(
    model: Any,
    tokenizer: Any,
    comparison: HeldoutComparison,
    options: TrainOptions,
    req: AnswerRequest,
    serving: str | None,
) -> AnswerScores:
    """The candidate's answers against the serving side's, judged (see AnswerRequest).
    The taste model reads the base model (no adapter), whichever side answers."""
    rt = comparison.runtime
    train = encode_records(list(req.train), tokenizer, options.lengths(), options.prompt_format)
    check = AnswerCheck(
        model,
        train[0] if req.train else [],
        comparison.examples,
        options,
        tokenizer.pad_token_id,
        end_of_turn_id(tokenizer),
        rt,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        baseline=lambda: _active(model, serving),
    )
    if not check.trusted:
        return AnswerScores(False, check.reason)
    with _active(model, "candidate"):
        verdict = check.confirm()
    assert verdict is not None
    return AnswerScores(
        True,
        f"{check.reason}; {verdict.sentence()}",
        verdict.share,
        verdict.reference_share,
        verdict.gain,
        verdict.low,
        verdict.high,
        verdict.prompts,
        verdict.better,
        verdict.worse,
    )


def _drift(
    model: Any,
    tokenizer: Any,
    comparison: HeldoutComparison,
    options: TrainOptions,
    req: DriftRequest,
) -> Drift:
    """Sample answers with `req.policy` active, score them under it and under the
    reference."""
    rt = comparison.runtime
    prompt_ids = [e.prompt_ids for e in comparison.examples]
    prompts, tokens = drift_prompts(prompt_ids, req.prompts, options.max_length, req.max_tokens)
    if not prompts:
        return Drift(float("nan"), float("nan"), 0, 0)
    pad, eot = tokenizer.pad_token_id, end_of_turn_id(tokenizer)
    lm = model.get_base_model()  # the causal LM, its LoRA layers set by `model`
    lm.eval()
    with _active(model, req.policy):
        answers = sampled_answers(lm, prompts, tokens, eot, pad, rt.device, req.seed)
        pairs = [(i, i) for i in range(len(answers))]
        policy = score_pairs(lm, answers, pairs, pad, rt.device, rt.autocast)
    with _active(model, req.reference):
        reference = score_pairs(lm, answers, pairs, pad, rt.device, rt.autocast)
    return sampled_drift(answers, policy, reference)


@contextlib.contextmanager
def _active(model: Any, adapter: str | None) -> Iterator[None]:
    """The named adapter active, or none at all (the base model)."""
    if adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield
