"""`kto-loop simulate`: simulated users chat with a served model (flows/simulate.py);
a table of who served the chats and how they were liked goes to stderr, the tally as
one JSON line to stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from kafka.errors import KafkaError
from rich.table import Table

from connectors.config import Settings
from connectors.feedback.kafka_clients import BrokerUnavailable
from flows.console import err, fail


def simulate(
    settings: Settings,
    *,
    model: str | None,
    prompts: Path | None,
    taste: str,
    users: int,
    chats: int,
    seed: int,
    temperature: float,
    max_tokens: int,
    send: bool,
) -> None:
    """Run the simulation and print its tally. Exit 2 for a bad taste or prompts file,
    3 when the broker could not be reached (before any chat), 1 when the server or the
    broker failed."""
    from connectors.feedback.prompts_file import read_prompts
    from flows.simulate import simulate as run_simulation
    from flows.user_code import load_callable

    try:
        taste_fn = load_callable(taste, "--taste")
        if prompts is not None:
            asked = read_prompts(prompts)
        else:
            from deploy.local.chat_model import chat_prompts

            asked = [[{"role": "user", "content": p}] for p in chat_prompts()]
    except (ValueError, OSError) as exc:
        fail(exc, 2)
    from connectors.serving.vllm_admin import VllmError

    try:
        result = run_simulation(
            settings,
            asked,
            taste_fn,
            model=model,
            users=users,
            chats=chats,
            seed=seed,
            temperature=temperature,
            max_tokens=max_tokens,
            send=send,
            progress=sys.stderr.isatty(),
        )
    except BrokerUnavailable as exc:
        fail(exc, 3)
    except (VllmError, KafkaError) as exc:
        fail(exc, 1)
    table = Table(title=f"{result.chats} simulated chats with {result.model}")
    for col in ("served by", "chats", "liked", "liked share"):
        table.add_column(col)
    for name, (n, k) in sorted(result.by_model.items()):
        table.add_row(name, f"{n:,}", f"{k:,}", f"{k / n:.1%}")
    err.print(table)
    if result.failed:
        err.print(f"{result.failed} requests failed, e.g. {result.failures[0]}", style="yellow")
    if result.retried:
        err.print(
            f"{result.retried} requests were sent twice: their connection dropped before an answer",
            style="yellow",
        )
    typer.echo(json.dumps(result.as_dict()))
