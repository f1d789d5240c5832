"""Score several adapters on one held-out set against the base model, for the gate.

The base model is loaded once; each adapter is attached to it by peft and scored with
the same pairs the trainer evaluates on (each record's own completion, and mismatched
pairs within fixed batches for the KL estimate). The reference is always the base with
no adapter, so every adapter's numbers share one scale.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from pipeline.encode import encode_records
from pipeline.evaluate import HeldoutMetrics, heldout_metrics
from pipeline.train_options import TrainOptions
from pipeline.trainer import (
    Record,
    TrainError,
    autocast_dtype,
    check_model_dir,
    eval_pairs,
    load_tokenizer,
    resolve_device,
    score_pairs,
)

log = logging.getLogger(__name__)


def score_adapters(
    base_model: Path,
    adapters: Mapping[str, Path | None],
    heldout: Sequence[Record],
    options: TrainOptions,
    chat_template: str | None = None,
) -> dict[str, HeldoutMetrics]:
    """Held-out metrics of each named adapter (None = the base model itself).

    Args:
        base_model: the model every adapter was trained on.
        adapters: name -> adapter directory, or None for the base model.
        heldout: the records to score, as in a snapshot's held-out split.
        options: beta, lengths, prompt format, batch size (the KL batches), device.

    Raises:
        TrainError: no held-out records, or a model or adapter that cannot be loaded.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not heldout:
        raise TrainError("no held-out records to score adapters on")
    check_model_dir(base_model)
    device = resolve_device(options)
    autocast = autocast_dtype(options, device)
    tokenizer = load_tokenizer(base_model, chat_template)
    examples, _ = encode_records(list(heldout), tokenizer, options.lengths(), options.prompt_format)
    matched, mismatched = eval_pairs(len(examples), options.batch_size)
    pairs = matched + mismatched
    pad_id = tokenizer.pad_token_id

    base = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=torch.bfloat16 if autocast else torch.float32
    ).to(device)
    base.eval()
    reference = score_pairs(base, examples, pairs, pad_id, device, autocast)
    desirable = torch.tensor([e.desirable for e in examples])

    def metrics(policy: dict) -> HeldoutMetrics:
        return heldout_metrics(
            _tensor(policy, matched),
            _tensor(reference, matched),
            _tensor(policy, mismatched),
            _tensor(reference, mismatched),
            desirable,
            options.beta,
        )

    out: dict[str, HeldoutMetrics] = {}
    model = None
    for name, path in adapters.items():
        if path is None:
            out[name] = metrics(reference)
            continue
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise TrainError(f"cannot load the adapter {name} from {path}: {exc}") from None
        model.set_adapter(name)
        model.eval()
        scores = score_pairs(model.get_base_model(), examples, pairs, pad_id, device, autocast)
        out[name] = metrics(scores)
        log.info(
            "%s: held-out accuracy %.3f, margin %.4f, KL %.4f",
            name,
            out[name].accuracy,
            out[name].margin,
            out[name].kl,
        )
    return out


def _tensor(scores: dict, pairs: list) -> torch.Tensor:
    if not pairs:
        return torch.zeros(1, dtype=torch.float64)
    return torch.tensor([scores[p] for p in pairs], dtype=torch.float64)
