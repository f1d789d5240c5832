"""Lineage: the feedback window a snapshot records (offsets per partition, time range,
votes per class and per producing adapter, or the TRL file), kept out of the content
id, and the chain of versions back to the first."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from connectors.snapshots import load_training_data, read_snapshot, write_snapshot
from pipeline import records
from pipeline.lineage import AdapterVotes, FeedbackWindow, PartitionWindow, lineage_chain
from pipeline.snapshot import SnapshotOptions, build_snapshot
from tests.test_snapshot import T0, event, frame

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
    window = build_snapshot(frame(_rows()), OPTIONS).window
    assert window is not None
    assert window.partitions == (
        # Counted: e2 (4), e3 (5), e4 (8); e1 was superseded, 9 is e2 again.
        PartitionWindow("fb", 0, 3, 9, 5, 4, 8, 3),
        # Counted: e5 (20); e6 was retracted by e7.
        PartitionWindow("fb", 1, 20, 22, 3, 20, 20, 1),
    )


def test_a_feedback_window_has_the_votes_time_range_and_counts_by_class_and_adapter() -> None:
    window = build_snapshot(frame(_rows()), OPTIONS).window
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
    window = build_snapshot(frame(rows), OPTIONS).window
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
    whole = build_snapshot(frame(rows), OPTIONS)
    # One more redelivery widens what was read but changes no example.
    again = build_snapshot(frame([*rows, _on(0, {**rows[0], records.KAFKA_OFFSET: 30})]), OPTIONS)
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
    path = write_snapshot(build_snapshot(frame(_rows()), OPTIONS), tmp_path)
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
            "reference": {"base_model": "/m", "adapter": "/reg/versions/v1", "version": "v1"},
        },
        "v4": {"version": "v4", "parent": "v3"},  # v3 removed by gc
    }
    chain = lineage_chain("v2", infos.get)
    assert [s["version"] for s in chain] == ["v2", "v1"]
    assert chain[0]["reference"]["version"] == "v1"
    assert chain[0]["window"] == {"votes_desirable": 3}
    assert chain[1]["run_id"] is None and chain[1]["window"] is None
    assert chain[1]["reference"] == {"base_model": "/m", "adapter": None, "version": None}
    assert lineage_chain("v4", infos.get)[-1] == {"version": "v3", "missing": True}
    # A parent loop (hand-edited records) ends instead of spinning.
    loop = {"v1": {"parent": "v2"}, "v2": {"parent": "v1"}}
    assert [s["version"] for s in lineage_chain("v1", loop.get)] == ["v1", "v2"]
