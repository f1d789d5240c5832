"""Does our trainer, with TRL's recipe, take TRL's steps? TRL's KTOTrainer and
`kto-loop`'s trainer with `trl_recipe` on the same rows, model and seed: the loss and
the KL estimate at every step, and the liked share of what each ends with.

    python -m bench.trl_parity [--tasks fact-00 carry-00 ...] [--seeds 1]

Each instance and seed is prepared as bench.tasks prepares it (a tiny chat model, its
feedback rows), then trained by both (cached under --work, shared with bench.tasks).
A row is in parity when every step's loss and KL agree within --tolerance and the
liked shares after within PARITY_POINTS. Prints a table, draws
bench/results/trl_parity.png (both loss curves of the first row); the last line of
stdout is one JSON object, also written to bench/results/trl_parity.json. Exit 1 when a
row is out of parity.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.tasks import PARITY_POINTS, RESULTS, _load_task, _settings, prepare, run_exact, run_trl

DEFAULT_TASKS = ["fact-00", "length-00", "tone-00", "format-00", "carry-00", "refusal-00"]


def compare_runs(trl: dict[str, Any], exact: dict[str, Any]) -> dict[str, Any]:
    """How far apart the two runs are, step by step and at the end."""
    steps = min(len(trl["loss"]), len(exact["loss"]))
    return {
        "steps_trl": len(trl["loss"]),
        "steps_exact": len(exact["loss"]),
        "max_loss_diff": max(abs(a - b) for a, b in zip(trl["loss"], exact["loss"], strict=False)),
        "max_kl_diff": max(abs(a - b) for a, b in zip(trl["kl"], exact["kl"], strict=False)),
        "kl_final_trl": trl["kl"][steps - 1],
        "kl_final_exact": exact["kl"][steps - 1],
        "after_trl": trl["after"],
        "after_exact": exact["after"],
    }


def plot(trl: dict[str, Any], exact: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "kl"), strict=True):
        ax.plot(trl[key], color="tab:gray", lw=3, alpha=0.6, label="TRL KTOTrainer")
        ax.plot(exact[key], color="tab:orange", lw=1, label="kto-loop, trl_recipe")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("data/bench-tasks"))
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    settings = _settings({})
    rows, first = [], None
    for name in args.tasks:
        t = _load_task(name)
        for seed in range(args.seeds):
            p = prepare(t, seed, args.work)
            trl, exact = run_trl(t, p, settings, args.work), run_exact(t, p, settings)
            first = first or (trl, exact, f"{name} seed {seed}")
            row = {"task": name, "seed": seed, "before": p.before, **compare_runs(trl, exact)}
            row["parity"] = (
                row["steps_trl"] == row["steps_exact"]
                and row["max_loss_diff"] <= args.tolerance
                and row["max_kl_diff"] <= args.tolerance * max(1.0, row["kl_final_trl"])
                and abs(row["after_trl"] - row["after_exact"]) <= PARITY_POINTS / 100
            )
            rows.append(row)
    table = Table(title="TRL's KTOTrainer against kto-loop's trl_recipe, same rows and seed")
    for col in ("task", "seed", "steps", "max |loss diff|", "max |kl diff|", "liked after"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["task"],
            str(r["seed"]),
            f"{r['steps_trl']} / {r['steps_exact']}",
            f"{r['max_loss_diff']:.2e}",
            f"{r['max_kl_diff']:.2e}",
            f"{r['after_trl']:.1%} / {r['after_exact']:.1%}",
        )
    Console(width=140).print(table)
    png = RESULTS / "trl_parity.png"
    if first is not None:
        plot(*first, png)
    report = {
        "bench": "trl_parity",
        "rows": rows,
        "in_parity": sum(r["parity"] for r in rows),
        "of": len(rows),
        "max_loss_diff": max(r["max_loss_diff"] for r in rows),
        "max_after_diff_points": 100 * max(abs(r["after_trl"] - r["after_exact"]) for r in rows),
        "plot": str(png.relative_to(RESULTS.parent.parent)),
    }
    (RESULTS / "trl_parity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    return 0 if report["in_parity"] == report["of"] else 1


if __name__ == "__main__":
    sys.exit(main())
