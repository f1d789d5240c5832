"""`python -m flows.demo --nights N`: the loop for N nights instead of one cycle.

Each night the simulated users chat with whatever `chat` serves and vote through Kafka,
then one alignment cycle runs ([cycle] strategy: --strategy, or the config's); after
the last night they chat once more, with what it published. With --change-at K, from
night K on they vote by a second taste that likes the curt answers the first disliked
(deploy/local/chat_model.py: curt_taste). It prints a line per night, draws the liked
share per night (nights.png in the run directory) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console


def run_nights(
    args: argparse.Namespace, run_dir: Path, console: Console, started: float
) -> dict[str, Any]:
    from connectors.feedback.ingest import Ingestor
    from deploy.local.chat_model import chat_prompts, curt_taste, taste
    from deploy.local.prefect_server import prefect_api
    from deploy.local.stack import local_stack
    from flows.alignment import alignment_cycle
    from flows.demo_model import demo_model
    from flows.simulate import simulate

    model, overrides = demo_model(args, run_dir, console)
    if args.strategy:
        overrides["cycle"] = {**overrides.get("cycle", {}), "strategy": args.strategy}
    prompts = [[{"role": "user", "content": p}] for p in chat_prompts()]
    nights: list[dict[str, Any]] = []
    console.print("starting the broker, vLLM and Prefect (health-checked, about a minute)")
    with (
        local_stack(run_dir, model, overrides, api_key=secrets.token_hex(16)) as stack,
        prefect_api(run_dir / "logs" / "prefect.log", home=run_dir / "prefect", ui=False),
    ):
        settings = stack.settings
        for night in range(1, args.nights + 2):  # the last round only chats
            chosen = curt_taste if args.change_at and night >= args.change_at else taste
            chats = simulate(
                settings, prompts, chosen, users=args.users, chats=args.chats,
                seed=args.seed * 1000 + night, run=f"night{night}-s{args.seed}",
                progress=False,
            )  # fmt: skip
            entry = {
                "night": night,
                "taste": chosen.__name__,
                "answered_by": ", ".join(sorted(chats.by_model)),
                "liked_share": round(chats.liked / max(chats.chats, 1), 4),
            }
            if night <= args.nights:
                Ingestor(settings).run(threading.Event(), idle_exit_seconds=2.0)
                state = alignment_cycle(config=str(stack.config), return_state=True)
                record = state.result(raise_on_failure=False) if state.is_completed() else {}
                entry["cycle"] = record.get("status", "failed")
                entry["reason"] = record.get("reason") or str(state.message)
            nights.append(entry)
            console.print(
                f"night {night}: {entry['answered_by']} liked {entry['liked_share']:.1%}"
                + (f"; cycle {entry['cycle']}: {entry['reason'][:90]}" if "cycle" in entry else "")
            )
    chart = _chart(nights, args.change_at, run_dir / "nights.png")
    return {
        "nights": nights,
        "strategy": settings.cycle.strategy,
        "liked": [n["liked_share"] for n in nights],
        "published": sum(n.get("cycle") == "published" for n in nights),
        "seconds": round(time.monotonic() - started, 1),
        "status": "published" if any(n.get("cycle") == "published" for n in nights) else "none",
        "chart": str(chart),
        "run_dir": str(run_dir),
    }


def _chart(nights: list[dict[str, Any]], change_at: int | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    xs = [n["night"] for n in nights]
    ax.plot(xs, [100 * n["liked_share"] for n in nights], marker="o")
    for n in nights:
        if n.get("cycle") == "published":
            ax.annotate("published", (n["night"] + 0.5, 3), ha="center", fontsize=8, color="green")
    if change_at:
        ax.axvline(change_at - 0.5, color="grey", linestyle="--")
        ax.text(change_at - 0.45, 92, "taste changes", color="grey")
    ax.set(xlabel="night (the last only chats)", ylabel="answers liked (%)", ylim=(0, 100))
    ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
