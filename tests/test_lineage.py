"""Lineage: the feedback window a snapshot records (offsets per partition, time range,
votes per class and per producing adapter, or the TRL file), kept out of the content
id, and the chain of versions back to the first."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from connectors.feedback.snapshots import load_training_data, read_snapshot, write_snapshot
from connectors.feedback.store import FEEDBACK, FeedbackStore
from connectors.serving.adapter_registry import AdapterRegistry
from connectors.training.run_dir import write_manifest
from flows.cli import app
from pipeline.feedback import records
from pipeline.feedback.events import parse_event
from pipeline.feedback.lineage import AdapterVotes, FeedbackWindow, PartitionWindow, lineage_chain
from pipeline.feedback.records import FEEDBACK_SCHEMA, FeedbackRows
from pipeline.feedback.sample import sample_events
from pipeline.feedback.snapshot import Snapshot, SnapshotOptions
from pipeline.feedback.votes import snapshot_of_rows
from pipeline.training.manifest import Manifest, RunMetrics
from tests.rows import T0, event, feedback_range, stored

runner = CliRunner()

OPTIONS = SnapshotOptions(heldout_fraction=0.0)


def _on(partition: int, row: dict) -> dict:
    return {**row, records.KAFKA_PARTITION: partition}


def _rows() -> list[dict]:
    """Two partitions of topic fb. Partition 0: offsets 3..9, where offset 3 is a like
    superseded at offset 8 (same user and message, later) and offset 9 redelivers
    event e2. Partition 1: offsets 20..22, where 22 retracts the vote at 21."""
    return [
        _on(0, event("e1", user="u1", message="m1", t=3, offset=3)),
        _on(0, event("e2", user="u2", message="m1", t=4, offset=4, feedback="dislike")),
        _on(0, event("e3", user="u3", message="m2", t=5, offset=5, response="B", adapter=None)),
        _on(0, event("e4", user="u1", message="m1", t=8, offset=8, feedback="dislike")),
        _on(0, event("e2", user="u2", message="m1", t=9, offset=9, feedback="dislike")),
        _on(1, event("e5", user="u4", message="m3", t=1, offset=20, response="C")),
        _on(1, event("e6", user="u5", message="m3", t=2, offset=21, response="C", adapter="x@v2")),
        _on(1, event("e7", user="u5", message="m3", t=7, offset=22, feedback="retract")),
    ]


def test_a_feedback_window_has_offset_ranges_per_partition_read_and_counted() -> None:
    window = snapshot_of_rows(stored(_rows()), OPTIONS).window
    assert window is not None
    assert window.partitions == (
        # Counted: e2 (4), e3 (5), e4 (8); e1 was superseded, 9 is e2 again.
        PartitionWindow("fb", 0, 3, 9, 5, 4, 8, 3),
        # Counted: e5 (20); e6 was retracted by e7.
        PartitionWindow("fb", 1, 20, 22, 3, 20, 20, 1),
    )


def test_a_feedback_window_has_the_votes_time_range_and_counts_by_class_and_adapter() -> None:
    window = snapshot_of_rows(stored(_rows()), OPTIONS).window
    assert window is not None
    # The counted votes: e5 (t=1), e2 (t=4), e3 (t=5), e4 (t=8).
    assert (window.votes_from, window.votes_to) == (
        (T0.replace(second=1)).isoformat(),
        (T0.replace(second=8)).isoformat(),
    )
    assert window.ingested_to == T0.isoformat()
    # Likes: e3, e5; dislikes: e2, e4.
    assert (window.votes_desirable, window.votes_undesirable) == (2, 2)
    assert window.by_adapter == (
        AdapterVotes("chat@v1", 1, 2),  # e5 liked; e2, e4 disliked
        AdapterVotes(None, 1, 0),  # e3, on the base model
    )
    assert window.file is None and window.builds_on == {}


def test_on_policy_votes_are_those_on_any_version_of_the_alias() -> None:
    rows = [
        event("a", user="u1", t=1, adapter="chat@v1"),
        event("b", user="u2", t=2, adapter="chat@v3", feedback="dislike"),
        event("c", user="u3", t=3, adapter="other@v1"),
        event("d", user="u4", t=4, adapter=None),
        event("e", user="u5", t=5, adapter="chat"),  # not alias@version: not counted
    ]
    window = snapshot_of_rows(stored(rows), OPTIONS).window
    assert window is not None
    assert window.on_policy_votes("chat") == 2
    tagged = window.built_on(run_id="r1", alias="chat", version="v3", other=None)
    assert tagged.builds_on == {"run_id": "r1", "alias": "chat", "version": "v3"}
    assert tagged.as_dict()["on_policy"] == {"alias": "chat", "votes": 2, "of": 5}
    assert "on_policy" not in window.as_dict()
    # Through JSON and back unchanged (on_policy is derived, not stored twice).
    assert FeedbackWindow.from_dict(json.loads(json.dumps(tagged.as_dict()))) == tagged


def test_the_window_leaves_the_content_id_alone(tmp_path: Path) -> None:
    rows = _rows()
    whole = snapshot_of_rows(stored(rows), OPTIONS)
    # One more redelivery widens what was read but changes no example.
    again = snapshot_of_rows(
        stored([*rows, _on(0, {**rows[0], records.KAFKA_OFFSET: 30})]), OPTIONS
    )
    assert again.id == whole.id
    assert again.window != whole.window
    assert again.window is not None and again.window.partitions[0].last_read == 30
    tagged = whole.window.built_on(run_id="r1") if whole.window else None
    path = write_snapshot(dataclasses.replace(whole, window=tagged), tmp_path)
    back = read_snapshot(path)
    assert back.id == whole.id == path.name
    assert back.window == tagged
    assert json.loads((path / "snapshot.json").read_text())["window"]["builds_on"] == {
        "run_id": "r1"
    }


def test_a_snapshot_written_before_windows_reads_with_none(tmp_path: Path) -> None:
    path = write_snapshot(snapshot_of_rows(stored(_rows()), OPTIONS), tmp_path)
    meta = json.loads((path / "snapshot.json").read_text())
    del meta["window"]
    (path / "snapshot.json").write_text(json.dumps(meta))
    assert read_snapshot(path).window is None


def test_a_trl_snapshot_records_its_file_and_counts_but_no_kafka_window(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    window = load_training_data(data).window
    assert window is not None
    assert window.file == str(data.resolve())
    assert (window.partitions, window.votes_from, window.votes_to) == ((), None, None)
    assert (window.votes_desirable, window.votes_undesirable) == (2, 2)
    assert window.by_adapter == (AdapterVotes(None, 2, 2),)
    # Read back from the snapshot written of it, the file is still named.
    snap = load_training_data(data)
    assert read_snapshot(write_snapshot(snap, tmp_path / "snaps")).window == window


def test_the_chain_walks_parents_back_to_the_first_and_reads_old_records() -> None:
    infos = {
        "v1": {"version": "v1", "parent": None, "snapshot_id": "s1", "base_model": "/m"},
        "v2": {
            "version": "v2",
            "parent": "v1",
            "run_id": "r2",
            "snapshot_id": "s2",
            "snapshot_window": {"votes_desirable": 3},
            "reference": {"base_model": "/m", "path": "/reg/versions/v1", "version": "v1"},
        },
        "v4": {"version": "v4", "parent": "v3"},  # v3 removed by gc
    }
    chain = lineage_chain("v2", infos.get)
    assert [s["version"] for s in chain] == ["v2", "v1"]
    assert chain[0]["reference"]["version"] == "v1"
    assert chain[0]["window"] == {"votes_desirable": 3}
    assert chain[1]["run_id"] is None and chain[1]["window"] is None
    assert chain[1]["reference"] == {"base_model": "/m", "path": None, "version": None}
    assert lineage_chain("v4", infos.get)[-1] == {"version": "v3", "missing": True}
    # A parent loop (hand-edited records) ends instead of spinning.
    loop = {"v1": {"parent": "v2"}, "v2": {"parent": "v1"}}
    assert [s["version"] for s in lineage_chain("v1", loop.get)] == ["v1", "v2"]


# -- versions and the command line: the real registry, snapshot writer and store ------


def _manifest(base: Path, snap: Snapshot, init: str | None, reference: str | None) -> Manifest:
    """What the trainer writes for a run on `snap` (the numbers are beside the point)."""
    window = snap.window.as_dict() if snap.window else None
    return Manifest(
        status="trained",
        status_reason=None,
        base_model=str(base),
        base_model_fingerprint="f" * 16,
        snapshot_id=snap.id,
        init_adapter=init,
        reference_adapter=reference,
        counts={},
        encoding={},
        lambdas={},
        beta=0.1,
        options={},
        lora={},
        steps=1,
        planned_steps=1,
        resumed_from_step=None,
        best_step=1,
        stopped_early=False,
        stop_reason=None,
        world_size=1,
        device="cpu",
        precision="fp32",
        metrics=RunMetrics({}, None, None, None, None),
        diagnostics={},
        warnings=(),
        seconds=1.0,
        versions={},
        extra={"snapshot_window": window},
    )


@pytest.fixture(scope="module")
def two_versions(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 20 votes on topic fb partition 0 (offsets 0..19, two batches), a
    registry with v1 (snapshot of offsets 0..9, registered by a cycle run) and v2
    (snapshot of 0..19, warm-started from v1 and referring to it, registered by hand
    from its trainer's manifest), and a config naming both. Returns the config."""
    from deploy.local.adapters import make_random_adapter

    root = tmp_path_factory.mktemp("lineage")
    store = FeedbackStore(str(root / "store"))
    registry = AdapterRegistry(str(root / "registry"))
    store.write_batch(FEEDBACK, "fb", 0, 0, 9, feedback_range(0, 9))
    first = snapshot_of_rows(store.read_arrow(FEEDBACK), OPTIONS)
    assert first.window is not None
    first = dataclasses.replace(first, window=first.window.built_on(run_id="run-1", alias="chat"))
    write_snapshot(first, root / "snapshots")
    assert first.window is not None
    registry.add(
        make_random_adapter(tiny_model_dir, root / "a1", seed=1),
        snapshot_id=first.id,
        snapshot_window=first.window.as_dict(),
        run_id="run-1",
    )

    store.write_batch(FEEDBACK, "fb", 0, 10, 19, feedback_range(10, 19))
    second = snapshot_of_rows(store.read_arrow(FEEDBACK), OPTIONS)
    write_snapshot(second, root / "snapshots")
    a2 = make_random_adapter(tiny_model_dir, root / "a2", seed=2)
    v1 = registry.path("v1")
    write_manifest(a2, _manifest(tiny_model_dir, second, init=v1, reference=v1))
    registry.add(a2)  # no --parent: the warm start names it

    config = root / "kto-loop.toml"
    config.write_text(
        f'[store]\nurl = "{root / "store"}"\n\n[registry]\nurl = "{root / "registry"}"\n'
    )
    # The store grows after v2: its votes are outside every window.
    store.write_batch(FEEDBACK, "fb", 0, 20, 24, feedback_range(20, 24))
    return config


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_lineage_of_a_warm_started_version_is_a_two_step_chain_with_each_window(
    two_versions: Path,
) -> None:
    result = runner.invoke(app, ["adapters", "--lineage", "v2", "--config", str(two_versions)])
    assert result.exit_code == 0, result.output
    out = _last_json(result.stdout)
    assert out["version"] == "v2"
    v2, v1 = out["chain"]
    assert (v2["version"], v2["parent"], v1["version"], v1["parent"]) == ("v2", "v1", "v1", None)
    assert v2["init_adapter"]["version"] == "v1"
    assert v2["reference"]["version"] == "v1" and v2["reference"]["path"].endswith("v1")
    assert v1["reference"]["path"] is None  # trained against the base model
    assert (v1["run_id"], v2["run_id"]) == ("run-1", None)
    [p1], [p2] = v1["window"]["partitions"], v2["window"]["partitions"]
    assert (p1["topic"], p1["partition"], p1["first_read"], p1["last_read"]) == ("fb", 0, 0, 9)
    assert (p2["first_read"], p2["last_read"], p2["rows_read"]) == (0, 19, 20)
    assert v1["window"]["builds_on"] == {"run_id": "run-1", "alias": "chat"}
    assert v1["window"]["on_policy"]["alias"] == "chat"
    for step in (v1, v2):
        w = step["window"]
        assert w["votes_desirable"] + w["votes_undesirable"] == sum(
            a["desirable"] + a["undesirable"] for a in w["by_adapter"]
        )
        assert w["votes_from"] <= w["votes_to"]
    assert "lineage of v2" in result.stderr


def test_votes_lists_only_the_store_rows_inside_the_versions_window(two_versions: Path) -> None:
    result = runner.invoke(
        app, ["adapters", "--lineage", "v1", "--votes", "--config", str(two_versions)]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    *votes, summary = lines
    assert [v["offset"] for v in votes] == list(range(10))
    assert set(votes[0]) == {
        "event_id",
        "topic",
        "partition",
        "offset",
        "ts",
        "feedback",
        "adapter",
    }
    assert summary["rows"] == summary["rows_read_by_snapshot"] == 10
    expected = (
        FeedbackStore(str(two_versions.parent / "store"))
        .read_arrow()[records.EVENT_ID]
        .to_pylist()[:10]
    )
    assert [v["event_id"] for v in votes] == expected


def test_an_unknown_version_exits_2_naming_the_versions_there_are(two_versions: Path) -> None:
    for args in (["--lineage", "v9"], ["--lineage", "v9", "--votes"], ["--lineage", "latest"]):
        result = runner.invoke(app, ["adapters", *args, "--config", str(two_versions)])
        assert result.exit_code == 2
        assert "versions there are: v1, v2" in result.output


def test_votes_of_a_version_without_a_window_exit_2_saying_why(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from deploy.local.adapters import make_random_adapter

    AdapterRegistry(str(tmp_path / "reg")).add(
        make_random_adapter(tiny_model_dir, tmp_path / "a", 3)
    )
    config = tmp_path / "c.toml"
    config.write_text(f'[registry]\nurl = "{tmp_path / "reg"}"\n')
    result = runner.invoke(app, ["adapters", "--lineage", "v1", "--votes", "--config", str(config)])
    assert result.exit_code == 2
    assert "records no feedback window" in result.output
    # Its lineage still prints: an old record reads with None for what it lacks.
    result = runner.invoke(app, ["adapters", "--lineage", "v1", "--config", str(config)])
    assert result.exit_code == 0
    [step] = _last_json(result.stdout)["chain"]
    assert step["window"] is None and step["parent"] is None


def test_read_ranges_reads_only_the_asked_columns_and_offsets(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path / "store"))
    store.write_batch(FEEDBACK, "fb", 0, 0, 9, feedback_range(0, 9))
    store.write_batch(FEEDBACK, "fb", 0, 10, 19, feedback_range(10, 19))
    other = FeedbackRows("fb", 1)
    for offset, e in enumerate(sample_events(5)):
        other.append(parse_event(json.dumps(e).encode(), user_hash_key=b"k"), offset, None)
    store.write_batch(FEEDBACK, "fb", 1, 0, 4, other.to_table(T0, "test"))
    columns = [records.KAFKA_PARTITION, records.KAFKA_OFFSET]
    rows = store.read_ranges([("fb", 0, 8, 12), ("fb", 1, 3, 9), ("gone", 0, 0, 5)], columns)
    assert rows.column_names == columns
    pairs = sorted(zip(*(rows[c].to_pylist() for c in columns), strict=True))
    assert pairs == [(0, 8), (0, 9), (0, 10), (0, 11), (0, 12), (1, 3), (1, 4)]
    assert store.read_ranges([], columns).num_rows == 0


def test_training_on_a_snapshot_keeps_its_window_in_the_manifest(tmp_path: Path) -> None:
    from flows.training import TrainInputs
    from pipeline.feedback.balance import BalanceOptions, choose_weights

    snap = snapshot_of_rows(stored(_rows()), OPTIONS)
    balance = choose_weights(*snap.class_counts("train"), BalanceOptions())
    inputs = TrainInputs.from_snapshot(
        snap, balance, tmp_path, tmp_path / "out", extra_manifest={"note": "x"}
    )
    assert snap.window is not None
    assert inputs.extra_manifest == {"note": "x", "snapshot_window": snap.window.as_dict()}


def test_votes_without_lineage_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["adapters", "--votes"])
    assert result.exit_code == 2
    assert "--lineage" in result.output


def test_the_window_of_a_snapshot_of_recent_votes_lists_only_the_rows_it_read(
    tmp_path: Path,
) -> None:
    # Offset 2 and 5 are older votes stored among newer ones (a late producer).
    rows = [
        event(f"e{offset}", user=f"u{offset}", t=t, offset=offset)
        for offset, t in enumerate([0, 10, 2, 11, 12, 3])
    ]
    store = FeedbackStore(str(tmp_path / "store"))
    store.write_batch(FEEDBACK, "fb", 0, 0, 5, pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA))
    rows = store.read_arrow(FEEDBACK)
    since = pa.scalar(T0 + dt.timedelta(seconds=10), rows.schema.field(records.TS).type)
    recent = rows.filter(pc.greater_equal(rows[records.TS], since))
    window = snapshot_of_rows(recent, OPTIONS).window
    assert window is not None
    assert (window.partitions[0].first_read, window.partitions[0].last_read) == (1, 4)
    assert window.read_from == (T0 + dt.timedelta(seconds=10)).isoformat()
    listed = store.read_ranges(
        [("fb", 0, 1, 4)],
        [records.KAFKA_OFFSET],
        since=dt.datetime.fromisoformat(window.read_from),
    )
    assert sorted(listed[records.KAFKA_OFFSET].to_pylist()) == [1, 3, 4]
