"""Many nights of the whole loop, once per strategy: does the liked share climb, hold,
and follow a change of taste?

    python -m bench.nights [--nights 6] [--change-at 4] [--seeds 0,1,2]
                           [--strategies retrain,continual] [--chats 600]

One local stack for the whole run (the broker, vLLM with the swap plugin, a Prefect
server) on the demo model (deploy/local/chat_model.py). Each (strategy, seed) is a
loop of its own: its alias, topic, store, registry and cycle work dir. Each night:

1. simulated users ask `--chats` questions of whatever the alias serves (the base model
   before the first publish) and vote through Kafka, by the demo's taste; from night
   `--change-at` on, by a second taste that likes the curt answers the first disliked
   (deploy/local/chat_model.py: curt_taste);
2. `kto-loop ingest` stores the votes;
3. one alignment cycle runs (the Prefect flow, [cycle] strategy = the strategy).

Per night it records the version that answered, the liked share of that night's
chats, the cycle's decision and why, the training set (examples, new, replay,
on-policy share), the seconds of snapshot, train, gate and publish, the drift the gate
measured, and the night's peak RSS of this process (the cycle runs in it; reset with
/proc/self/clear_refs each night). The goals, on the mean of the seeds:

- before the change, the liked share never drops more than 2 points from one night to
  the next;
- by night 3 it is at least 30 points over night 1;
- after the change, it recovers to within 5 points of its pre-change level (the night
  before the change) within 2 nights.

A chart of the liked share per night for each strategy, the change marked, and the
JSON go to bench/results/nights.{json,png}; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import secrets
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console

RESULTS = Path("bench/results")
DROP_LIMIT, CLIMB_GOAL, RECOVER_WITHIN, RECOVER_NIGHTS = 2.0, 30.0, 5.0, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=6)
    parser.add_argument("--change-at", type=int, default=4, help="first night of taste 2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default="retrain,continual")
    parser.add_argument("--chats", type=int, default=600)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=Path("data/nights"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("KTO_LOOP_EVENTS__USER_HASH_KEY", secrets.token_hex(32))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    root = (args.workdir / time.strftime("%Y%m%dT%H%M%S")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = args.strategies.split(",")

    from deploy.local.processes import interruptible

    with interruptible():
        loops = run_all(args, root, seeds, strategies, console)
    result = summarise(loops, args, strategies)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nights.json").write_text(json.dumps({**result, "loops": loops}, indent=2) + "\n")
    plot(loops, strategies, args.change_at, args.out / "nights.png")
    print(json.dumps(result))


def run_all(
    args: argparse.Namespace, root: Path, seeds: list[int], strategies: list[str], console: Console
) -> list[dict[str, Any]]:
    from deploy.local.chat_model import build_chat_model
    from deploy.local.prefect_server import prefect_api
    from deploy.local.stack import local_stack
    from flows.demo_model import DEMO_OVERRIDES

    with console.status("building the demo model"):
        model = build_chat_model(root / "model", seed=0)
    loops = []
    with (
        local_stack(root / "stack", model, DEMO_OVERRIDES, api_key=secrets.token_hex(16)) as stack,
        prefect_api(root / "stack" / "logs" / "prefect.log", home=root / "prefect", ui=False),
    ):
        for seed in seeds:
            for strategy in strategies:
                loops.append(run_loop(args, root, stack, model, strategy, seed, console))
    return loops


def run_loop(
    args: argparse.Namespace,
    root: Path,
    stack: Any,
    model: Path,
    strategy: str,
    seed: int,
    console: Console,
) -> dict[str, Any]:
    """One strategy's nights, on a loop of its own (alias, topic, store, registry)."""
    from connectors.config import load_settings
    from connectors.feedback.kafka_clients import ensure_topics
    from deploy.local.stack import stack_sections, write_config
    from flows.demo_model import DEMO_OVERRIDES

    name = f"{strategy}-s{seed}"
    here = root / name
    sections = stack_sections(here, stack.broker.bootstrap, stack.vllm.url, model)
    for section, values in {
        **DEMO_OVERRIDES,
        "kafka": {"topic": f"fb-{name}", "group_id": f"ingest-{name}"},
        "cycle": {"alias": f"chat-{name}", "strategy": strategy},
        "train": {**DEMO_OVERRIDES["train"], "seed": seed},
    }.items():
        sections[section] = {**sections.get(section, {}), **values}
    config = write_config(root / f"{name}.toml", sections)
    settings = load_settings(config)
    ensure_topics(settings.kafka, [settings.kafka.topic, settings.kafka.dead_letter_topic])
    nights = []
    for night in range(1, args.nights + 1):
        nights.append(run_night(args, settings, config, night, seed, name))
        n = nights[-1]
        console.print(
            f"{name} night {night}: {n['answered_by']} liked {n['liked_share']:.1%}; "
            f"cycle {n['status']}: {n['reason'][:100]}"
        )
    return {"strategy": strategy, "seed": seed, "nights": nights}


def run_night(
    args: argparse.Namespace, settings: Any, config: Path, night: int, seed: int, name: str
) -> dict[str, Any]:
    from connectors.feedback.ingest import Ingestor
    from deploy.local.chat_model import chat_prompts, curt_taste, taste
    from flows.alignment import alignment_cycle
    from flows.simulate import simulate

    _reset_peak_rss()
    prompts = [[{"role": "user", "content": p}] for p in chat_prompts()]
    chosen = curt_taste if night >= args.change_at else taste
    chats = simulate(
        settings,
        prompts,
        chosen,
        users=args.users,
        chats=args.chats,
        seed=seed * 1000 + night,
        run=f"{name}-n{night}",
        progress=False,
    )
    Ingestor(settings).run(threading.Event(), idle_exit_seconds=2.0)
    state = alignment_cycle(config=str(config), return_state=True)
    record = state.result(raise_on_failure=False) if state.is_completed() else {}
    gate, plan, steps = (
        record.get("gate") or {},
        record.get("plan") or {},
        record.get("step_seconds") or {},
    )
    return {
        "night": night,
        "taste": chosen.__name__,
        "answered_by": ",".join(sorted(chats.by_model)),
        "liked_share": chats.liked / max(chats.chats, 1),
        "chats": chats.chats,
        "status": record.get("status", "failed"),
        "reason": record.get("reason") or str(state.message),
        "version": record.get("version"),
        "examples": plan.get("examples"),
        "new": plan.get("new"),
        "replay": plan.get("replay"),
        "on_policy_share": plan.get("on_policy_share"),
        "drift": gate.get("drift"),
        "seconds": {k: steps.get(k) for k in ("snapshot", "train", "gate", "publish")},
        "peak_rss_mb": _peak_rss_mb(),
    }  # fmt: skip


def summarise(
    loops: list[dict[str, Any]], args: argparse.Namespace, strategies: list[str]
) -> dict[str, Any]:
    """Mean liked share per night per strategy, and each goal met or missed."""
    out: dict[str, Any] = {"bench": "nights", "nights": args.nights, "change_at": args.change_at}
    for strategy in strategies:
        runs = [loop["nights"] for loop in loops if loop["strategy"] == strategy]
        means = [
            statistics.mean(run[i]["liked_share"] for run in runs) * 100 for i in range(args.nights)
        ]
        out[strategy] = goals(means, args.change_at)
        out[strategy]["liked_pts"] = [round(m, 1) for m in means]
        out[strategy]["published"] = sum(n["status"] == "published" for run in runs for n in run)
    return out


def goals(means: list[float], change_at: int) -> dict[str, Any]:
    """The three goals on a list of mean liked shares (points), night 1 first."""
    before = means[: change_at - 1]
    worst_drop = max((a - b for a, b in itertools.pairwise(before)), default=0.0)
    climb = means[2] - means[0] if len(means) >= 3 else None
    level = before[-1] if before else None
    after = means[change_at : change_at + RECOVER_NIGHTS]
    recovered = None
    if level is not None:
        recovered = next((i + 1 for i, m in enumerate(after) if m >= level - RECOVER_WITHIN), None)
    return {
        "worst_drop_before_change_pts": round(worst_drop, 1),
        "drop_goal_met": worst_drop <= DROP_LIMIT,
        "climb_by_night3_pts": None if climb is None else round(climb, 1),
        "climb_goal_met": climb is not None and climb >= CLIMB_GOAL,
        "pre_change_level_pts": None if level is None else round(level, 1),
        "recovered_after_nights": recovered,
        "recover_goal_met": recovered is not None,
    }


def plot(loops: list[dict[str, Any]], strategies: list[str], change_at: int, path: Path) -> None:
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for k, strategy in enumerate(strategies):
        runs = [loop["nights"] for loop in loops if loop["strategy"] == strategy]
        for run in runs:
            ax.plot([n["night"] for n in run], [100 * n["liked_share"] for n in run],
                    color=f"C{k}", alpha=0.25, linewidth=1)  # fmt: skip
        nights = [n["night"] for n in runs[0]]
        means = [
            statistics.mean(100 * run[i]["liked_share"] for run in runs) for i in range(len(nights))
        ]
        ax.plot(nights, means, color=f"C{k}", marker="o", linewidth=2, label=f"{strategy} (mean)")
    ax.axvline(change_at - 0.5, color="grey", linestyle="--")
    ax.text(change_at - 0.45, 2, "taste changes", color="grey")
    ax.set_xlabel("night (its chats are answered by what the previous night published)")
    ax.set_ylabel("liked share of the night's chats, %")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
