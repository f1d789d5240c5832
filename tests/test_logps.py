"""Completion log-probs: the shared-prompt path scores exactly like whole sequences."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from pipeline.training.logps import (
    collate,
    collate_continuations,
    collate_prompts,
    continuation_logps,
    head_logps,
    run_prompts,
    run_prompts_with_completions,
    sequence_logps,
    token_logps,
)

PAD = 0


@pytest.fixture(scope="module")
def causal_lm(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval()


def _ids(seed: int, *lengths: int) -> list[list[int]]:
    """Random token ids (no special tokens) of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 400, (n,), generator=gen).tolist() for n in lengths]


def _plain(causal_lm: Any, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    batch = collate(list(zip(prompts, completions, strict=True)), PAD)
    return sequence_logps(token_logps(causal_lm, batch), batch)


def _shared(
    causal_lm: Any, prompts: list[list[int]], rows: list[int], completions: list[list[int]]
) -> torch.Tensor:
    prompt_batch = collate_prompts(prompts, PAD)
    state = run_prompts(causal_lm, prompt_batch)
    conts = collate_continuations(prompt_batch, rows, completions, PAD)
    return continuation_logps(causal_lm, state, conts)


@torch.no_grad()
def test_shared_prompt_path_equals_plain_path_for_ragged_lengths(causal_lm: Any) -> None:
    prompts = _ids(0, 3, 9, 5)
    completions = _ids(1, 4, 1, 7)

    got = _shared(causal_lm, prompts, [0, 1, 2], completions)

    assert_close(got, _plain(causal_lm, prompts, completions), atol=1e-5, rtol=0)


@torch.no_grad()
def test_single_token_completions_are_scored_from_the_prompt_state_alone(
    causal_lm: Any,
) -> None:
    """Every completion of length 1: the continuation has no tokens to run (W = 0)."""
    prompts = _ids(2, 4, 6)
    completions = _ids(3, 1, 1, 1)
    rows = [1, 0, 1]

    prompt_batch = collate_prompts(prompts, PAD)
    conts = collate_continuations(prompt_batch, rows, completions, PAD)
    got = continuation_logps(causal_lm, run_prompts(causal_lm, prompt_batch), conts)

    assert conts.input_ids.shape[1] == 0
    expected = _plain(causal_lm, [prompts[r] for r in rows], completions)
    assert_close(got, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_completions_may_follow_any_prompt_rows_repeated_and_out_of_order(
    causal_lm: Any,
) -> None:
    prompts = _ids(4, 5, 2, 8)
    rows = [2, 0, 0, 1, 2]
    completions = _ids(5, 3, 6, 1, 4, 2)

    got = _shared(causal_lm, prompts, rows, completions)

    expected = _plain(causal_lm, [prompts[r] for r in rows], completions)
    assert_close(got, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_prompts_with_their_completions_then_other_completions_on_the_returned_state(
    causal_lm: Any,
) -> None:
    """The trainer's path: one forward over prompt + own completion, then the mismatched
    completions (each prompt with the previous example's) and any others follow the
    prompt state it returns."""
    prompts = _ids(6, 4, 7, 3)
    own = _ids(7, 5, 1, 3)
    prompt_batch = collate_prompts(prompts, PAD)

    state, got_own = run_prompts_with_completions(
        causal_lm, prompt_batch, collate_continuations(prompt_batch, [0, 1, 2], own, PAD)
    )
    previous = [own[-1], *own[:-1]]
    got_previous = continuation_logps(
        causal_lm, state, collate_continuations(prompt_batch, [0, 1, 2], previous, PAD)
    )
    others, rows = _ids(8, 2, 6, 1, 4), [1, 1, 0, 2]
    got_others = continuation_logps(
        causal_lm, state, collate_continuations(prompt_batch, rows, others, PAD)
    )

    assert_close(got_own, _plain(causal_lm, prompts, own), atol=1e-5, rtol=0)
    assert_close(got_previous, _plain(causal_lm, prompts, previous), atol=1e-5, rtol=0)
    expected_others = _plain(causal_lm, [prompts[r] for r in rows], others)
    assert_close(got_others, expected_others, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["run_prompts", "run_prompts_with_completions"])
@pytest.mark.parametrize("rows", [[0, 1], [1, 0, 1]], ids=["same-rows", "other-rows"])
@torch.no_grad()
def test_continuations_leave_the_prompt_cache_unchanged(
    causal_lm: Any, source: str, rows: list[int]
) -> None:
    """Two sets of continuations on one prompt state give the same numbers in either
    order, and the cache's tensors are untouched."""
    prompts = _ids(9, 3, 6)
    prompt_batch = collate_prompts(prompts, PAD)
    first = _ids(10, *[4, 2, 5][: len(rows)])
    second = _ids(11, *[3, 6, 2][: len(rows)])

    def state() -> Any:
        if source == "run_prompts":
            return run_prompts(causal_lm, prompt_batch)
        own = collate_continuations(prompt_batch, [0, 1], _ids(12, 5, 3), PAD)
        return run_prompts_with_completions(causal_lm, prompt_batch, own)[0]

    def score(s: Any, completions: list[list[int]]) -> torch.Tensor:
        conts = collate_continuations(prompt_batch, rows, completions, PAD)
        return continuation_logps(causal_lm, s, conts)

    a = state()
    before = [(layer.keys.clone(), layer.values.clone()) for layer in a.cache.layers]
    a_first, a_second = score(a, first), score(a, second)
    b = state()
    b_second, b_first = score(b, second), score(b, first)

    assert_close(a_first, b_first, atol=0, rtol=0)
    assert_close(a_second, b_second, atol=0, rtol=0)
    width = prompt_batch.input_ids.shape[1]
    assert all(layer.keys.shape[2] == width for layer in a.cache.layers)
    for layer, (keys, values) in zip(a.cache.layers, before, strict=True):
        assert_close(layer.keys, keys, atol=0, rtol=0)
        assert_close(layer.values, values, atol=0, rtol=0)


@pytest.fixture
def lora_lm(tiny_model_dir: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    # Non-zero A and B: with the default B = 0 the gradient of A would be zero.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(model, config)


def test_matched_pass_backpropagates_into_lora_parameters(lora_lm: Any) -> None:
    causal_lm = lora_lm.get_base_model()
    prompt_batch = collate_prompts(_ids(13, 4, 6), PAD)
    conts = collate_continuations(prompt_batch, [0, 1], _ids(14, 3, 5), PAD)

    _, logps = run_prompts_with_completions(causal_lm, prompt_batch, conts)
    logps.sum().backward()

    lora = {n: p for n, p in lora_lm.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    missing = [n for n, p in lora.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"
    frozen = [n for n, p in lora_lm.named_parameters() if "lora_" not in n and p.grad is not None]
    assert not frozen


def test_continuation_on_detached_state_under_no_grad_carries_no_gradient(
    lora_lm: Any,
) -> None:
    causal_lm = lora_lm.get_base_model()
    prompt_batch = collate_prompts(_ids(15, 4, 6), PAD)
    own = collate_continuations(prompt_batch, [0, 1], _ids(16, 3, 5), PAD)
    other = collate_continuations(prompt_batch, [0, 1], _ids(17, 5, 2), PAD)

    state, logps = run_prompts_with_completions(causal_lm, prompt_batch, own)
    detached = state.detached()
    with torch.no_grad():
        kl_logps = continuation_logps(causal_lm, detached, other)

    assert logps.requires_grad and state.last_hidden.requires_grad
    assert not kl_logps.requires_grad
    assert not detached.last_hidden.requires_grad
    assert not any(layer.keys.requires_grad for layer in detached.cache.layers)
    # Detaching copies references, not the values.
    assert_close(kl_logps, continuation_logps(causal_lm, state, other).detach(), atol=0, rtol=0)


def _hidden() -> torch.Tensor:
    # Large hidden states, so that the logits are far from 0 and scaling and capping bite.
    return torch.randn(5, 64, generator=torch.Generator().manual_seed(18)) * 30


@pytest.mark.parametrize(
    ("settings", "transform"),
    [
        ({"logit_scale": 0.25}, lambda z: z * 0.25),
        ({"logits_scaling": 4.0}, lambda z: z / 4.0),
        ({"final_logit_softcapping": 2.0}, lambda z: torch.tanh(z / 2.0) * 2.0),
        (
            {"logit_scale": 3.0, "final_logit_softcapping": 2.0},
            lambda z: torch.tanh(z * 3.0 / 2.0) * 2.0,
        ),
    ],
    ids=["logit_scale", "logits_scaling", "softcapping", "scale-then-cap"],
)
@torch.no_grad()
def test_head_logps_applies_the_configs_logit_scaling_and_softcapping(
    causal_lm: Any, settings: dict[str, float], transform: Any
) -> None:
    """log_softmax(cap * tanh(scale * W h / cap))[target], computed by hand."""
    config = copy.deepcopy(causal_lm.config)
    for name, value in settings.items():
        setattr(config, name, value)
    head = causal_lm.get_output_embeddings()
    lm = SimpleNamespace(config=config, get_output_embeddings=lambda: head)
    hidden, targets = _hidden(), torch.tensor([3, 50, 7, 400, 11])

    got = head_logps(lm, hidden, targets)

    logits = hidden @ head.weight.T
    expected = torch.log_softmax(transform(logits), dim=-1)[torch.arange(5), targets]
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
    unscaled = torch.log_softmax(logits, dim=-1)[torch.arange(5), targets]
    assert (got - unscaled).abs().max() > 1e-2  # the setting made a difference
    assert_close(head_logps(causal_lm, hidden, targets), unscaled, atol=1e-5, rtol=1e-5)
