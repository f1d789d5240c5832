"""The promotion gate's rule, the cycle's run records and lock, and the report: pure
functions and local files, no servers."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from connectors.cycle_runs import CycleBusy, CycleRuns
from deploy.local.processes import dies_with_this_process
from flows.report import render_report
from pipeline.promotion import gate
from pipeline.promotion.gate import (
    AnswerScores,
    Check,
    GateDecision,
    GateOptions,
    GenerationScores,
    Measurements,
    judge,
    judged_on_new_heldout,
)
from pipeline.serving.registry import RegistryError
from pipeline.training.evaluate import HeldoutMetrics


def metrics(
    accuracy: float,
    margin: float,
    kl: float,
    count: int = 40,
    correct: tuple[bool, ...] | None = None,
) -> HeldoutMetrics:
    """Held-out metrics whose first round(accuracy * count) records are right, unless
    `correct` says which."""
    if correct is None:
        correct = tuple(i < round(accuracy * count) for i in range(count))
    return HeldoutMetrics(
        loss=0.5,
        accuracy=sum(correct) / len(correct),
        reward_desirable=margin / 2,
        reward_undesirable=-margin / 2,
        margin=margin,
        kl=kl,
        count=len(correct),
        correct=correct,
    )


BASE = metrics(0.0, 0.0, 0.0)  # the base model scored against itself: no record right


def verdict(
    candidate: HeldoutMetrics,
    serving: HeldoutMetrics,
    options: GateOptions,
    serving_name: str,
    generation: GenerationScores | None = None,
    drift: float | None = None,
    answers: AnswerScores | None = None,
    continual: bool = False,
) -> GateDecision:
    """The gate's verdict on what was measured on `candidate.count` held-out records."""
    measured = Measurements(
        serving_name, candidate.count, candidate, serving, continual, drift, answers, generation
    )
    return judge(measured, options)


def test_a_clear_win_on_accuracy_at_least_as_good_on_the_rest_is_promoted() -> None:
    # 4 more of 40 records right, none lost: gain 0.1 against a standard error of
    # sqrt(var(d) / n) = sqrt((4 - 40 * 0.1**2) / 39 / 40) = 0.048.
    decision = verdict(
        metrics(0.9, 1.2, 0.4),
        metrics(0.8, 1.0, 0.2),
        GateOptions(judge="likelihood"),
        "chat@v3",
    )
    assert decision.promote
    assert [c.name for c in decision.checks] == ["accuracy", "margin", "kl"]
    assert all(c.passed for c in decision.checks)
    accuracy = decision.checks[0]
    assert accuracy.noise == pytest.approx(math.sqrt(3.6 / 39 / 40))
    assert accuracy.required == "> serving + 0.048"
    assert decision.reason.startswith("candidate beats chat@v3 on held-out accuracy by 0.1")


def test_a_candidate_identical_to_serving_is_refused_equal_is_not_better() -> None:
    same = metrics(0.8, 1.0, 0.2)
    decision = verdict(same, same, GateOptions(judge="likelihood"), "chat@v3")
    assert not decision.promote
    assert [c.name for c in decision.checks if not c.passed] == ["accuracy"]
    assert decision.reason == (
        "candidate refused: no better than chat@v3: accuracy gain 0 is within the "
        "held-out noise (±0)"
    )
    # Without a noise bar it is still refused: the gain must be above 0.
    assert not verdict(same, same, GateOptions(judge="likelihood", noise_z=0), "chat@v3").promote


def test_a_small_win_within_the_heldout_noise_is_refused() -> None:
    serving = metrics(0.5, 1.0, 0.2)
    # 3 records gained and 2 lost of 40: gain 0.025, standard error
    # sqrt((5 - 40 * 0.025**2) / 39 / 40) = 0.056.
    flipped = {0: False, 1: False, 20: True, 21: True, 22: True}
    correct = tuple(flipped.get(i, c) for i, c in enumerate(serving.correct))
    candidate = metrics(0.525, 1.0, 0.2, correct=correct)
    decision = verdict(candidate, serving, GateOptions(judge="likelihood"), "chat@v3")
    assert not decision.promote
    assert decision.reason == (
        "candidate refused: no better than chat@v3: accuracy gain 0.025 is within the "
        "held-out noise (±0.056)"
    )
    # The noise is what refused it: without the noise bar the gain counts.
    assert verdict(
        candidate, serving, GateOptions(judge="likelihood", noise_z=0), "chat@v3"
    ).promote


def test_lower_accuracy_is_refused_and_the_reason_names_both_numbers() -> None:
    decision = verdict(
        metrics(0.70, 1.5, 0.4),
        metrics(0.80, 1.0, 0.2),
        GateOptions(judge="likelihood"),
        "chat@v3",
    )
    assert not decision.promote
    assert [c.name for c in decision.checks if not c.passed] == ["accuracy"]
    assert decision.reason.startswith("candidate refused: accuracy 0.7 against 0.8 from chat@v3")


def test_a_required_gain_and_a_tolerated_margin_loss() -> None:
    serving = metrics(0.80, 1.0, 0.2)
    short = verdict(
        metrics(0.9, 1.0, 0.2),
        serving,
        GateOptions(judge="likelihood", min_accuracy_gain=0.15),
        "s",
    )
    assert not short.promote
    assert "accuracy 0.9 against 0.8 from s (needs > serving + 0.15)" in short.reason
    assert verdict(
        metrics(0.9, 0.95, 0.2), serving, GateOptions(judge="likelihood", min_margin_gain=-0.1), "s"
    ).promote
    assert not verdict(
        metrics(0.9, 1.05, 0.2), serving, GateOptions(judge="likelihood", min_margin_gain=0.1), "s"
    ).promote


def test_kl_past_the_bound_is_refused_however_good_the_rest() -> None:
    decision = verdict(
        metrics(0.95, 3.0, 6.0), BASE, GateOptions(judge="likelihood", max_kl=5.0), "the base model"
    )
    assert not decision.promote
    assert [c.name for c in decision.checks if not c.passed] == ["kl"]
    assert "kl 6 (needs <= 5)" in decision.reason


def test_against_the_base_model_a_candidate_must_have_learnt_the_right_direction() -> None:
    assert verdict(
        metrics(0.6, 0.3, 0.1),
        BASE,
        GateOptions(judge="likelihood"),
        "the base model",
    ).promote
    wrong_way = verdict(
        metrics(0.3, -0.4, 0.1),
        BASE,
        GateOptions(judge="likelihood"),
        "the base model",
    )
    assert not wrong_way.promote and "margin" in wrong_way.reason
    # The base model itself (rewards 0, z_ref 0) gets no record right: no gain on it.
    itself = verdict(BASE, BASE, GateOptions(judge="likelihood"), "the base model")
    assert not itself.promote and "no better than the base model" in itself.reason


def test_too_few_heldout_records_cannot_be_judged() -> None:
    decision = verdict(
        metrics(1.0, 2.0, 0.1, count=5), BASE, GateOptions(judge="likelihood", min_heldout=8), "b"
    )
    assert not decision.promote and decision.checks == ()
    assert "only 5 held-out records" in decision.reason and "heldout_fraction" in decision.reason


def test_one_class_heldout_has_no_margin_to_compare_and_the_rest_still_decides() -> None:
    nan = math.nan
    decision = verdict(
        metrics(0.9, nan, 0.1),
        metrics(0.8, nan, 0.1),
        GateOptions(judge="likelihood"),
        "s",
    )
    assert decision.promote
    assert next(c for c in decision.checks if c.name == "margin").required == "n/a"
    assert not verdict(
        metrics(0.9, nan, 0.1),
        metrics(0.8, 1.0, 0.1),
        GateOptions(judge="likelihood"),
        "s",
    ).promote


def test_the_gate_needs_per_record_results_of_the_same_records() -> None:
    bare = HeldoutMetrics(0.5, 0.9, 0.5, -0.5, 1.0, 0.1, 40)
    with pytest.raises(ValueError, match="per-record correctness on the same held-out"):
        verdict(bare, metrics(0.8, 1.0, 0.1), GateOptions(judge="likelihood"), "s")
    with pytest.raises(ValueError, match="got 30 and 40 records"):
        verdict(
            metrics(0.9, 1.0, 0.1, count=30),
            metrics(0.8, 1.0, 0.1),
            GateOptions(judge="likelihood"),
            "s",
        )


def test_the_generation_check_joins_the_verdict() -> None:
    good, serving = metrics(0.9, 1.0, 0.1), metrics(0.8, 1.0, 0.1)
    worse = verdict(
        good,
        serving,
        GateOptions(judge="likelihood"),
        "s",
        GenerationScores(0.4, 0.6, 16),
    )
    assert not worse.promote and "generation_score 0.4 against 0.6" in worse.reason
    assert verdict(
        good,
        serving,
        GateOptions(judge="likelihood"),
        "s",
        GenerationScores(0.6, 0.6, 16),
    ).promote


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_kl"):
        GateOptions(judge="likelihood", max_kl=0)
    with pytest.raises(ValueError, match="a loss cannot be tolerated"):
        GateOptions(judge="likelihood", min_accuracy_gain=-0.05)
    with pytest.raises(ValueError, match="noise_z"):
        GateOptions(judge="likelihood", noise_z=-1)
    with pytest.raises(ValueError, match='scorer must be "module:function"'):
        GateOptions(scorer="politeness")
    with pytest.raises(ValueError, match="judge"):
        GateOptions(judge="vibes")  # type: ignore[arg-type]


def test_a_continual_candidate_is_not_held_to_max_kl_but_its_kl_must_be_finite() -> None:
    # Its KL to the base model grows night after night by design; its drift bounds it.
    options = GateOptions(judge="likelihood", max_kl=5.0)
    far_from_base = metrics(0.95, 3.0, 60.0)
    assert not verdict(far_from_base, BASE, options, "chat@v3").promote
    continued = verdict(far_from_base, BASE, options, "chat@v3", continual=True)
    assert continued.promote, continued.reason
    kl = next(c for c in continued.checks if c.name == "kl")
    assert kl.passed and kl.required.startswith("finite")
    broken = verdict(metrics(0.95, 3.0, math.inf), BASE, options, "chat@v3", continual=True)
    assert not broken.promote and "kl inf" in broken.reason


def test_a_continual_night_is_judged_on_its_new_heldout_votes_only_when_they_can_judge() -> None:
    options = GateOptions(min_heldout=8)
    assert judged_on_new_heldout(8, options) and not judged_on_new_heldout(7, options)


def test_with_a_scorer_a_passing_candidate_awaits_the_generation_check_then_is_judged_on_it():
    options = GateOptions(judge="likelihood", scorer="tests.scorers:constant", min_score_gain=0.2)
    first = verdict(metrics(0.9, 1.2, 0.4), metrics(0.8, 1.0, 0.2), options, "s")
    assert first.promote and first.generation_due
    assert "generation_score" not in {c.name for c in first.checks}
    scores = GenerationScores.of([0.5, 0.7], [0.5, 0.5])
    assert (scores.candidate, scores.serving, scores.prompts) == (0.6, 0.5, 2)
    second = judge(replace(first.measured, generation=scores), options)
    assert not second.promote and not second.generation_due
    assert "generation_score 0.6 against 0.5 from s (needs >= serving + 0.2)" in second.reason
    # No text prompt to ask: the check cannot pass on nothing.
    asked_nothing = judge(replace(first.measured, generation=GenerationScores.of([], [])), options)
    assert not asked_nothing.promote and "no held-out prompt with text" in asked_nothing.reason
    # Refused before it: nothing to check by generation; no scorer: nothing awaited.
    assert not verdict(BASE, BASE, options, "s").generation_due
    no_scorer = GateOptions(judge="likelihood")
    assert not verdict(metrics(0.9, 1.2, 0.4), BASE, no_scorer, "s").generation_due


def test_a_new_check_is_one_function_in_the_checks_list(monkeypatch: pytest.MonkeyPatch) -> None:
    # What adding a check takes: a function of (measurements, options) returning a
    # Check (or None where it does not apply), listed in gate.CHECKS.
    def enough_records(m: Measurements, options: GateOptions) -> Check:
        return Check(
            "records",
            m.heldout,
            None,
            ">= 50",
            m.heldout >= 50,
            failure=f"only {m.heldout} held-out records (needs >= 50)",
        )

    monkeypatch.setattr(gate, "CHECKS", (*gate.CHECKS, enough_records))
    decision = verdict(
        metrics(0.9, 1.2, 0.4), metrics(0.8, 1.0, 0.2), GateOptions(judge="likelihood"), "s"
    )
    assert [c.name for c in decision.checks] == ["accuracy", "margin", "kl", "records"]
    assert decision.reason == "candidate refused: only 40 held-out records (needs >= 50)"
    assert decision.as_dict()["checks"][-1] == {
        "name": "records", "candidate": 40, "serving": None, "required": ">= 50",
        "passed": False, "noise": None,
    }  # fmt: skip


# ---------------------------------------------------------------- run records and lock


_HOLDER = """
import sys, time
from connectors.cycle_runs import CycleRuns
with CycleRuns(sys.argv[1], "chat").lock("holder-run"):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_the_lock_refuses_a_second_run_naming_the_holder_and_frees_when_it_dies(tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
        preexec_fn=dies_with_this_process(),  # SIGTERM if the session dies first
    )
    try:
        assert holder.stdout.readline() == b"holding\n"
        runs = CycleRuns(tmp_path, "chat")
        with (
            pytest.raises(CycleBusy, match=f"run holder-run, pid {holder.pid}"),
            runs.lock("second-run"),
        ):
            pass
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock
        holder.wait(30)
        with runs.lock("third-run"):
            assert runs.holder()["run_id"] == "third-run"
        assert runs.holder() is None
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(30)


def test_runs_left_running_by_a_dead_process_are_marked_crashed(tmp_path) -> None:
    runs = CycleRuns(tmp_path, "chat")
    runs.save({"run_id": "a", "started_at": "2026-01-01T00:00:00Z", "status": "running"})
    runs.save({"run_id": "b", "started_at": "2026-01-02T00:00:00Z", "status": "published"})
    runs.save({"run_id": "c", "started_at": "2026-01-03T00:00:00Z", "status": "running"})
    assert runs.mark_crashed("c") == ["a"]
    assert [(r["run_id"], r["status"]) for r in runs.recent()] == [
        ("c", "running"),
        ("b", "published"),
        ("a", "crashed"),
    ]


def test_new_feedback_counts_from_the_last_run_the_gate_judged_and_that_ended(tmp_path) -> None:
    runs = CycleRuns(tmp_path, "chat")
    gate = {"promote": True}
    runs.save({"run_id": "a", "started_at": "1", "status": "published", "gate": gate})
    runs.save({"run_id": "b", "started_at": "2", "status": "skipped", "gate": {"promote": False}})
    runs.save(
        {"run_id": "c", "started_at": "3", "status": "failed", "gate": gate}
    )  # publish failed
    runs.save({"run_id": "d", "started_at": "4", "status": "skipped", "gate": None})  # too little
    assert runs.last_judged()["run_id"] == "b"
    # Training that kept its starting point judged its data too: not retrained tomorrow.
    runs.save({"run_id": "e", "started_at": "5", "status": "no_gain", "gate": None})
    assert runs.last_judged()["run_id"] == "e"


def test_a_bad_alias_is_refused() -> None:
    with pytest.raises(RegistryError, match="alias"):
        CycleRuns("/tmp", "../etc")


def test_the_report_shows_counts_lambdas_metrics_gate_and_version() -> None:
    decision = verdict(
        metrics(0.9, 1.2, 0.3),
        metrics(0.8, 1.0, 0.2),
        GateOptions(judge="likelihood"),
        "chat@v1",
    )
    markdown = render_report(
        {
            "run_id": "r1",
            "alias": "chat",
            "status": "published",
            "reason": "published chat@v2 as chat",
            "started_at": "2026-01-01T00:00:00Z",
            "seconds": 12.5,
            "snapshot": {
                "id": "ab" * 32,
                "votes": 300,
                "rows_read": 310,
                "train_desirable": 120,
                "train_undesirable": 120,
                "heldout_desirable": 30,
                "heldout_undesirable": 30,
            },
            "new_votes": 300,
            "balance": {
                "lambda_desirable": 1.0,
                "lambda_undesirable": 1.0,
                "explanation": "balanced",
            },
            "training": {
                "steps": 30,
                "planned_steps": 30,
                "best_step": 30,
                "seconds": 4.0,
                "heldout_before": {"accuracy": 0.0},
                "heldout_after": {"accuracy": 0.9},
                "warnings": ["raise [train] batch_size"],
                "notes": ["the KL estimate was clamped"],
            },
            "gate": decision.as_dict(),
            "version": "v2",
            "previous": "v1",
            "published": {"version": "chat@v2", "replicas": ["http://r1"], "action": "promote"},
            "plots": ["/tmp/r1/gate.png"],
        }
    )
    for text in ("**published**", "| train | 120 | 120 |", "lambda_D = 1.000", "| accuracy | 0 | 0.9 |",
                 "Decision: **promote**", "| accuracy | 0.9 | 0.8 | > serving + 0.048 | yes |",
                 "`chat@v2` (previous: v1)", "[gate.png](file:///tmp/r1/gate.png)",
                 "- warning: raise [train] batch_size", "- note: the KL estimate was clamped"):  # fmt: skip
        assert text in markdown, text


def test_a_candidate_that_drifts_too_far_from_what_serves_is_refused():
    good, serving = metrics(0.9, 1.2, 0.4), metrics(0.8, 1.0, 0.2)
    options = GateOptions(judge="likelihood", noise_z=0, max_drift=0.05)
    near = verdict(good, serving, options, "chat@v3", drift=0.04)
    assert near.promote and near.measured.drift == 0.04
    far = verdict(good, serving, options, "chat@v3", drift=0.3)
    assert not far.promote
    assert "drift 0.3 nats/token from chat@v3" in far.reason and "<= 0.05" in far.reason
    assert [c.name for c in far.checks if not c.passed] == ["drift"]
    # Not measured, or not limited: no drift check at all.
    assert verdict(good, serving, options, "chat@v3").promote
    unlimited = GateOptions(judge="likelihood", noise_z=0, max_drift=None)
    assert verdict(good, serving, unlimited, "chat@v3", drift=9.0).promote
    # The configured default bounds it.
    assert GateOptions().max_drift == 1.0 and GateOptions().measures_drift
    assert not verdict(good, serving, options, "chat@v3", drift=float("nan")).promote


def _answers(gain: float, low: float, high: float) -> AnswerScores:
    return AnswerScores(True, "trusted", 0.3 + gain, 0.3, gain, low, high, 24, low > 0, high < 0)


def test_judged_by_answers_a_better_candidate_is_promoted_whatever_its_accuracy():
    # Held-out accuracy says worse; the answers it samples are judged better: the
    # answers decide, the accuracy is reported.
    worse_on_votes = metrics(0.7, 1.0, 0.2)
    decision = verdict(
        worse_on_votes,
        metrics(0.8, 1.0, 0.2),
        GateOptions(),
        "chat@v3",
        answers=_answers(0.1, 0.04, 0.16),
    )
    assert decision.promote, decision.reason
    assert [c.name for c in decision.checks][:3] == ["answers", "accuracy", "margin"]
    assert decision.checks[1].required.startswith("reported")
    assert "judged better than chat@v3's" in decision.reason
    assert decision.as_dict()["answers"]["gain"] == 0.1


def test_judged_by_answers_worse_or_within_noise_is_refused_and_kl_still_binds():
    good = metrics(0.9, 1.2, 0.4)
    serving = metrics(0.8, 1.0, 0.2)
    worse = verdict(good, serving, GateOptions(), "chat@v3", answers=_answers(-0.2, -0.3, -0.1))
    assert not worse.promote and "judged worse than chat@v3's" in worse.reason
    tie = verdict(good, serving, GateOptions(), "chat@v3", answers=_answers(0.01, -0.02, 0.04))
    assert not tie.promote and "no better, within noise" in tie.reason
    far = verdict(
        metrics(0.9, 1.2, 9.0), serving, GateOptions(), "chat@v3", answers=_answers(0.1, 0.05, 0.2)
    )
    assert not far.promote and "kl" in far.reason


def test_a_judge_too_weak_to_trust_makes_the_gate_say_so_rather_than_guess():
    weak = AnswerScores(
        False, "the taste model separates held-out likes from dislikes with AUC 0.55"
    )
    decision = verdict(
        metrics(0.9, 1.2, 0.4), metrics(0.5, 0.1, 0.2), GateOptions(), "v1", answers=weak
    )
    assert not decision.promote and decision.checks == ()
    assert decision.reason == (
        "candidate refused: its answers cannot be judged: the taste model separates held-out "
        "likes from dislikes with AUC 0.55"
    )
    unjudged = verdict(metrics(0.9, 1.2, 0.4), metrics(0.5, 0.1, 0.2), GateOptions(), "v1")
    assert not unjudged.promote and "not judged" in unjudged.reason
