"""Read an adapter's files and a base model's weight shapes, for the checks before serving."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.serving.adapter_check import AdapterRefused

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, weights) of a peft LoRA directory.

    Raises:
        AdapterRefused: a file is missing, truncated or not what it claims to be.
    """
    d = Path(adapter_dir)
    problems = [f"{name} is missing" for name in (WEIGHTS, CONFIG) if not (d / name).is_file()]
    if problems:
        raise AdapterRefused(str(d), problems)
    try:
        config = json.loads((d / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterRefused(str(d), [f"{CONFIG} is not valid JSON ({e})"]) from None
    try:
        tensors = load_file(d / WEIGHTS)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise AdapterRefused(
            str(d), [f"{WEIGHTS} is unreadable (truncated or corrupt: {e}); write it again"]
        ) from None
    return config, tensors


def base_weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Every weight's shape in a safetensors model directory, read from the file headers
    (no weights are loaded, so this is cheap for any model size)."""
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir} has no *.safetensors files: [serving] base_model must be the served "
            "model's directory"
        )
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(meta["shape"])
    return shapes
