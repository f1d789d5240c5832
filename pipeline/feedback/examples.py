"""The training example: what crosses from a snapshot or a data file to the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One labelled answer.

    Exactly one of `prompt` (plain text) and `messages_json` (the conversation up to the
    answer, as JSON chat messages) is set. `weight` is what its term weighs in the loss
    (the votes an answer carries when repeats are counted as weights; 1 otherwise).
    `adapter` is the served version that gave the answer, when the feedback says so.
    """

    prompt: str | None
    messages_json: str | None
    completion: str
    desirable: bool
    weight: float = 1.0
    adapter: str | None = None
