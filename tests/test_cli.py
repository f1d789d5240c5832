"""The command line: clear refusals before touching Kafka, and the live status line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from connectors.ingest import IngestStats
from flows.cli import _StatusLine, app
from pipeline.events import json_schema

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
