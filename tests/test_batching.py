"""The plan of a run, worked out without a model: batches, the learning-rate schedule
and the held-out pairs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.training.batching import eval_pairs, lr_factor, normalised_weights, plan_batches
from pipeline.training.encode import Encoded
from pipeline.training.errors import TrainError
from pipeline.training.options import TrainOptions

OPTIONS = TrainOptions(batch_size=4, epochs=1, seed=0, batching="bucketed")


def test_every_batch_takes_its_share_of_both_classes_when_length_follows_the_label():
    # Liked answers are all short and disliked ones all long: sorting the two together
    # would give batches of one class; each class is sorted on its own instead.
    n = 400
    desirable = [i % 2 == 0 for i in range(n)]
    lengths = [10 + i % 7 if desirable[i] else 200 + i % 11 for i in range(n)]
    plan = plan_batches(lengths, desirable, OPTIONS)
    assert len(plan.batches) == n // 4 and plan.steps == n // 4
    assert all(sum(desirable[i] for i in b) == 2 for b in plan.batches)


def test_bucketing_puts_examples_of_similar_length_together():
    n = 400
    desirable = [True] * n
    lengths = list(range(n))
    bucketed = plan_batches(lengths, desirable, OPTIONS)
    mixed = plan_batches(lengths, desirable, replace(OPTIONS, batching="shuffled"))

    def spread(batches: list[list[int]]) -> float:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    assert spread(bucketed.batches) < spread(mixed.batches) / 10


def test_each_epoch_uses_every_example_once_and_the_plan_is_seeded():
    options = replace(OPTIONS, epochs=3)
    plan = plan_batches([5] * 40, [i < 10 for i in range(40)], options)
    flat = [i for b in plan.batches for i in b]
    for epoch in range(3):
        assert sorted(flat[epoch * 40 : (epoch + 1) * 40]) == list(range(40))
    assert plan_batches([5] * 40, [i < 10 for i in range(40)], options) == plan
    assert plan_batches([5] * 40, [i < 10 for i in range(40)], replace(options, seed=1)) != plan


def test_max_steps_overrides_epochs_and_grad_accum_groups_batches():
    plan = plan_batches([5] * 40, [True] * 40, replace(OPTIONS, max_steps=25, grad_accum=2))
    assert plan.steps == 25 and len(plan.batches) == 50


def test_two_ranks_split_each_global_batch_and_keep_its_pairs():
    args = ([5] * 64, [i % 3 == 0 for i in range(64)], OPTIONS)
    ranks = [plan_batches(*args, rank=r, world=2) for r in (0, 1)]
    assert ranks[0].steps == ranks[1].steps == 8
    for a, b in zip(ranks[0].batches, ranks[1].batches, strict=True):
        assert len(a) == len(b) == 4 and not set(a) & set(b)


def test_the_pairs_are_each_example_with_itself_and_with_the_one_before_it():
    plan = plan_batches([5] * 8, [True] * 8, replace(OPTIONS, batching="shuffled"))
    for b in plan.batches:
        for k, i in enumerate(b):
            assert (i, i) in plan.pairs() and (i, b[k - 1]) in plan.pairs()
    assert len(plan.pairs()) == 16


def test_too_little_data_for_one_step_says_what_to_change():
    with pytest.raises(TrainError, match="lower batch_size"):
        plan_batches([5] * 3, [True] * 3, OPTIONS)
    with pytest.raises(TrainError, match="grad_accum"):
        plan_batches([5] * 8, [True] * 8, replace(OPTIONS, grad_accum=4))


@pytest.mark.parametrize(
    "schedule, at_half",
    [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)],
)
def test_schedule_warms_up_then_decays(schedule, at_half):
    # 100 steps, 10 of warmup: step 0 is 1/11 of the rate, step 10 the full rate, and
    # step 55 half way through the decay.
    factor = lr_factor(replace(OPTIONS, lr_schedule=schedule, warmup_ratio=0.1), 100)
    assert factor(0) == pytest.approx(1 / 11)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(at_half)
    assert factor(100) == pytest.approx(0.0 if schedule != "constant" else 1.0, abs=1e-12)


def test_eval_pairs_shift_within_fixed_batches_and_skip_a_batch_of_one():
    matched, mismatched = eval_pairs(5, 2)
    assert matched == [(i, i) for i in range(5)]
    assert mismatched == [(0, 1), (1, 0), (2, 3), (3, 2)]


def test_weights_are_scaled_to_average_one():
    examples = [Encoded((1,), (2,), True, 3.0), Encoded((1,), (3,), False, 1.0)]
    assert [e.weight for e in normalised_weights(examples)] == [1.5, 0.5]
    unit = [Encoded((1,), (2,), True)]
    assert normalised_weights(unit) is unit


def test_trl_batches_are_the_data_in_order_every_epoch_with_a_short_last_batch():
    # TRL's KTOTrainer samples sequentially (its KL pairs require it): 10 examples in
    # batches of 4 are [0-3], [4-7], [8, 9], again each epoch; each example's
    # mismatched completion is the one before it in its batch.
    options = replace(OPTIONS, batching="trl", mismatch="trl", epochs=2)
    plan = plan_batches([5] * 10, [i % 2 == 0 for i in range(10)], options)
    chunks = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan.batches == chunks * 2 and plan.steps == 6
    assert plan.partners[0] == [3, 0, 1, 2] and plan.partners[2] == [9, 8]


def _by_prompt(n_prompts: int, per_prompt: int) -> tuple[list[int], list[bool], list[int]]:
    """Many sampled answers per prompt, their length following the prompt (the answer
    names the prompt's subject), a third of them liked."""
    prompts = [p for p in range(n_prompts) for _ in range(per_prompt)]
    lengths = [10 + p for p in prompts]
    desirable = [k % 3 == 0 for k in range(len(prompts))]
    return lengths, desirable, prompts


def _shared(plan, prompts: list[int]) -> float:
    pairs = [
        (i, j)
        for b, p in zip(plan.batches, plan.partners, strict=True)
        for i, j in zip(b, p, strict=True)
    ]
    return sum(prompts[i] == prompts[j] for i, j in pairs) / len(pairs)


def test_bucketed_batches_with_shifted_pairs_pair_a_prompt_with_itself():
    # The cause of a reference point that tracks the rewards: with length bucketing, a
    # prompt's answers (of one length) fill the same batches, and "mismatched" pairs
    # shifted by one mostly share their prompt.
    lengths, desirable, prompts = _by_prompt(24, 16)
    options = replace(OPTIONS, batch_size=8, mismatch="batch_shift")
    plan = plan_batches(lengths, desirable, options, prompts=prompts)
    assert _shared(plan, prompts) > 0.5


@pytest.mark.parametrize("batching", ["bucketed", "shuffled"])
def test_other_prompt_pairs_never_share_a_prompt(batching: str):
    lengths, desirable, prompts = _by_prompt(24, 16)
    options = replace(OPTIONS, batch_size=8, batching=batching, mismatch="other_prompt")
    plan = plan_batches(lengths, desirable, options, prompts=prompts)
    assert _shared(plan, prompts) == 0
    # Every example is still trained on once per epoch.
    assert sorted(i for b in plan.batches for i in b) == sorted(range(len(lengths)))


def test_other_prompt_falls_back_to_the_pair_it_has_when_one_prompt_is_all_there_is():
    options = replace(OPTIONS, batch_size=4, mismatch="other_prompt")
    plan = plan_batches([5] * 8, [True] * 8, options, prompts=[0] * 8)
    assert all(len(b) == len(p) == 4 for b, p in zip(plan.batches, plan.partners, strict=True))
