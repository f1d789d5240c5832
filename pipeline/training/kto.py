"""The KTO loss (Ethayarajh et al., 2024, arXiv 2402.01306), as a pure function.

With beta > 0, policy pi_theta and reference pi_ref, for a prompt x and completion y:

    r(x, y)  = beta * (log pi_theta(y|x) - log pi_ref(y|x))          implied reward
    z_ref    = beta * KL,  KL = max(0, mean_i(log pi_theta(y'_i|x_i) - log pi_ref(y'_i|x_i)))
    v(x, y)  = sigmoid(r - z_ref)   if y is desirable
               sigmoid(z_ref - r)   if y is undesirable
    loss     = mean over the batch of lambda_y * (1 - v(x, y))

where log pi(y|x) is the SUM of the completion tokens' log-probs, and (x_i, y'_i) are
mismatched pairs: prompt x_i with another example's completion. The KL estimate carries
no gradient. Under data parallelism the per-rank means are averaged before the clamp,
so the loop computes `mismatched_kl` per rank, averages, and passes the result in: this
module does no collectives.

TRL's KTOTrainer (loss_type="kto") computes the same numbers; tests/test_kto.py checks
that to 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KTOLoss:
    """What one KTO step yields.

    Attributes:
        loss: scalar, the mean of `losses` (the value to backpropagate).
        losses: (B,) lambda_y * (1 - v(x, y)) per example, in batch order.
        rewards: (B,) implied rewards beta * log-ratio, without gradient.
        kl: scalar, the clamped KL estimate (z_ref = beta * kl), without gradient.
        kl_clamped: whether the raw estimate was negative and clamped to 0.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    kl_clamped: bool


def mismatched_kl(
    policy_mismatched_logps: torch.Tensor, reference_mismatched_logps: torch.Tensor
) -> torch.Tensor:
    """The raw (unclamped) KL estimate of one rank: the mean log-ratio on mismatched pairs.

    Args:
        policy_mismatched_logps: (M,) summed completion log-probs of mismatched pairs.
        reference_mismatched_logps: (M,) the same under the reference.
    Returns:
        A detached scalar; average it across ranks, then pass it to `kto_loss`.
    """
    return (policy_mismatched_logps - reference_mismatched_logps).mean().detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO loss of a batch of matched (prompt, completion) pairs.

    Args:
        policy_logps: (B,) summed completion log-probs under the policy (with gradient).
        reference_logps: (B,) the same under the reference; a constant of the loss
            (detached here, as pi_ref is fixed).
        desirable: (B,) bool labels.
        kl: scalar raw KL estimate (from `mismatched_kl`, averaged across ranks); it is
            clamped at 0 here and detached.
        beta: the reward scale.
        desirable_weight, undesirable_weight: lambda_D and lambda_U.
    Returns:
        KTOLoss with per-example losses and rewards in batch order.
    """
    if policy_logps.shape != reference_logps.shape or policy_logps.shape != desirable.shape:
        raise ValueError(
            f"shapes differ: policy {tuple(policy_logps.shape)}, reference "
            f"{tuple(reference_logps.shape)}, desirable {tuple(desirable.shape)}"
        )
    kl = kl.detach()
    reference_logps = reference_logps.detach()
    clamped = bool(kl < 0)
    kl = kl.clamp(min=0)
    logratios = policy_logps - reference_logps
    desirable = desirable.to(torch.bool)
    # sigmoid(beta * (logratio - KL)) for desirable, sigmoid(beta * (KL - logratio)) for
    # undesirable: one expression with the sign flipped per example.
    sign = torch.where(desirable, 1.0, -1.0).to(logratios.dtype)
    values = F.sigmoid(beta * sign * (logratios - kl))
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(logratios.dtype)
    losses = weights * (1 - values)
    return KTOLoss(
        loss=losses.mean(),
        losses=losses,
        rewards=(beta * logratios).detach(),
        kl=kl,
        kl_clamped=clamped,
    )


def kto_loss_from_logps(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    policy_mismatched_logps: torch.Tensor,
    reference_mismatched_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """The whole KTO step on one device: the KL estimate from the mismatched pairs, then
    the loss. Shapes as in `kto_loss` and `mismatched_kl`."""
    kl = mismatched_kl(policy_mismatched_logps, reference_mismatched_logps)
    return kto_loss(
        policy_logps, reference_logps, desirable, kl, beta, desirable_weight, undesirable_weight
    )
