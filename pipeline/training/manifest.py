"""The manifest of a trained adapter: what it was trained from and how, and what the
run measured. One type, written and read through `as_dict` / `from_dict`, so every
reader (the CLI, the cycle, the registry, the benchmarks) sees the same fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

KIND = "kto-loop.adapter"
TRAINED = "trained"
NO_GAIN = "no_gain"
# Trained, but its answers could not be judged (the taste model was too weak to trust):
# written for inspection, never offered to serving unless the gate is told to.
UNJUDGED = "unjudged"


@dataclass(frozen=True)
class Provenance:
    """Where a run starts from, as the entry point knows it (paths as text)."""

    base_model: str
    base_model_fingerprint: str
    snapshot_id: str | None = None
    init_adapter: str | None = None
    reference_adapter: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunMetrics:
    """The numbers a run is judged by: the last step's training row, the held-out
    metrics of the start and of the weights kept, and the general NLL around them."""

    train_final: dict[str, Any]
    heldout_before: dict[str, float] | None
    heldout_after: dict[str, float] | None
    general_nll_before: float | None
    general_nll_after: float | None


@dataclass(frozen=True)
class Manifest:
    """A finished run. `status` is "trained", "no_gain" when the weights kept are the
    starting point, or "unjudged" when the answers could not be judged, with
    `status_reason` saying why. `judge` holds the answer check: whether its judge was
    trusted, the held-out AUC, and the verdicts of the step kept (selection and
    confirmation samples)."""

    status: str
    status_reason: str | None
    base_model: str
    base_model_fingerprint: str
    snapshot_id: str | None
    init_adapter: str | None
    reference_adapter: str | None
    counts: dict[str, int]
    encoding: dict[str, int]
    lambdas: dict[str, Any]
    beta: float
    options: dict[str, Any]
    lora: dict[str, Any]
    steps: int
    planned_steps: int
    resumed_from_step: int | None
    best_step: int | None
    stopped_early: bool
    stop_reason: str | None
    world_size: int
    device: str
    precision: str
    metrics: RunMetrics
    diagnostics: dict[str, Any]
    warnings: tuple[str, ...]
    seconds: float
    versions: dict[str, str]
    plots: tuple[str, ...] = ()
    judge: dict[str, Any] | None = None
    # What the run's report says beside the warnings: worth knowing, nothing to change.
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = KIND

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of manifest.json: the fields, with `extra`'s keys at the top
        level."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["metrics"] = asdict(self.metrics)
        out["warnings"] = list(self.warnings)
        out["notes"] = list(self.notes)
        out["plots"] = list(self.plots)
        return {"kind": self.kind, **{k: v for k, v in out.items() if k != "kind"}, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Read a manifest.json object; keys this version does not know go to `extra`."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known["metrics"] = RunMetrics(**data["metrics"])
        known["warnings"] = tuple(data.get("warnings", ()))
        known["notes"] = tuple(data.get("notes", ()))
        known["plots"] = tuple(data.get("plots", ()))
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


def run_status(best_step: int | None) -> tuple[str, str | None]:
    """What a finished run's adapter is: ("trained", None), or ("no_gain", why) when
    the weights kept are the starting point (the selection kept step 0). The adapter is
    written either way; a no_gain one equals the start (a fresh LoRA is the base model,
    a warm start its init adapter), so nothing downstream should ship it as new."""
    if best_step == 0:
        return NO_GAIN, (
            "no evaluated step beat the starting point on the held-out selection signal; "
            "the adapter written is the starting point"
        )
    return TRAINED, None
