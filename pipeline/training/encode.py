"""Turn training records into token ids exactly as serving will see them.

The prompt is rendered by the tokenizer's chat template with add_generation_prompt=True
and tokenized without extra special tokens, which is what vLLM's chat endpoint does.
The completion's tokens follow it: the completion text tokenized alone, then the end of
turn token the server stops on. Prompts are cut from the left (the latest turns
matter most), completions from the right.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from pipeline.feedback.examples import Example

log = logging.getLogger(__name__)


class EncodeError(ValueError):
    """The records cannot be turned into training sequences; the message says why."""


@dataclass(frozen=True)
class Lengths:
    """Token budgets. The completion is cut to max_completion_length, the prompt (from
    the left) to max_prompt_length, then the completion again so the pair fits
    max_length."""

    max_length: int = 512
    max_prompt_length: int = 384
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise EncodeError(
                f"max_length={self.max_length} is too small for any completion: it must "
                f"exceed max_prompt_length={self.max_prompt_length}; raise max_length or "
                "lower max_prompt_length"
            )


@dataclass(frozen=True)
class Encoded:
    """One record as token ids, with the weight of its term in the loss."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    desirable: bool
    weight: float = 1.0


@dataclass(frozen=True)
class EncodeReport:
    """What encoding did to the records."""

    kept: int
    dropped_empty_completion: int
    # Prompts that cannot be rendered as text: non-text parts (images, audio, files),
    # or turns the chat template refuses (e.g. tool calls on a template without tools).
    dropped_unrenderable: int
    truncated_prompts: int
    truncated_completions: int
    boundary_mismatches: int


class NonTextPrompt(EncodeError):
    """The prompt holds parts a text model cannot read (images, audio, files)."""


def prompt_messages(prompt: str | None, messages_json: str | None) -> list[dict[str, Any]]:
    """The prompt's turns as a chat template takes them: the stored messages, or one
    user turn for a plain prompt.

    Turns are prepared as vLLM prepares them for a text model's template: content sent
    as a list of parts (OpenAI's chat format) becomes the text of its text parts joined
    by newlines, absent content becomes "", and a tool call's JSON `arguments` string
    becomes an object (what tool-use templates expect). Other fields of a turn
    (tool_call_id, name) are passed on as sent.

    Raises:
        NonTextPrompt: a turn holds an image, audio, file or other non-text part: the
            answer was rated in light of something a text model cannot see.
    """
    if not messages_json:
        return [{"role": "user", "content": prompt or ""}]
    turns = json.loads(messages_json)
    for i, turn in enumerate(turns):
        content = turn.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    texts.append(part["text"])
                elif kind == "refusal" and isinstance(part.get("refusal"), str):
                    texts.append(part["refusal"])
                else:
                    raise NonTextPrompt(
                        f"turn {i} holds a {kind!r} part; a text model cannot see it, so the "
                        "example is left out of training"
                    )
            turns[i] = {**turn, "content": "\n".join(texts)}
        elif content is None:
            turns[i] = {**turn, "content": ""}
        if turn.get("tool_calls"):
            turns[i]["tool_calls"] = [_with_parsed_arguments(call) for call in turn["tool_calls"]]
    return turns


def _with_parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or isinstance(function.get("arguments"), dict):
        return call
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError:
        arguments = {}
    if not isinstance(arguments, dict):
        arguments = {}
    return {**call, "function": {**function, "arguments": arguments}}


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the server stops generation on after an assistant turn."""
    if tokenizer.eos_token_id is None:
        raise EncodeError(
            "the tokenizer has no eos_token: set eos_token in tokenizer_config.json to the "
            "token that ends an assistant turn"
        )
    return int(tokenizer.eos_token_id)


def check_chat_template(tokenizer: Any, prompt_format: str) -> None:
    """Refuse a chat-format run on a tokenizer without a chat template, saying how to
    supply one."""
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise EncodeError(
            "the model's tokenizer has no chat template, so prompts cannot be rendered as "
            "the chat server renders them. Supply one with --chat-template FILE (a Jinja "
            "template, the same file you pass to vLLM's --chat-template), or set "
            '[train] prompt_format = "raw" if your users call the completions endpoint '
            "with raw prompts"
        )


def encode_records(
    records: Sequence[Example],
    tokenizer: Any,
    lengths: Lengths,
    prompt_format: str = "chat",
    completion_tokens: str = "serving",
) -> tuple[list[Encoded], EncodeReport]:
    """Tokenize examples, each keeping its weight.

    With completion_tokens="template" the completion is instead what TRL trains on: the
    whole conversation rendered by the chat template (for a raw prompt, prompt +
    completion + the eos text) and tokenized, minus its common prefix with the prompt
    alone; a template may add tokens after the end of turn that serving never generates.

    Returns:
        The encoded examples (those left with no completion token are dropped) and a
        report of what was cut or dropped.
    Raises:
        EncodeError: no example fits.
    """
    check_chat_template(tokenizer, prompt_format)
    eot = end_of_turn_id(tokenizer)
    texts, renderable, unrenderable = _render_prompts(records, tokenizer, prompt_format)
    records = renderable
    completions = [record.completion for record in records]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    joined = tokenizer(
        [t + c for t, c in zip(texts, completions, strict=True)], add_special_tokens=False
    )["input_ids"]
    if completion_tokens == "template":
        prompt_ids, completion_ids = _template_split(
            records, texts, prompt_ids, tokenizer, prompt_format
        )
        joined = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    out: list[Encoded] = []
    dropped = cut_prompts = cut_completions = mismatches = 0
    completion_cap = lengths.max_completion_length or lengths.max_length
    for record, p, c, j in zip(records, prompt_ids, completion_ids, joined, strict=True):
        if j != p + c:
            mismatches += 1
        if completion_tokens != "template":
            c = [*c, eot]
        if len(c) > completion_cap:
            c = c[:completion_cap]
            cut_completions += 1
        if len(p) > lengths.max_prompt_length:
            p = p[-lengths.max_prompt_length :]
            cut_prompts += 1
        room = lengths.max_length - len(p)
        if len(c) > room:
            c = c[:room]
            cut_completions += 1
        if not c:
            dropped += 1
            continue
        out.append(Encoded(tuple(p), tuple(c), record.desirable, float(record.weight)))
    if mismatches:
        # Handled as the server sees it; worth knowing, nothing to change.
        log.info(
            "%d of %d records tokenize differently as prompt+completion than as prompt, "
            "then completion (tokens merge across the boundary, e.g. a chat template whose "
            "generation prompt ends in a space). Training uses prompt, then completion, "
            "which is what the server generates after the prompt.",
            mismatches,
            len(records),
        )
    if not out:
        raise EncodeError(
            f"no record fits max_length={lengths.max_length} with "
            f"max_prompt_length={lengths.max_prompt_length}: raise max_length"
        )
    report = EncodeReport(
        len(out), dropped, len(unrenderable), cut_prompts, cut_completions, mismatches
    )
    return out, report


def _template_split(
    records: Sequence[Example],
    texts: list[str],
    prompt_ids: list[list[int]],
    tokenizer: Any,
    prompt_format: str,
) -> tuple[list[list[int]], list[list[int]]]:
    """TRL's split of each record: the prompt's tokens up to where they and the whole
    conversation's tokens part, and the rest of the conversation as the completion."""
    if prompt_format == "chat":
        full = [
            tokenizer.apply_chat_template(
                [
                    *prompt_messages(r.prompt, r.messages_json),
                    {"role": "assistant", "content": r.completion},
                ],
                tokenize=False,
            )
            for r in records
        ]
    else:
        eos = tokenizer.eos_token or ""
        full = [
            t + (r.completion if r.completion.endswith(eos) else r.completion + eos)
            for t, r in zip(texts, records, strict=True)
        ]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    prompts, completions = [], []
    for p, f in zip(prompt_ids, full_ids, strict=True):
        k = 0
        while k < min(len(p), len(f)) and p[k] == f[k]:
            k += 1
        prompts.append(p[:k])
        completions.append(f[k:])
    return prompts, completions


def _render_prompts(
    records: Sequence[Example], tokenizer: Any, prompt_format: str
) -> tuple[list[str], list[Example], list[str]]:
    """The prompt texts as serving renders them, the examples they belong to, and why
    each left-out example's prompt cannot be rendered as text.

    Raises:
        EncodeError: no prompt renders.
    """
    texts: list[str] = []
    renderable: list[Example] = []
    unrenderable: list[str] = []
    for record in records:
        if prompt_format != "chat":
            texts.append(record.prompt or "")
            renderable.append(record)
            continue
        try:
            texts.append(
                tokenizer.apply_chat_template(
                    prompt_messages(record.prompt, record.messages_json),
                    add_generation_prompt=True,
                    tokenize=False,
                )
            )
        except (NonTextPrompt, jinja2.TemplateError) as exc:
            unrenderable.append(str(exc))
            continue
        renderable.append(record)
    if unrenderable:
        log.warning(
            "%d of %d records left out: their prompt cannot be rendered as text (first: %s); "
            "to train on them, send their prompts as text, or give a chat template that "
            "renders them (--chat-template, [cycle] chat_template)",
            len(unrenderable),
            len(records),
            unrenderable[0],
        )
    if not renderable:
        raise EncodeError(
            f"none of the {len(unrenderable)} records has a prompt that renders as text: "
            f"{unrenderable[0]}"
        )
    return texts, renderable, unrenderable
