"""Judging by sampled answers: AUC and its standard error worked out by hand, the taste
model on synthetic features, the liked-share and paired-comparison statistics, features
of a tiny random Llama model, and the LLM judge against a real HTTP server."""

from __future__ import annotations

import math
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from connectors.training.llm_judge import LlmJudge, LlmJudgeConfig, LlmJudgeError, judge_messages
from pipeline.training.encode import Encoded
from pipeline.training.judge import (
    LOGP_FEATURES,
    Featurizer,
    JudgeItem,
    TasteModel,
    TrustOptions,
    answer_features,
    auc,
    auc_standard_error,
    by_prompt,
    callable_judge,
    compare,
    fit_taste_judge,
    liked_share,
)
from tests.conftest import wait_until

PAD = 0


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- AUC


def test_auc_counts_the_pairs_a_like_wins_by_hand() -> None:
    # Likes 0.35 and 0.8, dislikes 0.1 and 0.4: 0.35 beats 0.1 only, 0.8 beats both: 3/4.
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auc([4, 3, 2, 1], [False, False, True, True]) == 0.0


def test_auc_ties_count_half() -> None:
    assert auc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    # Likes 1 and 2, dislikes 1 and 0: 1~1 half, 1>0, 2>1, 2>0: 3.5 / 4.
    assert auc([1, 2, 1, 0], [True, True, False, False]) == 0.875


def test_auc_without_both_classes_is_nan() -> None:
    assert math.isnan(auc([0.2, 0.3], [True, True]))


def test_delong_standard_error_by_hand() -> None:
    # V10 (share of dislikes each like beats) = [0.5, 1]; V01 (share of likes above each
    # dislike) = [1, 0.5]; sample variances 0.125 each: SE = sqrt(0.125/2 + 0.125/2).
    se = auc_standard_error([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    assert se == pytest.approx(math.sqrt(0.125))


def test_delong_standard_error_equals_the_pairwise_definition_with_ties() -> None:
    rng = random.Random(3)
    scores = [rng.randint(0, 6) for _ in range(40)]  # many ties
    labels = [rng.random() < 0.4 for _ in range(40)]
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]

    def psi(a: float, b: float) -> float:
        return 1.0 if a > b else 0.5 if a == b else 0.0

    v10 = [sum(psi(p, n) for n in neg) / len(neg) for p in pos]
    v01 = [sum(psi(p, n) for p in pos) / len(pos) for n in neg]

    def var(v: list[float]) -> float:
        m = sum(v) / len(v)
        return sum((x - m) ** 2 for x in v) / (len(v) - 1)

    assert auc(scores, labels) == pytest.approx(sum(v10) / len(v10))
    expected = math.sqrt(var(v10) / len(pos) + var(v01) / len(neg))
    assert auc_standard_error(scores, labels) == pytest.approx(expected)


# ---------------------------------------------------------------- the taste model


def _synthetic(n: int, dims: int, seed: int, signal: bool) -> tuple[torch.Tensor, list[bool]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dims, generator=gen) * torch.linspace(0.5, 3.0, dims)
    if signal:
        direction = torch.ones(dims) / math.sqrt(dims)
        labels = ((x / torch.linspace(0.5, 3.0, dims)) @ direction > 0).tolist()
    else:
        labels = (torch.rand(n, generator=gen) < 0.5).tolist()
    return x, labels


def test_taste_model_separates_a_linearly_separable_set() -> None:
    x, y = _synthetic(400, 16, seed=0, signal=True)
    model = TasteModel.fit(x[:200], y[:200])
    assert auc(model.probabilities(x[200:]).tolist(), y[200:]) > 0.95


def test_taste_model_stays_near_chance_on_noise() -> None:
    x, y = _synthetic(600, 16, seed=1, signal=False)
    model = TasteModel.fit(x[:200], y[:200])
    assert abs(auc(model.probabilities(x[200:]).tolist(), y[200:]) - 0.5) < 0.1


def test_taste_model_is_deterministic_and_picks_its_penalty_from_the_grid() -> None:
    x, y = _synthetic(120, 8, seed=2, signal=True)
    weights = [1.0 + (i % 3) for i in range(120)]
    a = TasteModel.fit(x, y, weights)
    b = TasteModel.fit(x, y, weights)
    assert torch.equal(a.coef, b.coef) and a.intercept == b.intercept
    assert a.l2 in (1e-3, 1e-2, 1e-1, 1.0)
    assert TasteModel.fit(x, y, l2=0.5).l2 == 0.5


def test_taste_model_refuses_one_class() -> None:
    with pytest.raises(ValueError, match="both classes"):
        TasteModel.fit(torch.randn(10, 3), [True] * 10)


# ---------------------------------------------------------------- trusting the taste


def _votes(n: int, labels: list[bool], offset: int = 0) -> list[Encoded]:
    return [Encoded((offset + i,), (1,), liked) for i, liked in enumerate(labels[:n])]


def _table_features(table: torch.Tensor):
    # Each vote's features are a row of `table`, found by its one prompt token.
    return lambda items: table[[e.prompt_ids[0] for e in items]]


def test_a_weak_taste_model_is_not_trusted_and_says_why() -> None:
    x, y = _synthetic(240, 16, seed=4, signal=False)
    judge = fit_taste_judge(
        _table_features(x), _votes(160, y), _votes(80, y[160:], offset=160), l2=0.1
    )
    assert not judge.trusted
    assert "AUC" in judge.reason and "refusing to judge by answers" in judge.reason
    # Checked on the 80 held-out votes and the 160 training votes out of fold.
    assert judge.heldout_likes + judge.heldout_dislikes == 240


def test_a_strong_taste_model_is_trusted_and_judges_items() -> None:
    x, y = _synthetic(240, 16, seed=5, signal=True)
    judge = fit_taste_judge(_table_features(x), _votes(160, y), _votes(80, y[160:], offset=160))
    assert judge.trusted, judge.reason
    assert judge.heldout_auc > 0.9
    probs = judge.probabilities([JudgeItem((i,), (1,)) for i in range(160, 240)])
    assert len(probs) == 80 and all(0 <= p <= 1 for p in probs)
    assert auc(probs, y[160:]) > 0.9


def test_too_few_votes_of_a_class_cannot_establish_trust() -> None:
    x, _ = _synthetic(200, 8, seed=6, signal=True)
    train = [Encoded((i,), (1,), i < 4) for i in range(30)]  # 4 likes
    heldout = [Encoded((160 + i,), (1,), i < 3) for i in range(40)]  # 3 likes
    judge = fit_taste_judge(_table_features(x), train, heldout, TrustOptions())
    assert not judge.trusted and "only 7 likes" in judge.reason


def test_training_votes_are_checked_out_of_fold_by_prompt() -> None:
    # A taste model that memorises prompts: each prompt's votes share one label, and
    # its features identify the prompt and nothing else. Scored by models fit without
    # their prompt, the training votes show it knows nothing.
    prompts = [i // 6 for i in range(240)]
    labels = [p % 2 == 0 for p in prompts]
    table = torch.eye(40)
    votes = [Encoded((p,), (1,), liked) for p, liked in zip(prompts, labels, strict=True)]
    judge = fit_taste_judge(lambda items: table[[e.prompt_ids[0] for e in items]], votes, [])
    assert not judge.trusted and "below 0.6" in judge.reason


def test_training_votes_of_one_class_give_no_model_and_a_reason() -> None:
    x = torch.randn(40, 4)
    judge = fit_taste_judge(_table_features(x), _votes(20, [False] * 20), _votes(20, [True] * 20))
    assert not judge.trusted and judge.model is None and "needs both" in judge.reason
    with pytest.raises(ValueError, match="no taste model"):
        judge.probabilities([JudgeItem((0,), (1,))])


# ---------------------------------------------------------------- liked share and compare


def test_liked_share_interval_covers_the_truth_most_of_the_time() -> None:
    rng = random.Random(7)
    covered, runs = 0, 300
    for _ in range(runs):
        # Prompts differ in how likeable their answers are (uniform on [0.1, 0.9], mean
        # 0.5); four answers each, each liked or not.
        per_prompt = {}
        for k in range(30):
            rate = rng.uniform(0.1, 0.9)
            per_prompt[k] = [float(rng.random() < rate) for _ in range(4)]
        share = liked_share(per_prompt)
        covered += share.low <= 0.5 <= share.high
    assert covered / runs > 0.88


def test_liked_share_groups_answers_by_prompt() -> None:
    share = liked_share(by_prompt(["a", "a", "b", "b"], [1.0, 0.0, 1.0, 1.0]))
    # Prompt means 0.5 and 1.0: share 0.75, SE = stdev([0.5, 1]) / sqrt(2) = 0.25.
    assert share.share == 0.75 and share.se == pytest.approx(0.25)
    assert (share.prompts, share.answers, share.high) == (2, 4, 1.0)


def _spread(rng: random.Random, n: int) -> dict[int, list[float]]:
    return {k: [rng.uniform(0.05, 0.95)] for k in range(n)}


def test_compare_pairs_by_prompt_and_says_better_worse_or_neither() -> None:
    rng = random.Random(8)
    serving = _spread(rng, 40)  # prompts that differ a lot in difficulty
    up = {k: [min(1.0, p[0] + 0.05)] for k, p in serving.items()}
    better = compare(up, serving)
    assert better.better and not better.worse
    # Unpaired, the two shares' intervals overlap: only the pairing sees the gain.
    assert better.candidate.low < better.serving.high
    assert better.difference == pytest.approx(0.05, abs=0.01)

    worse = compare(serving, up)
    assert worse.worse and not worse.better
    assert "worse" in worse.summary("the base model")

    same = compare(serving, serving)
    assert not same.better and not same.worse and same.difference == 0.0
    noisy = {k: [min(1.0, max(0.0, p[0] + rng.uniform(-0.2, 0.2)))] for k, p in serving.items()}
    assert not compare(noisy, serving).better


def test_compare_refuses_different_prompts_and_one_prompt_says_nothing() -> None:
    with pytest.raises(ValueError, match="same prompts"):
        compare({"a": [1.0]}, {"b": [0.0]})
    one = compare({"a": [1.0]}, {"a": [0.0]})
    assert one.se == math.inf and not one.better and not one.worse


def test_callable_judge_takes_messages_or_prompt_and_checks_the_range() -> None:
    judge = callable_judge(lambda asked, answer: "thanks" in answer)
    items = [
        JudgeItem((1,), (2,), "thanks!", messages=[{"role": "user", "content": "hi"}]),
        JudgeItem((1,), (3,), "no.", prompt="hi"),
    ]
    assert judge.probabilities(items) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        callable_judge(lambda asked, answer: 1.5).probabilities(items)


# ---------------------------------------------------------------- features


@pytest.fixture(scope="module")
def tiny_lm() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _items(seed: int, shapes: list[tuple[int, int]]) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Encoded(
            tuple(torch.randint(1, 128, (p,), generator=gen).tolist()),
            tuple(torch.randint(1, 128, (c,), generator=gen).tolist()),
            True,
        )
        for p, c in shapes
    ]


def test_features_do_not_depend_on_the_batch_they_ran_in(tiny_lm: Any) -> None:
    items = _items(0, [(5, 3), (2, 0), (9, 6), (3, 1), (12, 14), (4, 0), (7, 2)])
    cpu = torch.device("cpu")
    alone = answer_features(tiny_lm, items, PAD, cpu, batch_size=1)
    together = answer_features(tiny_lm, items, PAD, cpu, batch_size=8)
    shuffled = answer_features(tiny_lm, items[::-1], PAD, cpu, batch_size=3).flip(0)
    assert alone.shape == (7, 2 * 64 + LOGP_FEATURES)
    assert_close(together, alone, atol=1e-5, rtol=0)
    assert_close(shuffled, alone, atol=1e-5, rtol=0)


def test_an_empty_completion_reads_the_last_prompt_token(tiny_lm: Any) -> None:
    prompt = _items(1, [(6, 0)])[0].prompt_ids
    empty = answer_features(tiny_lm, [Encoded(prompt, (), True)], PAD, torch.device("cpu"))
    # The prompt's last five tokens as a completion: its last state is the same token's.
    split = answer_features(
        tiny_lm, [Encoded(prompt[:1], prompt[1:], True)], PAD, torch.device("cpu")
    )
    assert torch.isfinite(empty).all()
    assert_close(empty[0, :64], empty[0, 64:128])  # last == mean over one token
    # No answer tokens: no likelihood to read.
    assert (empty[0, 128:] == 0).all()
    assert_close(empty[0, :64], split[0, :64], atol=1e-5, rtol=0)


def test_features_of_chosen_layers(tiny_lm: Any) -> None:
    items = _items(2, [(4, 2), (6, 3)])
    cpu = torch.device("cpu")
    two = answer_features(tiny_lm, items, PAD, cpu, layers=(1, -1))
    last = answer_features(tiny_lm, items, PAD, cpu)
    assert two.shape == (2, 4 * 64 + LOGP_FEATURES)
    assert_close(two[:, 128:], last)


def test_likelihood_features_are_the_answers_log_probs(tiny_lm: Any) -> None:
    from pipeline.training.logps import collate, token_logps

    items = _items(4, [(4, 3), (6, 5)])
    feats = answer_features(tiny_lm, items, PAD, torch.device("cpu"))[:, -LOGP_FEATURES:]
    with torch.no_grad():
        logps = token_logps(
            tiny_lm, collate([(e.prompt_ids, e.completion_ids) for e in items], PAD)
        )
    first, second = logps[:3], logps[3:]
    for row, lp in ((0, first), (1, second)):
        expected = [lp.sum(), lp.mean(), lp.min(), torch.log1p(torch.tensor(len(lp.tolist())))]
        assert_close(feats[row], torch.stack(expected).float(), atol=1e-4, rtol=0)


def test_featurizer_reads_the_frozen_reference_of_a_peft_model(tiny_lm: Any) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    items = _items(3, [(5, 4), (3, 2)])
    cpu = torch.device("cpu")
    base = answer_features(tiny_lm, items, PAD, cpu)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(tiny_lm), lora)
    model.train()
    with_adapter = answer_features(model, items, PAD, cpu)
    assert not torch.allclose(with_adapter, base, atol=1e-4)
    assert_close(Featurizer(model, PAD, cpu)(items), base, atol=1e-5, rtol=0)
    assert model.training


# ---------------------------------------------------------------- the LLM judge


@dataclass
class JudgeServer:
    """A real OpenAI-format chat server on a free port: it likes answers that say
    "thanks", answering with logprobs when asked, and can fail its next requests."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # statuses to answer first
    logprobs: bool = True


@pytest.fixture
def judge_server() -> Iterator[JudgeServer]:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    state = JudgeServer()

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        if state.fail_next:
            status = state.fail_next.pop(0)
            return JSONResponse({"error": {"message": "busy"}}, status_code=status)
        liked = "thanks" in body["messages"][-1]["content"]
        word = "yes" if liked else "no"
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": word.capitalize() + "."},
            "finish_reason": "length",
        }
        if state.logprobs and body.get("logprobs"):
            p_yes = 0.8 if liked else 0.1
            top = [
                {"token": "Yes", "logprob": math.log(p_yes * 0.75)},
                {"token": " yes", "logprob": math.log(p_yes * 0.25)},
                {"token": "No", "logprob": math.log(1 - p_yes - 0.05)},
                {"token": "Maybe", "logprob": math.log(0.05)},
            ]
            first = top[0] if liked else top[2]
            choice["logprobs"] = {"content": [{**first, "top_logprobs": top}]}
        return JSONResponse({"id": "x", "object": "chat.completion", "choices": [choice]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    state.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the judge server to start")
    yield state
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


ITEMS = [
    JudgeItem((1,), (2,), "Sure, thanks for asking!", messages=[{"role": "user", "content": "Hi"}]),
    JudgeItem((1,), (3,), "Go away.", prompt="<|user|>\nHi<|end|>\n<|assistant|>\n"),
]


def test_llm_judge_reads_the_probability_of_yes_from_logprobs(
    judge_server: JudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    config = LlmJudgeConfig(judge_server.url, "judge-model", api_key_env="TEST_JUDGE_KEY")
    with LlmJudge(config) as judge:
        probs = judge.probabilities(ITEMS)
    # Yes 0.8 (0.6 + 0.2 over two spellings), no 0.15 (liked) or 0.85: P(yes | yes or no).
    assert probs == [pytest.approx(0.8 / 0.95), pytest.approx(0.1 / 0.95)]
    assert judge_server.headers[0]["authorization"] == "Bearer sk-test-123"
    body = judge_server.requests[0]
    assert body["model"] == "judge-model" and body["logprobs"] is True
    assert body["messages"][0]["role"] == "system"
    assert "USER: Hi" in body["messages"][1]["content"]


def test_llm_judge_falls_back_to_the_text_without_logprobs(judge_server: JudgeServer) -> None:
    judge_server.logprobs = False
    with LlmJudge(LlmJudgeConfig(judge_server.url, "m")) as judge:
        assert judge.probabilities(ITEMS) == [1.0, 0.0]


def test_llm_judge_retries_a_busy_server_but_not_a_refusal(judge_server: JudgeServer) -> None:
    judge_server.fail_next = [503, 429]
    with LlmJudge(LlmJudgeConfig(judge_server.url, "m", retries=3)) as judge:
        assert judge.probabilities(ITEMS[:1]) == [pytest.approx(0.8 / 0.95)]
        assert len(judge_server.requests) == 3
        judge_server.fail_next = [400]
        with pytest.raises(LlmJudgeError, match="400"):
            judge.probabilities(ITEMS[:1])
    assert len(judge_server.requests) == 4


def test_llm_judge_wants_its_key_in_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    with pytest.raises(LlmJudgeError, match="TEST_JUDGE_KEY is not set"):
        LlmJudge(LlmJudgeConfig("http://127.0.0.1:1", "m", api_key_env="TEST_JUDGE_KEY"))


def test_judge_messages_use_the_prompt_text_when_there_are_no_turns() -> None:
    asked = judge_messages(ITEMS[1])[1]["content"]
    assert "<|user|>\nHi" in asked and "Go away." in asked
