"""The GPU check's orchestration (bench/gpu_check.py) without its heavy parts: the plans
it runs, how it reads the parts' results into one line, and how it says what it could
not run. Its real proof is `bench/gpu_check.sh --cpu-dry-run`, run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]


def _plan(*argv: str) -> gpu_check.Plan:
    parser_args = gpu_check.argparse.Namespace(
        cpu_dry_run="--cpu-dry-run" in argv, name=None, precision=None, steps=None,
        seq_len=None, budget_s=570.0,
    )  # fmt: skip
    return gpu_check.plan_for(parser_args)


def test_the_gpu_plan_trains_the_half_billion_shape_in_bf16_and_serves_it_on_cuda():
    plan = _plan()
    training = gpu_check.training_command(plan, "py")
    assert training[:3] == ["py", "-m", "bench.train_vs_trl"]
    options = dict(zip(training[3::2], training[4::2], strict=True))
    assert options == {
        "--shape": "qwen2-0.5b", "--steps": "300", "--rounds": "1", "--device": "cuda",
        "--precision": "bf16", "--peers": "trl,ours_fsdp", "--name": "gpu_check_training",
        "--seq-len": "256",
    }  # fmt: skip
    hotswap = gpu_check.hotswap_command(plan, "py", "vllm-py", Path("m"), peer=False)
    assert hotswap[hotswap.index("--rounds") + 1] == "5"
    assert hotswap[hotswap.index("--vllm-python") + 1] == "vllm-py"
    assert hotswap[hotswap.index("--model") + 1] == "m"
    assert hotswap[-1] == "--no-peer"


def test_the_dry_run_takes_the_tiny_shape_on_the_cpu_and_the_hotswap_s_own_model():
    plan = _plan("--cpu-dry-run")
    training = gpu_check.training_command(plan, "py")
    assert "tiny" in training and "cpu" in training and "--seq-len" not in training
    hotswap = gpu_check.hotswap_command(plan, "py", "vllm-py", None, peer=True)
    assert "--model" not in hotswap and "--no-peer" not in hotswap
    assert plan.name == "gpu_check_cpu_dry_run"


def test_a_part_s_result_is_its_last_json_line_even_with_warnings_after_it():
    text = 'loading\n{"a": 1}\n{"b": 2}\nWARNING: something at exit\n'
    assert gpu_check.last_json(text) == {"b": 2}
    assert gpu_check.last_json("no json here\n{broken") is None


def test_one_training_result_gives_the_trl_comparison_and_the_fsdp_comparison():
    result = {
        "shape": "qwen2-0.5b", "ours_tokens_per_s": 900.0, "trl_tokens_per_s": 450.0,
        "ours_fsdp_tokens_per_s": 850.0, "ours_peak_gpu_mb": 3000.0, "trl_peak_gpu_mb": 3500.0,
        "ours_fsdp_peak_gpu_mb": 2900.0, "speedup": 2.0, "fsdp_ratio": 0.944, "rounds": 1,
    }  # fmt: skip
    training, fsdp = gpu_check.training_figures(result)
    assert training["speedup"] == 2.0 and "ours_fsdp_tokens_per_s" not in training
    assert fsdp == {
        "ours_tokens_per_s": 900.0, "ours_fsdp_tokens_per_s": 850.0,
        "ours_peak_gpu_mb": 3000.0, "ours_fsdp_peak_gpu_mb": 2900.0, "fsdp_ratio": 0.944,
    }  # fmt: skip


def test_the_line_is_not_ok_when_a_part_failed_but_a_skipped_part_is_no_failure():
    plan = _plan()
    env = {"device": "NVIDIA H100", "torch": "2.11.0", "cuda": "13.0"}
    skipped = {"training": {"speedup": 2.1}, "hotswap": {"skipped": "vllm not importable"}}
    line = gpu_check.combine(env, skipped, 12.34, plan)
    assert line["ok"] is True and line["wall_s"] == 12.3 and line["device"] == "NVIDIA H100"
    failed = gpu_check.combine(env, {"training": {"failed": "exit 1"}}, 1.0, plan)
    assert failed["ok"] is False


def test_an_interpreter_without_vllm_is_skipped_with_the_reason():
    python, why = gpu_check.find_vllm(["/nonexistent/python", sys.executable], "cuda", {})
    assert python is None
    assert "/nonexistent/python: not found" in why and sys.executable in why


def test_the_command_prints_one_json_line_with_every_part_accounted_for(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu-dry-run", "--skip", "training,hotswap",
         "--results", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(line) >= {"check", "torch", "training", "fsdp_1_gpu", "hotswap", "wall_s", "ok"}
    assert line["hotswap"] == {"skipped": "--skip hotswap"}
    assert json.loads((tmp_path / "gpu_check_cpu_dry_run.json").read_text()) == line
