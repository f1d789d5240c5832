"""Scoring without gradient: summed completion log-probs of (prompt, completion) pairs,
the mean per-token NLL of a set, the share of sampled answers that end their turn, and
how far a policy drifted from a reference on answers it samples.

The reference is frozen, so the trainer scores every pair it will need once, up front,
here; the evaluations score the policy the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.training.encode import Encoded
from pipeline.training.logps import (
    collate_continuations,
    collate_prompts,
    continuation_logps_and_last,
    run_prompts,
)
from pipeline.training.progress import Progress, silent

# Sequences per no-grad forward when scoring the reference up front.
REFERENCE_BATCH = 16
# Answers sampled per held-out prompt when checking that answers end their turn.
END_CHECK_SAMPLES = 2


@contextlib.contextmanager
def reference(model: Any) -> Iterator[None]:
    """Run the reference: the previous adapter if one was loaded, else no adapter."""
    if "reference" in model.peft_config:
        model.set_adapter("reference")
        try:
            yield
        finally:
            model.set_adapter("default")
    else:
        with model.disable_adapter():
            yield


def score_pairs(
    model: Any,
    examples: Sequence[Encoded],
    pairs: Sequence[tuple[int, int]],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: Progress = silent,
    with_last: bool = False,
) -> dict[tuple[int, int], Any]:
    """Summed completion log-probs of (prompt index, completion index) pairs, without
    gradient: each prompt runs once, in batches of prompts of similar length, and all
    its completions follow it; `progress` makes the bar that counts the pairs. With
    `with_last`, each value is (summed log-prob, last token's log-prob)."""
    by_prompt: dict[int, list[int]] = {}
    for i, j in pairs:
        by_prompt.setdefault(i, []).append(j)
    prompts = sorted(by_prompt, key=lambda i: len(examples[i].prompt_ids))
    out: dict[tuple[int, int], float] = {}
    bar = progress(total=len(pairs), initial=0, desc="reference", unit="pair")
    for s in range(0, len(prompts), REFERENCE_BATCH):
        chunk = prompts[s : s + REFERENCE_BATCH]
        batch = collate_prompts([examples[i].prompt_ids for i in chunk], pad_id)
        rows, completions, keys = [], [], []
        for row, i in enumerate(chunk):
            for j in by_prompt[i]:
                rows.append(row)
                completions.append(examples[j].completion_ids)
                keys.append((i, j))
        conts = collate_continuations(batch, rows, completions, pad_id)
        # no_grad, not inference_mode: a sharded model's gathered weights must stay
        # usable by the passes with gradient that follow.
        with torch.no_grad(), autocast_to(device, dtype):
            state = run_prompts(model, batch.to(device))
            sums, last = continuation_logps_and_last(model, state, conts.to(device))
        values = zip(sums.tolist(), last.tolist(), strict=True) if with_last else sums.tolist()
        out.update(zip(keys, values, strict=True))
        bar.update(len(keys))
    bar.close()
    return out


@contextlib.contextmanager
def autocast_to(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def sampled_end_rate(
    model: Any,
    prompts: Sequence[tuple[int, ...]],
    max_new_tokens: int,
    eot: int,
    pad_id: int,
    device: torch.device,
    seed: int,
) -> float:
    """Share of answers sampled (temperature 1) for the prompts that end with the
    end-of-turn token within max_new_tokens. Seeded apart from the training RNG."""
    answers = sampled_answers(model, prompts, max_new_tokens, eot, pad_id, device, seed)
    return sum(a.completion_ids[-1] == eot for a in answers) / len(answers)


def mean_nll(
    model: Any,
    examples: Sequence[Encoded],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> float:
    """Mean per-token negative log-likelihood of the completions."""
    scores = score_pairs(
        model, examples, [(i, i) for i in range(len(examples))], pad_id, device, dtype
    )
    tokens = sum(len(e.completion_ids) for e in examples)
    return -sum(scores.values()) / tokens


@dataclass(frozen=True)
class Drift:
    """How far a policy moved from a reference, measured on the policy's own answers:
    KL(policy || reference) estimated by sampling (temperature 1, no truncation) and
    averaging log pi(y|x) - log ref(y|x). Unbiased per answer; `per_token` divides the
    sum by the tokens sampled, so answers of any length weigh by their length."""

    per_token: float
    per_answer: float
    answers: int
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(vars(self))


def sampled_answers(
    model: Any,
    prompts: Sequence[tuple[int, ...]],
    max_new_tokens: int,
    eot: int,
    pad_id: int,
    device: torch.device,
    seed: int,
    samples: int = END_CHECK_SAMPLES,
) -> list[Encoded]:
    """`samples` answers per prompt, sampled from `model` as it is (temperature 1, no
    top-k or top-p), each cut after its end-of-turn token; seeded apart from the
    training RNG."""
    batch = collate_prompts(prompts, pad_id)
    devices = [device] if device.type == "cuda" else []
    # Ranks of a sharded model must run the same number of forwards: each keeps going
    # (synced) until every rank's answers have ended.
    synced = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
            eos_token_id=eot,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced,
        )
    answers = []
    for row, tokens in enumerate(out[:, batch.input_ids.shape[1] :].tolist()):
        end = tokens.index(eot) + 1 if eot in tokens else len(tokens)
        if end:
            answers.append(Encoded(tuple(prompts[row // samples]), tuple(tokens[:end]), True))
    return answers


def sampled_drift(
    answers: Sequence[Encoded],
    policy_logps: dict[tuple[int, int], float],
    reference_logps: dict[tuple[int, int], float],
) -> Drift:
    """The drift estimate from answers sampled from the policy and each one's summed
    log-prob under the policy and under the reference (score_pairs over (i, i))."""
    if not answers:
        return Drift(float("nan"), float("nan"), 0, 0)
    diffs = [policy_logps[(i, i)] - reference_logps[(i, i)] for i in range(len(answers))]
    tokens = sum(len(a.completion_ids) for a in answers)
    return Drift(sum(diffs) / tokens, sum(diffs) / len(answers), len(answers), tokens)
