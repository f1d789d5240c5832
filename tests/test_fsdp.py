"""Training with the base model sharded (FSDP2): two CPU ranks (gloo) under
`kto-loop train --nproc 2` take the same steps as one process on the same global batch,
a rank killed with SIGKILL leaves a resume point that ends in the same adapter, and the
one-process options (fsdp, activation checkpointing, bf16) change nothing they should
not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from connectors.training.run_dir import CHECKPOINT, MANIFEST, METRICS
from deploy.local.synthetic import unpaired_examples
from flows.training import TrainInputs, run_training, run_training_on
from pipeline.training.errors import TrainError
from tests.test_trainer import FAST, HELDOUT, TRAIN

pytestmark = pytest.mark.training

STEPS = 40
# The same run through the command line: the global batch is 8 examples, as one
# process of batch 8 or two ranks of batch 4.
ENV = {
    "KTO_LOOP_TRAIN__SELECTION": "final",
    "KTO_LOOP_TRAIN__CHECKPOINT_EVERY": "2",
    "KTO_LOOP_TRAIN__LEARNING_RATE": "2e-3",
    "OMP_NUM_THREADS": "1",
    "TQDM_DISABLE": "1",
}
TOLERANCE = 1e-5


def _command(model: Path, data: Path, out: Path, nproc: int, *more: str) -> list[str]:
    return [
        sys.executable, "-m", "flows.cli", "train", "--nproc", str(nproc),
        "--base-model", str(model), "--data", str(data), "--out", str(out),
        "--max-steps", str(STEPS), *more,
    ]  # fmt: skip


def _env(nproc: int) -> dict[str, str]:
    return {**os.environ, **ENV, "KTO_LOOP_TRAIN__BATCH_SIZE": str(8 // nproc)}


def _train(model: Path, data: Path, out: Path, nproc: int, *more: str) -> dict:
    proc = subprocess.run(
        _command(model, data, out, nproc, *more),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(nproc),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith('{"status"')]
    assert len(summaries) == 1, "one summary, from rank 0"
    return json.loads(summaries[0])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def _max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fsdp") / "data.jsonl"
    unpaired_examples(200, seed=7).to_json(path, orient="records", lines=True)
    return path


@pytest.fixture(scope="module")
def one_process(tiny_model_dir: Path, data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "adapter"
    _train(tiny_model_dir, data, out, 1)
    return out


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir: Path, data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "adapter"
    summary = _train(tiny_model_dir, data, out, 2)
    assert summary["status"] == "trained" and summary["steps"] == STEPS
    return out


def test_two_ranks_take_the_steps_of_one_process_on_the_same_global_batch(
    one_process: Path, two_ranks: Path
):
    manifest = json.loads((two_ranks / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["options"]["batch_size"] == 4
    one, two = _rows(one_process), _rows(two_ranks)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        # The row is the global batch's: counts add up across the ranks.
        assert (a["n_desirable"], a["n_undesirable"], a["tokens"]) == (
            b["n_desirable"],
            b["n_undesirable"],
            b["tokens"],
        )
        for key in ("loss", "sft", "kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=TOLERANCE), (a["step"], key)
    assert one[-1]["kl"] > 0.1, "the policy moved, so the parity is not that of a still model"
    assert _max_difference(one_process, two_ranks) <= TOLERANCE


def test_a_rank_killed_mid_run_leaves_a_resume_point_that_ends_in_the_same_adapter(
    tiny_model_dir: Path, data: Path, two_ranks: Path, tmp_path: Path
):
    out = tmp_path / "adapter"
    launcher = subprocess.Popen(
        _command(tiny_model_dir, data, out, 2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(2),
        start_new_session=True,
    )
    try:
        state = out / CHECKPOINT / "state.pt"
        deadline = time.monotonic() + 180
        while not state.exists():
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        ranks = [
            p
            for p in psutil.Process(launcher.pid).children(recursive=True)
            if p.environ().get("RANK") is not None
        ]
        assert sorted(p.environ()["RANK"] for p in ranks) == ["0", "1"]
        rank1 = next(p for p in ranks if p.environ()["RANK"] == "1")
        rank1.send_signal(signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, "a rank outlived the run"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert not (out / MANIFEST).exists(), "the run ended before the kill: nothing was tested"
    paused_at = len(_rows(out))
    assert 0 < paused_at < STEPS

    summary = _train(tiny_model_dir, data, out, 2, "--resume")
    assert summary["steps"] == STEPS
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["resumed_from_step"] is not None and manifest["resumed_from_step"] > 0
    assert [r["step"] for r in _rows(out)] == list(range(1, STEPS + 1))
    assert _max_difference(two_ranks, out) <= TOLERANCE


def _in_process(model: Path, out: Path, **changes) -> Path:
    options = replace(FAST, max_steps=6, eval_every=3, **changes)
    result = run_training(TrainInputs(model, TRAIN, out, heldout=HELDOUT, progress=False), options)
    assert result.manifest is not None and result.manifest.steps == 6
    return out


def test_fsdp_and_activation_checkpointing_in_one_process_match_the_plain_path(
    tiny_model_dir: Path, tmp_path: Path
):
    plain = _in_process(tiny_model_dir, tmp_path / "plain")
    sharded = _in_process(tiny_model_dir, tmp_path / "sharded", fsdp=True)
    assert json.loads((sharded / MANIFEST).read_text())["options"]["fsdp"] is True
    assert not torch.distributed.is_initialized(), "the one-rank group was left behind"
    recomputed = _in_process(
        tiny_model_dir, tmp_path / "recomputed", fsdp=True, activation_checkpointing=True
    )
    assert _max_difference(plain, sharded) <= TOLERANCE
    assert _max_difference(plain, recomputed) <= TOLERANCE


def test_bf16_with_fsdp_trains_and_writes_a_float32_adapter(tiny_model_dir: Path, tmp_path: Path):
    out = _in_process(tiny_model_dir, tmp_path / "bf16", fsdp=True, precision="bf16")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["precision"] == "torch.bfloat16"
    weights = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert any(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k), "it trained"


def test_the_cycle_trains_on_two_processes_and_gets_their_result_or_their_error(
    tiny_model_dir: Path, tmp_path: Path
):
    """run_training_on, which the cycle calls with [train] nproc: the ranks' adapter is
    one process's on the same global batch, and a run's error comes back as itself."""
    options = replace(FAST, max_steps=6, eval_every=3, selection="final")
    one = run_training(
        TrainInputs(tiny_model_dir, TRAIN, tmp_path / "one", heldout=HELDOUT, progress=False),
        options,
    )
    two = run_training_on(
        TrainInputs(tiny_model_dir, TRAIN, tmp_path / "two", heldout=HELDOUT, progress=False),
        replace(options, batch_size=4, nproc=2),
        nproc=2,
    )
    assert two.manifest is not None and two.manifest.world_size == 2
    assert two.adapter_dir == tmp_path / "two"
    assert _max_difference(tmp_path / "one", tmp_path / "two") <= TOLERANCE
    assert one.manifest.steps == two.manifest.steps == 6

    with pytest.raises(TrainError, match="fewer than one step's batch"):
        run_training_on(
            TrainInputs(tiny_model_dir, TRAIN[:6], tmp_path / "few", progress=False),
            replace(options, batch_size=4),
            nproc=2,
        )
