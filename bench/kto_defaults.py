"""Which KTO defaults improve a small model without collapsing it, across seeds.

    python -m bench.kto_defaults [--seeds 3] [--lrs 2e-4 1e-3 3e-3 1e-2] [--epochs 3]

For each seed the whole feedback loop runs on a tiny chat model
(`deploy.local.chat_model`, fine-tuned so that ~35% of its answers are liked):

1. feedback: sample 3 answers to each of the task's 130 prompts from the base model
   (on-policy, as production feedback is) and label them with `liked`; 15% of the
   prompts, with all their answers, are held out for the trainer's early stopping;
2. train: `flows.training.run_training` with TrainOptions defaults except the config's
   learning_rate, beta, sft_weight and early_stopping_patience, class weights from
   `pipeline.feedback.balance.choose_weights`, over `--epochs` passes (3: one pass of ~330
   records is 41 steps of 8, too few for any learning rate here to move the model);
3. measure: sample 2 answers to each prompt from the base model and from the
   trained adapter (the same sampling seed) and compare: liked share, EOS rate
   (answers that end with the end-of-turn token within 48 new tokens), repetition
   (answers with some token 4-gram twice) and mean length in tokens.

The grid is every learning rate (`--lrs`) with the trainer's guards on (early
stopping with patience 3, the sampled end-of-turn guard) and, unless --no-es-rows,
without them (one evaluation at the end, so the final weights), at beta 0.1; then one
row per `--sft` weight at the learning rate with the best worst-seed gain, and with
--sft-only a control: the largest SFT weight with the KTO terms weighted 0, which
tells how much of a gain is the SFT term alone. Recommended: among the configs whose
EOS rate does not fall, and whose repetition does not rise, by more than TOLERANCE of
the base model's on any seed, the one with the best worst-seed liked-share gain (ties:
best mean gain).

Prints a table, writes bench/results/kto_defaults.png, and prints as the last stdout
line one JSON object, also written to bench/results/kto_defaults.json.
"""

from __future__ import annotations

import argparse
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

from pipeline.feedback.examples import Example

RESULTS = Path(__file__).parent / "results"
FEEDBACK_PER_PROMPT = 3
EVAL_PER_PROMPT = 2
HELDOUT_SHARE = 0.15
MAX_NEW_TOKENS = 48
BETA = 0.1
SFT_WEIGHT = 0.1
# How far EOS rate may fall, or repetition rise, from the base model's on a seed.
TOLERANCE = 0.05

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """One row of the grid: the TrainOptions fields this benchmark varies."""

    learning_rate: float
    beta: float = BETA
    sft_weight: float = 0.0
    early_stopping_patience: int = 3
    # 0: the trainer's default (a tenth of the run). A config without early stopping
    # evaluates only at the end, so the adapter is the final one: the trainer always
    # keeps the best evaluated step.
    eval_every: int = 0
    epochs: int = 1
    eos_guard: float = 0.1
    # False: the KTO terms weigh 0, leaving the SFT term alone (the control for it).
    kto: bool = True

    @property
    def name(self) -> str:
        name = f"lr={self.learning_rate:g} beta={self.beta:g}"
        if self.sft_weight:
            name += f" sft={self.sft_weight:g}"
        if not self.kto:
            name += " (SFT only)"
        if not self.early_stopping_patience and not self.eos_guard:
            return name + " unguarded"
        return name + ("" if self.early_stopping_patience else " no-ES")


@dataclass(frozen=True)
class Sampled:
    """What a set of sampled answers looks like."""

    liked: float
    eos: float
    repetition: float
    mean_tokens: float


def describe(answers: list[Any]) -> Sampled:
    """Liked share, EOS rate, repetition rate and mean length of sampled answers."""
    from deploy.local.chat_model import liked

    n = len(answers)
    return Sampled(
        liked=sum(liked(a.text) for a in answers) / n,
        eos=sum(a.ended for a in answers) / n,
        repetition=sum(repeats_4gram(a.token_ids) for a in answers) / n,
        mean_tokens=sum(len(a.token_ids) for a in answers) / n,
    )


def repeats_4gram(ids: tuple[int, ...]) -> bool:
    """Whether some token 4-gram occurs twice in ids."""
    grams = [ids[i : i + 4] for i in range(len(ids) - 3)]
    return len(set(grams)) < len(grams)


@dataclass
class Seed:
    """One seed's base model, its labelled feedback and its base measurement."""

    seed: int
    model: Path
    train: list[Example]
    heldout: list[Example]
    base: Sampled
    feedback_liked: float


def prepare_seed(seed: int, work: Path) -> Seed:
    """Build the seed's chat model, collect and label its feedback, measure it."""
    from deploy.local.chat_model import build_chat_model, chat_prompts, liked, sample_answers

    model = build_chat_model(work / f"seed{seed}" / "model", seed=seed)
    prompts = chat_prompts()
    feedback = sample_answers(
        model, None, prompts, FEEDBACK_PER_PROMPT, seed=seed, max_new_tokens=MAX_NEW_TOKENS
    )
    held = set(random.Random(seed).sample(prompts, round(HELDOUT_SHARE * len(prompts))))
    records = [Example(a.prompt, None, a.text, liked(a.text)) for a in feedback]
    base = describe(
        sample_answers(
            model, None, prompts, EVAL_PER_PROMPT, seed=1000 + seed, max_new_tokens=MAX_NEW_TOKENS
        )
    )
    return Seed(
        seed=seed,
        model=model,
        train=[r for r in records if r.prompt not in held],
        heldout=[r for r in records if r.prompt in held],
        base=base,
        feedback_liked=sum(r.desirable for r in records) / len(records),
    )


def run_one(s: Seed, config: Config, work: Path) -> dict[str, Any]:
    """Train the config on the seed's feedback and measure the adapter's answers."""
    from deploy.local.chat_model import chat_prompts, sample_answers
    from flows.training import TrainInputs, run_training
    from pipeline.feedback.balance import choose_weights
    from pipeline.training.errors import TrainError
    from pipeline.training.options import TrainOptions

    n_d = sum(r.desirable for r in s.train)
    balance = choose_weights(n_d, len(s.train) - n_d)
    out = work / f"seed{s.seed}" / config.name.replace(" ", "_")
    started = time.perf_counter()
    row: dict[str, Any] = {"config": config.name, **asdict(config), "seed": s.seed}
    row["before"] = asdict(s.base)
    try:
        result = run_training(
            TrainInputs(
                s.model,
                s.train,
                out,
                # Without KTO terms the held-out KTO loss is 0 throughout and would keep
                # the starting point: the control trains to the end with no held-out set.
                heldout=s.heldout if config.kto else (),
                desirable_weight=balance.lambda_desirable if config.kto else 0.0,
                undesirable_weight=balance.lambda_undesirable if config.kto else 0.0,
                balance_explanation=balance.explanation,
                progress=False,
                plots=False,
            ),
            TrainOptions(
                learning_rate=config.learning_rate,
                beta=config.beta,
                sft_weight=config.sft_weight,
                early_stopping_patience=config.early_stopping_patience,
                eval_every=config.eval_every,
                epochs=config.epochs,
                eos_guard=config.eos_guard,
                seed=s.seed,
            ),
        )
    except TrainError as exc:
        # A diverged run writes no adapter: it counts as a collapse.
        row |= {"error": str(exc), "after": None, "train_seconds": None}
        return row
    row["train_seconds"] = round(time.perf_counter() - started, 1)
    manifest = result.manifest
    row |= {
        "steps": manifest.steps,
        "planned_steps": manifest.planned_steps,
        "best_step": manifest.best_step,
        "stopped_early": manifest.stopped_early,
        "heldout_before": manifest.metrics.heldout_before,
        "heldout_after": manifest.metrics.heldout_after,
    }
    after = describe(
        sample_answers(
            s.model,
            result.adapter_dir,
            chat_prompts(),
            EVAL_PER_PROMPT,
            seed=1000 + s.seed,
            max_new_tokens=MAX_NEW_TOKENS,
        )
    )
    row["after"] = asdict(after)
    row["gain"] = after.liked - s.base.liked
    row["safe"] = (
        after.eos >= s.base.eos - TOLERANCE and after.repetition <= s.base.repetition + TOLERANCE
    )
    return row


def summarise(config: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and worst over seeds of one config's runs."""
    done = [r for r in rows if r["after"] is not None]
    gains = [r["gain"] for r in done]
    eos = [r["after"]["eos"] for r in done]
    rep = [r["after"]["repetition"] for r in done]
    return {
        "config": config.name,
        **asdict(config),
        "seeds": len(rows),
        "failed": len(rows) - len(done),
        "gain_mean": statistics.mean(gains) if gains else None,
        "gain_min": min(gains) if len(done) == len(rows) else None,
        "liked_after_mean": statistics.mean(r["after"]["liked"] for r in done) if done else None,
        "eos_mean": statistics.mean(eos) if eos else None,
        "eos_min": min(eos) if eos else None,
        "repetition_mean": statistics.mean(rep) if rep else None,
        "repetition_max": max(rep) if rep else None,
        "mean_tokens": statistics.mean(r["after"]["mean_tokens"] for r in done) if done else None,
        "stopped_early": sum(bool(r.get("stopped_early")) for r in rows),
        "best_steps": [r.get("best_step") for r in rows],
        "planned_steps": [r.get("planned_steps") for r in rows],
        "heldout_accuracy_mean": _mean_heldout(done, "accuracy"),
        "heldout_margin_mean": _mean_heldout(done, "margin"),
        "safe_all_seeds": len(done) == len(rows) and all(r["safe"] for r in done),
        "runs": rows,
    }


def _mean_heldout(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r["heldout_after"][key] for r in rows if r.get("heldout_after")]
    return statistics.mean(values) if values else None


def recommend(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The safe config with the best worst-seed gain, ties broken by mean gain; the
    SFT-only control is a yardstick, not a candidate."""
    safe = [s for s in summaries if s["safe_all_seeds"] and s.get("kto", True)]
    if not safe:
        return None
    best = max(safe, key=lambda s: (round(s["gain_min"], 6), s["gain_mean"]))
    keys = ("config", "learning_rate", "beta", "sft_weight", "early_stopping_patience")
    return {k: best[k] for k in keys} | {
        "gain_min": best["gain_min"],
        "gain_mean": best["gain_mean"],
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}" if x < 0 else f"{100 * x:.1f}"


def print_table(console: Console, seeds: list[Seed], summaries: list[dict[str, Any]]) -> None:
    """One row per config: mean and worst over seeds, in percentage points."""
    base_liked = statistics.mean(s.base.liked for s in seeds)
    base_eos = statistics.mean(s.base.eos for s in seeds)
    base_rep = statistics.mean(s.base.repetition for s in seeds)
    table = Table(
        title=f"KTO defaults, {len(seeds)} seeds (base: liked {_pct(base_liked)}%, EOS "
        f"{_pct(base_eos)}%, repetition {_pct(base_rep)}%)"
    )
    for col in (
        "config",
        "gain mean",
        "gain min",
        "liked after",
        "EOS mean",
        "EOS min",
        "rep mean",
        "rep max",
        "tokens",
        "held-out acc",
        "stopped early",
        "best/planned",
        "safe",
    ):
        table.add_column(col, justify="left" if col == "config" else "right")
    for s in summaries:
        steps = " ".join(
            f"{b}/{p}" for b, p in zip(s["best_steps"], s["planned_steps"], strict=True)
        )
        table.add_row(
            s["config"],
            _pct(s["gain_mean"]),
            _pct(s["gain_min"]),
            _pct(s["liked_after_mean"]),
            _pct(s["eos_mean"]),
            _pct(s["eos_min"]),
            _pct(s["repetition_mean"]),
            _pct(s["repetition_max"]),
            "-" if s["mean_tokens"] is None else f"{s['mean_tokens']:.1f}",
            _pct(s["heldout_accuracy_mean"]),
            f"{s['stopped_early']}/{s['seeds']}",
            steps,
            "yes" if s["safe_all_seeds"] else "no",
        )
    console.print(table)


def plot(seeds: list[Seed], summaries: list[dict[str, Any]], path: Path) -> None:
    """Liked share before -> after, EOS rate and repetition, per config and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    names = [s["config"] for s in summaries]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, seed in enumerate(seeds):
        color = colors[k % len(colors)]
        dx = (k - (len(seeds) - 1) / 2) * 0.15
        for x, s in enumerate(summaries):
            run = next(r for r in s["runs"] if r["seed"] == seed.seed)
            if run["after"] is None:
                axes[0].plot(x + dx, seed.base.liked, "x", color=color)
                continue
            axes[0].annotate(
                "",
                xy=(x + dx, run["after"]["liked"]),
                xytext=(x + dx, seed.base.liked),
                arrowprops={"arrowstyle": "->", "color": color},
            )
            axes[1].plot(x + dx, run["after"]["eos"], "o", color=color)
            axes[2].plot(x + dx, run["after"]["repetition"], "o", color=color)
        axes[0].plot([], [], color=color, label=f"seed {seed.seed}")
        for ax, base in ((axes[1], seed.base.eos), (axes[2], seed.base.repetition)):
            ax.axhline(base, color=color, linestyle=":", linewidth=1)
    titles = (
        "liked share: base -> adapter",
        "EOS rate after (dotted: base)",
        "4-gram repetition after (dotted: base)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no-es-rows", action="store_true", help="skip the unguarded rows")
    parser.add_argument(
        "--sft", type=float, nargs="+", default=[SFT_WEIGHT], help="sft_weight rows to add"
    )
    parser.add_argument("--betas", type=float, nargs="+", default=[BETA])
    parser.add_argument("--tag", default="", help="results go to kto_defaults[_TAG].json/.png")
    parser.add_argument(
        "--sft-only", action="store_true", help="add the largest sft_weight without KTO"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(2)

    console = Console(stderr=True, width=200)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kto-defaults-") as tmp:
        work = Path(tmp)
        seeds = []
        for seed in range(args.seeds):
            seeds.append(prepare_seed(seed, work))
            s = seeds[-1]
            console.print(
                f"seed {seed}: {len(s.train)} train / {len(s.heldout)} held-out records, "
                f"feedback liked {s.feedback_liked:.1%}; base liked {s.base.liked:.1%}, EOS "
                f"{s.base.eos:.1%}, repetition {s.base.repetition:.1%}"
            )
        grid = [Config(lr, beta=beta, epochs=args.epochs) for lr in args.lrs for beta in args.betas]
        if not args.no_es_rows:
            grid += [
                Config(
                    lr, early_stopping_patience=0, eval_every=10**9, epochs=args.epochs, eos_guard=0
                )
                for lr in args.lrs
            ]
        summaries = []
        for config in grid:
            rows = [run_one(s, config, work) for s in seeds]
            summaries.append(summarise(config, rows))
            _progress(console, summaries[-1], started)
        # The SFT mix-in is the counter-measure for a learning rate that moves the policy
        # but breaks it: try it at the grid's best worst-seed gain, safe or not.
        moved = max(summaries, key=lambda s: (s["gain_min"] is not None, s["gain_min"] or 0))
        lr = moved["learning_rate"]
        for weight in args.sft:
            sft = Config(lr, beta=moved["beta"], sft_weight=weight, epochs=args.epochs)
            summaries.append(summarise(sft, [run_one(s, sft, work) for s in seeds]))
            _progress(console, summaries[-1], started)
        if args.sft_only:
            alone = Config(
                lr, beta=moved["beta"], sft_weight=max(args.sft), epochs=args.epochs, kto=False
            )
            summaries.append(summarise(alone, [run_one(s, alone, work) for s in seeds]))
            _progress(console, summaries[-1], started)

    recommended = recommend(summaries)
    print_table(Console(width=200), seeds, summaries)
    stem = "kto_defaults" + (f"_{args.tag}" if args.tag else "")
    png = RESULTS / f"{stem}.png"
    plot(seeds, summaries, png)
    report = {
        "bench": "kto_defaults",
        "seeds": [
            {
                "seed": s.seed,
                "train": len(s.train),
                "heldout": len(s.heldout),
                "feedback_liked": s.feedback_liked,
                "base": asdict(s.base),
            }
            for s in seeds
        ],
        "tolerance": TOLERANCE,
        "configs": summaries,
        "recommended": recommended,
        "seconds": round(time.perf_counter() - started, 1),
        "plot": str(png.relative_to(RESULTS.parent.parent)),
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


def _progress(console: Console, summary: dict[str, Any], started: float) -> None:
    gains = ", ".join(
        "failed" if r["after"] is None else f"{r['gain']:+.1%}" for r in summary["runs"]
    )
    console.print(
        f"[{time.perf_counter() - started:6.0f}s] {summary['config']}: gains {gains}; "
        f"stopped early {summary['stopped_early']}/{summary['seeds']}"
    )


if __name__ == "__main__":
    main()
