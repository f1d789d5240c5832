"""KTO class weights: lambda_D and lambda_U from the counts of desirable and undesirable
examples, or the reason a run should be skipped.

The KTO paper (arXiv 2402.01306, eq. 8 and section 4) recommends weights with

    (lambda_D * n_D) / (lambda_U * n_U)  in  [1, 4/3]

so that, summed over the data, desirable examples weigh slightly more than
undesirable ones. The rule here:

- counts whose ratio n_D / n_U already lies in the band keep lambda_D = lambda_U = 1:
  reweighting balanced data changes nothing the paper asks for;
- otherwise the minority class's weight is raised so the ratio hits `target_ratio`,
  and the majority's stays 1.0. The smaller lambda is always 1.0, so the loss scale
  of the majority class (and with it the learning rate that suits it) is unchanged;
- the raised weight is capped at `max_weight`; an example weighted 50x makes its
  batch's gradient mostly one example, so past the cap the ratio stays below the band
  and the explanation says so;
- one class alone (only likes, or only dislikes) is valid KTO training: its lambda is
  1.0 and the ratio is undefined.

The default target, 7/6, is the middle of the band: a weight computed from counts
that change by a few examples between rounds still lands inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

BAND_LOW = 1.0
BAND_HIGH = 4 / 3


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class BalanceOptions:
    """How the class weights are chosen, and when a run has too little data: the
    `[balance]` configuration section (bounds checked whenever one is built)."""

    target_ratio: Annotated[
        float,
        Field(
            ge=BAND_LOW,
            le=BAND_HIGH,
            description="(lambda_D n_D) / (lambda_U n_U) for imbalanced data, in [1, 4/3]",
        ),
    ] = 7 / 6
    min_examples: Annotated[
        int, Field(ge=1, description="fewer training examples skip the run")
    ] = 32
    min_per_class: Annotated[
        int, Field(ge=1, description="a class present with fewer examples skips the run")
    ] = 8
    max_weight: Annotated[float, Field(ge=1, description="cap on the minority class's lambda")] = (
        10.0
    )


@dataclass(frozen=True)
class Balance:
    """The class weights for one training run, the counts they came from, the ratio
    (lambda_D n_D) / (lambda_U n_U) they give (None with one class), why the run should
    be skipped (None to train) and one sentence that says all of it with the numbers."""

    lambda_desirable: float
    lambda_undesirable: float
    n_desirable: int
    n_undesirable: int
    ratio: float | None
    skip_reason: str | None
    explanation: str


def choose_weights(
    n_desirable: int, n_undesirable: int, options: BalanceOptions | None = None
) -> Balance:
    """Choose lambda_D and lambda_U for the counts of the training split.

    Raises:
        ValueError: a negative count.
    """
    options = options or BalanceOptions()
    n_d, n_u = n_desirable, n_undesirable
    if n_d < 0 or n_u < 0:
        raise ValueError(f"counts must be non-negative, got {n_d} desirable and {n_u} undesirable")
    counts = f"{n_d} desirable and {n_u} undesirable examples"

    skip = _skip_reason(n_d, n_u, options)
    if n_d == 0 or n_u == 0:
        only = "desirable" if n_u == 0 else "undesirable"
        explanation = (
            f"{counts}: one class only, so the ratio is undefined and both weights are 1.0 "
            f"(KTO trains on {only} examples alone)"
        )
        return _result(1.0, 1.0, n_d, n_u, None, skip, explanation)

    natural = n_d / n_u
    if BAND_LOW <= natural <= BAND_HIGH:
        return _result(
            1.0,
            1.0,
            n_d,
            n_u,
            natural,
            skip,
            f"{counts}: the ratio {natural:.3f} is already in [1, 4/3], so both weights are 1.0",
        )

    # Raise the minority class: desirable when n_D / n_U < 1, undesirable when > 4/3.
    if natural < BAND_LOW:
        lambda_d, lambda_u = options.target_ratio * n_u / n_d, 1.0
        raised, wanted = "lambda_D", lambda_d
        lambda_d = min(lambda_d, options.max_weight)
    else:
        lambda_d, lambda_u = 1.0, n_d / (options.target_ratio * n_u)
        raised, wanted = "lambda_U", lambda_u
        lambda_u = min(lambda_u, options.max_weight)
    ratio = lambda_d * n_d / (lambda_u * n_u)
    explanation = (
        f"{counts}: lambda_D = {lambda_d:.3f}, lambda_U = {lambda_u:.3f} give "
        f"({lambda_d:.3f} * {n_d}) / ({lambda_u:.3f} * {n_u}) = {ratio:.3f}"
    )
    if wanted > options.max_weight:
        explanation += (
            f", outside [1, 4/3] because {raised} would need {wanted:.3f} and is capped at "
            f"max_weight {options.max_weight:g}"
        )
    else:
        explanation += f", the target {options.target_ratio:.3f} inside [1, 4/3]"
    return _result(lambda_d, lambda_u, n_d, n_u, ratio, skip, explanation)


def _skip_reason(n_d: int, n_u: int, options: BalanceOptions) -> str | None:
    total = n_d + n_u
    if total < options.min_examples:
        return (
            f"only {total} training examples, fewer than balance.min_examples = "
            f"{options.min_examples}; collect more feedback or lower min_examples"
        )
    for name, n in (("desirable", n_d), ("undesirable", n_u)):
        if 0 < n < options.min_per_class:
            return (
                f"only {n} {name} examples, fewer than balance.min_per_class = "
                f"{options.min_per_class}: too few to weight reliably; collect more, lower "
                "min_per_class, or drop the class to train on the other alone"
            )
    return None


def _result(
    lambda_d: float,
    lambda_u: float,
    n_d: int,
    n_u: int,
    ratio: float | None,
    skip: str | None,
    explanation: str,
) -> Balance:
    if skip is not None:
        explanation = f"skipped: {skip} ({explanation})"
    return Balance(lambda_d, lambda_u, n_d, n_u, ratio, skip, explanation + ".")
