"""The options of a training run, apart from the trainer so that reading the
configuration does not import torch."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.encode import Lengths

# How the step whose weights are kept is chosen among the evaluated ones (the start
# included): the lowest held-out KTO loss, the highest held-out margin or accuracy, or
# the last one that passed the guards.
SELECTIONS = ("final", "heldout_loss", "heldout_margin", "heldout_accuracy")


@dataclass(frozen=True)
class LoraOptions:
    """The adapter's shape (ignored when warm-starting: the served adapter's is kept)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrainOptions:
    """Hyper-parameters of one run. See deploy/kto-loop.example.toml for each."""

    beta: float = 0.1
    learning_rate: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 3
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    max_prompt_length: int = 384
    max_completion_length: int | None = None
    prompt_format: str = "chat"
    seed: int = 0
    sft_weight: float = 1.0
    length_bucketing: bool = True
    eval_every: int = 0
    early_stopping_patience: int = 3
    selection: str = "heldout_loss"
    repeats: str = "keep"
    reference_point: bool = True
    checkpoint_every: int = 0
    stop_after_steps: int | None = None
    max_general_nll_increase: float | None = None
    eos_guard: float = 0.1
    precision: str = "auto"
    device: str = "auto"

    def lengths(self) -> Lengths:
        return Lengths(self.max_length, self.max_prompt_length, self.max_completion_length)
