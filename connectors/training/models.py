"""Models and tokenizers from local directories: the base model vLLM serves, with a
LoRA to train (fresh or warm-started) and, for continual rounds, a reference adapter."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.training.errors import TrainError
from pipeline.training.options import LoraOptions


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` each time it
    wraps a model, and transformers 5 answers with a FutureWarning; there is nothing for
    a user to change until peft reads the new name, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", category=FutureWarning, module=r"transformers\.modeling_utils"
        )
        yield


def check_model_dir(path: Path) -> None:
    """Refuse a path that is not a transformers model directory, saying what to pass."""
    if not path.is_dir():
        raise TrainError(f"base model directory {path} does not exist; pass --base-model DIR")
    if not (path / "config.json").is_file():
        raise TrainError(
            f"{path} holds no config.json: point --base-model at a transformers model "
            "directory (the one you serve with vLLM)"
        )


def load_tokenizer(base_model: Path, chat_template: str | None = None) -> Any:
    """The base model's tokenizer, with a pad token and, if given, a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base_model: Path, dtype: torch.dtype) -> Any:
    """The causal LM, without its generation cache (training and scoring need none)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    base.config.use_cache = False
    return base


def load_policy(
    base_model: Path,
    lora: LoraOptions,
    device: torch.device,
    dtype: torch.dtype,
    init_adapter: Path | None = None,
    reference_adapter: Path | None = None,
) -> Any:
    """The base model with a trainable "default" LoRA: fresh, with `lora`'s shape, or
    the adapter in `init_adapter`; and the frozen `reference_adapter` loaded as
    "reference" when given.

    Raises:
        TrainError: the LoRA's target modules are not linear layers of this model.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_base(base_model, dtype)
    if init_adapter is not None:
        with _peft_wrapping():
            model = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
    else:
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            with _peft_wrapping():
                model = get_peft_model(base, config)
        except ValueError as exc:
            raise TrainError(
                f"cannot put LoRA on {list(lora.target_modules)}: {exc}. Set [lora] "
                "target_modules to linear layer names of this model"
            ) from None
    if reference_adapter is not None:
        model.load_adapter(reference_adapter, adapter_name="reference", is_trainable=False)
        model.set_adapter("default")
    return model.to(device)


def attach_adapter(model: Any, name: str, path: Path) -> Any:
    """`model` (a base model, or a peft model from an earlier call) with the adapter in
    `path` loaded as `name` and set active.

    Raises:
        TrainError: the adapter's files cannot be loaded.
    """
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
        else:
            with _peft_wrapping():
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TrainError(f"cannot load the adapter {name} from {path}: {exc}") from None
    model.set_adapter(name)
    return model
