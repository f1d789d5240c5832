"""The command line: clear refusals before touching Kafka, and the live status line."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from connectors.config import load_settings
from connectors.feedback.ingest import IngestStats
from flows.cli import app
from flows.ingest_cli import _StatusLine
from pipeline.feedback.events import json_schema
from tests.conftest import HASH_KEY

runner = CliRunner()


def test_ingest_without_a_user_hash_key_says_how_to_set_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KTO_LOOP_EVENTS__USER_HASH_KEY", raising=False)
    config = tmp_path / "c.toml"
    config.write_text('[kafka]\ntopic = "fb"\n')
    result = runner.invoke(app, ["ingest", "--config", str(config), "--no-status"])
    assert result.exit_code == 2
    assert "KTO_LOOP_EVENTS__USER_HASH_KEY" in result.output


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[ingest]\nbatch_max_seconds = 0\n")
    result = runner.invoke(app, ["ingest", "--config", str(config)])
    assert result.exit_code == 2
    assert "[ingest] batch_max_seconds" in result.output


def test_schema_command_prints_the_published_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == json_schema()


def test_status_line_shows_rate_lag_and_dead_letters() -> None:
    stats = IngestStats(state="consuming", assigned=("fb[0]", "fb[1]"))
    line = _StatusLine(stats)
    console = Console(width=200, record=True)
    console.print(line)
    stats.consumed, stats.stored, stats.dead_lettered, stats.lag = 12_345, 12_000, 7, 345
    console.print(line)
    text = console.export_text().splitlines()[-1]
    assert "consuming" in text
    assert "consumed     12,345" in text
    assert "/s" in text
    assert "lag      345" in text
    assert "dead letters 7" in text
    assert "partitions 2" in text


def test_produce_sample_to_an_absent_broker_exits_3_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deploy.local.broker import free_port

    port = free_port()
    monkeypatch.setenv("KTO_LOOP_KAFKA__BOOTSTRAP_SERVERS", f'["127.0.0.1:{port}"]')
    result = runner.invoke(app, ["produce-sample", "--events", "3"])
    assert result.exit_code == 3
    assert f"127.0.0.1:{port}" in result.output


def test_produce_sample_with_an_adapter_not_alias_at_version_exits_2() -> None:
    result = runner.invoke(app, ["produce-sample", "--events", "3", "--adapter", "chat-v1"])
    assert result.exit_code == 2
    assert "alias@vN" in result.output and "Traceback" not in result.output


def _store_with_sample_feedback(root: Path, n: int = 400) -> None:
    import datetime as dt

    from connectors.feedback.store import FEEDBACK, FeedbackStore
    from pipeline.feedback.events import parse_event
    from pipeline.feedback.records import FeedbackRows
    from pipeline.feedback.sample import sample_events

    rows = FeedbackRows("fb", 0)
    for offset, event in enumerate(sample_events(n)):
        rows.append(parse_event(json.dumps(event).encode(), user_hash_key=b"k"), offset, None)
    table = rows.to_table(dt.datetime(2026, 5, 1, tzinfo=dt.UTC), "test")
    FeedbackStore(str(root)).write_batch(FEEDBACK, "fb", 0, 0, n - 1, table)


def _snapshot_config(tmp_path: Path) -> Path:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\nurl = "{tmp_path / "store"}"\n'
        f'[snapshot]\nout_dir = "{tmp_path / "snaps"}"\nheldout_fraction = 0.2\n'
    )
    return config


def test_snapshot_of_the_store_writes_files_and_ends_with_a_json_line(tmp_path: Path) -> None:
    from connectors.feedback.snapshots import read_snapshot

    _store_with_sample_feedback(tmp_path / "store")
    config = _snapshot_config(tmp_path)
    result = runner.invoke(app, ["snapshot", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "retracted" in result.stdout and "train desirable" in result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    path = Path(summary["path"])
    assert path == tmp_path / "snaps" / summary["snapshot"]
    assert (path / "records.parquet").is_file() and (path / "snapshot.json").is_file()
    snap = read_snapshot(path)
    assert snap.id == summary["snapshot"]
    assert summary["train_desirable"] == snap.counts.train_desirable
    assert summary["examples"] == len(snap.table) > 0

    again = runner.invoke(app, ["snapshot", "--config", str(config)])
    assert json.loads(again.stdout.strip().splitlines()[-1])["snapshot"] == summary["snapshot"]


def test_snapshot_after_store_compact_is_the_full_rebuilds(tmp_path: Path) -> None:
    import datetime as dt

    from connectors.feedback.store import FEEDBACK, FeedbackStore
    from pipeline.feedback.events import parse_event
    from pipeline.feedback.records import FeedbackRows
    from pipeline.feedback.sample import sample_events
    from pipeline.feedback.votes import FOLD_COLUMNS, snapshot_of_rows

    _store_with_sample_feedback(tmp_path / "store", n=200)
    config = _snapshot_config(tmp_path)
    first = runner.invoke(app, ["snapshot", "--config", str(config)])
    assert first.exit_code == 0, first.output
    store = FeedbackStore(str(tmp_path / "store"))
    # More batches after the first snapshot, then compacted together with the first.
    later = list(sample_events(200, seed=7))
    for start in range(200, 400, 50):
        rows = FeedbackRows("fb", 0)
        for offset, event in enumerate(later[start - 200 : start - 150], start=start):
            rows.append(parse_event(json.dumps(event).encode(), user_hash_key=b"k"), offset, None)
        table = rows.to_table(dt.datetime(2026, 5, 2, tzinfo=dt.UTC), "test")
        store.write_batch(FEEDBACK, "fb", 0, start, start + 49, table)
    compacted = runner.invoke(app, ["store", "--config", str(config), "--compact"])
    assert compacted.exit_code == 0, compacted.output
    assert json.loads(compacted.stderr.strip().splitlines()[-1])["compacted"] == {
        "files_merged": 5,
        "files_written": 1,
    }
    assert "feedback rows" in compacted.stdout and "400" in compacted.stdout
    again = runner.invoke(app, ["snapshot", "--config", str(config)])
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    options = load_settings(config).snapshot
    full = snapshot_of_rows(store.read_arrow(FEEDBACK, FOLD_COLUMNS), options)
    assert summary["snapshot"] == full.id


def test_snapshot_of_a_trl_file_goes_to_out(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
        + "\n"
        + json.dumps({"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"})
        + "\n"
        + json.dumps({"prompt": "Odd row", "chosen": 7, "rejected": "x"})
        + "\n"
    )
    out = tmp_path / "elsewhere"
    result = runner.invoke(
        app,
        [
            "snapshot",
            "--config",
            str(_snapshot_config(tmp_path)),
            "--data",
            str(data),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["examples"] == 4
    assert summary["skipped_rows"] == 1
    assert "1 of 3 rows skipped" in result.output and "chosen at row 3 is int 7" in result.output
    assert Path(summary["path"]).parent == out
    assert (
        summary["train_desirable"] + summary["heldout_desirable"],
        summary["train_undesirable"] + summary["heldout_undesirable"],
    ) == (2, 2)


def test_snapshot_of_bad_data_or_an_empty_store_exits_2_with_the_reason(tmp_path: Path) -> None:
    config = _snapshot_config(tmp_path)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c", "label": "maybe"}) + "\n")
    result = runner.invoke(app, ["snapshot", "--config", str(config), "--data", str(data)])
    assert result.exit_code == 2
    assert "label at row 1 is str 'maybe'" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(app, ["snapshot", "--config", str(config)])
    assert result.exit_code == 2
    assert "no feedback rows" in result.output
    assert not (tmp_path / "snaps").exists()


def test_simulate_with_no_broker_exits_3_before_any_chat(tmp_path: Path) -> None:
    from deploy.local.broker import free_port

    config = tmp_path / "c.toml"
    # Neither a broker nor a vLLM server listens: the broker is checked first.
    config.write_text(
        f'[kafka]\nbootstrap_servers = ["127.0.0.1:{free_port()}"]\n'
        "[ingest]\nconnect_timeout_seconds = 1\n"
        f'[serving]\nreplicas = ["http://127.0.0.1:{free_port()}"]\n'
    )
    # A process of its own, as a user runs it: its log lines and exit code are real.
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "simulate", "--config", str(config), "--chats", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KTO_LOOP_EVENTS__USER_HASH_KEY": HASH_KEY},
        cwd=Path(__file__).resolve().parent.parent,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "no Kafka broker reachable" in output
    assert "users chatting" not in output and "Traceback" not in output


def test_train_with_an_out_of_range_flag_exits_2_before_any_work(tmp_path: Path) -> None:
    from deploy.local.synthetic import unpaired_examples

    data = tmp_path / "data.jsonl"
    unpaired_examples(64, seed=0).to_json(data, orient="records", lines=True)
    out = tmp_path / "adapter"
    args = ["train", "--base-model", str(tmp_path / "no-model"), "--data", str(data)]
    result = runner.invoke(app, [*args, "--out", str(out), "--max-steps", "0"])
    assert result.exit_code == 2
    assert "max_steps" in result.output and "Traceback" not in result.output
    assert not out.exists()


def _registry_config(tmp_path: Path) -> Path:
    from deploy.local.broker import free_port

    config = tmp_path / "c.toml"
    config.write_text(
        f'[registry]\nurl = "{tmp_path / "adapters"}"\n'
        f'[serving]\nreplicas = ["http://127.0.0.1:{free_port()}"]\n'
    )
    return config


@pytest.mark.parametrize("given", ["out/adapter", "./adapter", "~/no-such-adapter-here"])
def test_publish_of_a_path_that_does_not_exist_says_there_is_no_adapter_there(
    tmp_path: Path, given: str
) -> None:
    config = _registry_config(tmp_path)
    args = ["publish", "--adapter", given, "--alias", "chat", "--config", str(config)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert f"no adapter directory at {given}" in result.output
    assert "version name" not in result.output


def test_publish_of_an_unregistered_version_names_the_versions_there_are(tmp_path: Path) -> None:
    config = _registry_config(tmp_path)
    args = ["publish", "--adapter", "v7", "--alias", "chat", "--config", str(config)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "no version v7" in result.output and "none yet" in result.output
    result = runner.invoke(app, [*args[:2], "my-adapter", *args[3:]])
    assert result.exit_code == 2
    assert "neither an adapter directory nor a version name" in result.output


def _cycle_config(tmp_path: Path, serving: str = "", extra: str = "") -> Path:
    config = tmp_path / "cycle.toml"
    config.write_text(
        f'[serving]\nreplicas = ["http://127.0.0.1:9"]\n{serving}\n'
        f'[cycle]\nwork_dir = "{tmp_path / "cycles"}"\n{extra}\n'
        f'[store]\nurl = "{tmp_path / "store"}"\n'
    )
    return config


@pytest.mark.parametrize("command", ["run", "schedule"])
def test_a_cycle_without_a_base_model_exits_2_before_prefect_starts(
    tmp_path: Path, command: str
) -> None:
    config = _cycle_config(tmp_path)
    result = runner.invoke(app, [command, "--config", str(config)])
    assert result.exit_code == 2
    assert "[serving] base_model" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cycles").exists()  # no Prefect server, no run directory


def test_a_cycle_names_every_missing_file_and_unloadable_scorer_at_once(tmp_path: Path) -> None:
    serving = f'base_model = "{tmp_path / "no-model"}"'
    extra = f'chat_template = "{tmp_path / "t.jinja"}"\n[gate]\nscorer = "no_such_module:f"'
    config = _cycle_config(tmp_path, serving, extra)
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2
    for key in ("[serving] base_model", "[cycle] chat_template", "[gate] scorer"):
        assert key in result.output
    assert not (tmp_path / "cycles").exists()


def _train_data(tmp_path: Path, n: int) -> Path:
    from deploy.local.synthetic import unpaired_examples

    data = tmp_path / "data.jsonl"
    unpaired_examples(n, seed=0).to_json(data, orient="records", lines=True)
    return data


def test_train_without_a_base_model_names_the_flag_and_the_key(tmp_path: Path) -> None:
    data, out = _train_data(tmp_path, 64), tmp_path / "adapter"
    config = _cycle_config(tmp_path)
    args = ["train", "--data", str(data), "--out", str(out), "--config", str(config)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--base-model" in result.output and "[serving] base_model" in result.output
    assert not out.exists()


def test_train_takes_the_base_model_from_the_config(tmp_path: Path) -> None:
    data, out = _train_data(tmp_path, 4), tmp_path / "adapter"
    args = ["train", "--data", str(data), "--out", str(out), "--config"]
    wrong = _cycle_config(tmp_path, f'base_model = "{tmp_path / "none"}"')
    result = runner.invoke(app, [*args, str(wrong)])
    assert result.exit_code == 2
    assert f"[serving] base_model: no model directory at {tmp_path / 'none'}" in result.output
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    right = _cycle_config(tmp_path, f'base_model = "{model}"')
    result = runner.invoke(app, [*args, str(right)])
    # Accepted: the run goes on to the data, too little of it to train on.
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "skipped"


def test_publish_with_a_base_model_that_is_no_model_exits_2_naming_the_key(
    tmp_path: Path,
) -> None:
    config = _cycle_config(tmp_path, f'base_model = "{tmp_path}"')
    args = ["publish", "--adapter", "v1", "--alias", "chat", "--config", str(config)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "[serving] base_model" in result.output and "config.json" in result.output


def _local_stack(tmp_path: Path, *extra: str) -> list[str]:
    from deploy.local.broker import free_port

    ports = [str(free_port()) for _ in range(3)]
    return [
        "local-stack",
        "--root",
        str(tmp_path / "local"),
        "--kafka-port",
        ports[0],
        "--vllm-port",
        ports[1],
        "--prefect-port",
        ports[2],
        *extra,
    ]


def test_local_stack_without_a_model_directory_exits_2_before_starting_anything(
    tmp_path: Path,
) -> None:
    result = runner.invoke(app, _local_stack(tmp_path, "--model", str(tmp_path / "none")))
    assert result.exit_code == 2
    assert f"--model: no model directory at {tmp_path / 'none'}" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, _local_stack(tmp_path, "--model", str(tmp_path / "empty")))
    assert result.exit_code == 2 and "config.json" in result.output
    assert not (tmp_path / "local").exists()


def _fake_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def test_local_stack_without_the_vllm_venv_says_to_run_make_setup_vllm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KTO_LOOP_VLLM_PYTHON", str(tmp_path / "no-venv/bin/python"))
    result = runner.invoke(app, _local_stack(tmp_path, "--model", str(_fake_model(tmp_path))))
    assert result.exit_code == 2
    assert "make setup-vllm" in result.output
    assert not (tmp_path / "local").exists()


def test_local_stack_refuses_a_port_in_use_and_a_config_that_points_elsewhere(
    tmp_path: Path,
) -> None:
    import socket

    model = _fake_model(tmp_path)
    args = _local_stack(tmp_path, "--model", str(model))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(args[args.index("--vllm-port") + 1])))
        result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "is in use" in result.output and "--vllm-port" in result.output

    config = tmp_path / "mine.toml"
    config.write_text('[kafka]\nbootstrap_servers = ["127.0.0.1:9092"]\n')
    result = runner.invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == 2
    for key in ("[kafka] bootstrap_servers", "[serving] replicas", "[serving] base_model"):
        assert key in result.output
    assert not (tmp_path / "local").exists()


def test_the_local_config_example_points_where_local_stack_listens_by_default() -> None:
    from flows.local_stack_cli import StackOptions, _mismatches

    root = Path(__file__).resolve().parent.parent
    settings = load_settings(root / "deploy/kto-loop.local.toml")
    options = StackOptions(
        model=Path("/models/my-model"),
        root=root / "data/local",
        kafka_port=9092,
        vllm_port=8000,
        prefect_port=4200,
        host="127.0.0.1",
        config=None,
        dtype="auto",
        max_model_len=None,
        max_lora_rank=8,
    )
    assert _mismatches(settings, options, Path("/models/my-model")) == []
    assert _mismatches(settings, options, Path("/models/other"))[0].startswith(
        "[serving] base_model"
    )


def test_local_stack_refuses_a_store_an_earlier_broker_filled(tmp_path: Path) -> None:
    # The broker starts empty and numbers offsets from 0 again: the store would take new
    # votes for ones it holds.
    stored = tmp_path / "local/store/feedback/topic=chat-feedback/partition=2"
    stored.mkdir(parents=True)
    (stored / "00000000000000000000-00000000000000000009.parquet").write_bytes(b"")
    result = runner.invoke(app, _local_stack(tmp_path, "--model", str(_fake_model(tmp_path))))
    assert result.exit_code == 2
    assert "already holds feedback" in result.output and "--root" in result.output
    assert not (tmp_path / "local/logs").exists()


def _commands() -> list[list[str]]:
    group = typer.main.get_command(app)
    return [[], *([name] for name in group.commands)]


def _rendered(args: list[str], width: int) -> list[str]:
    """The lines of `kto-loop ARGS --help` on a terminal `width` columns wide."""
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def _description(lines: list[str]) -> list[str]:
    """The lines between the usage line and the first panel, without the margins."""
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
    return [line.strip() for line in lines[start:end]]


def _paragraphs(lines: list[str]) -> list[str]:
    """The text of each paragraph (lines between blank ones), its lines joined."""
    out, current = [], []
    for line in [*lines, ""]:
        if line:
            current.append(line)
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def _written(help_text: str | None) -> list[str]:
    """The paragraphs of a docstring or a help string, each as one line (`code` is
    shown without its backticks)."""
    text = inspect.cleandoc(help_text or "").replace("`", "")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


@pytest.mark.parametrize("args", _commands(), ids=lambda a: " ".join(a) or "kto-loop")
def test_help_reads_as_paragraphs_wrapped_to_the_terminal(args: list[str]) -> None:
    command = typer.main.get_command(app)
    for name in args:
        command = command.commands[name]
    paragraphs = _written(command.help)
    wide = _rendered(args, 2000)
    # Wide, each paragraph is one line: no line is broken where the source broke it.
    assert [line for line in _description(wide) if line] == paragraphs
    # Narrow, the same paragraphs, rewrapped.
    assert _paragraphs(_description(_rendered(args, 70))) == paragraphs
    rows = [line.strip(" │") for line in wide]
    # Every option's help is shown whole (nothing taken for markup), on its own row.
    for param in command.params:
        for text in _written(getattr(param, "help", None)):
            assert any(text in row for row in rows), f"{param.name}: {text!r} is not shown"
    # A group lists each command with its first paragraph, on one row.
    for name, sub in getattr(command, "commands", {}).items():
        first = _written(sub.help)[0]
        assert any(row.startswith(name) and row.endswith(first) for row in rows), name
