"""What a run's steps add up to and when a run stops, worked out by hand: the metrics
row of a step, the warnings over the run, the guards and early stopping."""

from __future__ import annotations

import math

import pytest

from pipeline.training.diagnostics import Diagnostics, aggregate
from pipeline.training.evaluate import HeldoutMetrics
from pipeline.training.guards import (
    EarlyStopping,
    EndOfTurnGuard,
    GeneralNllGuard,
    GeneralOnly,
    improves,
    selection_score,
)


def micro(n_d: int, n_u: int, **values: float) -> dict[str, float]:
    row = {
        "loss": 0.5,
        "sft": 0.0,
        "kl": 0.0,
        "kl_clamped": 0.0,
        "reward_desirable_sum": 0.0,
        "reward_undesirable_sum": 0.0,
        "n_desirable": n_d,
        "n_undesirable": n_u,
        "kl_pairs": n_d + n_u,
        "tokens": 10,
    }
    return row | values


def metrics(
    loss: float = 0.5, accuracy: float = 0.5, margin: float = 0.0, **more
) -> HeldoutMetrics:
    return HeldoutMetrics(loss, accuracy, 0.0, 0.0, margin, 0.0, 10, **more)


def test_a_steps_row_averages_its_micro_batches_and_rewards_per_example():
    # Two micro-batches: rewards summed 3.0 over 3 liked and -2.0 over 5 disliked give
    # per-example means 1.0 and -0.4; loss and KL are means over the micro-batches.
    accum = [
        micro(2, 2, loss=0.4, kl=0.2, kl_clamped=1.0, reward_desirable_sum=2.0,
              reward_undesirable_sum=-1.0, kl_pairs=3),
        micro(1, 3, loss=0.6, kl=0.4, reward_desirable_sum=1.0, reward_undesirable_sum=-1.0),
    ]  # fmt: skip
    row = aggregate(accum, step=7, lr=1e-3, grad_norm=0.25)
    assert row["step"] == 7 and row["lr"] == 1e-3 and row["grad_norm"] == 0.25
    assert row["loss"] == pytest.approx(0.5) and row["kl"] == pytest.approx(0.3)
    assert row["kl_clamped"] == pytest.approx(0.5)
    assert row["reward_desirable"] == pytest.approx(1.0)
    assert row["reward_undesirable"] == pytest.approx(-0.4)
    assert (row["n_desirable"], row["n_undesirable"], row["micro_batches"]) == (3, 5, 2)
    assert row["one_class_batches"] == 0 and row["kl_pairs"] == 3 and row["tokens"] == 20


def test_a_class_absent_from_a_step_has_no_mean_reward_and_counts_as_one_class():
    row = aggregate([micro(0, 4)], step=1, lr=1.0, grad_norm=1.0)
    assert row["reward_desirable"] is None and row["reward_undesirable"] == 0.0
    assert row["one_class_batches"] == 1


def test_diagnostics_warn_about_what_to_change_and_note_the_rest():
    d = Diagnostics()
    for step in range(1, 5):
        row = aggregate([micro(0, 8, kl_clamped=1.0, kl_pairs=2)], step, 1.0, 1.0)
        d.add(row | {"heldout_loss": 0.1})
    summary = d.summary(pairs_per_step=8)
    assert summary["kl_clamp_rate"] == 1.0 and summary["one_class_rate"] == 1.0
    assert summary["kl_distinct_pairs_min"] == 2
    assert "heldout_loss" not in d.last and d.last["step"] == 4
    # A warning says what to change; what needs no change is a note for the report.
    (one_class,) = d.warnings(pairs_per_step=8)
    assert "100% of batches held one class" in one_class and "[train] batch_size" in one_class
    few, clamped = d.notes(pairs_per_step=8)
    assert "only 2 distinct mismatched pairs" in few
    assert "clamped at 0 in 100% of steps" in clamped
    # Too few pairs in every batch is a setting to change, said once, as a warning.
    small = d.warnings(pairs_per_step=2)
    assert "a batch of at least 4 ([train] batch_size)" in small[0]
    assert not any("distinct mismatched pairs" in n for n in d.notes(pairs_per_step=2))


def test_a_healthy_run_has_no_warnings_and_no_notes():
    d = Diagnostics()
    d.add(aggregate([micro(4, 4)], 1, 1.0, 1.0))
    assert d.warnings(pairs_per_step=8) == [] and d.notes(pairs_per_step=8) == []


def test_end_of_turn_guard_stops_below_its_tolerance_of_the_reference_rate():
    guard = EndOfTurnGuard(reference_rate=0.8, tolerance=0.1)  # stop below 0.72
    assert guard.check(metrics(sampled_end_rate=0.73)) is None
    reason = guard.check(metrics(sampled_end_rate=0.5))
    assert reason is not None and "50% of answers" in reason and "80%" in reason
    assert guard.check(metrics()) is None  # not measured
    assert EndOfTurnGuard(0.8, 0.0).check(metrics(sampled_end_rate=0.0)) is None  # off


def test_general_nll_guard_bounds_the_rise_as_a_share_of_the_start():
    guard = GeneralNllGuard(before=2.0, max_increase=0.1)  # stop above 2.2
    assert guard.check(GeneralOnly(2.2)) is None
    reason = guard.check(GeneralOnly(2.5))
    assert reason is not None and "from 2.0000 to 2.5000 (+25.0%)" in reason
    assert GeneralNllGuard(2.0, None).check(GeneralOnly(9.0)) is None
    assert GeneralNllGuard(None, 0.1).check(GeneralOnly(9.0)) is None


def test_selection_scores_are_minimised():
    m = metrics(loss=0.3, accuracy=0.75, margin=2.0)
    assert selection_score(m, "heldout_loss") == 0.3
    assert selection_score(m, "heldout_margin") == -2.0
    assert selection_score(m, "heldout_accuracy") == -0.75
    assert selection_score(metrics(margin=math.nan), "heldout_margin") == 0.0
    assert selection_score(m, "final") == 0.0
    assert improves(0.3, None, "heldout_loss") and not improves(0.3, 0.3, "heldout_loss")
    assert improves(0.0, 0.0, "final")


def test_early_stopping_counts_evaluations_without_improvement():
    early = EarlyStopping(patience=2, selection="heldout_loss")
    assert early.check(0.5) is None
    assert early.check(0.6) is None and early.stale == 1
    assert early.check(0.4) is None and early.stale == 0
    assert early.check(0.4) is None
    reason = early.check(0.45)
    assert reason is not None and "2 evaluations" in reason
    never = EarlyStopping(patience=0, selection="heldout_loss")
    assert all(never.check(1.0 + k) is None for k in range(5))
    final = EarlyStopping(patience=1, selection="final")
    assert all(final.check(1.0 + k) is None for k in range(5))
