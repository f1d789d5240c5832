"""The policy's checks during a run: held-out metrics against the frozen reference,
the general NLL, and the share of sampled answers that end their turn.

The reference side of every held-out pair is scored once, at setup; each evaluation
then scores the policy on the same pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from pipeline.training.batching import eval_pairs
from pipeline.training.encode import Encoded
from pipeline.training.evaluate import HeldoutMetrics, eos_logratio, heldout_metrics
from pipeline.training.options import TrainOptions
from pipeline.training.runtime import Runtime
from pipeline.training.scoring import mean_nll, reference, sampled_end_rate, score_pairs

# Held-out prompts whose sampled answers are checked for ending their turn.
END_CHECK_PROMPTS = 32


class Evaluator:
    """Evaluates the adapter as it is now; built once per run, before the first step."""

    def __init__(
        self,
        model: Any,
        heldout: Sequence[Encoded],
        general: Sequence[Encoded],
        options: TrainOptions,
        lambdas: tuple[float, float],
        pad_id: int,
        eot: int,
        runtime: Runtime,
    ) -> None:
        self.model, self.causal_lm = model, model.get_base_model()
        self.heldout, self.general = list(heldout), list(general)
        self.options, self.lambdas = options, lambdas
        self.pad_id, self.eot, self.runtime = pad_id, eot, runtime
        self.matched, self.mismatched = eval_pairs(len(self.heldout), options.batch_size)
        self.ref: dict[tuple[int, int], Any] = {}
        if self.heldout:
            with reference(model):
                self.ref = self._score(self.heldout, self.matched + self.mismatched)
        self.ends_turn = torch.tensor(
            [e.desirable and e.completion_ids[-1] == eot for e in self.heldout], dtype=torch.bool
        )
        self.check_prompts = list(dict.fromkeys(e.prompt_ids for e in self.heldout))[
            :END_CHECK_PROMPTS
        ]
        self.check_tokens = min(
            2 * max((len(e.completion_ids) for e in self.heldout), default=1),
            options.max_length - max((len(p) for p in self.check_prompts), default=0),
        )

    def reference_end_rate(self) -> float:
        """The sampled end rate of the reference (0 when the guard is off or there is
        nothing to sample for)."""
        if self.options.eos_guard <= 0 or not self.heldout:
            return 0.0
        with reference(self.model):
            return self.end_rate() or 0.0

    def end_rate(self) -> float | None:
        """Share of answers sampled for held-out prompts that end their turn."""
        if not self.check_prompts or self.check_tokens < 1:
            return None
        was_training = self.model.training
        self.model.eval()
        rate = sampled_end_rate(
            self.model,
            self.check_prompts,
            self.check_tokens,
            self.eot,
            self.pad_id,
            self.runtime.device,
            self.options.seed,
        )
        self.model.train(was_training)
        return rate

    def general_nll(self) -> float | None:
        """Mean per-token NLL of the general held-out set, if there is one."""
        if not self.general:
            return None
        return mean_nll(
            self.causal_lm, self.general, self.pad_id, self.runtime.device, self.runtime.autocast
        )

    def heldout_metrics(self) -> HeldoutMetrics | None:
        """Held-out metrics of the adapter as it is now (with the general NLL and the
        sampled end rate), or None without a held-out set."""
        if not self.heldout:
            return None
        self.model.eval()
        policy = self._score(self.heldout, self.matched + self.mismatched)
        general = self.general_nll()
        self.model.train()
        metrics = heldout_metrics(
            _column(policy, self.matched),
            _column(self.ref, self.matched),
            _column(policy, self.mismatched),
            _column(self.ref, self.mismatched),
            torch.tensor([e.desirable for e in self.heldout]),
            self.options.beta,
            *self.lambdas,
        )
        eos = eos_logratio(
            _column(policy, self.matched, 1), _column(self.ref, self.matched, 1), self.ends_turn
        )
        end_rate = self.end_rate() if self.options.eos_guard > 0 else None
        return replace(metrics, eos_logratio=eos, general_nll=general, sampled_end_rate=end_rate)

    def _score(
        self, examples: Sequence[Encoded], pairs: list[tuple[int, int]]
    ) -> dict[tuple[int, int], Any]:
        rt = self.runtime
        return score_pairs(
            self.causal_lm, examples, pairs, self.pad_id, rt.device, rt.autocast, with_last=True
        )


def _column(scores: dict, pairs: list, k: int = 0) -> torch.Tensor:
    if not pairs:
        return torch.zeros(1, dtype=torch.float64)
    return torch.tensor([scores[p][k] for p in pairs], dtype=torch.float64)
