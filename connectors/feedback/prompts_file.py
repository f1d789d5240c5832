"""Recorded prompts: a JSON lines file of traffic to replay in a simulation.

Each line is a string (one user message), {"prompt": "..."} or {"messages": [...]}
(what was sent, last turn the user's); blank lines are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.feedback.simulation import Messages


def read_prompts(path: str | Path) -> list[Messages]:
    """Prompts from a file of recorded traffic: JSON lines, each a string (one user
    message), {"prompt": "..."} or {"messages": [...]} (what was sent, last turn the
    user's). Blank lines are skipped.

    Raises:
        ValueError: naming the line that is none of these.
    """
    out: list[Messages] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value: Any = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n} is not JSON ({exc})") from None
        if isinstance(value, str):
            value = {"prompt": value}
        if isinstance(value, dict) and isinstance(value.get("prompt"), str):
            out.append([{"role": "user", "content": value["prompt"]}])
        elif isinstance(value, dict) and _is_messages(value.get("messages")):
            out.append(value["messages"])
        else:
            raise ValueError(
                f'{path}:{n} is not a prompt: expected "text", {{"prompt": "..."}} or '
                '{"messages": [{"role": ..., "content": ...}, ...]}'
            )
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
