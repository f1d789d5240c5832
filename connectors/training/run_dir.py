"""A training run's directory: the trainer's results as files.

<out>/metrics.jsonl                 one JSON row per optimizer step, written live
<out>/checkpoint/state.pt           the resume point (replaced atomically)
<out>/adapter_model.safetensors     the PEFT adapter vLLM loads, and
<out>/adapter_config.json
<out>/plots/*.png                   the run's curves
<out>/manifest.json                 written last: a directory with a manifest holds
                                    a complete adapter
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connectors.plots import plot_training
from pipeline.training.errors import TrainError
from pipeline.training.manifest import KIND, Manifest

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")

if TYPE_CHECKING:
    import torch


class RunDir:
    """The trainer's `RunStore` on a local directory.

    Args:
        path: the run's directory (created if missing).
        resume: continue from the checkpoint in it, if there is one.
        plots: draw the plots when the run finishes.
    """

    def __init__(self, path: Path, resume: bool = False, plots: bool = True) -> None:
        self.path, self.resume, self.plots = Path(path), resume, plots

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / MANIFEST).exists():
            raise TrainError(
                f"{self.path} already holds a finished adapter ({MANIFEST}); choose another --out"
            )
        if not self.resume and (self.path / CHECKPOINT).exists():
            raise TrainError(
                f"{self.path} holds a checkpoint of an unfinished run: pass --resume to "
                "continue it, or choose another --out"
            )

    def load_checkpoint(self, device: torch.device) -> dict[str, Any] | None:
        state = self.path / CHECKPOINT / "state.pt"
        if not self.resume or not state.is_file():
            return None
        import torch

        return torch.load(state, map_location=device, weights_only=False)

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        """Write the resume point atomically: a crash mid-write leaves the previous one."""
        target = self.path / CHECKPOINT
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / "state.pt.tmp"
        import torch

        torch.save(payload, tmp)
        os.replace(tmp, target / "state.pt")

    def start_metrics(self, after_step: int) -> None:
        path = self.metrics_path
        keep = []
        if after_step > 0 and path.is_file():
            keep = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= after_step
            ]
        path.write_text("".join(line + "\n" for line in keep))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """The metrics rows written so far."""
        text = self.metrics_path.read_text() if self.metrics_path.is_file() else ""
        return [json.loads(line) for line in text.splitlines() if line]

    def finish(self, model: Any, manifest: Manifest, weights: dict[str, Any]) -> Manifest:
        """Adapter files by rename, plots, then the manifest last; the resume point goes.
        `weights` are the whole trainable weights by parameter name (gathered from the
        ranks when the model is sharded), written in PEFT's format."""
        with tempfile.TemporaryDirectory(dir=self.path, prefix=".adapter-") as tmp:
            model.save_pretrained(tmp, selected_adapters=["default"], state_dict=weights)
            for name in ADAPTER_FILES:
                os.replace(Path(tmp) / name, self.path / name)
        if self.plots:
            written = plot_training(self.metrics(), self.path / "plots")
            plots = tuple(str(p.relative_to(self.path)) for p in written)
            manifest = replace(manifest, plots=plots)
        write_manifest(self.path, manifest)
        shutil.rmtree(self.path / CHECKPOINT, ignore_errors=True)
        return manifest


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write manifest.json atomically."""
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.as_dict(), indent=2, default=str) + "\n")
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest of a finished run's directory, or None when it has none (or its
    manifest.json is another tool's)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("kind") != KIND:
        return None
    return Manifest.from_dict(data)
