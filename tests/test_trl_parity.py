"""Our trainer with TRL's recipe takes TRL's steps: TRL's KTOTrainer and
`trl_recipe` on the same rows, model and seed agree on every step's loss and KL
estimate, and end with the same adapter (the whole check: python -m bench.trl_parity)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deploy.local.synthetic import unpaired_examples
from flows.training import TrainInputs, run_training
from pipeline.feedback.balance import choose_weights
from pipeline.feedback.examples import Example
from pipeline.training.options import LoraOptions, TrainOptions, trl_recipe

pytestmark = pytest.mark.training

ROWS = 76  # 9 full batches of 8 and a short one: TRL keeps it
EPOCHS = 2


def _trl(model: Path, rows: list[dict], lambdas: tuple[float, float], out: Path):
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer, PrinterCallback
    from trl import KTOConfig, KTOTrainer

    datasets.disable_progress_bars()
    trainer = KTOTrainer(
        model=str(model),
        args=KTOConfig(
            output_dir=str(out),
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            num_train_epochs=EPOCHS,
            desirable_weight=lambdas[0],
            undesirable_weight=lambdas[1],
            seed=3,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.save_model(str(out))
    return [h for h in trainer.state.log_history if "loss" in h and "kl" in h]


def test_trl_recipe_takes_trls_steps_on_the_same_rows(tiny_model_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    frame = unpaired_examples(ROWS, seed=5, desirable_share=0.3)
    rows = [
        {"prompt": r.prompt, "completion": r.completion, "label": bool(r.label)}
        for r in frame.itertuples()
    ]
    n_d = sum(r["label"] for r in rows)
    balance = choose_weights(n_d, ROWS - n_d)
    lambdas = (balance.lambda_desirable, balance.lambda_undesirable)
    history = _trl(tiny_model_dir, rows, lambdas, tmp_path / "trl")

    records = [
        Example(None, json.dumps(r["prompt"]), r["completion"][0]["content"], r["label"])
        for r in rows
    ]
    options = trl_recipe(TrainOptions(learning_rate=1e-3, epochs=EPOCHS, seed=3))
    ours = tmp_path / "ours"
    result = run_training(
        TrainInputs(
            tiny_model_dir,
            records,
            ours,
            desirable_weight=lambdas[0],
            undesirable_weight=lambdas[1],
            progress=False,
            plots=False,
        ),
        options,
        LoraOptions(),
    )
    metrics = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()]

    # TRL's sequential batches: 10 a pass, the last one short, every pass the same.
    assert result.manifest.steps == len(history) == 10 * EPOCHS
    for step, (theirs, mine) in enumerate(zip(history, metrics, strict=True), 1):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5), step
        assert mine["kl"] == pytest.approx(theirs["kl"], abs=1e-5), step
    # The policy moved: the KL estimate is not 0 throughout, so the check has teeth.
    assert any(m["kl"] > 0 for m in metrics)
    trl_weights = load_file(tmp_path / "trl" / "adapter_model.safetensors")
    our_weights = load_file(ours / "adapter_model.safetensors")
    assert trl_weights.keys() == our_weights.keys()
    for key, value in trl_weights.items():
        torch.testing.assert_close(our_weights[key], value, atol=1e-5, rtol=1e-4)
