"""Does learning carry over? kto-loop and TRL's KTOTrainer on task instances
nobody tuned on, several seeds each, the same rows for every trainer.

    python -m bench.tasks [--split eval|tune|all|suite] [--tasks NAME ...] [--seeds 5]
                          [--arms trl exact ours] [--set train.learning_rate=1e-3 ...]
                          [--tag NAME]

The instances come from bench/task_families.py (24 of them, 6 families, split into a
"tune" half and an "eval" half before any tuning; defaults are chosen on "tune" only)
or, with --split suite, the four hand-made tasks of bench/task_suite.py. For each
instance and seed:

1. model: a tiny Llama-style chat model (hidden 128, 2 layers) with a tokenizer trained
   on the instance's sentences, fine-tuned (seeded) on its corpus, so that sampled
   answers mix liked and disliked ones;
2. feedback: FEEDBACK_SAMPLES answers sampled at temperature 1 for each feedback prompt,
   labelled by the instance's taste, written in TRL's conversational unpaired format
   (prompt, completion, label), shuffled: repeats and empty answers as sampling gives
   them;
3. arms, each on those rows:
   - trl: TRL's KTOTrainer (beta 0.1, lr 1e-3, 3 epochs, batch 8, LoRA r8 on q,v,
     lambda_D / lambda_U from the class counts as its docs advise);
   - exact: our trainer with TRL's recipe (pipeline.training.options.trl_recipe) on the
     rows in file order, no held-out carve-out: it must land where TRL lands;
   - ours: what `kto-loop train --data feedback.jsonl` does with the shipped defaults
     (and any --set overrides): the file becomes a snapshot (held-out share carved
     out), the class weights are chosen, `flows.training.run_training` runs. What it
     keeps is what the loop would serve: a run that ends "no_gain" or "unjudged" (its
     judge was too weak to trust, so the gate never offers it) keeps the base;
4. measure: EVAL_SAMPLES answers sampled (temperature 1, the same sampling seed) for
   each held-out prompt, none of them in the feedback, from the base model and each
   arm's adapter; the liked share of each, by the instance's true taste.

The exact arm's adapter is also shown to the judge ours uses (a taste model fit on the
snapshot's training votes, answers sampled for its held-out prompts): the collapses it
refuses are counted.

Models, feedback and the trl and exact arms are cached under --work (keyed by what
makes them), so a second run with other settings of ours only trains ours again.
Prints a table, draws bench/results/tasks[_TAG].png; the last line of stdout is one
JSON object (also written to bench/results/tasks[_TAG].json).
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
from rich.progress import Progress
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


def _load_task(name: str) -> Task:
    from bench.task_families import INSTANCES, instance

    return instance(name) if name in INSTANCES else task(name)


def _key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _rows(p: Prepared) -> list[dict[str, Any]]:
    return [json.loads(line) for line in p.feedback.read_text().splitlines()]


def run_trl(t: Task, p: Prepared, settings: Any, work: Path) -> dict[str, Any]:
    """TRL's KTOTrainer on the feedback rows; cached by everything that shapes it."""
    train, lora = settings.train, settings.lora
    config = {
        "learning_rate": train.learning_rate,
        "epochs": train.epochs,
        "batch_size": train.batch_size,
        "lora": [lora.r, lora.alpha, lora.dropout, list(lora.target_modules)],
    }
    key = _key(config)
    cached = p.feedback.parent / f"trl-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    from pipeline.feedback.balance import choose_weights

    datasets.disable_progress_bars()
    rows = _rows(p)
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
            logging_steps=1,
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
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logging every step is for the history below
    trainer.train()
    trainer.save_model(str(out))
    seconds = time.perf_counter() - started
    history = [h for h in trainer.state.log_history if "loss" in h and "kl" in h]
    _, after = _sample_liked(t, p.model, out, t.heldout_prompts, EVAL_SAMPLES, 10_000 + p.seed)
    result = {
        "config": config,
        "after": after,
        "seconds": round(seconds, 1),
        "loss": [h["loss"] for h in history],
        "kl": [h["kl"] for h in history],
        "adapter": str(out),
    }
    cached.write_text(json.dumps(result) + "\n")
    return result


def run_exact(t: Task, p: Prepared, settings: Any) -> dict[str, Any]:
    """Our trainer with TRL's recipe on the rows in file order (no held-out carve-out),
    the class weights TRL gets; cached by the recipe."""
    from flows.training import TrainInputs, run_training
    from pipeline.feedback.balance import choose_weights
    from pipeline.feedback.examples import Example
    from pipeline.training.options import TrainOptions, trl_recipe

    train = settings.train
    # TRL's arm's settings, nothing else of ours: the recipe does not move with our defaults.
    options = trl_recipe(
        TrainOptions(
            learning_rate=train.learning_rate,
            epochs=train.epochs,
            batch_size=train.batch_size,
            beta=train.beta,
            seed=p.seed,
        )
    )
    config = {"options": asdict(options), "lora": asdict(settings.lora)}
    key = _key(config)
    cached = p.feedback.parent / f"exact-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    rows = _rows(p)
    records = [
        Example(None, messages_json(r["prompt"]), r["completion"][0]["content"], r["label"])
        for r in rows
    ]
    n_d = sum(r["label"] for r in rows)
    balance = choose_weights(n_d, len(rows) - n_d)
    out = p.feedback.parent / f"exact-{key}"
    started = time.perf_counter()
    result = run_training(
        TrainInputs(
            p.model,
            records,
            out,
            desirable_weight=balance.lambda_desirable,
            undesirable_weight=balance.lambda_undesirable,
            progress=False,
            plots=False,
        ),
        options,
        settings.lora,
    )
    seconds = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    _, after = _sample_liked(t, p.model, out, t.heldout_prompts, EVAL_SAMPLES, 10_000 + p.seed)
    row = {
        "status": result.manifest.status,
        "after": after,
        "seconds": round(seconds, 1),
        "loss": [m["loss"] for m in metrics],
        "kl": [m["kl"] for m in metrics],
        "adapter": str(out),
    }
    cached.write_text(json.dumps(row) + "\n")
    return row


def judge_adapter(p: Prepared, settings: Any, adapter: Path) -> dict[str, Any]:
    """What ours' judge says of another adapter: its taste model fit on the snapshot's
    training votes, answers sampled for the snapshot's held-out prompts against the
    base's (the confirmation samples)."""
    import torch

    from connectors.feedback.snapshots import load_training_data
    from connectors.training.models import load_policy, load_tokenizer
    from flows.training import runtime_for
    from pipeline.training.answer_check import AnswerCheck
    from pipeline.training.encode import encode_records, end_of_turn_id
    from pipeline.training.options import LoraOptions

    options = settings.train
    snap = load_training_data(p.feedback, settings.snapshot)
    tokenizer = load_tokenizer(p.model)
    runtime = runtime_for(options)
    model = load_policy(p.model, LoraOptions(), runtime.device, torch.float32, adapter, None)

    def encode(split: str) -> list:
        records = snap.records(split, options.repeats)
        return encode_records(records, tokenizer, options.lengths())[0] if records else []

    check = AnswerCheck(
        model,
        encode("train"),
        encode("heldout"),
        options,
        tokenizer.pad_token_id,
        end_of_turn_id(tokenizer),
        runtime,
    )
    verdict = check.confirm()
    return {
        "trusted": check.trusted,
        "refused": not (verdict is not None and verdict.better),
        "gain": verdict.gain if verdict is not None else None,
    }


def run_ours(t: Task, p: Prepared, settings: Any, out: Path) -> dict[str, Any]:
    """What `kto-loop train --data feedback.jsonl` does, then the held-out liked share of
    what the loop would serve (the base unless the run says "trained")."""
    from connectors.feedback.snapshots import load_training_data
    from flows.training import TrainInputs, run_training
    from pipeline.feedback.balance import choose_weights
    from pipeline.training.errors import TrainError

    started = time.perf_counter()
    snap = load_training_data(p.feedback, settings.snapshot)
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
    seconds = time.perf_counter() - started
    m = result.manifest
    _, adapter_after = _sample_liked(
        t, p.model, out, t.heldout_prompts, EVAL_SAMPLES, 10_000 + p.seed
    )
    judge = m.judge or {}
    return row | {
        "status": m.status,
        "reason": m.status_reason,
        "steps": m.steps,
        "planned_steps": m.planned_steps,
        "best_step": m.best_step,
        "kl_clamp_rate": m.diagnostics["kl_clamp_rate"],
        "judge_auc": judge.get("heldout_auc"),
        "judge_trusted": judge.get("trusted"),
        "adapter_after": adapter_after,
        # What the loop serves: an unjudged adapter is never offered.
        "after": adapter_after if m.status != "unjudged" else p.before,
        "seconds": round(seconds, 1),
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


ARMS = ("trl", "exact", "ours")
# The exact arm must land within this many points of TRL, per seed.
PARITY_POINTS = 3.0
# An adapter whose true liked share falls below this share of the start has collapsed.
COLLAPSE = 0.7


def _gain(r: dict[str, Any], arm: str) -> float | None:
    return r[arm]["after"] - r["before"] if arm in r else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per instance: each arm's mean gain and worst seed (liked-share points), the exact
    arm's largest distance from TRL, and what ours' runs ended as."""
    out = {}
    for name in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == name]
        s: dict[str, Any] = {
            "seeds": len(mine),
            "before_mean": statistics.mean(r["before"] for r in mine),
        }
        for arm in ARMS:
            gains = [g for r in mine if (g := _gain(r, arm)) is not None]
            if gains:
                s[f"{arm}_gain_mean"] = statistics.mean(gains)
                s[f"{arm}_gain_worst"] = min(gains)
        if all("exact" in r and "trl" in r for r in mine):
            s["parity_max"] = max(abs(r["exact"]["after"] - r["trl"]["after"]) for r in mine)
        if all("ours" in r for r in mine):
            statuses = [r["ours"].get("status", "?") for r in mine]
            s["ours_status"] = {k: statuses.count(k) for k in sorted(set(statuses))}
            s["ours_collapsed_kept"] = sum(
                r["ours"]["after"] < COLLAPSE * r["before"] for r in mine
            )
        collapsed = [r for r in mine if r.get("exact_judged") is not None]
        s["exact_collapsed"] = len(collapsed)
        s["exact_collapsed_refused"] = sum(r["exact_judged"]["refused"] for r in collapsed)
        out[name] = s
    return out


def overall(summary: dict[str, Any]) -> dict[str, Any]:
    """The goals' numbers over the instances."""
    per = list(summary.values())
    out: dict[str, Any] = {"instances": len(per)}
    for arm in ARMS:
        means = [s[f"{arm}_gain_mean"] for s in per if f"{arm}_gain_mean" in s]
        if means:
            out[f"{arm}_gain_mean"] = statistics.mean(means)
    if all("ours_gain_mean" in s and "trl_gain_mean" in s for s in per):
        out["ours_ge_trl_share"] = sum(
            s["ours_gain_mean"] >= s["trl_gain_mean"] - 1e-9 for s in per
        ) / len(per)
        out["ours_instances_below_start"] = sum(s["ours_gain_mean"] < -0.01 for s in per)
        out["ours_worst_instance"] = min(s["ours_gain_mean"] for s in per)
        out["ours_collapsed_kept"] = sum(s["ours_collapsed_kept"] for s in per)
    if all("parity_max" in s for s in per):
        out["parity_max"] = max(s["parity_max"] for s in per)
        out["parity_within"] = sum(s["parity_max"] <= PARITY_POINTS / 100 for s in per)
    out["exact_collapsed"] = sum(s["exact_collapsed"] for s in per)
    out["exact_collapsed_refused"] = sum(s["exact_collapsed_refused"] for s in per)
    return out


def _pts(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.1f}"


def print_table(console: Console, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    table = Table(title="liked share on held-out prompts (%): before, and each arm's gain")
    for col in ("task", "seed", "before", "TRL", "exact", "ours", "ours status"):
        table.add_column(col, justify="left" if col in ("task", "ours status") else "right")
    for r in rows:
        o = r.get("ours", {})
        status = o.get("status", "")
        if "best_step" in o:
            status += f" ({o['best_step']}/{o['planned_steps']})"
        if o.get("judge_auc") is not None:
            status += f" auc {o['judge_auc']:.2f}"
        table.add_row(
            r["task"],
            str(r["seed"]),
            f"{100 * r['before']:.1f}",
            *(_pts(_gain(r, arm)) for arm in ARMS),
            status,
        )
    for name, s in summary.items():
        table.add_row(
            f"[bold]{name}[/bold]",
            "mean",
            f"{100 * s['before_mean']:.1f}",
            *(_pts(s.get(f"{arm}_gain_mean")) for arm in ARMS),
            " ".join(f"{k} {v}" for k, v in s.get("ours_status", {}).items()),
        )
    console.print(table)


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Per instance, each seed's gain for each arm, and their means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    arms = [a for a in ARMS if any(a in r for r in rows)]
    colors = {"trl": "tab:gray", "exact": "tab:orange", "ours": "tab:blue"}
    labels = {"trl": "TRL KTOTrainer", "exact": "kto-loop, TRL's recipe", "ours": "kto-loop"}
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names) + 2), 5))
    width = 0.8 / len(arms)
    for x, name in enumerate(names):
        mine = [r for r in rows if r["task"] == name]
        for k, arm in enumerate(arms):
            gains = [100 * g for r in mine if (g := _gain(r, arm)) is not None]
            if not gains:
                continue
            dx = (k - (len(arms) - 1) / 2) * width
            ax.scatter([x + dx] * len(gains), gains, color=colors[arm], alpha=0.5, s=14)
            mean = statistics.mean(gains)
            ax.hlines(mean, x + dx - width / 2, x + dx + width / 2, color=colors[arm], lw=3)
    for arm in arms:
        ax.scatter([], [], color=colors[arm], label=f"{labels[arm]} (seeds, bar = mean)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("liked share gain on held-out prompts (points)")
    ax.set_title("Learning on task instances nobody tuned on")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _names(args: argparse.Namespace) -> list[str]:
    from bench.task_families import instances

    if args.tasks:
        return args.tasks
    return list(TASKS) if args.split == "suite" else instances(args.split)


def run_one(name: str, seed: int, args: argparse.Namespace, settings: Any, run_dir: Path):
    """Every arm on one instance and seed."""
    t = _load_task(name)
    p = prepare(t, seed, args.work)
    row: dict[str, Any] = {
        "task": name,
        "seed": seed,
        "before": p.before,
        "feedback": {k: v for k, v in asdict(p).items() if k not in ("model", "feedback")},
    }
    if "trl" in args.arms:
        row["trl"] = run_trl(t, p, settings, args.work)
    if "exact" in args.arms:
        row["exact"] = run_exact(t, p, settings)
        if row["exact"]["after"] < COLLAPSE * p.before:
            row["exact_judged"] = judge_adapter(p, settings, Path(row["exact"]["adapter"]))
    if "ours" in args.arms:
        row["ours"] = run_ours(t, p, settings, run_dir / name / f"seed{seed}")
    return row, p


def _reported(row: dict[str, Any]) -> dict[str, Any]:
    """A run as the report keeps it: the arms' step-by-step curves and adapter paths stay
    in the cache (bench.trl_parity reads them there)."""
    out = dict(row)
    for arm in ("trl", "exact"):
        if arm in out:
            out[arm] = {k: v for k, v in out[arm].items() if k not in ("loss", "kl", "adapter")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="eval", choices=["tune", "eval", "all", "suite"])
    parser.add_argument("--tasks", nargs="+", help="instances or suite tasks (overrides --split)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="SECTION.KEY=V")
    parser.add_argument(
        "--recipe",
        choices=["shipped", "trl"],
        default="shipped",
        help="ours starts from the shipped defaults, or from TRL's recipe (for ablations); "
        "--set applies on top",
    )
    parser.add_argument("--work", type=Path, default=Path("data/bench-tasks"))
    parser.add_argument("--tag", default="", help="results go to tasks[_TAG].json/.png")
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
    if args.recipe == "trl":
        from pipeline.training.options import TRL_RECIPE

        overrides["train"] = TRL_RECIPE | overrides.get("train", {})
    settings = _settings(overrides)
    started = time.perf_counter()
    rows = []
    (args.work / "runs").mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{args.tag or 'run'}-", dir=args.work / "runs"))
    names = _names(args)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with Progress(console=console) as bar:
        job = bar.add_task("instances x seeds", total=len(names) * len(seeds))
        for name in names:
            for seed in seeds:
                row, p = run_one(name, seed, args, settings, run_dir)
                rows.append(_reported(row))
                bar.advance(job)
                said = ", ".join(f"{arm} {row[arm]['after']:.1%}" for arm in ARMS if arm in row)
                console.print(
                    f"[{time.perf_counter() - started:6.0f}s] {name} seed {seed}: "
                    f"{p.rows} rows, {p.feedback_liked:.0%} liked, {p.distinct_share:.0%} "
                    f"distinct; before {p.before:.1%}; {said} "
                    f"({row.get('ours', {}).get('status', '')})"
                )
    summary = summarise(rows)
    print_table(Console(width=160), rows, summary)
    stem = "tasks" + (f"_{args.tag}" if args.tag else "")
    png = RESULTS / f"{stem}.png"
    plot(rows, summary, png)
    report = {
        "bench": "tasks",
        "split": "tasks" if args.tasks else args.split,
        "seeds": args.seeds,
        "arms": args.arms,
        "overrides": overrides,
        "train": asdict(settings.train),
        "overall": overall(summary),
        "tasks": summary,
        "runs": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "plot": str(png.relative_to(RESULTS.parent.parent)),
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("runs", "tasks")}, default=str))


if __name__ == "__main__":
    main()
