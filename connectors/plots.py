"""PNG plots of a training run's metrics.jsonl rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_training(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Plot loss, KL, and the rewards of desirable and undesirable completions over
    steps (training batches, and held-out evaluations where there were any), and the
    guards' view: held-out accuracy and the share of sampled answers ending their turn.

    Returns:
        The PNG files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    evals = [r for r in rows if "heldout_loss" in r]

    def series(key: str, source: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in source if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in rows], label="train", alpha=0.6)
    if evals:
        ax.plot(*series("heldout_loss", evals), "o-", label="held-out")
    ax.set(title="KTO loss", xlabel="step")
    ax.legend()
    ax = axes[1]
    ax.plot(steps, [r["kl"] for r in rows], label="train (per batch)", alpha=0.6)
    if evals:
        ax.plot(*series("heldout_kl", evals), "o-", label="held-out")
    ax.set(title="KL estimate (z_ref / beta)", xlabel="step")
    ax.legend()
    ax = axes[2]
    ax.plot(
        *series("reward_desirable", rows), label="desirable (train)", color="tab:green", alpha=0.5
    )
    ax.plot(
        *series("reward_undesirable", rows), label="undesirable (train)", color="tab:red", alpha=0.5
    )
    if evals:
        ax.plot(
            *series("heldout_reward_desirable", evals),
            "o-",
            color="tab:green",
            label="desirable (held-out)",
        )
        ax.plot(
            *series("heldout_reward_undesirable", evals),
            "o-",
            color="tab:red",
            label="undesirable (held-out)",
        )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(title="implied reward", xlabel="step")
    ax.legend()
    ax = axes[3]
    if evals:
        ax.plot(*series("heldout_accuracy", evals), "o-", label="held-out accuracy")
        ax.plot(
            *series("heldout_sampled_end_rate", evals),
            "s-",
            label="sampled answers ending their turn",
        )
    ax.set(title="guards", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend()
    fig.tight_layout()
    path = out_dir / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_gate(checks: list[dict[str, Any]], serving_name: str, promote: bool, path: Path) -> Path:
    """Bar pairs, candidate against the serving adapter, for each check the gate made
    (accuracy, margin, KL, and the generation score when there was one), each bar pair
    titled with what was required and coloured by whether it passed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(1, len(checks))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    for ax, check in zip(axes[0], checks, strict=False):
        serving = check["serving"]
        values = [serving if serving is not None else 0.0, check["candidate"]]
        colours = ["tab:grey", "tab:green" if check["passed"] else "tab:red"]
        ax.bar([serving_name, "candidate"], values, color=colours)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{check['name']}\nneeds {check['required']}", fontsize=10)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=9)
    verdict = "promoted" if promote else "refused"
    fig.suptitle(f"gate: candidate {verdict} (against {serving_name})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
