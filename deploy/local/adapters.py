"""LoRA adapters with seeded random weights, for tests and benchmarks of serving.

peft starts lora_B at zero, so a fresh adapter answers exactly like the base model; here
both matrices are random, so each seed gives an adapter whose greedy answers differ from
the base's and from other seeds'. The files are the ones peft and vLLM read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def make_random_adapter(
    base_model: str | Path,
    out: str | Path,
    seed: int,
    rank: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.5,
) -> Path:
    """Write a LoRA adapter for `base_model` with random A and B to `out`.

    Args:
        seed: picks the weights; the same seed writes the same adapter.
        scale: standard deviation of B; larger moves answers further from the base.
    Returns:
        The adapter directory (adapter_model.safetensors and adapter_config.json).
    """
    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                std = scale if "lora_B" in name else 1.0 / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(out)
    # peft records the base as the path given; keep it, it is what a user would see.
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_model)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def poison_adapter(adapter: str | Path, value: float = float("nan")) -> Path:
    """Overwrite one weight of an adapter with `value` (NaN by default), in place."""
    from safetensors.torch import load_file

    path = Path(adapter) / "adapter_model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, path)
    return Path(adapter)
