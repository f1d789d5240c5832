"""One alignment cycle end to end, against its core: training alone.

    python -m bench.cycle [--votes 2000] [--epochs 1]

Starts the local broker and a local vLLM on the tiny model, sends --votes feedback
events through Kafka into a fresh store with the real consumer, then:

- ours: a second `alignment_cycle` under Prefect's ephemeral mode, after a first one
  (which also starts Prefect's temporary API) and --votes more events (snapshot, new-feedback check,
  class weights, training, the gate scoring the candidate and the base model on the
  held-out split, registration, publishing to vLLM, the report), timed as a whole and
  per step;
- peer: `flows.training.run_training` called directly on the same snapshot records, options
  and class weights, which is what a hand-written nightly script would minimally run.

The ratio cycle/train is what the loop costs beyond training; "orchestration" is the
cycle's wall time outside its steps (Prefect, config, records, the report). On the tiny
model training is short, so the ratio here is an upper bound: the gate and the publish
do not grow with the training set, training does. The last line of stdout is one JSON
object; it and a bar chart go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path("bench/results")
TRAIN = {
    "beta": 0.1,
    "learning_rate": 2e-3,
    "batch_size": 8,
    "max_length": 96,
    "max_prompt_length": 64,
    "early_stopping_patience": 0,
    "sft_weight": 0.0,
    "eos_guard": 0.0,
}


def _ingest(settings, n: int) -> float:
    from connectors.feedback.ingest import Ingestor

    started = time.monotonic()
    ingestor = Ingestor(settings)
    stop = threading.Event()
    thread = threading.Thread(target=ingestor.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while ingestor.stats.stored < n:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"only {ingestor.stats.stored} of {n} events stored")
        time.sleep(0.1)  # the poll interval of a deadline loop
    stop.set()
    thread.join(60)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from connectors.feedback.produce import produce
    from deploy.local.stack import local_stack
    from deploy.local.synthetic import feedback_events
    from deploy.local.tiny_model import build_tiny_model
    from pipeline.feedback.sample import encode

    RESULTS.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KTO_LOOP_EVENTS__USER_HASH_KEY", secrets.token_hex(32))
    overrides = {
        "kafka": {"topic": "bench-fb", "group_id": "bench", "partitions": 2},
        "snapshot": {"heldout_fraction": 0.1},
        "train": {**TRAIN, "epochs": args.epochs},
        "cycle": {"alias": "bench"},
    }
    with tempfile.TemporaryDirectory(prefix="kto-loop-bench-cycle-") as tmp_name:
        tmp = Path(tmp_name)
        model = build_tiny_model(tmp / "model")
        with local_stack(tmp, model, overrides, api_key=secrets.token_hex(16)) as stack:
            settings, config = stack.settings, stack.config
            from flows.alignment import alignment_cycle

            # The first cycle in a process also starts Prefect's temporary API; the
            # second, on twice the votes, is the steady state a scheduled worker sees.
            records, walls = [], []
            for seed in (11, 12):
                produce(settings.kafka, [encode(e) for e in feedback_events(args.votes, seed=seed)])
                ingested = _ingest(settings, args.votes)
                if seed == 11:
                    ingest_s = ingested
                started = time.monotonic()
                state = alignment_cycle(config=str(config), return_state=True)
                walls.append(time.monotonic() - started)
                if not state.is_completed() or state.name != "Completed":
                    raise RuntimeError(f"the cycle did not publish: {state.message}")
                records.append(state.result())
            record, cycle_s = records[1], walls[1]
            direct_s = _train_directly(settings, model, record["snapshot"]["path"], tmp)

    steps = record["step_seconds"]
    result = {
        "bench": "cycle",
        "votes": record["snapshot"]["votes"],
        "epochs": args.epochs,
        "status": record["status"],
        "version": record["version"],
        "training_steps": record["training"]["steps"],
        "ingest_seconds": round(ingest_s, 2),
        "first_cycle_seconds": round(walls[0], 2),
        "cycle_seconds": round(cycle_s, 2),
        "step_seconds": steps,
        "orchestration_seconds": round(cycle_s - sum(steps.values()), 2),
        "train_direct_seconds": round(direct_s, 2),
        "ratio_cycle_over_train": round(cycle_s / direct_s, 2),
        "ratio_train_step_over_direct": round(steps["train"] / direct_s, 2),
    }
    _plot(result, RESULTS / "cycle.png")
    line = json.dumps(result)
    (RESULTS / "cycle.json").write_text(line + "\n")
    print(line)


def _train_directly(settings, model: Path, snapshot_path: str, tmp: Path) -> float:
    """The peer: the trainer alone, on the cycle's snapshot, options and weights."""
    from connectors.feedback.snapshots import read_snapshot
    from flows.training import TrainInputs, run_training
    from pipeline.feedback.balance import choose_weights

    snap = read_snapshot(snapshot_path)
    balance = choose_weights(*snap.class_counts("train", settings.train.repeats), settings.balance)
    started = time.monotonic()
    run_training(
        TrainInputs.from_snapshot(
            snap, balance, model, tmp / "direct", settings.train.repeats, progress=False
        ),
        settings.train,
        settings.lora,
    )
    return time.monotonic() - started


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = dict(result["step_seconds"])
    steps["orchestration"] = result["orchestration_seconds"]
    fig, ax = plt.subplots(figsize=(10, 3.2))
    left = 0.0
    for name, seconds in steps.items():
        ax.barh("cycle", seconds, left=left, label=f"{name} {seconds:.1f} s")
        left += seconds
    ax.barh("train() alone", result["train_direct_seconds"], color="grey")
    ax.set(
        xlabel="seconds",
        title=f"one cycle on {result['votes']} votes: {result['ratio_cycle_over_train']}x "
        "training alone",
    )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
