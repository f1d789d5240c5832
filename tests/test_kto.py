"""The KTO loss: hand-derived numbers, then parity with TRL's KTOTrainer on a tiny model."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from pipeline.training.kto import kto_loss, kto_loss_from_logps, mismatched_kl
from pipeline.training.logps import (
    collate,
    collate_continuations,
    collate_prompts,
    continuation_logps,
    run_prompts,
    run_prompts_with_completions,
    sequence_logps,
    token_logps,
)

# A batch of four: log-ratios [1, -1, 2, -2], desirable, undesirable, desirable, undesirable.
POLICY = torch.tensor([-10.0, -12.0, -8.0, -9.0])
REFERENCE = torch.tensor([-11.0, -11.0, -10.0, -7.0])
MIXED = torch.tensor([True, False, True, False])


# ---------------------------------------------------------------- hand-derived numbers


def test_mixed_batch_matches_hand_derived_losses_and_rewards() -> None:
    """beta = 0.5, KL = 0.4 (z_ref = beta * KL enters as beta * (logratio - KL)).

    logratios = policy - reference = [1, -1, 2, -2]
    rewards   = beta * logratios    = [0.5, -0.5, 1.0, -1.0]
    desirable:   1 - sigmoid(0.5 * (1 - 0.4))    = 1 - sigmoid(0.3) = 0.425557
    undesirable: 1 - sigmoid(0.5 * (0.4 - (-1))) = 1 - sigmoid(0.7) = 0.331812
    desirable:   1 - sigmoid(0.5 * (2 - 0.4))    = 1 - sigmoid(0.8) = 0.310026
    undesirable: 1 - sigmoid(0.5 * (0.4 - (-2))) = 1 - sigmoid(1.2) = 0.231475
    loss = mean = 1.298870 / 4 = 0.324718
    """
    out = kto_loss(POLICY, REFERENCE, MIXED, torch.tensor(0.4), beta=0.5)

    assert_close(
        out.losses, torch.tensor([0.425557, 0.331812, 0.310026, 0.231475]), atol=1e-6, rtol=0
    )
    assert_close(out.loss, torch.tensor(0.324718), atol=1e-6, rtol=0)
    assert_close(out.rewards, torch.tensor([0.5, -0.5, 1.0, -1.0]))
    assert_close(out.kl, torch.tensor(0.4))
    assert out.kl_clamped is False


def test_negative_kl_estimate_is_clamped_to_zero() -> None:
    """beta = 0.5, raw KL = -0.3 -> KL = max(0, -0.3) = 0.

    desirable:   1 - sigmoid(0.5 * 1)        = 1 - sigmoid(0.5) = 0.377541
    undesirable: 1 - sigmoid(0.5 * (0 + 1))  = 1 - sigmoid(0.5) = 0.377541
    desirable:   1 - sigmoid(0.5 * 2)        = 1 - sigmoid(1.0) = 0.268941
    undesirable: 1 - sigmoid(0.5 * (0 + 2))  = 1 - sigmoid(1.0) = 0.268941
    loss = 1.292964 / 4 = 0.323241
    """
    out = kto_loss(POLICY, REFERENCE, MIXED, torch.tensor(-0.3), beta=0.5)

    assert out.kl_clamped is True
    assert_close(out.kl, torch.tensor(0.0))
    assert_close(
        out.losses, torch.tensor([0.377541, 0.377541, 0.268941, 0.268941]), atol=1e-6, rtol=0
    )
    assert_close(out.loss, torch.tensor(0.323241), atol=1e-6, rtol=0)
    at_zero = kto_loss(POLICY, REFERENCE, MIXED, torch.tensor(0.0), beta=0.5)
    assert at_zero.kl_clamped is False
    assert_close(out.losses, at_zero.losses)


def test_class_weights_scale_each_class_losses() -> None:
    """lambda_D = 2, lambda_U = 0.5 on the mixed batch (beta = 0.5, KL = 0.4):

    losses = [2 * 0.425557, 0.5 * 0.331812, 2 * 0.310026, 0.5 * 0.231475]
           = [0.851115, 0.165906, 0.620051, 0.115738]
    loss   = 1.752810 / 4 = 0.438203
    """
    out = kto_loss(
        POLICY,
        REFERENCE,
        MIXED,
        torch.tensor(0.4),
        beta=0.5,
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )

    assert_close(
        out.losses, torch.tensor([0.851115, 0.165906, 0.620051, 0.115738]), atol=1e-6, rtol=0
    )
    assert_close(out.loss, torch.tensor(0.438203), atol=1e-6, rtol=0)
    assert_close(out.rewards, torch.tensor([0.5, -0.5, 1.0, -1.0]))


def test_all_desirable_batch() -> None:
    """beta = 0.1, logratios = [-5 - (-10), -7 - (-2)] = [5, -5], KL = 2.5:

    1 - sigmoid(0.1 * (5 - 2.5))  = 1 - sigmoid(0.25)  = 0.437823
    1 - sigmoid(0.1 * (-5 - 2.5)) = 1 - sigmoid(-0.75) = 0.679179
    loss = 1.117002 / 2 = 0.558501; rewards = [0.5, -0.5]
    """
    out = kto_loss(
        torch.tensor([-5.0, -7.0]),
        torch.tensor([-10.0, -2.0]),
        torch.tensor([True, True]),
        torch.tensor(2.5),
        beta=0.1,
        undesirable_weight=100.0,  # no undesirable example: must not matter
    )

    assert_close(out.losses, torch.tensor([0.437823, 0.679179]), atol=1e-6, rtol=0)
    assert_close(out.loss, torch.tensor(0.558501), atol=1e-6, rtol=0)
    assert_close(out.rewards, torch.tensor([0.5, -0.5]))


def test_all_undesirable_batch() -> None:
    """beta = 0.1, logratios = [5, -5], KL = 2.5:

    1 - sigmoid(0.1 * (2.5 - 5))  = 1 - sigmoid(-0.25) = 0.562177
    1 - sigmoid(0.1 * (2.5 + 5))  = 1 - sigmoid(0.75)  = 0.320821
    loss = 0.882998 / 2 = 0.441499; rewards = [0.5, -0.5]
    """
    out = kto_loss(
        torch.tensor([-5.0, -7.0]),
        torch.tensor([-10.0, -2.0]),
        torch.tensor([False, False]),
        torch.tensor(2.5),
        beta=0.1,
        desirable_weight=100.0,  # no desirable example: must not matter
    )

    assert_close(out.losses, torch.tensor([0.562177, 0.320821]), atol=1e-6, rtol=0)
    assert_close(out.loss, torch.tensor(0.441499), atol=1e-6, rtol=0)
    assert_close(out.rewards, torch.tensor([0.5, -0.5]))


def test_mismatched_kl_is_the_mean_log_ratio_then_the_loss_clamps_it() -> None:
    """Mismatched log-ratios [0.2, -1.0, 0.4, -0.6] have mean -0.25: raw, then clamped."""
    policy_mis = torch.tensor([-3.0, -5.0, -2.0, -4.0], requires_grad=True)
    reference_mis = torch.tensor([-3.2, -4.0, -2.4, -3.4])

    raw = mismatched_kl(policy_mis, reference_mis)
    out = kto_loss_from_logps(POLICY, REFERENCE, policy_mis, reference_mis, MIXED, beta=0.5)

    assert_close(raw, torch.tensor(-0.25))
    assert not raw.requires_grad
    assert out.kl_clamped is True
    assert_close(out.loss, torch.tensor(0.323241), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("reference", "desirable"),
    [
        (torch.zeros(3), MIXED),
        (REFERENCE, torch.tensor([True, False, True])),
    ],
    ids=["reference", "labels"],
)
def test_shape_mismatch_raises_value_error(
    reference: torch.Tensor, desirable: torch.Tensor
) -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        kto_loss(POLICY, reference, desirable, torch.tensor(0.1))


def test_gradient_flows_to_policy_logps_only() -> None:
    """d loss / d policy_i = -lambda_i * sign_i * beta * v_i * (1 - v_i) / B: never zero
    here; the reference and the KL estimate are constants of the loss."""
    policy = POLICY.clone().requires_grad_()
    reference = REFERENCE.clone().requires_grad_()
    kl = torch.tensor(0.4, requires_grad=True)

    out = kto_loss(policy, reference, MIXED, kl, beta=0.5)
    out.loss.backward()

    values = 1 - torch.tensor([0.425557, 0.331812, 0.310026, 0.231475])
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert_close(policy.grad, -sign * 0.5 * values * (1 - values) / 4, atol=1e-6, rtol=0)
    assert reference.grad is None
    assert kl.grad is None
    assert not out.kl.requires_grad
    assert not out.rewards.requires_grad


# ---------------------------------------------------------------- parity with TRL
#
# The oracle is TRL's KTOTrainer (loss_type="kto") with a LoRA adapter on the tiny model,
# scoring a batch its own collator made. Our tokenization differs from TRL's on purpose:
# TRL tokenizes prompt + completion through the chat template and takes the completion as
# where that diverges from the prompt alone, so its completion ends with the template's
# newline after the end-of-turn token; ours is the completion text then the end-of-turn
# token, which is what the server generates. To compare the math rather than the
# tokenizers, our shared-prompt path scores TRL's own token ids: each row is split into
# prompt (completion_mask 0) and completion (completion_mask 1), padding dropped.

BETA = 0.1
BATCH = 4
LORA_SCALE = 0.3


def _ordered_examples() -> list[dict[str, Any]]:
    """Three batches of four: mixed (D, U, U, D), all desirable, all undesirable."""
    from deploy.local.synthetic import unpaired_examples

    df = unpaired_examples(64, seed=3)
    rows = [
        {"prompt": r.prompt, "completion": r.completion, "label": bool(r.label)}
        for r in df.itertuples()
    ]
    good = [r for r in rows if r["label"]]
    bad = [r for r in rows if not r["label"]]
    return [good[0], bad[0], bad[1], good[1], *good[2:6], *bad[2:6]]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TRL, transformers and datasets warn and draw progress bars; none of it matters here."""
    import datasets
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def trl_trainer(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with _quiet():
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import KTOConfig, KTOTrainer

        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        args = KTOConfig(
            output_dir=str(tmp_path_factory.mktemp("trl-kto")),
            per_device_train_batch_size=BATCH,
            beta=BETA,
            use_cpu=True,
            report_to=[],
            precompute_ref_log_probs=False,
            save_strategy="no",
            logging_strategy="no",
            seed=0,
        )
        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        trainer = KTOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(_ordered_examples()),
            processing_class=tokenizer,
            peft_config=lora,
        )
    trainer.model.train()
    assert not [m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    return trainer


def _set_adapter(model: torch.nn.Module, seed: int) -> None:
    """Random non-zero LoRA A and B, so that the policy differs from the reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_SCALE)


def _raise_mismatched_likelihood(trainer: Any, batch: dict[str, torch.Tensor]) -> None:
    """A few Adam steps on the mismatched completions' log-likelihood. A random adapter
    on a near-uniform model almost always lowers the log-probs of given text, so the raw
    KL estimate is negative; after these steps it is positive and the clamp stays off."""
    causal_lm = trainer.model.get_base_model()
    pad = trainer.processing_class.pad_token_id
    prompts, completions = _split(
        batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
    )
    prompt_batch = collate_prompts(prompts, pad)
    conts = collate_continuations(prompt_batch, list(range(len(prompts))), completions, pad)
    params = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        _, logps = run_prompts_with_completions(causal_lm, prompt_batch, conts)
        (-logps.mean()).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _trl_batch(trainer: Any, index: int) -> dict[str, torch.Tensor]:
    rows = [trainer.train_dataset[i] for i in range(index * BATCH, (index + 1) * BATCH)]
    return trainer.data_collator(rows)


def _split(ids: torch.Tensor, attention: torch.Tensor, completion: torch.Tensor) -> tuple:
    prompts, completions = [], []
    for row, att, comp in zip(ids.tolist(), attention.tolist(), completion.tolist(), strict=True):
        prompts.append([t for t, a, c in zip(row, att, comp, strict=True) if a and not c])
        completions.append([t for t, a, c in zip(row, att, comp, strict=True) if a and c])
    return prompts, completions


def _our_loss(trainer: Any, batch: dict[str, torch.Tensor], wd: float, wu: float) -> Any:
    """Our KTO step on TRL's token ids: the shared-prompt path, reference = adapter off."""
    model = trainer.model
    causal_lm = model.get_base_model()
    pad = trainer.processing_class.pad_token_id
    prompts, completions = _split(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    )
    kl_prompts, kl_completions = _split(
        batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
    )
    assert kl_prompts == prompts
    # TRL's mismatched pairs: prompt x_i with completion y_(i-1) of the same batch.
    assert kl_completions == [completions[-1], *completions[:-1]]

    prompt_batch = collate_prompts(prompts, pad)
    rows = list(range(len(prompts)))
    matched = collate_continuations(prompt_batch, rows, completions, pad)
    mismatched = collate_continuations(prompt_batch, rows, kl_completions, pad)
    state, policy = run_prompts_with_completions(causal_lm, prompt_batch, matched)
    with torch.no_grad():
        policy_kl = continuation_logps(causal_lm, state.detached(), mismatched)
        with model.disable_adapter():
            ref_state = run_prompts(causal_lm, prompt_batch)
            reference = continuation_logps(causal_lm, ref_state, matched)
            reference_kl = continuation_logps(causal_lm, ref_state, mismatched)
    return kto_loss_from_logps(
        policy, reference, policy_kl, reference_kl, batch["label"], BETA, wd, wu
    ), policy


def _trl_loss(trainer: Any, batch: dict[str, torch.Tensor], wd: float, wu: float) -> tuple:
    trainer.desirable_weight, trainer.undesirable_weight = wd, wu
    trainer._metrics["train"].clear()
    with _quiet():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _assert_parity(trainer: Any, batch: dict[str, torch.Tensor], wd: float, wu: float) -> Any:
    trl_loss, metrics = _trl_loss(trainer, batch, wd, wu)
    ours, policy = _our_loss(trainer, batch, wd, wu)
    desirable = batch["label"]

    assert_close(ours.loss, trl_loss.detach(), atol=1e-5, rtol=0)
    assert_close(ours.kl.item(), metrics["kl"], atol=1e-5, rtol=0)
    if desirable.any():
        assert_close(
            ours.rewards[desirable].mean().item(), metrics["rewards/chosen"], atol=1e-5, rtol=0
        )
        assert_close(policy[desirable].mean().item(), metrics["logps/chosen"], atol=1e-4, rtol=1e-6)
    else:
        assert "rewards/chosen" not in metrics
    if (~desirable).any():
        assert_close(
            ours.rewards[~desirable].mean().item(), metrics["rewards/rejected"], atol=1e-5, rtol=0
        )
        assert_close(
            policy[~desirable].mean().item(), metrics["logps/rejected"], atol=1e-4, rtol=1e-6
        )
    else:
        assert "rewards/rejected" not in metrics
    # The rewards must not be trivially zero: the adapter moved the policy.
    assert ours.rewards.abs().max() > 1e-3
    return ours


@pytest.mark.parametrize(
    ("index", "labels", "weights", "seed"),
    [
        (0, [True, False, False, True], (1.33, 0.75), 0),
        (1, [True] * 4, (1.0, 1.0), 1),
        (2, [False] * 4, (0.5, 2.0), 2),
    ],
    ids=["mixed", "all-desirable", "all-undesirable"],
)
def test_loss_kl_and_rewards_match_trl(
    trl_trainer: Any, index: int, labels: list[bool], weights: tuple[float, float], seed: int
) -> None:
    _set_adapter(trl_trainer.model, seed)
    batch = _trl_batch(trl_trainer, index)
    assert batch["label"].tolist() == labels
    _raise_mismatched_likelihood(trl_trainer, batch)

    ours = _assert_parity(trl_trainer, batch, *weights)
    assert ours.kl_clamped is False
    assert ours.kl.item() > 1e-3


def test_clamped_kl_matches_trl(trl_trainer: Any) -> None:
    """Off-policy mismatched completions often make the raw estimate negative: find an
    adapter for which it is, then both must clamp it to 0 and agree on the loss."""
    batch = _trl_batch(trl_trainer, 0)
    for seed in range(100, 140):
        _set_adapter(trl_trainer.model, seed)
        with torch.no_grad():
            ours, _ = _our_loss(trl_trainer, batch, 1.0, 1.0)
        if ours.kl_clamped:
            break
    else:
        pytest.fail("no adapter seed in 100..139 gives a negative raw KL estimate")

    ours = _assert_parity(trl_trainer, batch, 0.8, 1.25)
    assert ours.kl_clamped is True
    assert ours.kl.item() == 0.0


def test_trl_fused_head_patch_leaves_our_scoring_unchanged(
    trl_trainer: Any, tiny_model_dir: Path
) -> None:
    """TRL patches the causal LM's forward with a fused LM head; our path calls the
    backbone and the LM head directly, so it scores like an unpatched copy."""
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = _trl_batch(trl_trainer, 0)
    prompts, completions = _split(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    )
    pad = trl_trainer.processing_class.pad_token_id
    plain = collate(list(zip(prompts, completions, strict=True)), pad)
    with torch.no_grad():
        expected = sequence_logps(token_logps(fresh, plain), plain)
        with trl_trainer.model.disable_adapter():
            patched = trl_trainer.model.get_base_model()
            got = sequence_logps(token_logps(patched, plain), plain)

    assert type(patched).forward is not patched.forward.__func__  # the patch is there
    assert_close(got, expected, atol=1e-5, rtol=0)
