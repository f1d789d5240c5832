"""Recorded prompts to replay: the three line shapes, and a bad line named."""

from __future__ import annotations

import json

import pytest

from connectors.feedback.prompts_file import read_prompts


def test_recorded_prompts_in_three_shapes_and_a_bad_line_named(tmp_path) -> None:
    path = tmp_path / "traffic.jsonl"
    lines = [
        json.dumps("plain text"),
        json.dumps({"prompt": "as a prompt"}),
        "",
        json.dumps(
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
        ),
    ]
    path.write_text("\n".join(lines) + "\n")
    assert read_prompts(path) == [
        [{"role": "user", "content": "plain text"}],
        [{"role": "user", "content": "as a prompt"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
    ]
    path.write_text(json.dumps("ok") + "\n" + json.dumps({"text": "what?"}) + "\n")
    with pytest.raises(ValueError, match=r"traffic.jsonl:2 is not a prompt"):
        read_prompts(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(path)
