"""`kto-loop import`: exports of Open WebUI, LangSmith, Langfuse and OpenAI-style logs
become the events the consumer accepts, what cannot be mapped is reported with where
it was, and importing an export twice stores no vote twice.

The fixtures under tests/data/import/ are written by hand from each tool's documented
export format (see the importers' docstrings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from connectors.feedback.import_files import ImportInputError, read_records
from connectors.feedback.snapshots import read_snapshot
from connectors.feedback.store import FeedbackStore
from flows.cli import app
from pipeline.feedback.events import EventParser
from pipeline.feedback.imports import Checked, ImportOptions, Mapped, Unmapped, check
from pipeline.feedback.imports import langfuse as import_langfuse
from pipeline.feedback.imports import langsmith as import_langsmith
from pipeline.feedback.imports import openai as import_openai
from pipeline.feedback.imports import openwebui as import_openwebui
from pipeline.feedback.records import FeedbackRows
from pipeline.feedback.votes import snapshot_of_rows
from tests.conftest import HASH_KEY, KafkaSetup, wait_until

DATA = Path(__file__).parent / "data" / "import"
ROOT = Path(__file__).resolve().parent.parent
IMPORTERS = {
    "openwebui": import_openwebui,
    "langsmith": import_langsmith,
    "langfuse": import_langfuse,
    "openai": import_openai,
}
runner = CliRunner()


def _map(fmt: str, path: Path | None = None, **options: Any) -> list[Mapped | Unmapped]:
    records = read_records(path or DATA / fmt)
    return list(IMPORTERS[fmt].map_export(records, ImportOptions(**options)))


def _events(items: list[Mapped | Unmapped]) -> dict[str, dict[str, Any]]:
    return {i.where: i.event for i in items if isinstance(i, Mapped)}


def _unmapped(items: list[Mapped | Unmapped]) -> dict[str, str]:
    return {i.where: i.reason for i in items if isinstance(i, Unmapped)}


def _parser() -> EventParser:
    return EventParser(HASH_KEY.encode())


def _snapshot_of(items: list[Mapped | Unmapped]) -> Any:
    """The snapshot the events would make, built as `kto-loop snapshot` builds one."""
    rows = FeedbackRows("import", 0)
    for offset, item in enumerate(check(items, _parser())):
        if isinstance(item, Checked):
            rows.append(item.event, offset, None)
    import datetime as dt

    return snapshot_of_rows(rows.to_table(dt.datetime.now(dt.UTC), "test"))


# -- Open WebUI -------------------------------------------------------------------------


def test_openwebui_vote_maps_the_rated_branch_with_the_system_prompt() -> None:
    events = _events(_map("openwebui"))
    first = events["feedback-export-2025-03-01.json[0]"]
    assert first == {
        "schema": 1,
        "event_id": "openwebui:fb-1:1740830200",
        "ts": "2025-03-01T11:56:40Z",
        "conversation_id": "chat-1",
        "message_id": "m-a1",
        "user_id": "u-alice",
        "feedback": "like",
        # m-a1 was rated, not the chat's current branch m-a1b
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "response": "Paris.",
        "model": "llama3.1:8b",
    }


def test_openwebui_string_rating_and_multi_turn_history() -> None:
    event = _events(_map("openwebui"))["feedback-export-2025-03-01.json[1]"]
    assert event["feedback"] == "dislike"  # data.rating "-1"
    assert [m["content"] for m in event["messages"]] == [
        "How do I sort a list in Python?",
        "Use sorted(xs) or xs.sort().",
        "And in reverse?",
    ]
    assert event["response"] == "I cannot help with that."
    assert event["model"] == "qwen2.5:7b"


def test_openwebui_attached_image_becomes_an_image_part() -> None:
    event = _events(_map("openwebui"))["feedback-export-2025-03-01.json[5]"]
    assert event["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]


def test_openwebui_chat_with_only_a_messages_list_maps_from_it(tmp_path: Path) -> None:
    # Chats saved before the history tree keep only `chat.messages`, same ids and parents.
    record = json.loads((DATA / "openwebui" / "feedback-export-2025-03-01.json").read_text())[0]
    chat = record["snapshot"]["chat"]["chat"]
    chat["messages"] = list(chat.pop("history")["messages"].values())
    (tmp_path / "old.json").write_text(json.dumps([record]))
    (event,) = _events(_map("openwebui", tmp_path / "old.json")).values()
    assert event["messages"][-1] == {"role": "user", "content": "What is the capital of France?"}
    assert event["response"] == "Paris."


def test_openwebui_report_names_each_record_it_could_not_map() -> None:
    assert _unmapped(_map("openwebui")) == {
        "feedback-export-2025-03-01.json[2]": "no_vote",
        "feedback-export-2025-03-01.json[3]": "message_not_in_snapshot",
        "feedback-export-2025-03-01.json[4]": "no_model",
    }
    fallback = _events(_map("openwebui", model="llama3.1:8b"))
    assert fallback["feedback-export-2025-03-01.json[4]"]["model"] == "llama3.1:8b"


def test_openwebui_updated_vote_supersedes_and_a_repeated_export_adds_nothing() -> None:
    items = _map("openwebui")
    events = _events(items)
    old, new = (
        events["feedback-export-2025-03-01.json[0]"],
        events["feedback-export-2025-03-02.json[0]"],
    )
    assert (old["feedback"], new["feedback"]) == ("like", "dislike")
    assert new["event_id"] == "openwebui:fb-1:1740916800" != old["event_id"]
    # fb-2 is in both exports unchanged: the same event
    assert (
        events["feedback-export-2025-03-01.json[1]"] == events["feedback-export-2025-03-02.json[1]"]
    )
    snap = _snapshot_of(items)
    assert snap.stats.superseded == 1 and snap.stats.duplicates == 1
    labels = {r.completion: r.desirable for r in snap.records("train") + snap.records("heldout")}
    assert labels["Paris."] is False


# -- LangSmith --------------------------------------------------------------------------


def test_langsmith_feedback_on_a_chain_rates_its_llm_call() -> None:
    event = _events(_map("langsmith"))["feedback-2025-03-01.jsonl:1"]
    assert event == {
        "schema": 1,
        "event_id": "langsmith:f-1:2025-03-01T12:00:05.000000+00:00",
        "ts": "2025-03-01T12:00:05+00:00",
        "conversation_id": "thread-9",
        "message_id": "r-chain-1",
        "user_id": "user-1",
        "feedback": "like",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What does KTO stand for?"},
        ],
        "response": "Kahneman-Tversky Optimization.",
        "model": "gpt-4o-mini",
    }


def test_langsmith_multi_part_and_tool_turns_keep_their_form() -> None:
    event = _events(_map("langsmith"))["feedback-2025-03-01.jsonl:2"]
    assert event["feedback"] == "dislike"  # score false
    assert event["user_id"] == "langsmith:f-2"  # no user: the record is its own voter
    assert event["conversation_id"] == "sess-2"
    assert event["model"] == "gpt-4o"
    assert event["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the weather in Oslo?"},
                {"type": "text", "text": "Use Celsius."},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"temp_c": -3}', "tool_call_id": "call_1"},
    ]


def test_langsmith_report_has_line_numbers_and_reasons() -> None:
    assert _unmapped(_map("langsmith")) == {
        "feedback-2025-03-01.jsonl:3": "other_key",
        "feedback-2025-03-01.jsonl:4": "not_json",
        "feedback-2025-03-01.jsonl:5": "neutral_score",
        "feedback-2025-03-01.jsonl:6": "run_not_found",
        "feedback-2025-03-01.jsonl:7": "no_model",
        "feedback-2025-03-01.jsonl:8": "no_response_text",
    }


def test_langsmith_any_key_and_threshold_options() -> None:
    events = _events(_map("langsmith", keys=None, threshold=0.95))
    assert events["feedback-2025-03-01.jsonl:3"]["feedback"] == "dislike"  # 0.9 < 0.95
    assert events["feedback-2025-03-01.jsonl:5"]["feedback"] == "dislike"  # 0.5 < 0.95


def test_langsmith_modified_feedback_supersedes() -> None:
    snap = _snapshot_of(_map("langsmith"))
    assert snap.stats.superseded == 1
    labels = {r.completion: r.desirable for r in snap.records("train") + snap.records("heldout")}
    assert labels["Kahneman-Tversky Optimization."] is False


# -- Langfuse ---------------------------------------------------------------------------


def test_langfuse_observation_score_maps_the_generation() -> None:
    event = _events(_map("langfuse"))["scores-page-1.json:data[0]"]
    assert event == {
        "schema": 1,
        "event_id": "langfuse:sc-1:2025-03-01T10:05:00.100Z",
        "ts": "2025-03-01T10:05:00.100000+00:00",
        "conversation_id": "lf-session-1",
        "message_id": "ob-1",
        "user_id": "lf-user-1",
        "feedback": "like",
        "messages": [
            {"role": "system", "content": "You are a travel guide."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Plan a day in Rome."},
                    {"type": "text", "text": "I like museums."},
                ],
            },
        ],
        "response": "Start at the Vatican Museums, then walk to the Pantheon.",
        "model": "mistral-7b-instruct",
    }


def test_langfuse_trace_score_categories_and_model_fallback() -> None:
    items = _map("langfuse", model="base-7b", categories={"helpful": "like"})
    events = _events(items)
    trace_vote = events["scores-page-1.json:data[1]"]
    assert trace_vote["feedback"] == "dislike"  # NUMERIC 0
    assert trace_vote["messages"] == [
        {"role": "user", "content": "How many legs does a spider have?"}
    ]
    assert (trace_vote["response"], trace_vote["model"]) == ("Six.", "base-7b")
    assert events["scores-page-1.json:data[2]"]["feedback"] == "like"
    assert _unmapped(items) == {
        "scores-page-1.json:data[3]": "other_key",
        "scores-page-1.json:data[4]": "not_an_answer",
    }
    assert _unmapped(_map("langfuse")) == {
        "scores-page-1.json:data[1]": "no_model",
        "scores-page-1.json:data[2]": "categorical_unmapped",
        "scores-page-1.json:data[3]": "other_key",
        "scores-page-1.json:data[4]": "not_an_answer",
    }


def test_langfuse_edited_score_supersedes() -> None:
    events = _events(_map("langfuse"))
    edited = events["scores-page-2.json:data[0]"]
    assert edited["event_id"] == "langfuse:sc-1:2025-03-02T08:00:00.000Z"
    assert edited["feedback"] == "dislike"
    assert _snapshot_of(_map("langfuse")).stats.superseded == 1


# -- OpenAI-style logs -----------------------------------------------------------------


def test_openai_stored_completion_with_parts() -> None:
    event = _events(_map("openai"))["chat-logs.jsonl:1"]
    assert event == {
        "schema": 1,
        "event_id": "openai:chatcmpl-A1:1740823200:like",
        "ts": "2025-03-01T10:00:00Z",
        "conversation_id": "conv-1",
        "message_id": "chatcmpl-A1",
        "user_id": "oa-user-1",
        "feedback": "like",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Summarise this:"},
                    {"type": "text", "text": "KTO learns from thumbs."},
                ],
            },
        ],
        "response": "KTO trains on likes and dislikes.",
        "model": "gpt-4o-mini-2024-07-18",
    }


def test_openai_request_response_pair_keeps_tool_turns() -> None:
    event = _events(_map("openai"))["chat-logs.jsonl:2"]
    assert (event["message_id"], event["user_id"], event["feedback"]) == (
        "chatcmpl-B2",
        "oa-user-2",
        "dislike",
    )
    assert event["messages"][1]["tool_calls"][0]["function"]["name"] == "calculator"
    assert event["messages"][2] == {"role": "tool", "content": "391", "tool_call_id": "call_9"}
    assert event["model"] == "gpt-4o-2024-08-06"


def test_openai_retraction_and_report() -> None:
    items = _map("openai")
    retract = _events(items)["chat-logs.jsonl:4"]
    assert retract == {
        "schema": 1,
        "event_id": "openai:chatcmpl-A1:2025-03-02T08:00:00Z:retract",
        "ts": "2025-03-02T08:00:00+00:00",
        "conversation_id": "conv-1",
        "message_id": "chatcmpl-A1",
        "user_id": "oa-user-1",
        "feedback": "retract",
    }
    assert _unmapped(items) == {
        "chat-logs.jsonl:3": "no_model",
        "chat-logs.jsonl:5": "no_rating",
        "chat-logs.jsonl:6": "not_json",
        "chat-logs.jsonl:7": "unknown_rating",
        "chat-logs.jsonl:8": "no_response_text",
    }
    assert _snapshot_of(items).stats.retracted == 1


def test_openai_record_without_id_gets_a_stable_content_id() -> None:
    first = _events(_map("openai", model="gpt-4o-mini"))["chat-logs.jsonl:3"]
    again = _events(_map("openai", model="gpt-4o-mini"))["chat-logs.jsonl:3"]
    assert first == again
    assert first["messages"] == [{"role": "user", "content": "Name a prime number."}]
    assert (first["response"], first["feedback"]) == ("7", "like")


def test_openai_rating_field_option() -> None:
    items = _map("openai", rating_fields=("metadata.feedback",))
    assert list(_events(items)) == ["chat-logs.jsonl:1"]


# -- every format ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(IMPORTERS))
def test_every_fixture_event_passes_the_consumers_parser(fmt: str) -> None:
    items = _map(fmt, model="fallback-model", categories={"helpful": "like"})
    checked = list(check(items, _parser()))
    assert not [i for i in checked if isinstance(i, Unmapped) and i.reason.startswith("invalid")]
    assert sum(isinstance(i, Checked) for i in checked) == len(_events(items)) > 0


@pytest.mark.parametrize("fmt", sorted(IMPORTERS))
def test_importing_again_gives_identical_event_ids(fmt: str) -> None:
    assert _events(_map(fmt)) == _events(_map(fmt))


def test_an_invalid_mapped_event_is_reported_with_the_consumers_reason() -> None:
    event = {"schema": 1, "event_id": "x", "ts": "2025-01-01T00:00:00Z", "conversation_id": "c",
             "message_id": "m", "feedback": "like", "prompt": "p", "response": "r"}  # fmt: skip
    (item,) = check([Mapped("f.json[0]", event)], _parser())
    assert item == Unmapped(
        "f.json[0]",
        "invalid_event:missing_field",
        "`model` is required: the base model that answered",
    )


def test_a_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "export.json"
    bad.write_text("id,rating\n1,up\n")
    with pytest.raises(ImportInputError, match="is not JSON"):
        list(read_records(bad))


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_a_too_deep_record_in_an_array_is_reported_and_the_rest_imported(tmp_path: Path) -> None:
    records = json.loads((DATA / "openwebui" / "feedback-export-2025-03-01.json").read_text())
    deep = '{"id": "fb-deep", "data": {"rating": 1}, "meta": ' + _deep(100_000) + "}"
    parts = [json.dumps(r) for r in records]
    path = tmp_path / "export.json"
    path.write_text("[" + ",\n".join([parts[0], deep, *parts[1:]]) + "]")
    items = _map("openwebui", path)
    expected = _map("openwebui", DATA / "openwebui" / "feedback-export-2025-03-01.json")
    assert _unmapped(items)["export.json[1]"] == "too_deep"
    assert sorted(map(str, _events(items).values())) == sorted(map(str, _events(expected).values()))


def test_an_array_is_streamed_its_first_events_come_before_its_end_is_read(
    tmp_path: Path,
) -> None:
    record = json.loads((DATA / "openwebui" / "feedback-export-2025-03-01.json").read_text())[0]
    records = [json.dumps({**record, "id": f"fb-{i}"}) for i in range(2_000)]
    path = tmp_path / "export.json"
    path.write_text("[" + ",\n".join(records[:1_000]) + ",\n")  # the export still being written
    assert path.stat().st_size > 1 << 20
    items = import_openwebui.map_export(read_records(path), ImportOptions())
    first = next(items)
    assert isinstance(first, Mapped) and first.where == "export.json[0]"
    with path.open("a") as f:
        f.write(",\n".join(records[1_000:]) + "]")
    rest = list(items)
    assert len(rest) == 1_999 and all(isinstance(i, Mapped) for i in rest)
    assert rest[-1].where == "export.json[1999]"


# -- the command ----------------------------------------------------------------------


def _invoke(*args: str) -> Any:
    return runner.invoke(app, ["import", *args], env={"KTO_LOOP_EVENTS__USER_HASH_KEY": HASH_KEY})


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--from", "openwebui", "/nonexistent/export.json"], "does not exist"),
        (["--from", "chatgpt", str(DATA / "openai")], "unknown format"),
        (["--from", "trl", str(DATA / "openai")], "kto-loop snapshot --data"),
        (["--from", "openai", "--to", "s3", str(DATA / "openai")], "--to must be one of"),
        (["--from", "openai", "--category", "meh", str(DATA / "openai")], "VALUE=like"),
        (["--from", "openai", "--threshold", "1.5", str(DATA / "openai")], "threshold"),
    ],
)
def test_bad_input_exits_2_saying_what_is_wrong(args: list[str], says: str, tmp_path: Path) -> None:
    result = _invoke(*args, "--report", str(tmp_path / "r.jsonl"))
    assert result.exit_code == 2, result.output
    assert says in result.output


def test_a_file_that_is_not_json_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "export.json"
    bad.write_text("<html>login required</html>")
    result = _invoke("--from", "openwebui", str(bad), "--report", str(tmp_path / "r.jsonl"))
    assert result.exit_code == 2
    assert "is not JSON" in result.output


def test_import_to_snapshot_holds_what_the_mapping_says(tmp_path: Path) -> None:
    report = tmp_path / "report.jsonl"
    result = _invoke(
        "--from", "openwebui", str(DATA / "openwebui"), "--to", "snapshot",
        "--out", str(tmp_path / "snaps"), "--report", str(report),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    expected = _snapshot_of(_map("openwebui"))
    assert summary["snapshot"] == expected.id
    assert (summary["read"], summary["events"], summary["unmapped"]) == (8, 5, 3)
    assert summary["unmapped_by_reason"] == {
        "message_not_in_snapshot": 1, "no_model": 1, "no_vote": 1,
    }  # fmt: skip
    snap = read_snapshot(summary["path"])
    got = {(r.completion, r.desirable) for r in snap.records("train") + snap.records("heldout")}
    assert got == {
        ("Paris.", False),
        ("I cannot help with that.", False),
        ("A cat on a sofa.", True),
    }
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert {(x["where"], x["reason"]) for x in lines} == set(_unmapped(_map("openwebui")).items())


def test_a_too_deep_line_is_reported_and_the_rest_imported(tmp_path: Path) -> None:
    lines = (DATA / "openai" / "chat-logs.jsonl").read_text().splitlines()
    deep = '{"id": "chatcmpl-deep", "metadata": {"feedback": "up"}, "request": ' + _deep(100_000)
    export = tmp_path / "chat-logs.jsonl"
    export.write_text("\n".join([lines[0], deep + "}", *lines[1:]]) + "\n")
    report = tmp_path / "report.jsonl"
    result = _invoke(
        "--from", "openai", str(export), "--to", "snapshot", "--out", str(tmp_path / "snaps"),
        "--report", str(report),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["events"] == len(_events(_map("openai")))
    assert summary["unmapped_by_reason"]["too_deep"] == 1
    reported = [json.loads(line) for line in report.read_text().splitlines()]
    assert {"where": "chat-logs.jsonl:2", "reason": "too_deep"}.items() <= next(
        r for r in reported if r["reason"] == "too_deep"
    ).items()


def test_import_to_kafka_twice_stores_no_vote_twice(
    kafka_setup: KafkaSetup, ingest_processes: Any, tmp_path: Path
) -> None:
    config = kafka_setup.config_file()
    env = {**os.environ, "KTO_LOOP_EVENTS__USER_HASH_KEY": HASH_KEY}
    sent = []
    for attempt in range(2):
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "import", "--from", "openwebui",
             str(DATA / "openwebui"), "--to", "kafka", "--config", str(config),
             "--report", str(tmp_path / f"report-{attempt}.jsonl")],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        sent.append(json.loads(out.stdout.strip().splitlines()[-1])["sent"])
    assert sent == [5, 5]

    store = FeedbackStore(str(kafka_setup.tmp / "store"))
    proc = ingest_processes(config, tmp_path / "ingest.log")
    wait_until(lambda: store.count() >= 10, 120, "both imports stored")
    code, _ = proc.terminate()
    assert code == 0, proc.log()

    rows = store.read()
    # 5 events per import; fb-2 is in both exports of one import, unchanged: 4 distinct
    assert len(rows) == 10 and rows["event_id"].nunique() == 4
    snap = snapshot_of_rows(store.read_arrow())
    direct = _snapshot_of(_map("openwebui"))
    assert snap.id == direct.id
    assert snap.stats.votes == direct.stats.votes == 3
    assert snap.stats.duplicates == 5 + direct.stats.duplicates
