"""Where a run computes: decided once at the entry point and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    """The device, the autocast dtype (None: full precision), and this process's rank
    among `world` data-parallel ranks."""

    device: torch.device
    autocast: torch.dtype | None = None
    rank: int = 0
    world: int = 1

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype to load weights in: bf16 under bf16 autocast, else fp32."""
        return torch.bfloat16 if self.autocast is not None else torch.float32

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0
