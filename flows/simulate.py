"""`kto-loop simulate`: simulated users chat with a served model through vLLM, rate
each answer with a taste, and (unless told not to) send their votes to Kafka as
ordinary feedback events.

Answers are sampled as a chat client would get them (the server's chat template,
temperature 1 by default) with a per-request seed, so a run repeats. Point `--model`
at an alias, at a candidate version loaded under its own name (`chat@v7`), or at the
base model; give your own recorded prompts (`--prompts`) and taste (`--taste`) to
replay traffic against a candidate.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rich.progress import Progress

from connectors.config import Settings
from connectors.feedback import kafka_clients
from connectors.feedback.produce import produce
from connectors.serving.publish import admins_for
from connectors.serving.vllm_admin import VllmAdmin, VllmError
from pipeline.feedback.sample import encode
from pipeline.feedback.simulation import Chat, Messages, Taste, feedback_event, plan_chats

DEFAULT_TASTE = "deploy.local.chat_model:taste"


@dataclass
class Simulation:
    """What the users saw and how they voted."""

    model: str
    chats: int = 0
    liked: int = 0
    failed: int = 0
    retried: int = 0  # requests sent twice because their connection dropped (not failed)
    sent: int = 0
    seconds: float = 0.0
    by_model: dict[str, list[int]] = field(default_factory=dict)  # served name -> [n, liked]
    failures: list[str] = field(default_factory=list)

    @property
    def liked_share(self) -> float:
        return self.liked / self.chats if self.chats else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "chats": self.chats,
            "liked": self.liked,
            "liked_share": round(self.liked_share, 4),
            "failed": self.failed,
            "retried": self.retried,
            "sent": self.sent,
            "seconds": round(self.seconds, 2),
            "by_model": {
                m: {"chats": n, "liked": k, "liked_share": round(k / n, 4)}
                for m, (n, k) in self.by_model.items()
            },
        }


def _check_broker(settings: Settings) -> None:
    """Wait up to [ingest] connect_timeout_seconds (10 s when 0) for the broker, and
    create the feedback topic if asked to: records sent to a topic being auto-created
    can be lost."""
    kafka = settings.kafka

    def connect() -> None:
        if kafka.create_topics:
            kafka_clients.ensure_topics(kafka, [kafka.topic, kafka.dead_letter_topic])
        else:
            kafka_clients.admin_client(kafka).close()

    timeout = settings.ingest.connect_timeout_seconds or 10.0
    kafka_clients.wait_for_broker(connect, kafka, timeout_seconds=timeout)


def default_model(admin: VllmAdmin, alias: str) -> str:
    """The alias when the server has it, else the base model (before any promotion)."""
    return alias if alias in admin.models() else admin.base_models()[0]


def simulate(
    settings: Settings,
    prompts: Sequence[Messages],
    taste: Taste,
    *,
    model: str | None = None,
    users: int = 20,
    chats: int = 400,
    seed: int = 0,
    temperature: float = 1.0,
    max_tokens: int = 48,
    concurrency: int = 16,
    send: bool = True,
    run: str | None = None,
    progress: bool = True,
) -> Simulation:
    """Run `chats` simulated turns against the first replica and return the tally;
    with `send`, their votes go to the feedback topic.

    Raises:
        BrokerUnavailable: with `send`, no broker answered before any chat started.
        VllmError: the server cannot be reached at all (single failed requests are
            counted, not raised).
        KafkaError: a vote was refused by the broker.
    """
    started = time.monotonic()
    if send:
        # Before any chat: votes that cannot be sent make the run worthless.
        _check_broker(settings)
    admin = admins_for(settings.serving)[0]
    target = model or default_model(admin, settings.cycle.alias)
    run = run or f"sim-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-s{seed}"
    plan = plan_chats(prompts, users, chats, seed, run)
    result = Simulation(target)
    events: list[dict] = []

    def ask(chat: Chat) -> tuple[Chat, Any]:
        try:
            return chat, admin.chat(
                target,
                chat.messages,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=1.0,
                seed=chat.seed,
                # OpenAI's end-user field: a canary routes each user to one version.
                user=chat.user_id,
            )
        except VllmError as exc:
            return chat, exc

    with (
        ThreadPoolExecutor(max_workers=concurrency) as pool,
        Progress(disable=not progress, transient=True) as bar,
    ):
        task = bar.add_task(f"users chatting with {target}", total=len(plan))
        for chat, answer in pool.map(ask, plan):
            bar.advance(task)
            if isinstance(answer, VllmError):
                result.failed += 1
                result.failures.append(str(answer))
                continue
            liked = bool(taste(chat.messages, answer.text))
            result.chats += 1
            result.liked += liked
            tally = result.by_model.setdefault(answer.model, [0, 0])
            tally[0] += 1
            tally[1] += liked
            events.append(
                feedback_event(chat, answer.text, answer.model, liked, dt.datetime.now(dt.UTC))
            )
    admin.close()
    result.retried = admin.retried
    if result.chats == 0:
        raise VllmError(admin.url, f"every request failed: {result.failures[:1]}")
    if send:
        result.sent = produce(settings.kafka, [encode(e) for e in events])
    result.seconds = time.monotonic() - started
    return result
