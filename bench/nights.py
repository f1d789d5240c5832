"""Many nights of the whole loop, once per configuration: does the liked share climb,
hold, and follow a change of taste; and does a canary stop a bad candidate?

    python -m bench.nights [--nights 6] [--change-at 4] [--seeds 0,1,2] [--chats 800]
        [--strategies retrain,retrain:canary,continual:canary] [--canary 0.5]
        [--checks 4] [--half-life-votes 0] [--flip-night 0] [--name nights]

One local stack for the whole run (the broker, vLLM with the swap plugin, a Prefect
server) on the demo model (deploy/local/chat_model.py). Each (configuration, seed) is a
loop of its own: its alias, topic, store, registry and cycle work dir. A configuration
is a [cycle] strategy, `retrain` or `continual`, with `:canary` when each night's
candidate goes into a canary on `--canary` of the users (sticky by user) instead of
being published to everyone. Each night:

1. simulated users ask `--chats` questions of whatever the alias serves (the base model
   before the first publish; the canary's two versions while one runs) and vote
   through Kafka, by the demo's taste; from night `--change-at` on, by a second taste
   that likes the curt answers the first disliked (deploy/local/chat_model.py:
   curt_taste). On `--flip-night` they vote the opposite of their taste, so the
   candidate trained that night learns the wrong way round (the bad candidate);
2. `kto-loop ingest` stores the votes; with a canary, the chats come in `--checks`
   parts, each followed by ingest and a canary check (flows/canary.py), as a
   scheduled check would run during the day. Before a final verdict acts, both
   versions answer `--truth-chats` unvoted chats, judged by the users' taste: the
   verdict's ground truth;
3. one alignment cycle runs (the Prefect flow).

Per night it records the versions that answered and the liked share of each, the
liked share of the night's chats (by the users' true taste), every canary check (arms,
interval, outcome), the cycle's decision and why, the shift check, the training set,
the seconds of snapshot, train, gate and publish, the drift the gate measured, and the
night's peak RSS of this process (reset with /proc/self/clear_refs each night). The
goals, on the mean of the seeds:

- before the change, no drop of more than 2 points from one night to the next, on any
  seed;
- by night 3, at least 30 points over night 1;
- after the change, back within 5 points of the pre-change level (the night before
  the change) within 2 nights;
- no canary promotes a candidate whose true liked share is below the served one's;
- a flipped-vote candidate never gets more than the canary share of a night's traffic,
  and is rolled back within [canary] max_votes.

A chart (the liked share per night per configuration; for each canary configuration's
first seed, the traffic per version and each version's liked share) and the JSON go
to bench/results/<name>.{json,png}; the last stdout line is one JSON object.
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
    parser.add_argument("--strategies", default="retrain,retrain:canary,continual:canary")
    parser.add_argument("--chats", type=int, default=600)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=Path("data/nights"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--canary",
        type=float,
        default=0.5,
        help="the canary share of a configuration named STRATEGY:canary",
    )
    parser.add_argument(
        "--checks", type=int, default=4, help="canary checks a night (its chats in as many parts)"
    )
    parser.add_argument(
        "--half-life-votes",
        type=int,
        default=0,
        help="[snapshot] half_life_votes (0: every vote weighs the same)",
    )
    parser.add_argument(
        "--flip-night",
        type=int,
        default=0,
        help="on this night the users vote the opposite of their taste, so the next "
        "candidate is trained on flipped votes (the bad-candidate benchmark)",
    )
    parser.add_argument(
        "--truth-chats",
        type=int,
        default=400,
        help="with a canary, chats (not voted) that measure both versions' true liked share "
        "at each verdict",
    )
    parser.add_argument("--name", default="nights", help="results file name")
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
    (args.out / f"{args.name}.json").write_text(
        json.dumps({**result, "loops": loops}, indent=2) + "\n"
    )
    plot(loops, strategies, args, args.out / f"{args.name}.png")
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
    config_name: str,
    seed: int,
    console: Console,
) -> dict[str, Any]:
    """One configuration's nights, on a loop of its own (alias, topic, store, registry).

    `config_name` is a strategy, "retrain" or "continual", with ":canary" when the
    cycle's candidates go into a canary on `--canary` of the users."""
    from connectors.config import load_settings
    from connectors.feedback.kafka_clients import ensure_topics
    from deploy.local.stack import stack_sections, write_config
    from flows.demo_model import DEMO_OVERRIDES

    strategy, _, variant = config_name.partition(":")
    canary = variant == "canary"
    name = f"{strategy}{'-canary' if canary else ''}-s{seed}"
    here = root / name
    sections = stack_sections(here, stack.broker.bootstrap, stack.vllm.url, model)
    overrides: dict[str, dict[str, Any]] = {
        **DEMO_OVERRIDES,
        "kafka": {"topic": f"fb-{name}", "group_id": f"ingest-{name}"},
        "cycle": {"alias": f"chat-{name}", "strategy": strategy},
        "train": {**DEMO_OVERRIDES["train"], "seed": seed},
    }
    if canary:
        # The nights last minutes: a canary may run for the rest of the benchmark, and a
        # new night's candidate replaces one still undecided.
        overrides["canary"] = {
            "enabled": True,
            "share": args.canary,
            "max_votes": 3 * args.chats,
            "on_new_candidate": "replace",
        }
    if args.half_life_votes:
        overrides["snapshot"] = {"half_life_votes": args.half_life_votes}
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    config = write_config(root / f"{name}.toml", sections)
    settings = load_settings(config)
    ensure_topics(settings.kafka, [settings.kafka.topic, settings.kafka.dead_letter_topic])
    nights = []
    for night in range(1, args.nights + 1):
        nights.append(run_night(args, settings, config, night, seed, name, canary))
        n = nights[-1]
        console.print(
            f"{name} night {night}: {n['answered_by']} liked {n['liked_share']:.1%}; "
            f"canary {[c['status'] for c in n['checks']]}; "
            f"cycle {n['status']}: {n['reason'][:100]}"
        )
    return {"config": config_name, "strategy": strategy, "seed": seed, "nights": nights}


def run_night(
    args: argparse.Namespace,
    settings: Any,
    config: Path,
    night: int,
    seed: int,
    name: str,
    canary: bool,
) -> dict[str, Any]:
    """One night: the users chat and vote (in `--checks` parts, the canary checked after
    each, when there is one), then one cycle."""
    from connectors.feedback.ingest import Ingestor
    from deploy.local.chat_model import chat_prompts, curt_taste, taste
    from flows.alignment import alignment_cycle
    from flows.simulate import simulate

    _reset_peak_rss()
    prompts = [[{"role": "user", "content": p}] for p in chat_prompts()]
    chosen = curt_taste if night >= args.change_at else taste
    flipped = night == args.flip_night
    voting = _opposite(chosen) if flipped else chosen
    parts = args.checks if canary else 1
    chats = liked = 0
    by_model: dict[str, list[int]] = {}  # answered by -> [chats, liked by the users' taste]
    checks: list[dict[str, Any]] = []
    for part in range(parts):
        n = args.chats // parts + (part < args.chats % parts)
        sim = simulate(
            settings,
            prompts,
            voting,
            users=args.users,
            chats=n,
            seed=seed * 1000 + night if parts == 1 else (seed * 1000 + night) * 100 + part,
            run=f"{name}-n{night}" if parts == 1 else f"{name}-n{night}p{part}",
            progress=False,
        )
        chats += sim.chats
        liked += sim.chats - sim.liked if flipped else sim.liked
        for model, (k, votes_liked) in sim.by_model.items():
            tally = by_model.setdefault(model, [0, 0])
            tally[0] += k
            tally[1] += k - votes_liked if flipped else votes_liked
        Ingestor(settings).run(threading.Event(), idle_exit_seconds=2.0)
        if canary:
            checks.append(check(args, settings, prompts, chosen, seed * 1000 + night))
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
        "votes_flipped": flipped,
        "answered_by": ",".join(sorted(by_model)),
        "by_model": {m: {"chats": k, "liked": v} for m, (k, v) in sorted(by_model.items())},
        "liked_share": liked / max(chats, 1),
        "chats": chats,
        "checks": checks,
        "status": record.get("status", "failed"),
        "reason": record.get("reason") or str(state.message),
        "version": record.get("version"),
        "candidate": record.get("version") and f"{settings.cycle.alias}@{record['version']}",
        "shift": record.get("shift"),
        "examples": plan.get("examples"),
        "new": plan.get("new"),
        "replay": plan.get("replay"),
        "on_policy_share": plan.get("on_policy_share"),
        "drift": gate.get("drift"),
        "seconds": {k: steps.get(k) for k in ("snapshot", "train", "gate", "publish")},
        "peak_rss_mb": _peak_rss_mb(),
    }  # fmt: skip


def check(
    args: argparse.Namespace, settings: Any, prompts: list, taste: Any, seed: int
) -> dict[str, Any]:
    """One canary check (flows/canary.py). Before a final verdict acts, both versions
    answer `--truth-chats` unvoted chats (the same chats and sampling seeds), judged by
    the users' taste: their true liked shares, to say whether the verdict was right."""
    from flows.canary import canary_verdict, check_canary
    from flows.simulate import simulate

    alias = settings.cycle.alias
    peek = canary_verdict(settings, alias)
    truth = None
    if peek is not None and peek[1].final and args.truth_chats:
        truth = {}
        for arm in (peek[1].served, peek[1].candidate):
            sim = simulate(settings, prompts, taste, model=arm.name, users=args.users,
                           chats=args.truth_chats, seed=seed + 7919, send=False,
                           run=f"truth-{arm.name}", progress=False)  # fmt: skip
            truth[arm.name] = round(sim.liked_share, 4)
    done = check_canary(settings, alias)
    out = {"status": done["status"], "outcome": done.get("outcome")}
    if "verdict" in done:
        v = done["verdict"]
        out |= {
            "served": v["served"]["name"],
            "candidate": v["candidate"]["name"],
            "arms": {a["name"]: [a["liked"], a["votes"]] for a in (v["served"], v["candidate"])},
            "estimate": v["estimate"],
            "lower": v["lower"],
            "upper": v["upper"],
        }
    if truth is not None:
        out["true_liked_share"] = truth
    return out


def _opposite(taste: Any) -> Any:
    def opposite(messages: Any, answer: str) -> bool:
        return not taste(messages, answer)

    opposite.__name__ = f"opposite_of_{taste.__name__}"
    return opposite


def summarise(
    loops: list[dict[str, Any]], args: argparse.Namespace, strategies: list[str]
) -> dict[str, Any]:
    """Mean liked share per night per configuration, each goal met or missed, and
    what the canaries decided."""
    out: dict[str, Any] = {"bench": args.name, "nights": args.nights, "change_at": args.change_at}
    for config in strategies:
        runs = [loop["nights"] for loop in loops if loop["config"] == config]
        means = [
            statistics.mean(run[i]["liked_share"] for run in runs) * 100 for i in range(args.nights)
        ]
        out[config] = goals(means, args.change_at, runs)
        out[config]["liked_pts"] = [round(m, 1) for m in means]
        out[config]["published"] = sum(n["status"] == "published" for run in runs for n in run)
        if config.endswith(":canary"):
            out[config]["canary"] = canary_summary(runs, args)
    return out


def canary_summary(runs: list[list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """What the canaries decided, whether each promotion was right by the users' true
    taste, and the most traffic a candidate got before its verdict."""
    ended = [c for run in runs for n in run for c in n["checks"] if c.get("outcome")]
    promotions = [c for c in ended if c["outcome"] == "promoted"]
    wrong = [
        c
        for c in promotions
        if c.get("true_liked_share")
        and c["true_liked_share"][c["candidate"]] < c["true_liked_share"][c["served"]]
    ]
    started = sum(n["status"] == "canary" for run in runs for n in run)
    return {
        "started": started,
        "outcomes": {
            o: sum(c["outcome"] == o for c in ended)
            for o in ("promoted", "rolled_back", "inconclusive")
        },
        "promotions_of_a_worse_candidate": len(wrong),
        "worse_promotions": wrong,
        "votes_to_verdict": [sum(v[1] for v in c["arms"].values()) for c in ended],
        "flipped_candidate": flipped_candidate(runs, args) if args.flip_night else None,
    }


def flipped_candidate(runs: list[list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """The candidate trained on the flipped night's votes, in each loop: the most of a
    night's traffic it got, and the verdict on it."""
    out = []
    for run in runs:
        night = run[args.flip_night - 1]
        version = night.get("version")
        if not version or night["status"] != "canary":
            out.append({"version": version, "status": night["status"]})
            continue
        name = night["candidate"]
        shares = [
            n["by_model"].get(name, {}).get("chats", 0) / max(n["chats"], 1)
            for n in run[args.flip_night :]
        ]
        verdicts = [
            c for n in run[args.flip_night :] for c in n["checks"] if c.get("candidate") == name
        ]
        final = next((c for c in verdicts if c.get("outcome")), None)
        out.append({
            "candidate": name,
            "max_night_traffic_share": round(max(shares, default=0.0), 4),
            "outcome": final and final["outcome"],
            "votes_at_verdict": final and sum(v[1] for v in final["arms"].values()),
        })  # fmt: skip
    return {"loops": out, "max_votes": 3 * args.chats, "share": args.canary}


def goals(
    means: list[float], change_at: int, runs: list[list[dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """The goals on a list of mean liked shares (points), night 1 first, and the worst
    drop before the change on any one run."""
    before = means[: change_at - 1]
    worst_drop = max((a - b for a, b in itertools.pairwise(before)), default=0.0)
    seed_drop = max(
        (
            100 * (a["liked_share"] - b["liked_share"])
            for run in runs or []
            for a, b in itertools.pairwise(run[: change_at - 1])
        ),
        default=0.0,
    )
    climb = means[2] - means[0] if len(means) >= 3 else None
    level = before[-1] if before else None
    after = means[change_at : change_at + RECOVER_NIGHTS]
    recovered = None
    if level is not None:
        recovered = next((i + 1 for i, m in enumerate(after) if m >= level - RECOVER_WITHIN), None)
    return {
        "worst_drop_before_change_pts": round(worst_drop, 1),
        "worst_drop_on_a_seed_pts": round(seed_drop, 1),
        "drop_goal_met": seed_drop <= DROP_LIMIT,
        "climb_by_night3_pts": None if climb is None else round(climb, 1),
        "climb_goal_met": climb is not None and climb >= CLIMB_GOAL,
        "pre_change_level_pts": None if level is None else round(level, 1),
        "recovered_after_nights": recovered,
        "recover_goal_met": recovered is not None,
    }


def plot(
    loops: list[dict[str, Any]], configs: list[str], args: argparse.Namespace, path: Path
) -> None:
    """The liked share per night of each configuration (the seeds faint, their mean
    bold); under it, for each canary configuration's first seed, each night's traffic
    by the version that answered and each version's liked share."""
    canaries = [c for c in configs if c.endswith(":canary")]
    fig = Figure(figsize=(9, 4.5 + 3 * bool(canaries)))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if canaries else 1, max(1, len(canaries)))
    ax = fig.add_subplot(grid[0, :])
    for k, config in enumerate(configs):
        runs = [loop["nights"] for loop in loops if loop["config"] == config]
        for run in runs:
            ax.plot([n["night"] for n in run], [100 * n["liked_share"] for n in run],
                    color=f"C{k}", alpha=0.25, linewidth=1)  # fmt: skip
        nights = [n["night"] for n in runs[0]]
        means = [
            statistics.mean(100 * run[i]["liked_share"] for run in runs) for i in range(len(nights))
        ]
        ax.plot(nights, means, color=f"C{k}", marker="o", linewidth=2, label=f"{config} (mean)")
    if args.change_at <= args.nights:
        ax.axvline(args.change_at - 0.5, color="grey", linestyle="--")
        ax.text(args.change_at - 0.45, 2, "taste changes", color="grey")
    if args.flip_night:
        ax.axvline(args.flip_night, color="C3", linestyle=":")
        ax.text(args.flip_night + 0.05, 92, "votes flipped", color="C3")
    ax.set_xlabel("night")
    ax.set_ylabel("liked share of the night's chats, %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    for k, config in enumerate(canaries):
        run = next(loop["nights"] for loop in loops if loop["config"] == config)
        _traffic(fig.add_subplot(grid[1, k]), run, config)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _traffic(ax: Any, run: list[dict[str, Any]], config: str) -> None:
    """Stacked bars: each night's share of chats per answering version; dots: the liked
    share of each version's answers that night."""
    versions = sorted({m for n in run for m in n["by_model"]}, key=_version_order)
    bottom = [0.0] * len(run)
    nights = [n["night"] for n in run]
    for k, version in enumerate(versions):
        shares = [100 * n["by_model"].get(version, {}).get("chats", 0) / max(n["chats"], 1)
                  for n in run]  # fmt: skip
        label = version.rpartition("@")[2] if "@" in version else "base"
        ax.bar(nights, shares, bottom=bottom, color=f"C{k}", alpha=0.5, label=label)
        liked = [
            (n["night"], 100 * n["by_model"][version]["liked"] / n["by_model"][version]["chats"])
            for n in run
            if n["by_model"].get(version, {}).get("chats")
        ]
        ax.plot(*zip(*liked, strict=True), color=f"C{k}", marker="o", linestyle="none")
        bottom = [b + x for b, x in zip(bottom, shares, strict=True)]
    ax.set_title(f"{config}, first seed: traffic (bars) and liked share (dots)", fontsize=8)
    ax.set_xlabel("night")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=6, ncol=2)


def _version_order(name: str) -> tuple[int, str]:
    _, _, version = name.rpartition("@v")
    return (int(version), name) if version.isdigit() else (0, name)


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
