"""Judging by answers, end to end on the tiny chat model (its sampled answers mix liked
and disliked styles): the trainer keeps a clear win, refuses to keep a collapse, and
leaves a run unjudged when its taste model cannot be trusted; the gate says the same of
the adapters those runs wrote."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deploy.local.chat_model import chat_prompts, liked, sample_answers
from flows.adapter_scores import AnswerRequest, score_adapters
from flows.training import TrainInputs, run_training
from pipeline.feedback.examples import Example
from pipeline.promotion.gate import GateOptions, Measurements, judge
from pipeline.training.judge import callable_judge
from pipeline.training.options import TrainOptions

pytestmark = pytest.mark.training

OPTIONS = TrainOptions(
    learning_rate=2e-3,
    batch_size=8,
    epochs=2,
    max_length=96,
    max_prompt_length=64,
    eval_every=10,
    early_stopping_patience=0,
    judge_answers=96,
    seed=0,
)


@pytest.fixture(scope="module")
def votes(chat_model_dir: Path) -> tuple[list[Example], list[Example], list[str]]:
    """Answers the chat model samples, voted by its users' taste: training votes on
    half the prompts, held-out votes on the other half."""
    torch.set_num_threads(1)
    prompts = chat_prompts()
    random.Random(0).shuffle(prompts)
    train_prompts, heldout_prompts = prompts[:48], prompts[48:96]
    out = []
    for group, n in ((train_prompts, 6), (heldout_prompts, 2)):
        answers = sample_answers(chat_model_dir, None, group, n, seed=1, max_new_tokens=40)
        out.append(
            [
                Example(
                    None, json.dumps([{"role": "user", "content": a.prompt}]), a.text, liked(a.text)
                )
                for a in answers
            ]
        )
    return out[0], out[1], heldout_prompts


def _liked_share(model: Path, adapter: Path | None, prompts: list[str]) -> float:
    answers = sample_answers(model, adapter, prompts, 4, seed=2, max_new_tokens=40)
    return sum(liked(a.text) for a in answers) / len(answers)


def _train(model: Path, out: Path, train, heldout, options=OPTIONS, judge_=None):
    inputs = TrainInputs(model, train, out, heldout=heldout, progress=False, plots=False)
    return run_training(inputs, options, judge=judge_).manifest


def _gate(model: Path, candidate: Path, train, heldout):
    scores = score_adapters(
        model,
        {"serving": None, "candidate": candidate},
        heldout,
        OPTIONS,
        answers=AnswerRequest(train),
    )
    m = scores.metrics
    measured = Measurements(
        "the base model", len(heldout), m["candidate"], m["serving"], answers=scores.answers
    )
    return judge(measured, GateOptions())


def test_a_clear_win_is_kept_and_the_gate_promotes_it(chat_model_dir, votes, tmp_path):
    train, heldout, prompts = votes
    out = tmp_path / "win"
    # Trained long enough to move the liked share well past the judge's noise.
    manifest = _train(chat_model_dir, out, train, heldout, replace(OPTIONS, epochs=4))

    assert manifest.status == "trained" and manifest.best_step > 0
    assert manifest.judge["trusted"], manifest.judge["reason"]
    confirmation = manifest.judge["confirmation"]
    assert confirmation["better"] and confirmation["low"] > 0
    # What the judge saw is what users would see.
    assert _liked_share(chat_model_dir, out, prompts) > _liked_share(chat_model_dir, None, prompts)
    decision = _gate(chat_model_dir, out, train, heldout)
    assert decision.promote, decision.reason
    assert decision.checks[0].name == "answers" and decision.measured.answers.better


def test_a_collapse_is_refused_by_the_trainer_and_by_the_gate(chat_model_dir, votes, tmp_path):
    train, heldout, _ = votes
    contrary = [replace(e, desirable=not e.desirable) for e in train]
    users = callable_judge(lambda messages, answer: float(liked(answer)))
    # Trained on contrary votes and judged by the users' own taste: every step's answers
    # are worse than the start's, so the start is what the run keeps.
    manifest = _train(chat_model_dir, tmp_path / "kept", contrary, heldout, judge_=users)
    assert manifest.status == "no_gain" and manifest.best_step == 0
    assert "starting point" in manifest.status_reason

    # The same collapse, kept to the last step, is what a trainer without a judge
    # offers: the gate, judging its answers with a taste learnt from the true votes,
    # refuses it as worse.
    collapsed = tmp_path / "collapsed"
    hard = replace(OPTIONS, selection="final", learning_rate=5e-3, epochs=4)
    _train(chat_model_dir, collapsed, contrary, heldout, hard)
    decision = _gate(chat_model_dir, collapsed, train, heldout)
    assert not decision.promote
    assert decision.measured.answers.trusted and decision.measured.answers.worse
    assert "judged worse than the base model's" in decision.reason


def test_a_weak_taste_model_leaves_the_run_unjudged_and_the_gate_says_so(
    chat_model_dir, votes, tmp_path
):
    train, heldout, _ = votes
    rng = random.Random(3)
    noise = [replace(e, desirable=rng.random() < 0.5) for e in train]
    noise_heldout = [replace(e, desirable=rng.random() < 0.5) for e in heldout]
    out = tmp_path / "noise"
    manifest = _train(chat_model_dir, out, noise, noise_heldout)

    assert manifest.status == "unjudged"
    assert not manifest.judge["trusted"] and "refusing to judge" in manifest.status_reason
    decision = _gate(chat_model_dir, out, noise, noise_heldout)
    assert not decision.promote and decision.checks == ()
    assert decision.reason.startswith("candidate refused: its answers cannot be judged")
