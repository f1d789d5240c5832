"""Training throughput and memory: our KTO trainer against TRL's KTOTrainer.

    python -m bench.train_vs_trl [--shape tiny] [--steps 150] [--rounds 2]
    python -m bench.train_vs_trl --shape 100m --seq-len 512 --batch 4 --steps 12

Builds one random-initialised model of the given shape (deploy/local/shaped_model.py)
and one synthetic unpaired dataset, then trains it under the same settings (LoRA r=8
on q_proj and v_proj, beta 0.1, the same batch, the same rows, the same number of
optimizer steps over them: `--epochs` passes, TRL's and our default 3) several ways,
each in its own process so that peak memory is each one's own:

- ours: `flows.training.run_training` from the model directory to a written adapter,
  doing TRL's work: no held-out judging (`selection = "final"`) and no SFT term, our
  other defaults (shuffled batches, mismatched pairs of other prompts);
- trl: KTOTrainer with gradient checkpointing off, its fastest setting;
- trl_precompute: the same with `precompute_ref_log_probs=True`;
- trl_default: KTOTrainer as configured by default (gradient checkpointing on);
- ours_fsdp: ours with the base sharded over a one-rank group (`[train] fsdp`).

`--peers` picks which besides ours run. TRL's fastest is the faster of trl and
trl_precompute in each round. Each time runs from the model directory to the end of
training (tokenization and the reference pass included, imports and process start
excluded); ours runs without its PNG plots (TRL draws none). Rates are examples
(steps x batch) and tokens (the same examples' prompt + completion tokens, as our
tokenizer counts them) per second. Rounds alternate the order; speedups pair the runs
of a round (the machine's speed drifts between rounds), median over rounds. Peak
memory: the process's maximum RSS, and on CUDA torch's peak allocation. The last line
of stdout is one JSON object; it and a bar chart go to bench/results/NAME.json/.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

BETA = 0.1
LR = 5e-5
SEED = 0
RESULTS = Path(__file__).parent / "results"
PEERS = ("trl", "trl_precompute", "trl_default", "ours_fsdp")
TRL_KINDS = ("trl", "trl_precompute", "trl_default")
# Of a --seq-len budget, the prompt's share: chat turns carry a long context and a
# shorter answer.
PROMPT_SHARE = 0.75


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _records(n: int, seq_len: int | None, tokenizer_dir: Path | None) -> list[dict]:
    """n TRL-style unpaired rows; with `seq_len`, prompts and completions lengthened to
    about PROMPT_SHARE and the rest of it (our tokenizer's tokens), from the same
    synthetic text."""
    from deploy.local.synthetic import corpus_lines, unpaired_examples

    rows = unpaired_examples(n, seed=SEED).to_dict("records")
    if seq_len is None:
        return rows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines, rng = corpus_lines(), random.Random(SEED)
    prompt_budget = int(seq_len * PROMPT_SHARE) - 16
    completion_budget = seq_len - int(seq_len * PROMPT_SHARE) - 8

    def lengthen(text: str, budget: int) -> str:
        while len(tokenizer(text)["input_ids"]) < budget:
            text = f"{rng.choice(lines)} {text}"
        ids = tokenizer(text)["input_ids"]
        return tokenizer.decode(ids[-budget:]) if len(ids) > budget else text

    for r in rows:
        r["prompt"] = [
            {"role": "user", "content": lengthen(r["prompt"][0]["content"], prompt_budget)}
        ]
        content = r["completion"][0]["content"]
        r["completion"] = [{"role": "assistant", "content": lengthen(content, completion_budget)}]
    return rows


def _tokens(rows: list[dict], model: Path) -> float:
    """Mean prompt + completion tokens of a row, as our encoding counts them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    total = 0
    for r in rows:
        prompt = tokenizer.apply_chat_template(
            r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        total += len(prompt) + len(tokenizer(r["completion"][0]["content"])["input_ids"]) + 1
    return total / len(rows)


def _lengths(args: argparse.Namespace) -> tuple[int, int]:
    max_length = args.seq_len or 128
    return max_length, max_length - max(16, max_length // 8)


def run_ours(args: argparse.Namespace, rows: list[dict], fsdp: bool) -> dict:
    # Imported before the clock starts, as TRL's are: import time is not training time.
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from flows.training import TrainInputs, run_training
    from pipeline.feedback.examples import Example
    from pipeline.training.options import TrainOptions

    records = [
        Example(None, json.dumps(r["prompt"]), r["completion"][0]["content"], bool(r["label"]))
        for r in rows
    ]
    max_length, max_prompt = _lengths(args)
    with tempfile.TemporaryDirectory() as out:
        _reset_cuda_peak(args.device)
        start = time.perf_counter()
        run_training(
            TrainInputs(args.model, records, Path(out) / "adapter", progress=False, plots=False),
            TrainOptions(
                beta=BETA,
                learning_rate=LR,
                batch_size=args.batch,
                max_length=max_length,
                max_prompt_length=max_prompt,
                max_steps=args.steps,
                seed=SEED,
                early_stopping_patience=0,
                sft_weight=0.0,  # TRL's loss has no SFT term
                selection="final",  # TRL judges nothing
                device=args.device,
                precision=args.precision,
                fsdp=fsdp,
            ),
        )
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples": args.steps * args.batch}


def run_trl(args: argparse.Namespace, rows: list[dict], kind: str) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in rows]
    )
    max_length, _ = _lengths(args)
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as out:
        _reset_cuda_peak(args.device)
        start = time.perf_counter()
        trainer = KTOTrainer(
            model=str(args.model),
            args=KTOConfig(
                output_dir=out,
                per_device_train_batch_size=args.batch,
                max_length=max_length,
                beta=BETA,
                learning_rate=LR,
                max_steps=args.steps,
                seed=SEED,
                use_cpu=not cuda,
                bf16=args.precision == "bf16",
                save_strategy="no",
                report_to=[],
                logging_steps=10_000,
                disable_tqdm=True,
                dataloader_num_workers=0,
                gradient_checkpointing=kind == "trl_default",
                precompute_ref_log_probs=kind == "trl_precompute",
            ),
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(args.model),
            peft_config=LoraConfig(
                r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
            ),
        )
        trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples": args.steps * args.batch}


def _reset_cuda_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _worker(args: argparse.Namespace) -> None:
    rows = json.loads(Path(args.rows).read_text())
    if args.worker in ("ours", "ours_fsdp"):
        result = run_ours(args, rows, fsdp=args.worker == "ours_fsdp")
    else:
        result = run_trl(args, rows, args.worker)
    result["peak_rss_mb"] = _peak_rss_mb()
    if args.device == "cuda":
        import torch

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def _spawn(kind: str, args: argparse.Namespace, model: Path, rows: Path) -> dict:
    cmd = [
        sys.executable, "-m", "bench.train_vs_trl", "--worker", kind, "--model", str(model),
        "--rows", str(rows), "--steps", str(args.steps), "--batch", str(args.batch),
        "--device", args.device, "--precision", args.precision,
    ]  # fmt: skip
    if args.seq_len:
        cmd += ["--seq-len", str(args.seq_len)]
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rate(res: dict) -> float:
    return res["examples"] / res["seconds"]


def _plot(summary: dict, kinds: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    memory = "peak_gpu_mb" if summary["device"] == "cuda" else "peak_rss_mb"
    panels = [("tokens_per_s", "tokens / s (higher is better)"),
              (memory, f"{memory.replace('_', ' ')} (lower is better)")]  # fmt: skip
    colours = {"ours": "tab:green", "ours_fsdp": "tab:olive", "trl": "tab:blue"}
    for i, (key, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, i)
        ax.bar(
            kinds,
            [summary[f"{k}_{key}"] for k in kinds],
            color=[colours.get(k, "tab:grey") for k in kinds],
        )
        ax.set(title=title)
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(
        f"{summary['shape']} shape, {summary['device']} {summary['precision']}, "
        f"{summary['tokens_per_example']:.0f} tokens an example: ours {summary['speedup']}x "
        "TRL's fastest"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _summary(args: argparse.Namespace, results: dict[str, list[dict]], tokens: float) -> dict:
    summary: dict = {
        "bench": "train_vs_trl",
        "shape": args.shape,
        "device": args.device,
        "precision": args.precision,
        "steps": args.steps,
        "batch": args.batch,
        "epochs": args.epochs,
        "max_length": _lengths(args)[0],
        "tokens_per_example": round(tokens, 1),
        "rounds": args.rounds,
    }
    for kind, runs in results.items():
        rate = statistics.median(_rate(x) for x in runs)
        summary[f"{kind}_examples_per_s"] = round(rate, 2)
        summary[f"{kind}_tokens_per_s"] = round(rate * tokens, 1)
        for key in ("peak_rss_mb", "peak_gpu_mb"):
            if key in runs[0]:
                summary[f"{kind}_{key}"] = round(max(x[key] for x in runs), 1)

    def paired(peer_rates: list[float]) -> float:
        ours = [_rate(x) for x in results["ours"]]
        return round(statistics.median(o / t for o, t in zip(ours, peer_rates, strict=True)), 3)

    fastest = [k for k in ("trl", "trl_precompute") if k in results]
    if fastest:
        per_round = [max(_rate(results[k][r]) for k in fastest) for r in range(args.rounds)]
        summary["trl_fastest"] = max(fastest, key=lambda k: summary[f"{k}_examples_per_s"])
        summary["speedup"] = paired(per_round)
    for kind in PEERS:
        if kind in results:
            summary[f"speedup_vs_{kind}"] = paired([_rate(x) for x in results[kind]])
    if "ours_fsdp" in results:
        summary["fsdp_ratio"] = round(1 / summary["speedup_vs_ours_fsdp"], 3)
    return summary


def main() -> None:
    from deploy.local.shaped_model import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the rows")
    parser.add_argument("--seq-len", type=int, help="lengthen rows to about this many tokens")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--peers", default="trl,trl_precompute,trl_default")
    parser.add_argument("--name", help="results file name (default: train_vs_trl[_SHAPE])")
    parser.add_argument("--worker", choices=["ours", *PEERS])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rows", type=Path)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")

    from deploy.local.shaped_model import build_shaped_model

    console = Console(stderr=True)
    kinds = ["ours", *peers]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    n = max(args.batch, args.steps * args.batch // args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_shaped_model(Path(tmp) / "model", args.shape)
        rows = _records(n, args.seq_len, model)
        tokens = _tokens(rows, model)
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows))
        for r in range(args.rounds):
            order = kinds if r % 2 == 0 else kinds[::-1]
            for kind in order:
                with console.status(f"round {r + 1}/{args.rounds}: {kind}"):
                    res = _spawn(kind, args, model, rows_file)
                results[kind].append(res)
                console.print(
                    f"round {r + 1} {kind}: {_rate(res):.2f} examples/s, "
                    f"peak {res['peak_rss_mb']:.0f} MB RSS"
                    + (f", {res['peak_gpu_mb']:.0f} MB GPU" if "peak_gpu_mb" in res else "")
                )
    summary = _summary(args, results, tokens)
    name = args.name or ("train_vs_trl" if args.shape == "tiny" else f"train_vs_trl_{args.shape}")
    RESULTS.mkdir(exist_ok=True)
    _plot(summary, kinds, RESULTS / f"{name}.png")
    (RESULTS / f"{name}.json").write_text(json.dumps(summary) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
