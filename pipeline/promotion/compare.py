"""Score models on one held-out set against one reference, for the gate.

Every model is scored with the same pairs the trainer evaluates on (each record's own
completion, and mismatched pairs within fixed batches for the KL estimate), and the
reference is always the base model with no adapter, so every adapter's numbers share
one scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.feedback.examples import Example
from pipeline.training.batching import eval_pairs
from pipeline.training.encode import encode_records
from pipeline.training.errors import TrainError
from pipeline.training.evaluate import HeldoutMetrics, heldout_metrics
from pipeline.training.options import TrainOptions
from pipeline.training.runtime import Runtime
from pipeline.training.scoring import score_pairs


class HeldoutComparison:
    """The held-out set encoded once and the reference's scores of its pairs; then
    `metrics(model)` for each model to compare.

    Args:
        base: the base causal LM (the reference), on `runtime.device`.
        tokenizer: its tokenizer, with the chat template serving uses.
        heldout: the examples, as in a snapshot's held-out split.
        options: beta, lengths, prompt format, batch size (the KL batches).

    Raises:
        TrainError: no held-out examples.
    """

    def __init__(
        self,
        base: Any,
        tokenizer: Any,
        heldout: Sequence[Example],
        options: TrainOptions,
        runtime: Runtime,
    ) -> None:
        if not heldout:
            raise TrainError("no held-out records to score adapters on")
        self.examples, _ = encode_records(
            list(heldout), tokenizer, options.lengths(), options.prompt_format
        )
        self.matched, self.mismatched = eval_pairs(len(self.examples), options.batch_size)
        self.pad_id, self.options, self.runtime = tokenizer.pad_token_id, options, runtime
        self.desirable = torch.tensor([e.desirable for e in self.examples])
        base.eval()
        self.reference = self._score(base)

    def reference_metrics(self) -> HeldoutMetrics:
        """The base model's own metrics (its rewards are all 0)."""
        return self._metrics(self.reference)

    def metrics(self, causal_lm: Any) -> HeldoutMetrics:
        """The held-out metrics of a model (the base with an adapter set)."""
        causal_lm.eval()
        return self._metrics(self._score(causal_lm))

    def _score(self, causal_lm: Any) -> dict[tuple[int, int], float]:
        rt = self.runtime
        pairs = self.matched + self.mismatched
        return score_pairs(causal_lm, self.examples, pairs, self.pad_id, rt.device, rt.autocast)

    def _metrics(self, policy: dict[tuple[int, int], float]) -> HeldoutMetrics:
        return heldout_metrics(
            _tensor(policy, self.matched),
            _tensor(self.reference, self.matched),
            _tensor(policy, self.mismatched),
            _tensor(self.reference, self.mismatched),
            self.desirable,
            self.options.beta,
        )


def _tensor(scores: dict, pairs: list) -> torch.Tensor:
    if not pairs:
        return torch.zeros(1, dtype=torch.float64)
    return torch.tensor([scores[p] for p in pairs], dtype=torch.float64)
