"""Does learning carry over? kto-loop and TRL's KTOTrainer on tasks kto-loop was not
tuned for, several seeds each.

    python -m bench.tasks [--tasks capitals brevity signoff followup] [--seeds 5]
                          [--set train.learning_rate=1e-3 ...] [--tag NAME]

For each task of bench/task_suite.py and each seed:

1. model: a tiny Llama-style chat model (hidden 128, 2 layers) with a tokenizer trained
   on the task's sentences, fine-tuned (seeded) on the task's corpus, so that sampled
   answers mix liked and disliked ones;
2. feedback: FEEDBACK_SAMPLES answers sampled at temperature 1 for each feedback prompt,
   labelled by the task's taste, written in TRL's conversational unpaired format
   (prompt, completion, label), shuffled: repeats and empty answers as sampling gives
   them;
3. TRL: KTOTrainer with its documented defaults (beta 0.1, lambda_D / lambda_U from the
   rows' class counts as its docs advise) and the learning rate, epochs, batch size and
   LoRA of ours, on the same rows;
4. ours: what `kto-loop train --data feedback.jsonl` does with the shipped defaults
   (and any --set overrides): the file becomes a snapshot, the class weights are
   chosen, `flows.training.run_training` runs;
5. measure: EVAL_SAMPLES answers sampled (temperature 1, the same sampling seed) for
   each held-out prompt, none of them in the feedback, from the base model, TRL's
   adapter and ours; the liked share of each.

Models, feedback and TRL's results are cached under --work (keyed by what makes them),
so a second run with other settings of ours only trains ours again. Prints a table,
draws bench/results/tasks[_TAG].png; the last line of stdout is one JSON object (also
written to bench/results/tasks[_TAG].json) with, per task, the mean gain and the worst
seed of both trainers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.task_suite import TASKS, Task, messages_json, task

RESULTS = Path(__file__).parent / "results"
FEEDBACK_SAMPLES = 12
EVAL_SAMPLES = 8
SFT_BATCH = 32
SFT_LR = 3e-3
# Bump when the model recipe changes: cached models are keyed by it.
MODEL_RECIPE = "v1"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """One (task, seed): its model, feedback file and the base model's liked share."""

    task: str
    seed: int
    model: Path
    feedback: Path
    rows: int
    feedback_liked: float
    distinct_share: float
    empty: int
    before: float


def _sample_liked(t: Task, model: Path, adapter: Path | None, prompts: list, n: int, seed: int):
    from deploy.local.chat_model import sample_answers

    answers = sample_answers(model, adapter, prompts, n, seed=seed, max_new_tokens=t.max_new_tokens)
    return answers, sum(t.taste(a.prompt, a.text) for a in answers) / len(answers)


def prepare(t: Task, seed: int, work: Path) -> Prepared:
    """Build (or reuse) the model and feedback of a task and seed."""
    from deploy.local.chat_model import fine_tune
    from deploy.local.tiny_model import TinyModelSpec, build_tiny_model

    home = work / t.name / f"seed{seed}-{MODEL_RECIPE}-{t.sft_steps}"
    done = home / "prepared.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        return Prepared(**{**meta, "model": home / "model", "feedback": home / "feedback.jsonl"})
    model = home / "model"
    spec = TinyModelSpec(
        hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, seed=seed
    )
    build_tiny_model(model, spec, corpus=t.corpus)
    rng = random.Random(seed)
    pairs = t.sft(rng, t.sft_steps * SFT_BATCH)
    fine_tune(
        model,
        [(None, messages_json(m), a) for m, a in pairs],
        steps=t.sft_steps,
        batch_size=SFT_BATCH,
        learning_rate=SFT_LR,
        seed=seed,
    )
    answers, liked = _sample_liked(t, model, None, t.feedback_prompts, FEEDBACK_SAMPLES, seed)
    rows = [
        {
            "prompt": a.prompt,
            "completion": [{"role": "assistant", "content": a.text}],
            "label": t.taste(a.prompt, a.text),
        }
        for a in answers
    ]
    random.Random(seed).shuffle(rows)
    feedback = home / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, before = _sample_liked(t, model, None, t.heldout_prompts, EVAL_SAMPLES, 10_000 + seed)
    distinct = {(messages_json(a.prompt), a.text) for a in answers}
    prepared = Prepared(
        task=t.name,
        seed=seed,
        model=model,
        feedback=feedback,
        rows=len(rows),
        feedback_liked=liked,
        distinct_share=len(distinct) / len(rows),
        empty=sum(not a.text.strip() for a in answers),
        before=before,
    )
    done.write_text(json.dumps(asdict(prepared), default=str) + "\n")
    return prepared


def _settings(overrides: dict[str, dict[str, Any]]) -> Any:
    from connectors.config import load_settings

    return load_settings(None, **overrides)


def run_trl(t: Task, p: Prepared, settings: Any, work: Path) -> dict[str, Any]:
    """TRL's KTOTrainer on the feedback rows; cached by everything that shapes it."""
    train, lora = settings.train, settings.lora
    config = {
        "learning_rate": train.learning_rate,
        "epochs": train.epochs,
        "batch_size": train.batch_size,
        "lora": [lora.r, lora.alpha, lora.dropout, list(lora.target_modules)],
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    cached = p.feedback.parent / f"trl-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    from pipeline.balance import choose_weights

    datasets.disable_progress_bars()
    rows = [json.loads(line) for line in p.feedback.read_text().splitlines()]
    n_d = sum(r["label"] for r in rows)
    balance = choose_weights(n_d, len(rows) - n_d)
    out = p.feedback.parent / f"trl-{key}"
    started = time.perf_counter()
    trainer = KTOTrainer(
        model=str(p.model),
        args=KTOConfig(
            output_dir=str(out),
            per_device_train_batch_size=train.batch_size,
            learning_rate=train.learning_rate,
            num_train_epochs=train.epochs,
            desirable_weight=balance.lambda_desirable,
            undesirable_weight=balance.lambda_undesirable,
            seed=p.seed,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            report_to=[],
            logging_steps=10_000,
            disable_tqdm=True,
            dataloader_num_workers=0,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(p.model),
        peft_config=LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    trainer.train()
    trainer.save_model(str(out))
    seconds = time.perf_counter() - started
    _, after = _sample_liked(t, p.model, out, t.heldout_prompts, EVAL_SAMPLES, 10_000 + p.seed)
    result = {"config": config, "after": after, "seconds": round(seconds, 1)}
    cached.write_text(json.dumps(result) + "\n")
    return result


def run_ours(t: Task, p: Prepared, settings: Any, out: Path) -> dict[str, Any]:
    """What `kto-loop train --data feedback.jsonl` does, then the held-out liked share."""
    from connectors.snapshots import load_training_data
    from flows.training import TrainInputs, run_training
    from pipeline.balance import choose_weights
    from pipeline.train_errors import TrainError

    started = time.perf_counter()
    snap = load_training_data(p.feedback, settings.snapshot.options())
    c = snap.counts
    repeats = settings.train.repeats
    balance = choose_weights(*snap.class_counts("train", repeats), settings.balance)
    row: dict[str, Any] = {
        "examples": c.total,
        "heldout": c.heldout_desirable + c.heldout_undesirable,
    }
    if balance.skip_reason is not None:
        return row | {"status": "skipped", "reason": balance.skip_reason, "after": p.before}
    try:
        result = run_training(
            TrainInputs.from_snapshot(
                snap, balance, p.model, out, repeats, progress=False, plots=False
            ),
            settings.train.overridden(seed=p.seed),
            settings.lora,
        )
    except TrainError as exc:
        return row | {"status": "failed", "reason": str(exc), "after": p.before}
    m = result.manifest
    _, after = _sample_liked(t, p.model, out, t.heldout_prompts, EVAL_SAMPLES, 10_000 + p.seed)
    return row | {
        "status": m.status,
        "steps": m.steps,
        "planned_steps": m.planned_steps,
        "best_step": m.best_step,
        "kl_clamp_rate": m.diagnostics["kl_clamp_rate"],
        "after": after,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """--set section.key=value (value parsed as JSON when it parses) into sections."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        section, _, key = name.partition(".")
        if not key:
            raise SystemExit(f"--set {pair!r}: expected section.key=value")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(section, {})[key] = parsed
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: mean gain and worst seed of both trainers, in liked-share points."""
    out = {}
    for name in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == name]
        ours = [r["ours"]["after"] - r["before"] for r in mine]
        trl = [r["trl"]["after"] - r["before"] for r in mine]
        out[name] = {
            "seeds": len(mine),
            "before_mean": statistics.mean(r["before"] for r in mine),
            "ours_gain_mean": statistics.mean(ours),
            "ours_gain_worst": min(ours),
            "trl_gain_mean": statistics.mean(trl),
            "trl_gain_worst": min(trl),
            "ours_no_gain": sum(r["ours"].get("status") == "no_gain" for r in mine),
            "ours_below_start": sum(g < 0 for g in ours),
            "trl_below_start": sum(g < 0 for g in trl),
        }
    return out


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def print_table(console: Console, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    table = Table(title="liked share on held-out prompts (%), before -> after")
    for col in (
        "task",
        "seed",
        "before",
        "TRL after",
        "ours after",
        "TRL gain",
        "ours gain",
        "ours status",
    ):
        table.add_column(col, justify="left" if col in ("task", "ours status") else "right")
    for r in rows:
        o = r["ours"]
        status = o.get("status", "?")
        if "best_step" in o:
            status += f" ({o['best_step']}/{o['planned_steps']})"
        table.add_row(
            r["task"],
            str(r["seed"]),
            f"{100 * r['before']:.1f}",
            f"{100 * r['trl']['after']:.1f}",
            f"{100 * o['after']:.1f}",
            _pts(r["trl"]["after"] - r["before"]),
            _pts(o["after"] - r["before"]),
            status,
        )
    for name, s in summary.items():
        table.add_row(
            f"[bold]{name}[/bold]",
            "mean",
            f"{100 * s['before_mean']:.1f}",
            "",
            "",
            f"{_pts(s['trl_gain_mean'])} (worst {_pts(s['trl_gain_worst'])})",
            f"{_pts(s['ours_gain_mean'])} (worst {_pts(s['ours_gain_worst'])})",
            f"{s['ours_no_gain']} no_gain",
        )
    console.print(table)


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Per task, each seed's gain for TRL and ours, and their means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(2.6 * len(names) + 2, 5))
    for x, name in enumerate(names):
        mine = [r for r in rows if r["task"] == name]
        for dx, who, color in ((-0.18, "trl", "tab:gray"), (0.18, "ours", "tab:blue")):
            gains = [100 * (r[who]["after"] - r["before"]) for r in mine]
            ax.scatter([x + dx] * len(gains), gains, color=color, alpha=0.6, s=25)
            ax.hlines(statistics.mean(gains), x + dx - 0.12, x + dx + 0.12, color=color, lw=3)
    ax.scatter([], [], color="tab:gray", label="TRL KTOTrainer (seeds, bar = mean)")
    ax.scatter([], [], color="tab:blue", label="kto-loop (seeds, bar = mean)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("liked share gain on held-out prompts (points)")
    ax.set_title("Learning on tasks kto-loop was not tuned for")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="SECTION.KEY=V")
    parser.add_argument("--work", type=Path, default=Path("data/bench-tasks"))
    parser.add_argument("--tag", default="", help="results go to tasks[_TAG].json/.png")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL unless cached")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads: tiny models gain little from more, and 1 gives the same "
        "numbers on any machine",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    console = Console(stderr=True, width=160)
    overrides = _overrides(args.overrides)
    settings = _settings(overrides)
    started = time.perf_counter()
    rows = []
    (args.work / "runs").mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{args.tag or 'run'}-", dir=args.work / "runs"))
    for name in args.tasks:
        t = task(name)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            p = prepare(t, seed, args.work)
            trl = run_trl(t, p, settings, args.work) if not args.no_trl else {"after": p.before}
            ours = run_ours(t, p, settings, run_dir / name / f"seed{seed}")
            rows.append(
                {
                    "task": name,
                    "seed": seed,
                    "before": p.before,
                    "trl": trl,
                    "ours": ours,
                    "feedback": {
                        k: v for k, v in asdict(p).items() if k not in ("model", "feedback")
                    },
                }
            )
            console.print(
                f"[{time.perf_counter() - started:6.0f}s] {name} seed {seed}: feedback "
                f"{p.rows} rows, {p.feedback_liked:.0%} liked, {p.distinct_share:.0%} distinct, "
                f"{p.empty} empty; liked before {p.before:.1%}, TRL {trl['after']:.1%}, ours "
                f"{ours['after']:.1%} ({ours.get('status')}, best step {ours.get('best_step')}/"
                f"{ours.get('planned_steps')})"
            )
    summary = summarise(rows)
    print_table(Console(width=160), rows, summary)
    stem = "tasks" + (f"_{args.tag}" if args.tag else "")
    png = RESULTS / f"{stem}.png"
    plot(rows, summary, png)
    gains = [s["ours_gain_mean"] for s in summary.values()]
    report = {
        "bench": "tasks",
        "overrides": overrides,
        "train": asdict(settings.train),
        "tasks": summary,
        "ours_gain_mean_all": statistics.mean(gains),
        "trl_gain_mean_all": statistics.mean(s["trl_gain_mean"] for s in summary.values()),
        "runs": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "plot": str(png.relative_to(RESULTS.parent.parent)),
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, default=str))


if __name__ == "__main__":
    main()
