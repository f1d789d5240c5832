"""`make demo`: the whole loop on one machine, and whether it helped.

    python -m flows.demo [--seed 0] [--chats 1200] [--model-dir DIR]
    python -m flows.demo --nights 6 [--strategy continual] [--change-at 4]

1. Build the demo model (deploy/local/chat_model.py: a tiny Llama-style model with a
   locally trained tokenizer, briefly fine-tuned on a synthetic chat corpus so that
   its answers mix liked and disliked styles), unless --model-dir names a real one.
2. Start the local stack: the broker, vLLM on the CPU with the swap plugin, the store,
   and a Prefect server for the cycle (PREFECT_API_URL's instead, when set).
3. Simulated users chat with the served model and press like or dislike by a simple
   taste: an answer is liked when it is one of the friendly, on-topic templates
   ("Sure! Tea are a lovely subject..."), disliked otherwise (curt, garbled or cut
   off). Their votes stream through Kafka into the store.
4. One alignment cycle (a Prefect flow): snapshot, train, gate, register, publish;
   the new adapter is hot-swapped into vLLM as `chat`.
5. The same users ask the same questions again, with the same sampling seeds.

It prints a before/after table, writes demo.png in the run directory, stops everything
it started (also on Ctrl-C or SIGTERM; and a SIGKILL takes its servers down with it),
and ends with one JSON line:
{"liked_before", "liked_after", "gain_pts", "adapter", "seconds", ...}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from deploy.local.processes import interruptible
from flows.console import number
from flows.demo_model import demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chats", type=int, default=1200, help="chats per round")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=Path("data/demo"))
    parser.add_argument("--model-dir", type=Path, help="a local model to use instead")
    parser.add_argument(
        "--config",
        type=Path,
        help="a kto-loop TOML: its [serving] base_model is the model to use, and its "
        "[snapshot] [balance] [train] [lora] [gate] sections apply to the cycle",
    )
    parser.add_argument(
        "--nights", type=int, default=1, help="run the loop this many nights (flows/demo_nights.py)"
    )
    parser.add_argument("--strategy", choices=["retrain", "continual"], help="[cycle] strategy")
    parser.add_argument("--change-at", type=int, help="with --nights: the taste changes that night")
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the demo prints its own lines
    # Demo data is thrown away, so a fresh hash key per run is fine; production sets one.
    os.environ.setdefault("KTO_LOOP_EVENTS__USER_HASH_KEY", secrets.token_hex(32))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    # Wrapped to a terminal's width; in a log file or a pipe, one line per message.
    console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
    started = time.monotonic()
    run_dir = (args.workdir / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with interruptible():  # also when started with SIGINT ignored (`make demo &`)
            if args.nights > 1:
                from flows.demo_nights import run_nights

                result = run_nights(args, run_dir, console, started)
            else:
                result = run_demo(args, run_dir, console, started)
    except KeyboardInterrupt:
        console.print("interrupted: every process the demo started is stopped", style="yellow")
        raise SystemExit(130) from None
    print(json.dumps(result))
    if result["status"] != "published":
        raise SystemExit(1)


def _quiet_libraries() -> None:
    """Leave out what the demo's libraries print that says nothing about the demo."""
    from transformers.utils import logging as transformers_logging

    # The demo model is tiny: transformers' bars for loading and writing its weights
    # would flash by in well under a second (the demo says what each phase does).
    transformers_logging.disable_progress_bar()
    # kafka-python's event loop warns whenever one of its steps takes over 0.1 s, which
    # is routine while vLLM, training and the demo's clients share two cores.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


def run_demo(
    args: argparse.Namespace, run_dir: Path, console: Console, started: float
) -> dict[str, Any]:
    from connectors.feedback.ingest import Ingestor
    from deploy.local.chat_model import chat_prompts, taste
    from deploy.local.prefect_server import prefect_api
    from deploy.local.stack import local_stack
    from flows.simulate import simulate

    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.monotonic()
        phases[name] = round(now - since, 1)
        return now

    t = time.monotonic()
    model, overrides = demo_model(args, run_dir, console)
    t = phase("model", t)
    prompts = [[{"role": "user", "content": p}] for p in chat_prompts()]
    console.print("starting the broker, vLLM and Prefect (health-checked, about a minute)")
    with (
        local_stack(run_dir, model, overrides, api_key=secrets.token_hex(16)) as stack,
        prefect_api(run_dir / "logs" / "prefect.log", home=run_dir / "prefect", ui=False) as api,
    ):
        t = phase("stack", t)
        console.print(
            f"broker {stack.broker.bootstrap}, vLLM {stack.vllm.url}, Prefect {api}, "
            f"logs in {run_dir / 'logs'}"
        )
        settings = stack.settings
        progress = sys.stderr.isatty()

        def chat_round(name: str) -> Any:
            return simulate(
                settings,
                prompts,
                taste,
                users=args.users,
                chats=args.chats,
                seed=args.seed,
                run=f"{name}-s{args.seed}",
                progress=progress,
            )

        def ingest() -> None:
            Ingestor(settings).run(threading.Event(), idle_exit_seconds=2.0)

        before = chat_round("before")
        ingest()
        console.print(f"before: {before.liked_share:.1%} of {before.chats} answers liked")
        t = phase("chat before", t)

        from flows.alignment import alignment_cycle

        with console.status("alignment cycle: snapshot, train, gate, register, publish"):
            state = alignment_cycle(config=str(stack.config), return_state=True)
        record = state.result(raise_on_failure=False) if state.is_completed() else {}
        console.print(f"cycle: {state.name}: {state.message}")
        t = phase("cycle", t)

        after = chat_round("after")
        ingest()
        t = phase("chat after", t)

    return _summary(args, run_dir, console, started, before, after, record, phases)


def _summary(
    args: argparse.Namespace,
    run_dir: Path,
    console: Console,
    started: float,
    before: Any,
    after: Any,
    record: dict[str, Any],
    phases: dict[str, float],
) -> dict[str, Any]:
    """The before/after table and chart, and the demo's JSON result."""
    gate = record.get("gate") or {}
    candidate = gate.get("candidate") or {}
    training = record.get("training") or {}
    balance = record.get("balance") or {}
    served_after = ", ".join(sorted(after.by_model)) or "-"
    gain = round(100 * (after.liked_share - before.liked_share), 1)
    table = Table(title="the loop, before and after one cycle")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    rows = [
        ("served by", ", ".join(sorted(before.by_model)), served_after),
        ("answers liked", f"{before.liked_share:.1%}", f"{after.liked_share:.1%}"),
        ("  of chats", f"{before.chats:,}", f"{after.chats:,}"),
        ("held-out implied-reward accuracy", number(0.0, 3), number(candidate.get("accuracy"), 3)),
        ("KL to the base model (held-out)", number(0.0, 3), number(candidate.get("kl"), 3)),
        ("lambda_D / lambda_U", "", _lambdas(balance)),
        ("training steps", "", str(training.get("steps", "-"))),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    console.print(f"gain: {gain:+.1f} points; phases (s): {phases}")
    chart = _chart(before, after, phases, run_dir / "demo.png")
    return {
        "liked_before": round(before.liked_share, 4),
        "liked_after": round(after.liked_share, 4),
        "gain_pts": gain,
        "adapter": served_after,
        "seconds": round(time.monotonic() - started, 1),
        "status": record.get("status", "failed"),
        "seed": args.seed,
        "chats": args.chats,
        "kl": candidate.get("kl"),
        "lambda_desirable": balance.get("lambda_desirable"),
        "lambda_undesirable": balance.get("lambda_undesirable"),
        "phases": phases,
        "chart": str(chart),
        "run_dir": str(run_dir),
    }


def _lambdas(balance: dict[str, Any]) -> str:
    if not balance:
        return "-"
    return f"{number(balance['lambda_desirable'], 2)} / {number(balance['lambda_undesirable'], 2)}"


def _chart(before: Any, after: Any, phases: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.4]})
    names = [", ".join(sorted(before.by_model)), ", ".join(sorted(after.by_model))]
    shares = [100 * before.liked_share, 100 * after.liked_share]
    ax.bar(["before\n" + names[0], "after\n" + names[1]], shares, color=["tab:grey", "tab:green"])
    for x, v in enumerate(shares):
        ax.annotate(f"{v:.1f}%", (x, v), ha="center", va="bottom")
    ax.set(ylabel="answers liked (%)", ylim=(0, 100))
    ax.set_title(f"liked share: {shares[1] - shares[0]:+.1f} points after one cycle")
    bx.barh(list(phases), list(phases.values()), color="tab:blue")
    bx.invert_yaxis()
    bx.set(xlabel="seconds", title=f"where the {sum(phases.values()):.0f} s went")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
