"""An LLM as judge: asks an OpenAI-compatible chat server whether a user would like an
answer, and reads the probability of "yes" from the first answer token's logprobs.

The server is asked for one or two tokens at temperature 0 with top_logprobs. P(like) is
P(yes) / (P(yes) + P(no)) over the first non-blank token's alternatives ("Yes", " yes"
and "YES" all count as yes); a server that returns no logprobs gives 1.0 or 0.0 from the
reply's text. Asking is free of side effects, so timeouts, dropped connections, 429 and
502-504 are retried; other refusals raise with the server's message. The API key is read
from the environment variable the config names, never from files in the repository.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from pipeline.training.judge import JudgeItem

INSTRUCTIONS = (
    "You predict how a user rates an assistant's answer. Read the conversation and the "
    "assistant's answer, then say whether the user would give the answer a thumbs up. "
    "Reply with one word: yes or no."
)
_RETRY_STATUSES = (429, 502, 503, 504)


class LlmJudgeError(Exception):
    """The judge server refused or its reply cannot be read; the message says why."""


class _Retryable(LlmJudgeError):
    """A failure worth asking again: no answer, or a busy server."""


@dataclass(frozen=True)
class LlmJudgeConfig:
    """Where and how to ask.

    Attributes:
        base_url: the server, without /v1 (e.g. http://10.0.0.5:8000).
        model: the model name the server knows.
        api_key_env: the environment variable holding the API key; None sends no key.
        timeout_s: per request.
        retries: attempts per answer for retryable failures.
        top_logprobs: alternatives asked for at the first token.
        max_tokens: tokens the reply may have (the first non-blank one is read).
        instructions: the system message.
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 60.0
    retries: int = 3
    top_logprobs: int = 5
    max_tokens: int = 2
    instructions: str = INSTRUCTIONS


class LlmJudge:
    """A Judge (pipeline.training.judge) backed by a chat model; close() it, or use `with`."""

    def __init__(self, config: LlmJudgeConfig, transport: httpx.BaseTransport | None = None):
        headers = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise LlmJudgeError(
                    f"{config.api_key_env} is not set: export the judge server's API key in "
                    "it, or set api_key_env to None for a server without one"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.config = config
        self._client = httpx.Client(
            base_url=config.base_url.rstrip("/"),
            headers=headers,
            timeout=config.timeout_s,
            transport=transport,
        )
        self._ask = retry(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(max(1, config.retries)),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            reraise=True,
        )(self._ask_once)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LlmJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probabilities(self, items: Sequence[JudgeItem]) -> list[float]:
        """P(the user likes it) for each answer, one request each."""
        return [probability(self._ask(item)) for item in items]

    def _ask_once(self, item: JudgeItem) -> dict[str, Any]:
        body = {
            "model": self.config.model,
            "messages": judge_messages(item, self.config.instructions),
            "max_tokens": self.config.max_tokens,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.config.top_logprobs,
        }
        try:
            response = self._client.post("/v1/chat/completions", json=body)
        except httpx.TransportError as e:
            raise _Retryable(f"no answer from {self.config.base_url}: {e!r}") from e
        if response.status_code >= 400:
            kind = _Retryable if response.status_code in _RETRY_STATUSES else LlmJudgeError
            raise kind(
                f"{self.config.base_url} answered {response.status_code}: {response.text[:300]}"
            )
        choices = response.json().get("choices") or []
        if not choices:
            raise LlmJudgeError(f"{self.config.base_url} returned no choices")
        return choices[0]


def judge_messages(item: JudgeItem, instructions: str = INSTRUCTIONS) -> list[dict[str, str]]:
    """The chat sent to the judge: the instructions, then the conversation and answer."""
    if item.messages is not None:
        conversation = "\n\n".join(
            f"{turn.get('role', 'user').upper()}: {turn.get('content') or ''}"
            for turn in item.messages
        )
    elif item.prompt is not None:
        conversation = item.prompt
    else:
        raise LlmJudgeError("an item without prompt text or messages cannot be judged by text")
    asked = (
        f"Conversation:\n{conversation}\n\nAssistant's answer:\n{item.answer}\n\n"
        "Would the user like this answer? Reply yes or no."
    )
    return [{"role": "system", "content": instructions}, {"role": "user", "content": asked}]


def probability(choice: dict[str, Any]) -> float:
    """P(yes) from a chat completion choice: its first non-blank token's logprobs, else
    its text.

    Raises:
        LlmJudgeError: neither says yes or no.
    """
    for token in (choice.get("logprobs") or {}).get("content") or []:
        if not token.get("token", "").strip():
            continue
        seen = {token["token"]: token["logprob"]}
        seen.update({t["token"]: t["logprob"] for t in token.get("top_logprobs") or []})
        odds = {"yes": 0.0, "no": 0.0}
        for text, logprob in seen.items():
            word = _word(text)
            if word in odds:
                odds[word] += math.exp(logprob)
        if odds["yes"] + odds["no"] > 0:
            return odds["yes"] / (odds["yes"] + odds["no"])
        break
    text = (choice.get("message") or {}).get("content") or ""
    word = _word(text.split()[0] if text.split() else "")
    if word in ("yes", "no"):
        return 1.0 if word == "yes" else 0.0
    raise LlmJudgeError(
        f"the judge replied {text[:60]!r}, not yes or no: use a model that follows the "
        "instruction, or one whose server returns logprobs"
    )


def _word(text: str) -> str:
    return text.strip().strip(".,!:;\"'").lower()
