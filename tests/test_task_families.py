"""The task families of the learning benchmark: fixed instances, a split fixed by seed,
and tasks whose corpora, prompts and tastes fit the tiny models. No model is trained."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.task_families import (
    FAMILIES,
    INSTANCES,
    SHARE_RANGE,
    family_of,
    instance,
    instances,
)
from bench.task_suite import Task, messages_json

ROOT = Path(__file__).resolve().parents[1]
SFT_SAMPLE = 1000
# What a fingerprint covers: everything an instance is made of, and its labels.
FINGERPRINT = """
import hashlib, json, random
from bench.task_families import INSTANCES, instance
h = hashlib.sha256()
for name in INSTANCES:
    t = instance(name)
    pairs = t.sft(random.Random(1), 50)
    labels = [t.taste(m, a) for m, a in pairs]
    h.update(json.dumps([t.name, t.about, t.corpus, t.feedback_prompts, t.heldout_prompts,
                         pairs, labels, t.max_new_tokens, t.sft_steps]).encode())
print(h.hexdigest())
"""


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    return {name: instance(name) for name in INSTANCES}


@pytest.fixture(scope="module")
def sft_samples(tasks: dict[str, Task]) -> dict[str, list]:
    return {name: t.sft(random.Random(0), SFT_SAMPLE) for name, t in tasks.items()}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z0-9']+", text))


def _liked_example(t: Task, pairs: list) -> tuple[list, str]:
    return next((m, a) for m, a in pairs if t.taste(m, a))


def test_there_are_at_least_24_instances_four_of_each_family() -> None:
    assert len(INSTANCES) >= 24
    assert len(FAMILIES) >= 6
    for family in FAMILIES:
        assert sum(family_of(n) == family for n in INSTANCES) >= 4
    assert all(re.fullmatch(r"[a-z]+-\d\d", n) for n in INSTANCES)


def test_halves_are_disjoint_make_up_all_and_each_holds_every_family() -> None:
    tune, held = instances("tune"), instances("eval")
    assert not set(tune) & set(held)
    assert sorted(tune + held) == sorted(instances("all")) == sorted(INSTANCES)
    for half in (tune, held):
        assert {family_of(n) for n in half} == set(FAMILIES)


def test_split_is_the_same_on_every_call() -> None:
    assert instances("tune") == instances("tune")
    assert instances("eval") == instances("eval")
    assert instances("tune")[:2] == ["fact-00", "fact-02"]


def test_unknown_split_or_instance_names_what_is_known() -> None:
    with pytest.raises(ValueError, match="tune, eval, all"):
        instances("train")
    with pytest.raises(KeyError, match="fact-00"):
        instance("fact-99")


def test_an_instance_is_the_same_on_every_call(tasks: dict[str, Task]) -> None:
    for name in ("fact-01", "carry-02", "refusal-03"):
        again, first = instance(name), tasks[name]
        assert again.name == name
        assert (again.corpus, again.about) == (first.corpus, first.about)
        assert again.feedback_prompts == first.feedback_prompts
        assert again.heldout_prompts == first.heldout_prompts
        pairs = first.sft(random.Random(3), 100)
        assert again.sft(random.Random(3), 100) == pairs
        assert [again.taste(m, a) for m, a in pairs] == [first.taste(m, a) for m, a in pairs]


def test_instances_are_the_same_in_processes_with_other_hash_seeds() -> None:
    def fingerprint(hash_seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", FINGERPRINT],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    assert fingerprint("1") == fingerprint("2")


def test_multi_turn_prompts_are_in_several_families_of_both_halves(
    tasks: dict[str, Task],
) -> None:
    for half in ("tune", "eval"):
        multi = {family_of(n) for n in instances(half) if len(tasks[n].heldout_prompts[0]) > 1}
        assert len(multi) >= 2, (half, multi)
    assert any(len(tasks[n].heldout_prompts[0]) == 1 for n in INSTANCES)


@pytest.mark.parametrize("name", INSTANCES)
def test_the_taste_likes_a_share_of_the_sft_answers_in_the_band(
    name: str, tasks: dict[str, Task], sft_samples: dict[str, list]
) -> None:
    t, pairs = tasks[name], sft_samples[name]
    share = sum(t.taste(m, a) for m, a in pairs) / len(pairs)
    assert SHARE_RANGE[0] * 0.6 <= share <= 0.6, share
    assert any(a == "" for _, a in pairs), "the corpus must hold a few empty answers"


@pytest.mark.parametrize("name", INSTANCES)
def test_every_heldout_prompt_has_a_liked_answer_among_the_sft_answers(
    name: str, tasks: dict[str, Task], sft_samples: dict[str, list]
) -> None:
    t = tasks[name]
    answers = sorted({a for _, a in sft_samples[name]})
    for prompt in t.heldout_prompts:
        assert any(t.taste(prompt, a) for a in answers), prompt


def test_prompt_sets_are_32_to_64_and_disjoint(tasks: dict[str, Task]) -> None:
    for name, t in tasks.items():
        feedback = {messages_json(m) for m in t.feedback_prompts}
        heldout = {messages_json(m) for m in t.heldout_prompts}
        assert 32 <= len(feedback) == len(t.feedback_prompts) <= 64, name
        assert 32 <= len(heldout) == len(t.heldout_prompts) <= 64, name
        assert not feedback & heldout, name


def test_the_corpus_holds_every_word_of_prompts_and_answers(
    tasks: dict[str, Task], sft_samples: dict[str, list]
) -> None:
    for name, t in tasks.items():
        known = set().union(*(_words(line) for line in t.corpus))
        texts = [m["content"] for p in t.feedback_prompts + t.heldout_prompts for m in p]
        for messages, answer in sft_samples[name][:300]:
            texts += [m["content"] for m in messages] + [answer]
        missing = set().union(*(_words(x) for x in texts)) - known
        assert not missing, (name, sorted(missing))


def test_tastes_reject_garbage_and_liked_answers_cut_or_doubled(
    tasks: dict[str, Task], sft_samples: dict[str, list]
) -> None:
    for name, t in tasks.items():
        prompt, liked = _liked_example(t, sft_samples[name])
        assert t.taste(prompt, liked), name
        for garbage in ("", "   ", "the the the", "!!!", liked[:-1], f"{liked} {liked}"):
            assert not t.taste(prompt, garbage), (name, garbage)


def test_refusal_tastes_depend_on_the_prompt(tasks: dict[str, Task]) -> None:
    for name in (n for n in INSTANCES if family_of(n) == "refusal"):
        t = tasks[name]
        answers = sorted({a for _, a in t.sft(random.Random(0), 200) if a})
        prompts = t.heldout_prompts
        for a in answers:
            assert len({t.taste(p, a) for p in prompts}) == 2, (name, a)


def test_carry_tastes_read_the_detail_from_the_first_turn(tasks: dict[str, Task]) -> None:
    for name in (n for n in INSTANCES if family_of(n) == "carry"):
        t = tasks[name]
        prompt, liked = _liked_example(t, t.sft(random.Random(0), 200))
        other = next(p for p in t.heldout_prompts if not t.taste(p, liked))
        assert not t.taste([other[0], *prompt[1:]], liked), name
        assert t.taste([prompt[0], *other[1:]], liked), name
