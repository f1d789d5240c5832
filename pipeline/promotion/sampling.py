"""Which held-out prompts the gate samples answers for, and how long the answers may be:
distinct prompts, in held-out order, up to the configured number."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pipeline.feedback.examples import Example
from pipeline.training.encode import NonTextPrompt, prompt_messages


def chat_prompts(examples: Sequence[Example], n: int) -> list[list[dict[str, Any]]]:
    """Up to `n` distinct prompts of `examples`, as chat messages (what the generation
    check asks a server); prompts with a part a text model cannot see are left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    for example in examples:
        try:
            messages = prompt_messages(example.prompt, example.messages_json)
        except NonTextPrompt:
            continue
        out.setdefault(json.dumps(messages, sort_keys=True), messages)
        if len(out) == n:
            break
    return list(out.values())


def drift_prompts(
    prompts: Sequence[tuple[int, ...]], n: int, max_length: int, max_tokens: int
) -> tuple[list[tuple[int, ...]], int]:
    """Up to `n` distinct encoded prompts, and the most tokens an answer to each may
    take: `max_tokens`, less where the longest prompt leaves less room in `max_length`.
    No prompts when there is no room for a single token."""
    chosen = list(dict.fromkeys(prompts))[:n]
    room = max_length - max((len(p) for p in chosen), default=0)
    if not chosen or room < 1:
        return [], 0
    return chosen, min(max_tokens, room)
