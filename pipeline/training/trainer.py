"""Train a LoRA adapter with the KTO loss: one explicit loop.

Setup: encode the examples as serving renders them, plan every batch of the run up
front, and score the reference once: it is frozen, so the log-probs of every matched
and mismatched pair the plan will use are computed before the first step, in
length-sorted batches without gradient. Each step then needs one policy forward with
gradient on the matched pairs and one without on the mismatched pairs; the reference
is the same weights with the adapter disabled (no second copy), or a previous adapter
for continual rounds.

The trainer is handed a loaded model, where it runs (`Runtime`) and where its results
go (a `RunStore`); it touches no path, environment variable or terminal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.feedback.examples import Example
from pipeline.training.answer_check import AnswerCheck, Verdict, verdict_dict
from pipeline.training.batching import Plan, lr_factor, normalised_weights, plan_batches
from pipeline.training.diagnostics import Diagnostics, aggregate
from pipeline.training.encode import Encoded, EncodeReport, encode_records, end_of_turn_id
from pipeline.training.errors import (
    CheckpointMismatch,
    DivergedError,
    GeneralAbilityError,
    TrainError,
)
from pipeline.training.guards import (
    EarlyStopping,
    EndOfTurnGuard,
    GeneralNllGuard,
    GeneralOnly,
    improves,
    selection_score,
)
from pipeline.training.heldout import Evaluator
from pipeline.training.judge import Judge
from pipeline.training.kto import kto_loss, mismatched_kl
from pipeline.training.logps import (
    collate,
    collate_continuations,
    collate_prompts,
    continuation_logps,
    run_prompts_with_completions,
    sequence_logps,
    token_logps,
)
from pipeline.training.manifest import (
    NO_GAIN,
    UNJUDGED,
    Manifest,
    Provenance,
    RunMetrics,
    run_status,
)
from pipeline.training.options import TrainOptions
from pipeline.training.progress import Progress, silent
from pipeline.training.runtime import Runtime
from pipeline.training.scoring import autocast_to, reference, score_pairs
from pipeline.training.sharding import (
    from_full_state,
    full_optimizer_state,
    full_state,
    is_sharded,
    load_full_optimizer_state,
    load_local_state,
    local_state,
    total_norm,
)

log = logging.getLogger(__name__)

# What a resume point holds changes with the trainer's state: one of another format is
# refused as a checkpoint of another run.
CHECKPOINT_FORMAT = 4
# What to do when the taste model is too weak to judge answers by (after its reason).
_UNJUDGED_ADVICE = (
    "the last step is kept, unjudged, and the gate will not offer it: collect more votes "
    "(likes and dislikes, on more prompts), or set [train] selection to a held-out signal "
    "such as heldout_loss"
)


@dataclass(frozen=True)
class TrainData:
    """What to train on: the examples, the held-out ones the steps are judged by, a
    general set whose NLL is watched, and the class weights chosen for the data."""

    train: Sequence[Example]
    heldout: Sequence[Example] = ()
    general: Sequence[Example] = ()
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    balance_explanation: str = ""


@dataclass(frozen=True)
class TrainResult:
    """The outcome. `manifest` is None when the run paused (stop_after_steps) and left
    a resume point at `step` of `planned_steps`; `adapter_dir` is set by the caller
    that knows where the run store wrote."""

    manifest: Manifest | None
    step: int
    planned_steps: int
    adapter_dir: Path | None = None


class RunStore(Protocol):
    """Where a run's results go: metrics rows, the resume point, and at the end the
    adapter, its plots and the manifest (written last)."""

    def prepare(self) -> None:
        """Refuse a store that holds a finished run, or (unless resuming) a
        checkpoint."""

    def load_checkpoint(self, device: torch.device) -> dict[str, Any] | None:
        """The saved resume point, or None when not resuming or there is none."""

    def save_checkpoint(self, payload: dict[str, Any]) -> None: ...

    def start_metrics(self, after_step: int) -> None:
        """Keep the metrics rows up to `after_step` (none for a fresh run)."""

    def append_metrics(self, row: dict[str, Any]) -> None: ...

    def finish(self, model: Any, manifest: Manifest, weights: dict[str, torch.Tensor]) -> Manifest:
        """Write the adapter (`weights`: the whole trainable weights by parameter name),
        the plots and then the manifest (returned with its plots); drop the resume
        point."""


@dataclass(frozen=True)
class _Examples:
    train: list[Encoded]
    heldout: list[Encoded]
    general: list[Encoded]
    report: EncodeReport
    counts: dict[str, int]


@dataclass(frozen=True)
class _Step:
    """What every micro-step reads: the examples, the reference's scores of the pairs
    the plan uses, the options, the class weights and where to run."""

    examples: Sequence[Encoded]
    ref: dict[tuple[int, int], float]
    options: TrainOptions
    lambdas: tuple[float, float]
    pad_id: int
    runtime: Runtime


@dataclass
class _State:
    """What a checkpoint holds besides weights and optimizer: where the run is."""

    step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    start_weights: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False
    stop_reason: str | None = None
    heldout_before: dict[str, float] | None = None
    early: EarlyStopping = field(default_factory=lambda: EarlyStopping(0, "final"))
    diagnostics: Diagnostics = field(default_factory=Diagnostics)


def train(
    model: Any,
    tokenizer: Any,
    data: TrainData,
    options: TrainOptions,
    run: RunStore,
    runtime: Runtime,
    provenance: Provenance,
    progress: Progress = silent,
    judge: Judge | None = None,
) -> TrainResult:
    """Train the model's "default" adapter, write it with its manifest, and return them.

    Args:
        model: a peft model whose "default" adapter trains; a "reference" adapter, if
            loaded, is the reference, else the base with the adapter disabled.
        tokenizer: the base model's, with a pad token (and the chat template serving
            uses).
        progress: makes the progress bars (the reference's pairs, the steps).
        judge: judges sampled answers when selection = "judge"; None fits a taste
            model on the training votes (pipeline/training/answer_check.py).

    Raises:
        TrainError: bad input (data, lengths), found before anything is written;
            DivergedError, GeneralAbilityError: the run failed, no adapter is written
            (the metrics and last checkpoint stay for inspection).
    """
    recipe = _Recipe(model, tokenizer, data, options, run, runtime, provenance, progress, judge)
    recipe.loop()
    return recipe.finish()


class _Recipe:
    """One run: set up in __init__, then `loop()` and `finish()`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        data: TrainData,
        options: TrainOptions,
        run: RunStore,
        runtime: Runtime,
        provenance: Provenance,
        progress: Progress,
        judge: Judge | None = None,
    ) -> None:
        self.started = time.monotonic()
        self.model, self.data, self.options = model, data, options
        self.run, self.runtime, self.provenance, self.progress = run, runtime, provenance, progress
        self.examples = _setup_examples(data, tokenizer, options)
        train_ex = self.examples.train
        self.plan = plan_batches(
            [len(e.prompt_ids) + len(e.completion_ids) for e in train_ex],
            [e.desirable for e in train_ex],
            options,
            runtime.rank,
            runtime.world,
            prompts=[e.prompt_ids for e in train_ex],
        )
        self.run_id = _run_fingerprint(provenance, options, self.examples.train, runtime.world)
        if runtime.main:
            run.prepare()
        pad_id = tokenizer.pad_token_id
        lambdas = (data.desirable_weight, data.undesirable_weight)
        self.step_ctx = _setup_reference(
            model, self.examples.train, self.plan, options, lambdas, pad_id, runtime, progress
        )
        self.evaluator = Evaluator(
            model,
            self.examples.heldout,
            self.examples.general,
            options,
            lambdas,
            pad_id,
            end_of_turn_id(tokenizer),
            runtime,
        )
        self.answers = None
        if options.selection == "judge":
            self.answers = AnswerCheck(
                model,
                self.examples.train,
                self.examples.heldout,
                options,
                pad_id,
                end_of_turn_id(tokenizer),
                runtime,
                judge,
                lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            )
            if not self.answers.trusted:
                log.warning("%s; %s", self.answers.reason, _UNJUDGED_ADVICE)
        # How the kept step is chosen: a judge that cannot be trusted chooses nothing.
        self.selection = options.selection
        if self.answers is not None and not self.answers.trusted:
            self.selection = "final"
        self.confirmed: Verdict | None = None
        self.unconfirmed_step: int | None = None
        self.general_before = self.evaluator.general_nll()
        self.guards = (
            EndOfTurnGuard(self.evaluator.reference_end_rate(), options.eos_guard),
            GeneralNllGuard(self.general_before, options.max_general_nll_increase),
        )
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.units = _fsdp_units(model)
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=options.learning_rate, weight_decay=options.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(options, self.plan.steps)
        )
        self.state = self._setup_state()
        self.resumed_from_step = self.state.step or None

    def loop(self) -> None:
        """Step until the plan ends, a guard or early stopping stops the run, or
        stop_after_steps pauses it."""
        options, plan, state = self.options, self.plan, self.state
        eval_every = options.eval_every or max(1, plan.steps // 10)
        checkpoint_every = options.checkpoint_every or eval_every
        stop_at = plan.steps
        if options.stop_after_steps is not None:
            stop_at = min(plan.steps, state.step + options.stop_after_steps)
        bar = self.progress(total=plan.steps, initial=state.step, desc="KTO", unit="step")
        causal_lm = self.model.get_base_model()
        self.model.train()
        while state.step < stop_at:
            first = state.step * options.grad_accum
            accum = []
            for k in range(options.grad_accum):
                for unit in self.units:
                    unit.set_requires_gradient_sync(k == options.grad_accum - 1)
                accum.append(
                    _micro_step(
                        causal_lm, self.step_ctx, plan.batches[first + k], plan.partners[first + k]
                    )
                )
            row = self._optimizer_step(accum)
            state.diagnostics.add(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.3f}")

            reason = None
            if state.step % eval_every == 0 or state.step == plan.steps:
                reason = self._judge_step(row)
            if self.runtime.main:
                self.run.append_metrics(row)
            if reason is not None:
                # The run's report says so too (stop_reason): a planned end, not an alarm.
                log.info(
                    "stopping at step %d and keeping step %d: %s",
                    state.step,
                    state.best_step,
                    reason,
                )
                state.stopped_early, state.stop_reason = True, reason
                break
            if state.step % checkpoint_every == 0 and state.step < plan.steps:
                self._save_checkpoint()
        bar.close()

    def finish(self) -> TrainResult:
        """Pause with a resume point, or write the best weights with the manifest."""
        state, evaluator = self.state, self.evaluator
        if state.step < self.plan.steps and not state.stopped_early:
            # stop_after_steps: leave a resume point and no adapter.
            self._save_checkpoint()
            return TrainResult(None, state.step, self.plan.steps)
        if state.best_weights is not None:
            load_local_state(self.model, state.best_weights)
        self._confirm()
        if self.runtime.world > 1:
            # Ranks that drifted apart would each evaluate a different adapter: say which.
            rt = self.runtime
            log.info("rank %d of %d: adapter checksum %s", rt.rank, rt.world, _checksum(self.model))
        after = evaluator.heldout_metrics()
        general_after = after.general_nll if after is not None else evaluator.general_nll()
        failed = self.guards[1].check(after or GeneralOnly(general_after))
        if failed is not None:
            raise GeneralAbilityError(
                f"{failed}; no adapter was written. Lower learning_rate, raise beta, or add "
                "sft_weight"
            )
        metrics = RunMetrics(
            state.diagnostics.last,
            state.heldout_before,
            after.as_dict() if after else None,
            self.general_before,
            general_after,
        )
        manifest = self._manifest(metrics)
        weights = full_state(self.model)  # every rank: gathering is collective
        if self.runtime.main:
            manifest = self.run.finish(self.model, manifest, weights)
        return TrainResult(manifest, state.step, self.plan.steps)

    def _optimizer_step(self, accum: list[dict[str, float]]) -> dict[str, Any]:
        """Clip, step; the step's metrics row. Across ranks the gradients are already
        averaged (FSDP's reduce-scatter), and the norm is the whole gradient's."""
        options = self.options
        grad_norm = total_norm(
            torch.nn.utils.clip_grad_norm_(self.trainable, options.max_grad_norm)
        )
        if not math.isfinite(grad_norm):
            raise DivergedError(
                _diverged_message("gradient norm", grad_norm, self.state.step + 1, options)
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return aggregate(accum, self.state.step, self.scheduler.get_last_lr()[0], grad_norm)

    def _judge_step(self, row: dict[str, Any]) -> str | None:
        """Evaluate the step into its metrics row, keep its weights if it is the best
        so far, and say why the run should stop, if it should."""
        metrics = self.evaluator.heldout_metrics()
        if metrics is not None:
            row.update(metrics.as_dict("heldout_"))
            for guard in self.guards:
                reason = guard.check(metrics)
                if reason is not None:
                    return reason
        score = self._score(metrics, row)
        if score is None:
            return None
        state = self.state
        if improves(score, state.best_score, self.selection):
            state.best_score, state.best_step = score, state.step
            state.best_weights = local_state(self.model)
        return state.early.check(score)

    def _score(self, metrics: Any, row: dict[str, Any]) -> float | None:
        """The selection score of the adapter as it is now (lower is better): minus the
        judged gain in liked share over the reference, or a held-out signal; None when
        there is nothing to select by."""
        if self.selection == "judge":
            assert self.answers is not None
            verdict = self.answers.evaluate()
            assert verdict is not None
            row.update(verdict.as_row())
            return -verdict.gain
        if metrics is None:
            return None
        return selection_score(metrics, self.selection)

    def _setup_state(self) -> _State:
        """The state of a resumed run, or a fresh one whose starting point is
        evaluated: it is a candidate too, so a run that only gets worse ends where it
        began."""
        payload = self.run.load_checkpoint(self.runtime.device)
        if payload is not None:
            state = _restore(
                payload, self.run_id, self.model, self.optimizer, self.scheduler, self.runtime
            )
            if self.runtime.main:
                self.run.start_metrics(after_step=state.step)
            log.info("resuming at step %d of %d", state.step, self.plan.steps)
            return state
        if self.runtime.main:
            self.run.start_metrics(after_step=0)
        options = self.options
        state = _State(early=EarlyStopping(options.early_stopping_patience, self.selection))
        state.start_weights = local_state(self.model)
        before = self.evaluator.heldout_metrics()
        if before is not None:
            state.heldout_before = before.as_dict()
        score = 0.0 if self.selection == "judge" else None
        if score is None and before is not None:
            score = selection_score(before, self.selection)
        if score is not None:
            state.best_score, state.best_step = score, 0
            state.best_weights = state.start_weights
            state.early.check(score)
        return state

    def _confirm(self) -> None:
        """Judge the step kept on fresh samples; go back to the start unless they still
        find it better than the reference (see pipeline/training/answer_check.py)."""
        state = self.state
        if self.selection != "judge" or not state.best_step:
            return
        assert self.answers is not None
        self.confirmed = self.answers.confirm()
        assert self.confirmed is not None
        if self.confirmed.better:
            return
        log.info(
            "step %d was the judge's best, but on fresh samples %s: keeping the start",
            state.best_step,
            self.confirmed.sentence(),
        )
        self.unconfirmed_step = state.best_step
        state.best_step, state.best_weights = 0, state.start_weights
        assert state.start_weights is not None
        load_local_state(self.model, state.start_weights)

    def _status(self) -> tuple[str, str | None]:
        """trained, no_gain or unjudged, and why (see Manifest)."""
        answers, state = self.answers, self.state
        if answers is not None and not answers.trusted:
            return UNJUDGED, answers.reason
        if self.selection != "judge" or state.best_step:
            return run_status(state.best_step)
        if self.confirmed is not None:
            return NO_GAIN, (
                f"step {self.unconfirmed_step} looked best, but on fresh samples "
                f"{self.confirmed.sentence()}; the adapter written is the starting point"
            )
        return NO_GAIN, (
            "no evaluated step's answers were judged better than the start's; the adapter "
            "written is the starting point"
        )

    def _judge_record(self) -> dict[str, Any] | None:
        if self.answers is None:
            return None
        return self.answers.record() | {
            "best_step_selected": self.unconfirmed_step or self.state.best_step,
            "confirmation": verdict_dict(self.confirmed),
        }

    def _save_checkpoint(self) -> None:
        # Every rank gathers (a collective); rank 0 writes.
        payload = _checkpoint(
            self.run_id, self.model, self.optimizer, self.scheduler, self.state, self.runtime
        )
        if self.runtime.main:
            self.run.save_checkpoint(payload)

    def _manifest(self, metrics: RunMetrics) -> Manifest:
        options, runtime, provenance, state = (
            self.options,
            self.runtime,
            self.provenance,
            self.state,
        )
        pairs_per_step = options.batch_size * runtime.world
        warnings = state.diagnostics.warnings(pairs_per_step)
        for w in warnings:
            log.warning(w)
        notes = state.diagnostics.notes(pairs_per_step)
        for n in notes:
            log.info(n)
        status, status_reason = self._status()
        if status_reason is not None:
            # An outcome, in the manifest and the summary; an untrusted judge warned above.
            log.info("%s: %s", status, status_reason)
        data = self.data
        return Manifest(
            status=status,
            status_reason=status_reason,
            base_model=provenance.base_model,
            base_model_fingerprint=provenance.base_model_fingerprint,
            snapshot_id=provenance.snapshot_id,
            init_adapter=provenance.init_adapter,
            reference_adapter=provenance.reference_adapter,
            counts=self.examples.counts,
            encoding=asdict(self.examples.report),
            lambdas={
                "desirable": data.desirable_weight,
                "undesirable": data.undesirable_weight,
                "explanation": data.balance_explanation,
            },
            beta=options.beta,
            options=asdict(options),
            lora=provenance.lora,
            steps=state.step,
            planned_steps=self.plan.steps,
            resumed_from_step=self.resumed_from_step,
            best_step=state.best_step,
            stopped_early=state.stopped_early,
            stop_reason=state.stop_reason,
            world_size=runtime.world,
            device=str(runtime.device),
            precision=str(runtime.autocast or torch.float32),
            metrics=metrics,
            diagnostics=state.diagnostics.summary(pairs_per_step),
            warnings=tuple(warnings),
            notes=tuple(notes),
            seconds=round(time.monotonic() - self.started, 3),
            versions=provenance.versions,
            judge=self._judge_record(),
            extra=provenance.extra,
        )


# ---------------------------------------------------------------- setup


def _setup_examples(data: TrainData, tokenizer: Any, options: TrainOptions) -> _Examples:
    """Encode the three sets; training examples get weights averaging 1."""
    if not data.train:
        raise TrainError("no training records: the snapshot or data file is empty")
    lengths = options.lengths()

    def encode(records: Sequence[Example]) -> list[Encoded]:
        if not records:
            return []
        return encode_records(
            list(records), tokenizer, lengths, options.prompt_format, options.completion_tokens
        )[0]

    train_ex, report = encode_records(
        list(data.train), tokenizer, lengths, options.prompt_format, options.completion_tokens
    )
    train_ex, heldout = normalised_weights(train_ex), encode(data.heldout)
    n_d, h_d = sum(e.desirable for e in train_ex), sum(e.desirable for e in heldout)
    counts = {
        "train_desirable": n_d,
        "train_undesirable": len(train_ex) - n_d,
        "heldout_desirable": h_d,
        "heldout_undesirable": len(heldout) - h_d,
    }
    return _Examples(train_ex, heldout, encode(data.general), report, counts)


def _setup_reference(
    model: Any,
    examples: list[Encoded],
    plan: Plan,
    options: TrainOptions,
    lambdas: tuple[float, float],
    pad_id: int,
    runtime: Runtime,
    progress: Progress,
) -> _Step:
    """The reference never changes: score every pair the run will use, once."""
    with reference(model):
        ref = score_pairs(
            model.get_base_model(),
            examples,
            sorted(plan.pairs()),
            pad_id,
            runtime.device,
            runtime.autocast,
            progress,
        )
    return _Step(examples, ref, options, lambdas, pad_id, runtime)


# ---------------------------------------------------------------- the step


def _micro_step(
    causal_lm: Any, ctx: _Step, batch_idx: list[int], previous: list[int]
) -> dict[str, float]:
    """Forward and backward of one micro-batch; returns its statistics.

    The prompts and their own completions run in one forward with gradient; the
    mismatched completions (each prompt with its partner's completion, `previous`, as
    the plan chose it) then follow a detached copy of the prompts' cache, without
    gradient.
    """
    examples, options, device = ctx.examples, ctx.options, ctx.runtime.device
    prompts = collate_prompts([examples[i].prompt_ids for i in batch_idx], ctx.pad_id)
    rows = list(range(len(batch_idx)))
    matched = collate_continuations(
        prompts, rows, [examples[i].completion_ids for i in batch_idx], ctx.pad_id
    ).to(device)
    mismatched = collate_continuations(
        prompts, rows, [examples[j].completion_ids for j in previous], ctx.pad_id
    ).to(device)
    desirable = torch.tensor([examples[i].desirable for i in batch_idx], device=device)
    ref_logps = torch.tensor([ctx.ref[(i, i)] for i in batch_idx], device=device)
    ref_kl_logps = torch.tensor(
        [ctx.ref[(i, j)] for i, j in zip(batch_idx, previous, strict=True)], device=device
    )

    policy_logps, policy_kl_logps = _policy_logps(
        causal_lm, ctx, batch_idx, previous, prompts, matched, mismatched
    )
    kl = mismatched_kl(policy_kl_logps, ref_kl_logps)
    if ctx.runtime.world > 1:
        torch.distributed.all_reduce(kl)
        kl /= ctx.runtime.world
    if not options.reference_point:
        # z_ref = 0: each answer is judged against the reference alone (what the clamp
        # does anyway whenever the mismatched-pair estimate is negative).
        kl = torch.zeros_like(kl)
    out = kto_loss(policy_logps, ref_logps, desirable, kl, options.beta, *ctx.lambdas)
    # Each example's term weighs what its votes weigh (1 each unless the repeats of an
    # answer are counted as weights): weights average 1 over the training set.
    weights = torch.tensor([examples[i].weight for i in batch_idx], device=device)
    kto_term = (out.losses * weights).mean()
    loss = kto_term
    sft = torch.zeros((), device=device)
    if options.sft_weight > 0:
        sft = _sft(ctx, batch_idx, policy_logps, weights, desirable)
        loss = loss + options.sft_weight * sft
    if not torch.isfinite(loss):
        raise DivergedError(_diverged_message("loss", loss.item(), -1, options))
    (loss / options.grad_accum).backward()
    n_d = int(desirable.sum())
    row = {
        "loss": kto_term.item(),
        "sft": sft.item(),
        "kl": out.kl.item(),
        "kl_clamped": float(out.kl_clamped),
        "reward_desirable_sum": out.rewards[desirable].sum().item(),
        "reward_undesirable_sum": out.rewards[~desirable].sum().item(),
        "n_desirable": n_d,
        "n_undesirable": len(batch_idx) - n_d,
        "kl_pairs": _distinct_pairs(examples, batch_idx, previous),
        "tokens": int(
            prompts.attention_mask.sum()
            + matched.attention_mask[:, prompts.input_ids.shape[1] :].sum()
            + len(batch_idx)
        ),
    }
    return _across_ranks(row, ctx.runtime) if ctx.runtime.world > 1 else row


# A micro-step's statistics that are means over its examples (the rest are sums).
_MEANS = ("loss", "sft", "kl", "kl_clamped")


def _across_ranks(row: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """The statistics of the global micro-batch: the ranks' sums, and the mean of their
    means (every rank holds batch_size examples; each rank's `sft` is its share of the
    global mean times the ranks)."""
    keys = list(row)
    values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(values)
    out = dict(zip(keys, values.tolist(), strict=True))
    for k in _MEANS:
        out[k] /= runtime.world
    for k in ("n_desirable", "n_undesirable", "kl_pairs", "tokens"):
        out[k] = int(out[k])
    return out


def _policy_logps(
    causal_lm: Any,
    ctx: _Step,
    batch_idx: list[int],
    previous: list[int],
    prompts: Any,
    matched: Any,
    mismatched: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's summed log-probs of the matched pairs (with gradient) and of the
    mismatched ones (without)."""
    device, examples = ctx.runtime.device, ctx.examples
    with autocast_to(device, ctx.runtime.autocast):
        if ctx.options.activation_checkpointing:
            # A checkpointed layer must not extend a cache (its recomputation would
            # extend it again): whole sequences, matched and mismatched.
            policy_logps = _whole_logps(causal_lm, examples, batch_idx, batch_idx, ctx)
            with torch.no_grad():
                return policy_logps, _whole_logps(causal_lm, examples, batch_idx, previous, ctx)
        state, policy_logps = run_prompts_with_completions(causal_lm, prompts.to(device), matched)
        with torch.no_grad():
            return policy_logps, continuation_logps(causal_lm, state.detached(), mismatched)


def _sft(
    ctx: _Step,
    batch_idx: list[int],
    policy_logps: torch.Tensor,
    weights: torch.Tensor,
    desirable: torch.Tensor,
) -> torch.Tensor:
    """Mean per-token NLL of the desirable completions of the global batch: each rank
    divides its sum by the tokens of all ranks (the ranks' gradients are averaged)."""
    device, world = ctx.runtime.device, ctx.runtime.world
    tokens = torch.tensor([len(ctx.examples[i].completion_ids) for i in batch_idx], device=device)
    total = (tokens * weights)[desirable].sum().detach()
    if world > 1:
        torch.distributed.all_reduce(total)
    if total <= 0:
        return torch.zeros((), device=device)
    return -(policy_logps * weights)[desirable].sum() * world / total


def _whole_logps(
    causal_lm: Any,
    examples: Sequence[Encoded],
    prompts: list[int],
    completions: list[int],
    ctx: _Step,
) -> torch.Tensor:
    """Summed completion log-probs of each (prompt i, completion j), as whole sequences
    without a cache: (B,)."""
    batch = collate(
        [
            (examples[i].prompt_ids, examples[j].completion_ids)
            for i, j in zip(prompts, completions, strict=True)
        ],
        ctx.pad_id,
    ).to(ctx.runtime.device)
    return sequence_logps(token_logps(causal_lm, batch), batch)


def _distinct_pairs(examples: Sequence[Encoded], batch: list[int], previous: list[int]) -> int:
    """Mismatched pairs that share neither prompt nor completion with their own pair."""
    return sum(
        1
        for i, j in zip(batch, previous, strict=True)
        if i != j
        and examples[i].prompt_ids != examples[j].prompt_ids
        and examples[i].completion_ids != examples[j].completion_ids
    )


def _diverged_message(what: str, value: float, step: int, options: TrainOptions) -> str:
    at = f" at step {step}" if step > 0 else ""
    return (
        f"the {what} became {value}{at}: training diverged and no adapter was written. "
        f"Lower learning_rate (now {options.learning_rate:g}) or max_grad_norm, or use "
        'precision = "fp32"; the last checkpoint and metrics.jsonl are kept for inspection'
    )


# ---------------------------------------------------------------- weights and resume points


def _fsdp_units(model: Any) -> list[Any]:
    """A sharded model's FSDP units (their gradients are reduced at the last micro-batch
    of a step only); none when it is not sharded."""
    if not is_sharded(model):
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _checksum(model: Any) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(full_state(model).items()):
        h.update(name.encode())
        h.update(tensor.float().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_fingerprint(
    provenance: Provenance, options: TrainOptions, examples: Sequence[Encoded], world: int
) -> str:
    """What a checkpoint must match to be resumed: options, adapter shape, base, data and
    the number of ranks (the global batch is batch_size times it)."""
    h = hashlib.sha256()
    run = asdict(options) | {"stop_after_steps": None, "nproc": None, "world": world}
    h.update(json.dumps([run, provenance.lora], sort_keys=True).encode())
    h.update(provenance.base_model_fingerprint.encode())
    for e in examples:
        h.update(repr((e.prompt_ids, e.completion_ids, e.desirable, e.weight)).encode())
    return h.hexdigest()[:16]


def _checkpoint(
    run_id: str, model: Any, optimizer: Any, scheduler: Any, state: _State, runtime: Runtime
) -> dict[str, Any]:
    """The resume point: the whole trainable weights and optimizer moments (gathered
    when sharded: a few MB, and readable whatever the sharding), the scheduler, the run's state,
    and each rank's random generator (LoRA dropout draws from it: a resumed run
    continues the same streams). A collective when sharded or on several ranks."""
    fields = {k: v for k, v in vars(state).items() if k not in ("early", "diagnostics")}
    for key in ("best_weights", "start_weights"):
        if fields[key] is not None:
            fields[key] = full_state(model, fields[key])
    rng = [torch.get_rng_state()]
    if runtime.world > 1:
        rng = [None] * runtime.world
        torch.distributed.all_gather_object(rng, torch.get_rng_state())
    return {
        "format": CHECKPOINT_FORMAT,
        "run_id": run_id,
        "adapter": full_state(model),
        "optimizer": full_optimizer_state(optimizer),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "state": fields,
        "early": vars(state.early),
        "diagnostics": vars(state.diagnostics),
    }


def _restore(
    payload: dict[str, Any],
    run_id: str,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    runtime: Runtime,
) -> _State:
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatch(
            "the checkpoint to resume was written by another version of kto-loop; start "
            "afresh (choose another --out, or delete its checkpoint/)"
        )
    if payload["run_id"] != run_id:
        raise CheckpointMismatch(
            "the checkpoint to resume belongs to a run with other data, model, options or "
            "number of processes; resume with the same ones, or choose another --out"
        )
    load_local_state(model, from_full_state(model, payload["adapter"]))
    load_full_optimizer_state(optimizer, payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    # Each rank continues its own stream (the fingerprint holds the number of ranks).
    torch.set_rng_state(payload["rng"][runtime.rank].cpu())
    fields = dict(payload["state"])
    for key in ("best_weights", "start_weights"):
        if fields[key] is not None:
            fields[key] = from_full_state(model, fields[key])
    return _State(
        **fields,
        early=EarlyStopping(**payload["early"]),
        diagnostics=Diagnostics(**payload["diagnostics"]),
    )
