"""Held-out metrics of a policy against its reference, from summed completion log-probs.

The same numbers judge a training run (early stopping) and a candidate adapter against
the one serving now: does the implied reward put desirable completions above the
reference point and undesirable ones below it, by how much, and how far has the policy
moved from the reference (KL)?
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from pipeline.training.kto import kto_loss, mismatched_kl


@dataclass(frozen=True)
class HeldoutMetrics:
    """Implied-reward metrics on held-out records.

    Attributes:
        loss: the KTO loss with the held-out set's own reference point.
        accuracy: share of records on the right side of z_ref (desirable above it,
            undesirable below it).
        reward_desirable, reward_undesirable: mean implied reward per class (nan if
            the class is absent).
        margin: reward_desirable - reward_undesirable.
        kl: the clamped KL estimate from mismatched pairs (z_ref = beta * kl).
        count: records scored.
        eos_logratio: mean log(pi_theta / pi_ref) of the end-of-turn token that closes
            each desirable completion; well below 0 means the policy is losing the
            habit of stopping where liked answers stop, the usual first sign of a
            collapse (None if not measured or no desirable record). Undesirable
            completions are left out: lowering their end-of-turn token along with the
            rest of them is what training on them does.
        general_nll: mean per-token NLL of the general held-out set, if there is one.
        sampled_end_rate: share of answers sampled for held-out prompts that end their
            turn within twice the longest held-out completion (None if not checked).
        correct: per record, in the order scored, whether it is on the right side of
            z_ref (accuracy is their mean). The gate compares two adapters record by
            record with it; left out of as_dict (one entry per record).
    """

    loss: float
    accuracy: float
    reward_desirable: float
    reward_undesirable: float
    margin: float
    kl: float
    count: int
    eos_logratio: float | None = None
    general_nll: float | None = None
    sampled_end_rate: float | None = None
    correct: tuple[bool, ...] = field(default=(), repr=False)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The summary numbers (everything but the per-record `correct`)."""
        return {
            f"{prefix}{f.name}": getattr(self, f.name) for f in fields(self) if f.name != "correct"
        }


def eos_logratio(
    policy_last: torch.Tensor, reference_last: torch.Tensor, ends_turn: torch.Tensor
) -> float | None:
    """Mean log-ratio of the completions' final end-of-turn token, over the completions
    selected by `ends_turn` (desirable ones that end with one: a completion cut at the
    length limit does not). Shapes: (B,)."""
    if not ends_turn.any():
        return None
    return (policy_last - reference_last)[ends_turn].mean().item()


def heldout_metrics(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    policy_mismatched_logps: torch.Tensor,
    reference_mismatched_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> HeldoutMetrics:
    """Score a held-out set. Shapes: (B,) for matched, (M,) for mismatched pairs."""
    kl = mismatched_kl(policy_mismatched_logps, reference_mismatched_logps)
    out = kto_loss(
        policy_logps,
        reference_logps,
        desirable,
        kl,
        beta,
        desirable_weight,
        undesirable_weight,
    )
    z_ref = beta * out.kl
    desirable = desirable.to(torch.bool)
    correct = torch.where(desirable, out.rewards > z_ref, out.rewards < z_ref)
    r_d = out.rewards[desirable].mean().item() if desirable.any() else float("nan")
    r_u = out.rewards[~desirable].mean().item() if (~desirable).any() else float("nan")
    return HeldoutMetrics(
        loss=out.loss.item(),
        accuracy=correct.float().mean().item(),
        reward_desirable=r_d,
        reward_undesirable=r_u,
        margin=r_d - r_u,
        kl=out.kl.item(),
        count=int(desirable.numel()),
        correct=tuple(bool(c) for c in correct.tolist()),
    )
