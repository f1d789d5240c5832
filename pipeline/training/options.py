"""The options of a training run, apart from the trainer so that reading the
configuration does not import torch.

They are the single source of the `[train]` and `[lora]` configuration sections:
names, types, bounds, descriptions and defaults live here only, and an instance is
validated whenever it is built (`dataclasses.replace` included), so the trainer can
rely on every value being in range.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from pipeline.feedback.snapshot import RepeatPolicy
from pipeline.training.encode import Lengths

# How the step whose weights are kept is chosen among the evaluated ones (the start
# included): the answers it samples for held-out prompts, judged (pipeline/answer_check);
# the lowest held-out KTO loss, the highest held-out margin or accuracy; or the last one
# that passed the guards.
Selection = Literal["judge", "final", "heldout_loss", "heldout_margin", "heldout_accuracy"]
SELECTIONS: tuple[str, ...] = get_args(Selection)

Batching = Literal["bucketed", "shuffled", "trl"]
Mismatch = Literal["other_prompt", "batch_shift", "trl"]
CompletionTokens = Literal["serving", "template"]

# The ranks vLLM accepts for a LoRA adapter.
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]

# Fields a caller sets in code for one run; a configuration file setting them would
# steer every run.
RUN_CONTROLS = ("stop_after_steps",)

# extra="forbid": a misspelled option is an error, not a silently ignored keyword.
_STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_STRICT)
class LoraOptions:
    """The LoRA adapter's shape (ignored when warm-starting: the served adapter's is
    kept). The rank must not exceed the server's --max-lora-rank."""

    r: Annotated[
        LoraRank, Field(description="a rank vLLM accepts: 1, 8, 16, 32, 64, 128, 256, 320 or 512")
    ] = 8
    alpha: Annotated[int, Field(ge=1)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] = ("q_proj", "v_proj")


@dataclass(frozen=True, config=_STRICT)
class TrainOptions:
    """Hyper-parameters of one run. Defaults suit a LoRA on a small or mid-size chat
    model; see docs/training.md for how they were chosen, and
    deploy/kto-loop.example.toml for each."""

    beta: Annotated[
        float, Field(gt=0, description="reward scale; higher keeps the policy nearer the reference")
    ] = 0.1
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    batch_size: Annotated[
        int, Field(ge=1, description="per device; z_ref rests on this many mismatched pairs")
    ] = 8
    grad_accum: Annotated[int, Field(ge=1)] = 1
    epochs: Annotated[int, Field(ge=1)] = 3
    max_steps: Annotated[
        int | None, Field(ge=1, description="cap on optimizer steps (default: the epochs)")
    ] = None
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    lr_schedule: Literal["cosine", "linear", "constant"] = "linear"
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    max_length: Annotated[int, Field(ge=2, description="prompt + completion tokens")] = 512
    max_prompt_length: Annotated[
        int, Field(ge=1, description="prompts are cut from the left to this")
    ] = 384
    max_completion_length: Annotated[
        int | None, Field(ge=1, description="completions are cut from the right")
    ] = None
    prompt_format: Annotated[
        Literal["chat", "raw"],
        Field(
            description="chat: render prompts with the chat template, as vLLM's chat endpoint does"
        ),
    ] = "chat"
    seed: int = 0
    sft_weight: Annotated[
        float, Field(ge=0, description="weight of an NLL term on desirable completions")
    ] = 1.0
    batching: Annotated[
        Batching,
        Field(
            description="bucketed: batches of similar length; shuffled: each epoch shuffled, "
            "the remainder left out; trl: TRL's sequential batches (the data in the order "
            "given, the same batches every epoch, the last one short)"
        ),
    ] = "shuffled"
    mismatch: Annotated[
        Mismatch,
        Field(
            description="the mismatched pairs of the KL reference point: other_prompt: the "
            "previous example in the batch, arranged so the prompts differ; batch_shift: the "
            "previous example in the batch; trl: the previous example in data order, fixed "
            "before shuffling (TRL's rule)"
        ),
    ] = "other_prompt"
    completion_tokens: Annotated[
        CompletionTokens,
        Field(
            description="serving: the completion's own tokens, then the end-of-turn token the "
            "server stops on; template: what the chat template renders after the prompt for "
            "the whole conversation (TRL's rule; it may add tokens after the end of turn)"
        ),
    ] = "serving"
    eval_every: Annotated[
        int,
        Field(
            ge=0, description="optimizer steps between held-out evaluations; 0 = a tenth of the run"
        ),
    ] = 0
    early_stopping_patience: Annotated[
        int,
        Field(
            ge=0,
            description="evaluations without a better held-out loss before stopping; 0 = never",
        ),
    ] = 0
    selection: Annotated[
        Selection,
        Field(
            description="which evaluated step's weights are kept (the start included): judge: "
            "the best liked share of answers sampled for held-out prompts, as a taste model "
            "learnt from the votes judges them, kept only if fresh samples confirm it beats "
            "the start; or the lowest held-out KTO loss, the best held-out margin or "
            "accuracy, or the last one the guards passed"
        ),
    ] = "judge"
    judge_answers: Annotated[
        int,
        Field(
            ge=2,
            description="answers sampled at each evaluation, spread evenly over the held-out "
            "prompts (at least 2 each)",
        ),
    ] = 128
    judge_prompts: Annotated[
        int, Field(ge=2, description="held-out prompts the answers are sampled for, at most")
    ] = 48
    judge_min_auc: Annotated[
        float,
        Field(
            gt=0.5,
            le=1,
            description="the taste model judges only when its held-out AUC's lower bound "
            "reaches this",
        ),
    ] = 0.6
    judge_z: Annotated[
        float,
        Field(
            gt=0,
            description="z of the judge's intervals: a step is kept only if the lower bound "
            "of its gain over the start is above 0",
        ),
    ] = 1.645
    repeats: Annotated[
        RepeatPolicy,
        Field(
            description="what the votes of an answer given many times count for: one example "
            "(collapse), one example per vote (keep), or one example weighted by its votes"
        ),
    ] = "keep"
    reference_point: Annotated[
        bool,
        Field(description="z_ref = beta * KL from the batch's mismatched pairs; false: z_ref = 0"),
    ] = True
    checkpoint_every: Annotated[
        int,
        Field(ge=0, description="optimizer steps between checkpoints; 0 = at each evaluation"),
    ] = 0
    stop_after_steps: Annotated[
        int | None,
        Field(
            description="pause after this many more optimizer steps, leaving a resume point "
            "and no adapter; a run control (RUN_CONTROLS), not configuration"
        ),
    ] = None
    max_general_nll_increase: Annotated[
        float | None,
        Field(
            gt=0,
            description="fail the run when the general held-out NLL rises by more than this share",
        ),
    ] = None
    eos_guard: Annotated[
        float,
        Field(
            ge=0,
            lt=1,
            description="stop (keeping the best step) when the share of sampled held-out "
            "answers that end their turn falls this far below the reference's; 0 = off",
        ),
    ] = 0.0
    precision: Annotated[
        Literal["auto", "fp32", "bf16"],
        Field(description="auto: bf16 autocast on a GPU that has it"),
    ] = "auto"
    device: Annotated[str, Field(description="auto, cpu, cuda, cuda:1, ...")] = "auto"
    nproc: Annotated[
        int,
        Field(
            ge=1,
            description="processes (GPUs) the cycle and kto-loop train run a training on, "
            "launched with torchrun on this machine; the base is sharded across them (FSDP2)",
        ),
    ] = 1
    fsdp: Annotated[
        bool,
        Field(
            description="shard the base model (FSDP2) even in one process; with several "
            "processes (kto-loop train --nproc N) it is always sharded"
        ),
    ] = False
    activation_checkpointing: Annotated[
        bool,
        Field(
            description="recompute each layer's activations in the backward pass: less "
            "memory, about a third more compute"
        ),
    ] = False

    @model_validator(mode="after")
    def _check(self) -> TrainOptions:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for a completion after "
                f"max_prompt_length={self.max_prompt_length}; raise max_length or lower "
                "max_prompt_length"
            )
        return self

    def overridden(self, **changes: Any) -> TrainOptions:
        """These options with `changes` applied, validated; a change of None leaves the
        value as it is (a command-line flag that was not given)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def lengths(self) -> Lengths:
        return Lengths(self.max_length, self.max_prompt_length, self.max_completion_length)


# TRL's KTOTrainer (trl 1.16, loss_type "kto") with its defaults, in our options: its
# sampler and mismatched pairs, the completion as its chat template renders it, a linear
# schedule without warmup, no SFT term, no held-out judging or early stopping, the last
# step kept, and every row of the data an example. With a snapshot's held-out share at 0
# and the same class weights, a run on the same rows and seed takes TRL's steps.
TRL_RECIPE: dict[str, Any] = {
    "batching": "trl",
    "mismatch": "trl",
    "completion_tokens": "template",
    "lr_schedule": "linear",
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "sft_weight": 0.0,
    "eos_guard": 0.0,
    "early_stopping_patience": 0,
    "selection": "final",
    "repeats": "keep",
    "reference_point": True,
}


def trl_recipe(options: TrainOptions | None = None) -> TrainOptions:
    """`options` (default: the defaults) with every departure from TRL turned off."""
    return (options or TrainOptions()).overridden(**TRL_RECIPE)
