"""Training throughput and memory: our KTO trainer against TRL's KTOTrainer.

    python -m bench.train_vs_trl [--steps 150] [--rounds 2]

Builds one tiny Llama-style model (hidden 256, 4 layers, 4 heads) and one synthetic
unpaired dataset, then trains it under the same settings (LoRA r=8 on q_proj and
v_proj, beta 0.1, batch 8, max length 128, the same number of steps, fp32 on the CPU)
three ways, each in its own process so that peak memory is each one's own:

- ours: `flows.training.run_training` from the model directory to a written adapter;
- trl: KTOTrainer with its defaults (reference log-probs computed at every step);
- trl_precompute: KTOTrainer with precompute_ref_log_probs=True.

Ours runs without its PNG plots (TRL draws none; matplotlib alone is ~27 MB of
RSS), otherwise as `kto-loop train` runs. Each time runs from the model directory to
the end of training (tokenization, the
reference pass, the steps), with process start and imports excluded; a rate is
examples (steps x batch) over that time. Rounds alternate the order; the speedup is
ours / trl paired within a round (the machine's speed drifts between rounds), median
over rounds. Peak RSS is the process's maximum resident set. The last line of stdout
is one JSON object; it and a bar chart go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

BATCH = 8
MAX_LENGTH = 128
BETA = 0.1
LR = 5e-5
SEED = 0
RESULTS = Path(__file__).parent / "results"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _records(n: int) -> list[dict]:
    from deploy.local.synthetic import unpaired_examples

    df = unpaired_examples(n, seed=SEED)
    return df.to_dict("records")


def run_ours(model: Path, n: int, steps: int) -> dict:
    # Imported before the clock starts, as TRL's are: import time is not training time.
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from flows.training import TrainInputs, run_training
    from pipeline.feedback.examples import Example
    from pipeline.training.options import TrainOptions

    rows = _records(n)
    records = [
        Example(None, json.dumps(r["prompt"]), r["completion"][0]["content"], bool(r["label"]))
        for r in rows
    ]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_training(
            TrainInputs(model, records, Path(out) / "adapter", progress=False, plots=False),
            TrainOptions(
                beta=BETA,
                learning_rate=LR,
                batch_size=BATCH,
                max_length=MAX_LENGTH,
                max_prompt_length=MAX_LENGTH - 16,
                max_steps=steps,
                seed=SEED,
                early_stopping_patience=0,
                sft_weight=0.0,  # TRL's loss has no SFT term
            ),
        )
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples": steps * BATCH}


def run_trl(model: Path, n: int, steps: int, precompute: bool) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    datasets.disable_progress_bars()
    rows = _records(n)
    dataset = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in rows]
    )
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer = KTOTrainer(
            model=str(model),
            args=KTOConfig(
                output_dir=out,
                per_device_train_batch_size=BATCH,
                max_length=MAX_LENGTH,
                beta=BETA,
                learning_rate=LR,
                max_steps=steps,
                seed=SEED,
                use_cpu=True,
                bf16=False,
                save_strategy="no",
                report_to=[],
                logging_steps=10_000,
                disable_tqdm=True,
                dataloader_num_workers=0,
                precompute_ref_log_probs=precompute,
            ),
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model),
            peft_config=LoraConfig(
                r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
            ),
        )
        trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples": steps * BATCH}


def _worker(args: argparse.Namespace) -> None:
    if args.worker == "ours":
        result = run_ours(args.model, args.n, args.steps)
    else:
        result = run_trl(args.model, args.n, args.steps, args.worker == "trl_precompute")
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def _spawn(kind: str, model: Path, n: int, steps: int) -> dict:
    cmd = [
        sys.executable, "-m", "bench.train_vs_trl", "--worker", kind,
        "--model", str(model), "--n", str(n), "--steps", str(steps),
    ]  # fmt: skip
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rate(res: dict) -> float:
    return res["examples"] / res["seconds"]


def _plot(summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    names = ["ours", "trl", "trl_precompute"]
    panels = [("examples_per_s", "examples / s (higher is better)"),
              ("peak_rss_mb", "peak RSS, MB (lower is better)")]  # fmt: skip
    for i, (key, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, i)
        ax.bar(
            names,
            [summary[f"{k}_{key}"] for k in names],
            color=["tab:green", "tab:grey", "tab:blue"],
        )
        ax.set(title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=["ours", "trl", "trl_precompute"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    console = Console(stderr=True)
    from deploy.local.tiny_model import TinyModelSpec, build_tiny_model

    n = args.steps * BATCH
    results: dict[str, list[dict]] = {"ours": [], "trl": [], "trl_precompute": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(
            Path(tmp) / "model",
            TinyModelSpec(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688),
        )
        for r in range(args.rounds):
            order = ["ours", "trl", "trl_precompute"]
            if r % 2:
                order.reverse()
            for kind in order:
                with console.status(f"round {r + 1}/{args.rounds}: {kind}"):
                    res = _spawn(kind, model, n, args.steps)
                results[kind].append(res)
                console.print(
                    f"round {r + 1} {kind}: {_rate(res):.1f} examples/s, "
                    f"peak {res['peak_rss_mb']:.0f} MB"
                )

    summary: dict = {
        "bench": "train_vs_trl",
        "steps": args.steps,
        "batch": BATCH,
        "max_length": MAX_LENGTH,
        "rounds": args.rounds,
    }
    for kind, runs in results.items():
        summary[f"{kind}_examples_per_s"] = round(statistics.median(_rate(x) for x in runs), 1)
        summary[f"{kind}_peak_rss_mb"] = round(max(x["peak_rss_mb"] for x in runs), 1)
    for key, peer in (("speedup", "trl"), ("speedup_vs_precompute", "trl_precompute")):
        # Paired within a round: both runs saw the same machine speed.
        pairs = zip(results["ours"], results[peer], strict=True)
        summary[key] = round(statistics.median(_rate(o) / _rate(t) for o, t in pairs), 3)
    RESULTS.mkdir(exist_ok=True)
    _plot(summary, RESULTS / "train_vs_trl.png")
    (RESULTS / "train_vs_trl.json").write_text(json.dumps(summary) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
