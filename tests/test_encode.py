"""Records become the token ids serving sees: the chat template's rendering with the
generation prompt, then the completion and the end-of-turn token."""

from __future__ import annotations

import json
import logging

import pytest

from connectors.training.models import load_tokenizer
from pipeline.feedback.examples import Example
from pipeline.training.encode import EncodeError, Lengths, encode_records

MESSAGES = json.dumps([{"role": "user", "content": "Tell me about tea."}])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_prompt_is_rendered_as_the_chat_server_renders_it(tokenizer):
    [encoded], report = encode_records(
        [Example(None, MESSAGES, "Sure! Tea is nice.", True)], tokenizer, Lengths()
    )
    rendered = tokenizer.apply_chat_template(
        json.loads(MESSAGES), add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|assistant|>\n")
    assert list(encoded.prompt_ids) == tokenizer(rendered, add_special_tokens=False).input_ids
    assert tokenizer.decode(encoded.completion_ids) == "Sure! Tea is nice.<|end|>"
    assert encoded.completion_ids[-1] == tokenizer.eos_token_id
    assert report.kept == 1 and report.boundary_mismatches == 0


def test_plain_prompt_becomes_one_user_turn(tokenizer):
    [a], _ = encode_records(
        [Example("Tell me about tea.", None, "Yes.", True)], tokenizer, Lengths()
    )
    [b], _ = encode_records([Example(None, MESSAGES, "Yes.", True)], tokenizer, Lengths())
    assert a == b


def test_prompt_is_cut_from_the_left_and_completion_from_the_right(tokenizer):
    long_prompt = json.dumps([{"role": "user", "content": "tea " * 200}])
    long_answer = "coffee " * 200
    lengths = Lengths(max_length=64, max_prompt_length=40, max_completion_length=30)
    [e], report = encode_records(
        [Example(None, long_prompt, long_answer, False)], tokenizer, lengths
    )
    full_prompt = tokenizer(
        tokenizer.apply_chat_template(
            json.loads(long_prompt), add_generation_prompt=True, tokenize=False
        ),
        add_special_tokens=False,
    ).input_ids
    full_answer = tokenizer(long_answer, add_special_tokens=False).input_ids
    assert list(e.prompt_ids) == full_prompt[-40:]  # the generation prompt survives
    assert list(e.completion_ids) == full_answer[:24]  # 64 - 40 tokens of room
    assert report.truncated_prompts == 1 and report.truncated_completions == 2


def test_lengths_that_leave_no_room_for_a_completion_are_refused():
    with pytest.raises(EncodeError, match="too small for any completion"):
        Lengths(max_length=32, max_prompt_length=32)


def test_boundary_merge_is_counted_and_noted_not_warned(tokenizer, caplog):
    # A generation prompt ending in a space: byte-level BPE glues the space to the next
    # word, so prompt+completion tokenizes differently from prompt, then completion.
    # Training encodes them as the server generates, so there is nothing to change.
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %} Answer: "
    with caplog.at_level(logging.INFO, logger="pipeline.training.encode"):
        _, report = encode_records(
            [Example(None, MESSAGES, "tea is nice", True)], tokenizer, Lengths()
        )
    assert report.boundary_mismatches == 1
    (noted,) = [r for r in caplog.records if "tokenize differently" in r.getMessage()]
    assert noted.levelno == logging.INFO


def test_raw_prompts_need_no_chat_template(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(EncodeError, match="no chat template"):
        encode_records([Example("Q:", None, "A", True)], tokenizer, Lengths())
    [e], _ = encode_records(
        [Example("Q:", None, "A", True)], tokenizer, Lengths(), prompt_format="raw"
    )
    assert list(e.prompt_ids) == tokenizer("Q:", add_special_tokens=False).input_ids


def test_content_parts_render_as_their_text_joined_by_newlines(tokenizer):
    parts = json.dumps(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Tell me"},
                    {"type": "text", "text": "about tea."},
                ],
            }
        ]
    )
    plain = json.dumps([{"role": "user", "content": "Tell me\nabout tea."}])
    [a], _ = encode_records([Example(None, parts, "Yes.", True)], tokenizer, Lengths())
    [b], _ = encode_records([Example(None, plain, "Yes.", True)], tokenizer, Lengths())
    assert a == b


def test_a_prompt_with_an_image_is_left_out_and_counted_not_fatal(tokenizer, caplog):
    image = json.dumps(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            }
        ]
    )
    records = [Example(None, image, "A cat.", True), Example(None, MESSAGES, "Yes.", True)]
    with caplog.at_level(logging.WARNING):
        encoded, report = encode_records(records, tokenizer, Lengths())
    assert (len(encoded), report.kept, report.dropped_unrenderable) == (1, 1, 1)
    assert "'image_url' part" in caplog.text and "--chat-template" in caplog.text
    with pytest.raises(EncodeError, match="renders as text"):
        encode_records(records[:1], tokenizer, Lengths())


def test_tool_turns_reach_the_template_as_serving_prepares_them():
    from pipeline.training.encode import prompt_messages

    turns = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "w", "arguments": '{"c": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": [{"type": "text", "text": "4 C"}]},
    ]
    rendered = prompt_messages(None, json.dumps(turns))
    assert rendered[1]["content"] == ""
    assert rendered[1]["tool_calls"][0]["function"]["arguments"] == {"c": 1}
    assert rendered[2] == {"role": "tool", "tool_call_id": "1", "content": "4 C"}
