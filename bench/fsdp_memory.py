"""Memory per rank with the base sharded (FSDP2) against one plain process, on the CPU.

    python -m bench.fsdp_memory [--shape qwen2-0.5b] [--steps 5] [--max-length 64]

Builds the random-initialised model of `--shape` (deploy/local/shaped_model.py; cached
under data/cache/models) and a small synthetic unpaired data file, then trains the same
steps twice through the command line, one after the other:

- fsdp_2_ranks: `kto-loop train --nproc 2` (torchrun, gloo), 4 examples per rank;
- plain_1_process: `kto-loop train` in one process without sharding, 8 examples.

The global batch is 8 in both. Short sequences (`--max-length`) and held-out checks only
at the start and the end keep it to a few minutes on two cores; the model's weights,
not the activations, are what the comparison is about.

Memory is each training process's resident set as the kernel counts it: its peak is
VmHWM (the high-water mark Linux keeps per process, so nothing between two reads is
missed), read from /proc every 0.1 s until the process exits, and the current VmRSS
at each read. A rank is a descendant of torchrun whose environment holds RANK. Beside
the peak: the resident set when step 1's metrics row is written (the base sharded and
one step taken) and at the last read. The last line of stdout is one JSON object; it
and a plot of the resident sets over time go to bench/results/fsdp_memory.json/png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"
CACHE = Path("data/cache/models")
GLOBAL_BATCH = 8
POLL_S = 0.1


def _status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB ({} once it has gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, kb = line.split()[:2]
                    out[key.rstrip(":")] = int(kb) / 1024
    except OSError:
        return {}
    return out


@dataclass
class Rank:
    rank: int
    peak_mb: float = 0.0
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)
    at_first_step_mb: float | None = None


def _rank_of(proc: psutil.Process, alone: int | None) -> int | None:
    """The process's rank: RANK from its environment, 0 for the process `alone` (the
    command itself when it trains without torchrun), None for anything else."""
    try:
        rank = proc.environ().get("RANK")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if rank is not None:
        return int(rank)
    return 0 if proc.pid == alone else None


def watch(command: list[str], env: dict[str, str], metrics: Path, log: Path, nproc: int) -> dict:
    """Run `command` to its end, reading every rank's memory every POLL_S seconds (the
    command is itself the one rank when `nproc` is 1, else torchrun)."""
    ranks: dict[int, Rank] = {}  # by pid
    launcher_peak = 0.0
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            now = time.monotonic() - start
            first_step = metrics.is_file() and metrics.stat().st_size > 0
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = [root, *root.children(recursive=True)]
                for p in tree:
                    mem = _status_mb(p.pid)
                    if not mem:
                        continue
                    if p.pid not in ranks:
                        rank = _rank_of(p, proc.pid if nproc == 1 else None)
                        if rank is None:
                            if p.pid == proc.pid:  # torchrun itself
                                launcher_peak = max(launcher_peak, mem["VmHWM"])
                            continue
                        ranks[p.pid] = Rank(rank)
                    r = ranks[p.pid]
                    r.peak_mb = max(r.peak_mb, mem["VmHWM"])
                    r.rss.append((round(now, 2), round(mem["VmRSS"], 1)))
                    if first_step and r.at_first_step_mb is None:
                        r.at_first_step_mb = mem["VmRSS"]
            time.sleep(POLL_S)  # the poll interval of the memory reads
    wall = time.monotonic() - start
    lines = log.read_text().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"{command[2:5]} exited {proc.returncode}:\n" + "\n".join(lines[-30:]))
    summary = next(json.loads(x) for x in reversed(lines) if x.startswith('{"status"'))
    by_rank = sorted(ranks.values(), key=lambda r: r.rank)
    return {
        "status": summary["status"],
        "steps": summary.get("steps"),
        "wall_s": round(wall, 1),
        "peak_rss_mb_per_rank": [round(r.peak_mb) for r in by_rank],
        "rss_at_first_step_mb_per_rank": [
            round(r.at_first_step_mb) if r.at_first_step_mb else None for r in by_rank
        ],
        "rss_at_end_mb_per_rank": [round(r.rss[-1][1]) if r.rss else None for r in by_rank],
        "launcher_peak_rss_mb": round(launcher_peak) if launcher_peak else None,
        "timeline": {str(r.rank): r.rss for r in by_rank},
    }


def train(model: Path, data: Path, out: Path, nproc: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "flows.cli", "train", "--nproc", str(nproc),
        "--base-model", str(model), "--data", str(data), "--out", str(out),
        "--max-steps", str(args.steps), "--log-level", "WARNING",
    ]  # fmt: skip
    env = {
        **os.environ,
        "KTO_LOOP_TRAIN__BATCH_SIZE": str(GLOBAL_BATCH // nproc),
        "KTO_LOOP_TRAIN__MAX_LENGTH": str(args.max_length),
        "KTO_LOOP_TRAIN__MAX_PROMPT_LENGTH": str(args.max_length * 3 // 4),
        "KTO_LOOP_TRAIN__PRECISION": "fp32",
        "KTO_LOOP_TRAIN__DEVICE": "cpu",
        # Held-out checks at the start and the end only, the last step kept.
        "KTO_LOOP_TRAIN__SELECTION": "final",
        "KTO_LOOP_TRAIN__EVAL_EVERY": str(args.steps),
        "KTO_LOOP_SNAPSHOT__HELDOUT_FRACTION": "0.1",
        # The cores shared out between the ranks, as a GPU each would be.
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)),
        "TQDM_DISABLE": "1",
    }
    from connectors.training.run_dir import METRICS

    out.parent.mkdir(parents=True, exist_ok=True)
    return watch(command, env, out / METRICS, out.parent / "train.log", nproc)


def plot(runs: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, run in runs.items():
        for rank, points in run["timeline"].items():
            if points:
                t, mb = zip(*points, strict=True)
                ax.plot(t, [m / 1024 for m in mb], label=f"{name}, rank {rank}")
    ax.set_xlabel("seconds since the command started")
    ax.set_ylabel("resident set (GB)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2-0.5b", help="a deploy.local.shaped_model shape")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64, help="prompt + completion tokens")
    parser.add_argument("--rows", type=int, default=80, help="synthetic examples in the file")
    parser.add_argument("--name", default="fsdp_memory", help="result file name")
    args = parser.parse_args()

    from deploy.local.model_cache import shaped_model
    from deploy.local.synthetic import unpaired_examples

    model = shaped_model(CACHE, args.shape)
    parameters = json.loads((model / "shaped_model.json").read_text())["parameters"]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="kto-loop-fsdp-memory-") as tmp:
        data = Path(tmp) / "data.jsonl"
        unpaired_examples(args.rows, seed=0).to_json(data, orient="records", lines=True)
        for name, nproc in (("fsdp_2_ranks", 2), ("plain_1_process", 1)):
            runs[name] = train(model, data, Path(tmp) / name / "adapter", nproc, args)
            print(name, {k: v for k, v in runs[name].items() if k != "timeline"}, file=sys.stderr)

    fsdp, plain = runs["fsdp_2_ranks"], runs["plain_1_process"]
    result = {
        "shape": args.shape,
        "parameters": parameters,
        "steps": args.steps,
        "max_length": args.max_length,
        "global_batch": GLOBAL_BATCH,
        "precision": "fp32",
        "memory": "VmHWM (peak) and VmRSS per training process, read every 0.1 s",
        **{name: {k: v for k, v in run.items() if k != "timeline"} for name, run in runs.items()},
        "rank_peak_vs_plain": round(
            max(fsdp["peak_rss_mb_per_rank"]) / plain["peak_rss_mb_per_rank"][0], 3
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(runs, RESULTS / f"{args.name}.png", f"{args.shape}, {args.steps} steps, CPU")
    line = json.dumps(result)
    (RESULTS / f"{args.name}.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
