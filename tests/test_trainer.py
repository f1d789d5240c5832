"""The KTO trainer on a tiny Llama-style model built in a fixture: it learns a
separable task, writes an adapter that peft loads, leaves the base untouched,
resumes on the same trajectory, and refuses bad input before writing anything."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from connectors.training.run_dir import ADAPTER_FILES, CHECKPOINT, MANIFEST, METRICS, read_manifest
from deploy.local.synthetic import unpaired_examples
from flows.training import TrainInputs, run_training
from pipeline.feedback.examples import Example
from pipeline.training.encode import EncodeError
from pipeline.training.errors import (
    CheckpointMismatch,
    DivergedError,
    GeneralAbilityError,
    TrainError,
)
from pipeline.training.options import TrainOptions

pytestmark = pytest.mark.training

# Large enough to move the tiny model in a few dozen steps.
FAST = TrainOptions(
    beta=0.1,
    learning_rate=2e-3,
    batch_size=8,
    max_length=96,
    max_prompt_length=64,
    eval_every=5,
    early_stopping_patience=0,
    sft_weight=0.0,
    seed=0,
    # The fixture's model is random: its sampled answers are noise, nothing a judge could
    # rank, so these runs are judged by held-out likelihood (tests/test_answer_check.py
    # covers the judge).
    selection="heldout_loss",
)


def records(n: int, seed: int, desirable_share: float = 0.5, flip: bool = False) -> list[Example]:
    frame = unpaired_examples(n, seed=seed, desirable_share=desirable_share)
    return [
        Example(None, json.dumps(r.prompt), r.completion[0]["content"], bool(r.label) != flip)
        for r in frame.itertuples()
    ]


TRAIN = records(240, seed=1)
HELDOUT = records(48, seed=2)
DISLIKES = [r for r in TRAIN if not r.desirable]


def inputs(model: Path, out: Path, **changes) -> TrainInputs:
    base = TrainInputs(model, TRAIN, out, heldout=HELDOUT, progress=False)
    return replace(base, **changes)


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def no_adapter(out: Path) -> bool:
    return not any((out / name).exists() for name in (*ADAPTER_FILES, MANIFEST))


def test_learns_a_separable_task_and_writes_a_complete_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    result = run_training(inputs(tiny_model_dir, out), replace(FAST, epochs=2))

    after = result.manifest.metrics.heldout_after
    assert result.manifest.best_step > 0
    assert (result.manifest.status, result.manifest.status_reason) == ("trained", None)
    assert after["reward_desirable"] > after["reward_undesirable"]
    assert after["accuracy"] > 0.75
    for name in (*ADAPTER_FILES, MANIFEST, METRICS, "plots/training.png"):
        assert (out / name).is_file(), name
    assert not (out / CHECKPOINT).exists()
    manifest = read_manifest(out)
    assert manifest.as_dict() == json.loads(json.dumps(result.manifest.as_dict(), default=str))
    assert manifest.counts["train_desirable"] + manifest.counts["train_undesirable"] == 240
    assert manifest.beta == FAST.beta
    assert manifest.lambdas["desirable"] == 1.0
    assert manifest.versions["torch"] == torch.__version__.split("+")[0] or manifest.versions[
        "torch"
    ].startswith(torch.__version__.split("+")[0])
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, manifest.steps + 1))
    assert {"loss", "kl", "reward_desirable", "reward_undesirable", "lr"} <= rows[0].keys()
    assert any("heldout_loss" in r for r in rows)


def test_saved_adapter_loads_with_peft_changes_outputs_and_leaves_base_untouched(
    tiny_model_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = digest(tiny_model_dir)
    out = tmp_path / "adapter"
    run_training(inputs(tiny_model_dir, out), FAST)
    assert digest(tiny_model_dir) == before

    ids = torch.tensor([[1, 4, 200, 201, 202, 2, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
        with tuned.disable_adapter():
            disabled_logits = tuned(input_ids=ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    torch.testing.assert_close(base_logits, disabled_logits)


def test_trains_on_dislikes_only(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    # The guard is off: on this random model, pushing dislikes down at this rate also
    # lowers the liked answers' end-of-turn token (test_eos_guard_... covers that).
    heldout = [r for r in HELDOUT if not r.desirable]
    result = run_training(
        inputs(tiny_model_dir, out, train=DISLIKES, heldout=heldout), replace(FAST, eos_guard=0)
    )

    assert (out / MANIFEST).is_file()
    after = result.manifest.metrics.heldout_after
    assert result.manifest.counts["train_desirable"] == 0
    # Pushed the disliked style down against the reference point.
    assert after["reward_undesirable"] < 0
    assert result.manifest.diagnostics["one_class_rate"] == 1.0
    assert any("one class" in w for w in result.manifest.warnings)


def test_resume_continues_the_same_trajectory(tiny_model_dir, tmp_path):
    options = replace(FAST, max_steps=8, checkpoint_every=2, eval_every=4)
    straight = run_training(inputs(tiny_model_dir, tmp_path / "straight"), options)

    out = tmp_path / "interrupted"
    paused = run_training(inputs(tiny_model_dir, out), replace(options, stop_after_steps=3))
    assert paused.adapter_dir is None and paused.manifest is None and paused.step == 3
    assert (out / CHECKPOINT / "state.pt").is_file()
    assert no_adapter(out)
    with pytest.raises(TrainError, match="--resume"):
        run_training(inputs(tiny_model_dir, out), options)
    resumed = run_training(inputs(tiny_model_dir, out, resume=True), options)

    assert resumed.manifest.steps == straight.manifest.steps == 8

    def losses(path: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (path / METRICS).read_text().splitlines()]

    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / ADAPTER_FILES[0])
    b = load_file(out / ADAPTER_FILES[0])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_resume_refuses_a_checkpoint_of_other_data(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    options = replace(FAST, max_steps=6, checkpoint_every=2)
    run_training(inputs(tiny_model_dir, out), replace(options, stop_after_steps=2))
    with pytest.raises(CheckpointMismatch, match="other data"):
        run_training(inputs(tiny_model_dir, out, train=TRAIN[:-8], resume=True), options)
    assert no_adapter(out)
    # A resume point another version of the trainer wrote is refused the same way (the
    # cycle then starts afresh), not misread.
    state = out / CHECKPOINT / "state.pt"
    torch.save({**torch.load(state, weights_only=False), "format": 1}, state)
    with pytest.raises(CheckpointMismatch, match="another version"):
        run_training(inputs(tiny_model_dir, out, resume=True), options)


def test_early_stopping_keeps_the_best_step(tiny_model_dir, tmp_path):
    # Held-out labels flipped: the better the model learns the task, the worse the
    # held-out loss, so it must stop and keep an early step.
    options = replace(FAST, epochs=3, eval_every=2, early_stopping_patience=2)
    flipped = records(48, seed=2, flip=True)
    result = run_training(inputs(tiny_model_dir, tmp_path / "a", heldout=flipped), options)

    m = result.manifest
    assert m.stopped_early
    assert m.steps < m.planned_steps
    assert m.best_step <= m.steps - 2 * options.eval_every
    assert (
        m.metrics.heldout_after["loss"]
        <= min(
            json.loads(line).get("heldout_loss", 9) for line in (tmp_path / "a" / METRICS).open()
        )
        + 1e-6
    )


def test_a_run_that_keeps_its_starting_point_says_no_gain_and_writes_the_start(
    tiny_model_dir, tmp_path
):
    from safetensors.torch import load_file

    # A learning rate too small to move the held-out loss by the 1e-6 selection
    # threshold: no evaluated step beats step 0, so the start is what is kept.
    options = replace(FAST, learning_rate=1e-9, max_steps=2, eval_every=1)
    out = tmp_path / "a"
    result = run_training(inputs(tiny_model_dir, out), options)

    m = result.manifest
    assert (m.best_step, m.steps) == (0, 2)
    assert m.status == "no_gain"
    assert "no evaluated step beat the starting point" in m.status_reason
    assert json.loads((out / MANIFEST).read_text())["status"] == "no_gain"
    # The adapter is still written, and it is the start: a fresh LoRA's B is zero.
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(not t.any() for t in lora_b)


def test_sft_term_is_reported_and_lowers_desirable_nll(tiny_model_dir, tmp_path):
    general = [r for r in HELDOUT if r.desirable]
    plain = run_training(
        inputs(tiny_model_dir, tmp_path / "plain", general=general), replace(FAST, max_steps=10)
    )
    sft = run_training(
        inputs(tiny_model_dir, tmp_path / "sft", general=general),
        replace(FAST, max_steps=10, sft_weight=1.0),
    )
    rows = [json.loads(line) for line in (tmp_path / "sft" / METRICS).open()]
    assert all(r["sft"] > 0 for r in rows)
    assert sft.manifest.metrics.general_nll_after < plain.manifest.metrics.general_nll_after


def test_general_nll_guard_stops_early_and_keeps_a_step_within_the_bound(tiny_model_dir, tmp_path):
    general = records(16, seed=5)
    bound = 0.01
    result = run_training(
        inputs(tiny_model_dir, tmp_path / "a", general=general, train=DISLIKES),
        replace(
            FAST,
            learning_rate=2e-2,
            max_steps=20,
            eval_every=2,
            max_general_nll_increase=bound,
            eos_guard=0,
        ),
    )
    m = result.manifest
    assert m.stopped_early and "general held-out NLL" in m.stop_reason
    before, after = m.metrics.general_nll_before, m.metrics.general_nll_after
    assert after <= before * (1 + bound)
    rows = [json.loads(line) for line in (tmp_path / "a" / METRICS).open()]
    assert any(r.get("heldout_general_nll", 0) > before * (1 + bound) for r in rows)


def test_general_nll_bound_without_a_heldout_set_fails_the_run(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(GeneralAbilityError, match="general held-out NLL rose"):
        run_training(
            inputs(tiny_model_dir, out, general=records(16, seed=5), heldout=(), train=DISLIKES),
            replace(FAST, learning_rate=2e-2, max_steps=10, max_general_nll_increase=1e-6),
        )
    assert no_adapter(out)


def test_end_of_turn_guard_stops_a_collapsing_policy_and_keeps_an_earlier_step(
    chat_model_dir, tmp_path
):
    # The chat model ends its sampled answers; pushed hard on dislikes only, the
    # probability taken off them goes to text that never ends its turn.
    result = run_training(
        inputs(chat_model_dir, tmp_path / "a", train=DISLIKES),
        replace(FAST, learning_rate=3e-2, max_steps=30, eval_every=3, eos_guard=0.1),
    )
    m = result.manifest
    assert m.stopped_early and "end their turn" in m.stop_reason, m.stop_reason
    assert m.steps < 30
    assert m.best_step < m.steps
    rows = [json.loads(line) for line in (tmp_path / "a" / METRICS).open()]
    checked = [r["heldout_sampled_end_rate"] for r in rows if "heldout_sampled_end_rate" in r]
    assert checked[-1] < 0.9 * m.metrics.heldout_before["sampled_end_rate"]
    assert m.metrics.heldout_after["sampled_end_rate"] > checked[-1]


def test_divergence_stops_with_a_clear_error_and_no_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(DivergedError, match="diverged"):
        run_training(
            inputs(tiny_model_dir, out),
            replace(FAST, learning_rate=1e30, max_grad_norm=1e38, max_steps=20),
        )
    assert no_adapter(out)


def test_continual_round_uses_the_previous_adapter_as_reference(tiny_model_dir, tmp_path):
    first = tmp_path / "v1"
    run_training(inputs(tiny_model_dir, first), replace(FAST, max_steps=6))
    second = run_training(
        inputs(tiny_model_dir, tmp_path / "v2", init_adapter=first, reference_adapter=first),
        replace(FAST, max_steps=4),
    )
    # Warm-started from the reference itself: before training, policy == reference.
    before = second.manifest.metrics.heldout_before
    assert before["kl"] == pytest.approx(0, abs=1e-6)
    assert before["margin"] == pytest.approx(0, abs=1e-6)
    assert second.manifest.reference_adapter == str(first)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"train": []}, TrainError, "no training records"),
        ({"base_model": Path("/nonexistent/model")}, TrainError, "does not exist"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(
    tiny_model_dir, tmp_path, change, error, match
):
    out = tmp_path / "adapter"
    with pytest.raises(error, match=match):
        run_training(inputs(tiny_model_dir, out, **change), FAST)
    assert no_adapter(out)


def test_model_without_a_chat_template_says_how_to_supply_one(model_cache, tmp_path):
    from deploy.local.model_cache import tiny_model
    from deploy.local.tiny_model import CHAT_TEMPLATE

    model = tiny_model(model_cache, chat_template=False)
    out = tmp_path / "adapter"
    with pytest.raises(EncodeError, match="--chat-template"):
        run_training(inputs(model, out), replace(FAST, max_steps=2))
    assert no_adapter(out)
    result = run_training(
        inputs(model, out, chat_template=CHAT_TEMPLATE), replace(FAST, max_steps=2)
    )
    assert result.adapter_dir == out


def test_max_length_too_small_for_any_completion(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(ValueError, match="leaves no room for a completion"):
        run_training(
            inputs(tiny_model_dir, out), replace(FAST, max_length=16, max_prompt_length=16)
        )
    assert no_adapter(out)


def test_cli_train_prints_a_json_summary_and_exits_nonzero_on_bad_input(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "data.jsonl"
    unpaired_examples(200, seed=7).to_json(data, orient="records", lines=True)
    with data.open("a") as f:  # one odd row: skipped and counted, not fatal
        f.write(json.dumps({"prompt": "p", "completion": "c", "label": "maybe"}) + "\n")
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "flows.cli", "train", "--base-model", str(tiny_model_dir)]
    # The fixture's model is random: held-out likelihood picks the step (see FAST).
    ok = subprocess.run(
        [*cmd, "--data", str(data), "--out", str(out), "--max-steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KTO_LOOP_TRAIN__SELECTION": "heldout_loss"},
    )
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["status"] == "trained" and summary["steps"] == 3
    assert summary["status_reason"] is None and summary["skipped_rows"] == 1
    assert "1 of 201 rows skipped" in ok.stderr and "label at row 201" in ok.stderr
    assert summary["lambda_desirable"] >= 1 and summary["lambda_undesirable"] >= 1
    assert (out / MANIFEST).is_file()

    bad = subprocess.run(
        [*cmd, "--data", str(data), "--out", str(tmp_path / "again"), "--max-steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"KTO_LOOP_TRAIN__MAX_LENGTH": "8", "PATH": "/usr/bin:/bin"},
    )
    assert bad.returncode == 2
    assert "max_length" in bad.stderr and "Traceback" not in bad.stderr


def test_gradient_accumulation_makes_one_step_of_several_batches(tiny_model_dir, tmp_path):
    result = run_training(
        inputs(tiny_model_dir, tmp_path / "a"),
        replace(FAST, batch_size=4, grad_accum=3, max_steps=4, eval_every=2),
    )
    rows = [json.loads(line) for line in (tmp_path / "a" / METRICS).open()]
    assert result.manifest.steps == 4 and len(rows) == 4
    # Each step saw three batches of four.
    assert all(r["n_desirable"] + r["n_undesirable"] == 12 for r in rows)


def test_vote_weights_scale_each_examples_term_in_the_loss(tiny_model_dir, tmp_path):
    # At the first step the policy is the reference (a fresh LoRA's B is zero), so the
    # KL estimate is 0, every v is sigmoid(0) = 1/2, and an example's term is
    # lambda_y / 2 times its weight. Two likes weighing 3 and six dislikes weighing 1
    # average 1.5, so they weigh 2 and 2/3 once scaled to average 1. With lambda_D = 2,
    # lambda_U = 1 and one batch of all eight the loss is
    # (2 * 2 * 2 + 6 * 1 * 2/3) / 8 / 2 = 0.75; unweighted it would be
    # (2 * 2 + 6 * 1) / 8 / 2 = 0.625.
    likes = [replace(r, weight=3.0) for r in TRAIN if r.desirable][:2]
    dislikes = [r for r in TRAIN if not r.desirable][:6]
    options = replace(FAST, max_steps=1, batching="shuffled")
    weighted = run_training(
        inputs(
            tiny_model_dir, tmp_path / "w", train=likes + dislikes, heldout=(), desirable_weight=2.0
        ),
        options,
    )
    plain = run_training(
        inputs(
            tiny_model_dir,
            tmp_path / "p",
            train=[replace(r, weight=1.0) for r in likes + dislikes],
            heldout=(),
            desirable_weight=2.0,
        ),
        options,
    )
    assert weighted.manifest.metrics.train_final["loss"] == pytest.approx(0.75, abs=1e-5)
    assert plain.manifest.metrics.train_final["loss"] == pytest.approx(0.625, abs=1e-5)


def test_empty_answers_train_as_the_end_of_turn_alone(tiny_model_dir, tmp_path):
    # A model that ends its turn at once gave an answer too, and users dislike it.
    prompt = TRAIN[0].messages_json
    empty = [Example(None, prompt, "", False)] * 8
    result = run_training(
        inputs(tiny_model_dir, tmp_path / "a", train=TRAIN[:56] + empty, heldout=()),
        replace(FAST, max_steps=2),
    )
    m = result.manifest
    assert m.status == "trained"
    assert m.encoding["kept"] == 64
    assert m.encoding["dropped_empty_completion"] == 0
    n_u = sum(not r.desirable for r in TRAIN[:56]) + 8
    assert m.counts["train_undesirable"] == n_u
