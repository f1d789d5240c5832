"""Is this LoRA adapter fit to serve? Checked before any server sees it.

A NaN weight serves garbage, a rank above the server's --max-lora-rank is refused by vLLM
mid-publish, and an adapter trained on another base model either fails to load or, when
the shapes happen to fit, serves nonsense. All of that is visible in the files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# vLLM accepts only these values for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class ServingLimits:
    """What the servers accept.

    Attributes:
        max_lora_rank: the value given to vLLM's --max-lora-rank.
        base_fingerprint: the served base model's fingerprint, or None to skip that check.
    """

    max_lora_rank: int
    base_fingerprint: str | None = None


class AdapterRefused(Exception):
    """The adapter must not be served (or registered); `problems` lists every reason."""

    def __init__(
        self, where: str, problems: list[str], when: str = "before any server was touched"
    ) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"adapter {where} refused {when}:\n{lines}")


def _module_of(key: str) -> tuple[str, str] | None:
    """("model.layers.0.self_attn.q_proj", "A") for a peft LoRA weight key, else None."""
    for part in ("A", "B"):
        marker = f".lora_{part}."
        if marker in key:
            module = key.split(marker)[0]
            return module.removeprefix("base_model.model."), part
    return None


def check_adapter(
    adapter_config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    base_shapes: Mapping[str, tuple[int, ...]] | None,
    limits: ServingLimits,
    adapter_base_fingerprint: str | None = None,
) -> list[str]:
    """Every reason this adapter must not be served; empty when it may.

    Args:
        adapter_config: the adapter's adapter_config.json.
        tensors: its weights by key (peft's `...<module>.lora_A.weight` names).
        base_shapes: the served base model's weight shapes by name, e.g.
            "model.layers.0.self_attn.q_proj.weight" -> (out, in); None skips the check.
        limits: what the servers accept.
        adapter_base_fingerprint: the base-model fingerprint the trainer recorded, if any.
    """
    problems = adapter_problems(adapter_config, tensors)
    for where, r in _ranks(adapter_config).items():
        if isinstance(r, int) and r > limits.max_lora_rank:
            problems.append(
                f"LoRA rank {r} ({where}) is above the servers' --max-lora-rank "
                f"{limits.max_lora_rank}: vLLM refuses it; train with [lora] r <= "
                f"{limits.max_lora_rank} or restart vLLM with a larger --max-lora-rank "
                f"(one of {', '.join(map(str, VLLM_LORA_RANKS))})"
            )
    if base_shapes is not None:
        problems += _shape_problems(tensors, base_shapes)
    if (
        adapter_base_fingerprint
        and limits.base_fingerprint
        and adapter_base_fingerprint != limits.base_fingerprint
    ):
        problems.append(
            f"trained on a base model with fingerprint {adapter_base_fingerprint}, but the "
            f"served base model's is {limits.base_fingerprint}: train on the served model"
        )
    return problems


def _ranks(adapter_config: Mapping) -> dict[str, object]:
    ranks = {"r": adapter_config.get("r")}
    pattern = adapter_config.get("rank_pattern") or {}
    ranks.update({f"rank_pattern[{k}]": v for k, v in pattern.items()})
    return ranks


def adapter_problems(adapter_config: Mapping, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Every reason no server could serve this adapter, whatever its limits: not LoRA, a
    rank that is not a positive integer, no weights, NaN or inf weights. The registry
    refuses such an adapter before it becomes a version."""
    problems: list[str] = []
    if adapter_config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {adapter_config.get('peft_type')!r}; vLLM serves LORA only")
    for where, r in _ranks(adapter_config).items():
        if not isinstance(r, int) or r < 1:
            problems.append(f"adapter_config.json {where} is {r!r}, not a positive rank")
    if not tensors:
        problems.append("adapter_model.safetensors holds no weights")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t.float()).all()]
    if bad:
        problems.append(
            f"{len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); the training "
            "run diverged: retrain with a lower learning rate"
        )
    return problems


def _shape_problems(
    tensors: Mapping[str, torch.Tensor],
    base_shapes: Mapping[str, tuple[int, ...]],
) -> list[str]:
    missing: list[str] = []
    mismatched: list[str] = []
    for key, t in tensors.items():
        parsed = _module_of(key)
        if parsed is None:
            continue
        module, part = parsed
        base = base_shapes.get(f"{module}.weight")
        if base is None:
            missing.append(module)
            continue
        out_features, in_features = base[0], base[-1]
        if part == "A" and (t.ndim != 2 or t.shape[1] != in_features):
            mismatched.append(f"{key} {tuple(t.shape)} vs base {module} in={in_features}")
        if part == "B" and (t.ndim != 2 or t.shape[0] != out_features):
            mismatched.append(f"{key} {tuple(t.shape)} vs base {module} out={out_features}")
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} adapted module(s) do not exist in the served base model "
            f"(first: {missing[0]}): the adapter was trained on another model"
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} weight shape(s) do not fit the served base model "
            f"(first: {mismatched[0]}): the adapter was trained on another model"
        )
    return problems
