"""What a run's steps add up to: one metrics row per optimizer step, and over the run
what the reference point (z_ref) rested on, with the warnings and notes it calls for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Fewer mismatched pairs than this per step make z_ref a noisy estimate.
MIN_KL_PAIRS = 4


def aggregate(
    accum: list[dict[str, float]], step: int, lr: float, grad_norm: float
) -> dict[str, Any]:
    """One optimizer step's metrics row from its micro-batches' statistics."""
    n = len(accum)
    n_d = sum(a["n_desirable"] for a in accum)
    n_u = sum(a["n_undesirable"] for a in accum)
    return {
        "step": step,
        "loss": sum(a["loss"] for a in accum) / n,
        "sft": sum(a["sft"] for a in accum) / n,
        "kl": sum(a["kl"] for a in accum) / n,
        "kl_clamped": sum(a["kl_clamped"] for a in accum) / n,
        "reward_desirable": sum(a["reward_desirable_sum"] for a in accum) / n_d if n_d else None,
        "reward_undesirable": sum(a["reward_undesirable_sum"] for a in accum) / n_u
        if n_u
        else None,
        "n_desirable": n_d,
        "n_undesirable": n_u,
        "micro_batches": n,
        "one_class_batches": sum(
            1 for a in accum if a["n_desirable"] == 0 or a["n_undesirable"] == 0
        ),
        "kl_pairs": min(a["kl_pairs"] for a in accum),
        "tokens": sum(a["tokens"] for a in accum),
        "lr": lr,
        "grad_norm": grad_norm,
    }


@dataclass
class Diagnostics:
    """What the reference point rested on over the run, added up step by step from the
    metrics rows."""

    steps: int = 0
    clamped: float = 0.0
    one_class: int = 0
    micro_batches: int = 0
    min_pairs: int | None = None
    last: dict[str, Any] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.steps += 1
        self.clamped += row["kl_clamped"]
        self.one_class += row["one_class_batches"]
        self.micro_batches += row["micro_batches"]
        self.min_pairs = (
            row["kl_pairs"] if self.min_pairs is None else min(self.min_pairs, row["kl_pairs"])
        )
        self.last = {k: v for k, v in row.items() if not k.startswith("heldout_")}

    def summary(self, pairs_per_step: int) -> dict[str, Any]:
        return {
            "kl_pairs_per_step": pairs_per_step,
            "kl_distinct_pairs_min": self.min_pairs,
            "kl_clamp_rate": self.clamped / self.steps if self.steps else None,
            "one_class_steps": self.one_class,
            "one_class_rate": self.one_class / self.micro_batches if self.micro_batches else None,
        }

    def warnings(self, pairs_per_step: int) -> list[str]:
        """What the run's settings should change, each with the change to make."""
        out = []
        if pairs_per_step < MIN_KL_PAIRS:
            out.append(
                f"z_ref rests on {pairs_per_step} mismatched pairs per step (batch_size x "
                "ranks): a noisy reference point; use a batch of at least "
                f"{MIN_KL_PAIRS} ([train] batch_size)"
            )
        if self.micro_batches and self.one_class / self.micro_batches > 0.5:
            out.append(
                f"{self.one_class / self.micro_batches:.0%} of batches held one class only: "
                "desirable and undesirable losses rarely met in a step; raise [train] "
                "batch_size, or send votes of both kinds"
            )
        return out

    def notes(self, pairs_per_step: int) -> list[str]:
        """What the reference point rested on, worth knowing and needing no change: for
        the run's report, not a warning."""
        out = []
        # With too few pairs per step for any batch, warnings() says so already.
        few = self.min_pairs is not None and self.min_pairs < MIN_KL_PAIRS
        if few and pairs_per_step >= MIN_KL_PAIRS:
            out.append(
                f"some steps had only {self.min_pairs} distinct mismatched pairs (their batch "
                "repeated prompts or completions), so z_ref was noisier there"
            )
        if self.steps and self.clamped / self.steps > 0.5:
            out.append(
                f"the KL estimate was clamped at 0 in {self.clamped / self.steps:.0%} of "
                "steps: the policy stayed near the reference, so z_ref was mostly 0 and "
                "rewards were judged against the reference itself"
            )
        return out
