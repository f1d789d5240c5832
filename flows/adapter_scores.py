"""The gate's held-out scores: the base model loaded once, each adapter attached to it
in turn and scored against the base."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from connectors.models import attach_adapter, check_model_dir, load_base, load_tokenizer
from flows.training import runtime_for
from pipeline.compare import HeldoutComparison
from pipeline.evaluate import HeldoutMetrics
from pipeline.examples import Example
from pipeline.train_options import TrainOptions

log = logging.getLogger(__name__)


def score_adapters(
    base_model: Path,
    adapters: Mapping[str, Path | None],
    heldout: Sequence[Example],
    options: TrainOptions,
    chat_template: str | None = None,
) -> dict[str, HeldoutMetrics]:
    """Held-out metrics of each named adapter (None = the base model itself).

    Args:
        base_model: the model every adapter was trained on.
        adapters: name -> adapter directory, or None for the base model.
        heldout: the examples to score, as in a snapshot's held-out split.
        options: beta, lengths, prompt format, batch size (the KL batches), device.

    Raises:
        TrainError: no held-out records, or a model or adapter that cannot be loaded.
    """
    check_model_dir(base_model)
    runtime = runtime_for(options)
    tokenizer = load_tokenizer(base_model, chat_template)
    base = load_base(base_model, runtime.weights_dtype).to(runtime.device)
    comparison = HeldoutComparison(base, tokenizer, heldout, options, runtime)
    out: dict[str, HeldoutMetrics] = {}
    model = base
    for name, path in adapters.items():
        if path is None:
            out[name] = comparison.reference_metrics()
            continue
        model = attach_adapter(model, name, path)
        out[name] = comparison.metrics(model.get_base_model())
        log.info(
            "%s: held-out accuracy %.3f, margin %.4f, KL %.4f",
            name,
            out[name].accuracy,
            out[name].margin,
            out[name].kl,
        )
    return out
