"""Why a training run cannot start or go on: one type per cause a caller acts on."""

from __future__ import annotations


class TrainError(RuntimeError):
    """The run cannot start or cannot go on; the message says why and what to do."""


class CheckpointMismatch(TrainError):
    """The checkpoint to resume belongs to a run with other data, model or options."""


class DivergedError(TrainError):
    """The loss or the gradients became NaN or infinite."""


class GeneralAbilityError(TrainError):
    """The general held-out NLL rose past the configured bound."""
