"""Training snapshots: hand-worked cases of the votes that count (dedupe, latest vote,
retraction, majority, ties) through the one path that builds a feedback snapshot (a fold
into a vote table, then snapshot_from_votes), the split by conversation, the content id,
TRL datasets, snapshot files, and the messages of bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.config import ConfigError, load_settings
from connectors.feedback.snapshots import load_training_data, read_snapshot, write_snapshot
from pipeline.feedback import records
from pipeline.feedback.examples import Example
from pipeline.feedback.records import TRAINING_COLUMNS, TRAINING_SCHEMA
from pipeline.feedback.snapshot import (
    HELDOUT,
    TRAIN,
    SnapshotError,
    SnapshotOptions,
    split_of,
)
from pipeline.feedback.votes import snapshot_of_rows
from tests.rows import event, stored


def only_row(snapshot: Any) -> dict[str, Any]:
    assert len(snapshot.table) == 1
    return snapshot.table.iloc[0].to_dict()


# -- votes -------------------------------------------------------------------------


def test_latest_vote_of_a_user_on_a_message_wins_whatever_the_row_order() -> None:
    rows = [event("e2", feedback="dislike", t=10), event("e1", feedback="like", t=0)]
    snap = snapshot_of_rows(stored(rows))
    row = only_row(snap)
    assert (row[records.DESIRABLE], row[records.VOTES_DESIRABLE]) == (False, 0)
    assert row[records.VOTES_UNDESIRABLE] == 1
    assert snap.stats.superseded == 1


def test_equal_timestamps_are_ordered_by_kafka_offset() -> None:
    like_last = [event("a", feedback="dislike", offset=5), event("b", feedback="like", offset=7)]
    dislike_last = [event("a", feedback="dislike", offset=7), event("b", feedback="like", offset=5)]
    assert only_row(snapshot_of_rows(stored(like_last)))[records.DESIRABLE]
    assert not only_row(snapshot_of_rows(stored(dislike_last)))[records.DESIRABLE]


def test_a_retraction_as_latest_event_removes_that_users_vote() -> None:
    rows = [
        event("e1", user="u1", feedback="like", t=0),
        event("e2", user="u2", feedback="dislike", t=1),
        event("e3", user="u1", feedback="retract", t=2),
    ]
    snap = snapshot_of_rows(stored(rows))
    row = only_row(snap)
    assert (row[records.VOTES_DESIRABLE], row[records.VOTES_UNDESIRABLE]) == (0, 1)
    assert not row[records.DESIRABLE]
    assert snap.stats.retracted == 1

    # Voting again after a retraction counts again (1-1: keep the tie to see it).
    again = stored([*rows, event("e4", user="u1", feedback="like", t=3)])
    snap = snapshot_of_rows(again, SnapshotOptions(tie_policy="desirable"))
    assert only_row(snap)[records.VOTES_DESIRABLE] == 1
    assert (snap.stats.retracted, snap.stats.superseded) == (0, 2)


def test_a_neutral_rating_replaces_an_earlier_vote_with_none() -> None:
    rows = [
        event("e1", user="u1", feedback="like", t=0),
        event("e2", user="u1", rating=3, t=1),
        event("e3", user="u2", rating=1, t=2),
    ]
    snap = snapshot_of_rows(stored(rows))
    row = only_row(snap)
    assert (row[records.VOTES_DESIRABLE], row[records.VOTES_UNDESIRABLE]) == (0, 1)
    assert (snap.stats.unlabelled, snap.stats.superseded) == (1, 1)


def test_a_redelivered_event_counts_once() -> None:
    # Anonymous votes each count, so only dedupe by event_id stops e1 from winning 2-1.
    rows = [
        event("e1", user=None, feedback="like", offset=1),
        event("e1", user=None, feedback="like", offset=2),
        event("e2", user=None, feedback="dislike", offset=3),
        event("e3", user="u9", message="m2", response="Call support."),
    ]
    snap = snapshot_of_rows(stored(rows))
    assert snap.stats.duplicates == 1
    assert snap.stats.ties == 1  # e1 vs e2, dropped by default
    assert snap.table[records.COMPLETION].tolist() == ["Call support."]


def test_events_without_a_user_are_separate_voters() -> None:
    rows = [
        event("e1", user=None, t=0),
        event("e2", user=None, t=1),
        event("e3", user="u1", feedback="dislike", t=2),
    ]
    row = only_row(snapshot_of_rows(stored(rows)))
    assert (row[records.VOTES_DESIRABLE], row[records.VOTES_UNDESIRABLE]) == (2, 1)
    assert row[records.DESIRABLE]


def test_majority_across_users_and_messages_labels_one_example_per_prompt_and_response() -> None:
    rows = [
        event("e1", user="u1", message="m1", conversation="c1", t=0, adapter="chat@v1"),
        event("e2", user="u2", message="m2", conversation="c2", t=1, adapter="chat@v2"),
        event("e3", user="u3", message="m3", conversation="c3", feedback="dislike", t=2),
    ]
    row = only_row(snapshot_of_rows(stored(rows)))
    assert row[records.DESIRABLE]
    assert (row[records.VOTES_DESIRABLE], row[records.VOTES_UNDESIRABLE]) == (2, 1)
    # The first vote's conversation decides the split; the latest vote's adapter is kept.
    assert row[records.CONVERSATION_ID] == "c1"
    assert row[records.ADAPTER] == "chat@v1"
    rows[2][records.ADAPTER] = "chat@v3"
    assert only_row(snapshot_of_rows(stored(rows)))[records.ADAPTER] == "chat@v3"


@pytest.mark.parametrize(
    ("policy", "kept", "label"),
    [("drop", False, None), ("desirable", True, True), ("undesirable", True, False)],
)
def test_tie_policy(policy: str, kept: bool, label: bool | None) -> None:
    rows = [
        event("e1", user="u1"),
        event("e2", user="u2", feedback="dislike"),
        event("e3", user="u1", message="m2", response="Other answer."),
    ]
    snap = snapshot_of_rows(stored(rows), SnapshotOptions(tie_policy=policy))  # type: ignore[arg-type]
    tied = snap.table[snap.table[records.COMPLETION] == "Open Settings, then Security."]
    assert snap.stats.ties == 1
    assert snap.stats.ties_dropped == (0 if kept else 1)
    assert len(tied) == int(kept)
    if kept:
        assert tied.iloc[0][records.DESIRABLE] == label
        assert (tied.iloc[0][records.VOTES_DESIRABLE], tied.iloc[0][records.VOTES_UNDESIRABLE]) == (
            1,
            1,
        )


def test_chat_histories_become_messages_json_and_plain_prompts_stay_prompts() -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I reset my password?"},
    ]
    rows = [event("e1", messages=history), event("e2", user="u2", message="m2")]
    table = snapshot_of_rows(stored(rows)).table
    assert len(table) == 2  # same question, but a history is a different prompt
    chat = table[table[records.MESSAGES_JSON].notna()].iloc[0]
    assert json.loads(chat[records.MESSAGES_JSON]) == history
    assert pd.isna(chat[records.PROMPT])
    assert (table[records.PROMPT].notna() != table[records.MESSAGES_JSON].notna()).all()


def test_the_table_has_the_training_schema_and_source() -> None:
    snap = snapshot_of_rows(stored([event("e1")]))
    assert tuple(snap.table.columns) == TRAINING_COLUMNS
    pa.Table.from_pandas(snap.table, schema=TRAINING_SCHEMA, preserve_index=False)
    assert set(snap.table[records.SOURCE]) == {"feedback"}


def test_records_of_a_split_use_none_for_the_absent_prompt_form() -> None:
    history = [{"role": "user", "content": "Hi?"}]
    rows = [event("e1", messages=history), event("e2", user="u2", message="m2", feedback="dislike")]
    snap = snapshot_of_rows(stored(rows), SnapshotOptions(heldout_fraction=0.0))
    assert sorted(map(_fields, snap.records("train")), key=str) == sorted(
        [
            (None, json.dumps(history), "Open Settings, then Security.", True, 1.0),
            ("How do I reset my password?", None, "Open Settings, then Security.", False, 1.0),
        ],
        key=str,
    )
    # Provenance: the served version that gave each answer.
    assert {e.adapter for e in snap.records("train")} == {"chat@v1"}
    assert snap.records("heldout") == []
    with pytest.raises(ValueError, match="split must be"):
        snap.records("test")


# -- split and id ------------------------------------------------------------------


def conversations(first: int, last: int, seed_votes: int = 0) -> list[dict[str, Any]]:
    """Three rated turns (distinct prompts) per conversation c<first>..c<last>."""
    rows = []
    for c in range(first, last + 1):
        for m in range(3):
            rows.append(
                event(
                    f"e{c}-{m}-{seed_votes}",
                    user=f"u{seed_votes}",
                    message=f"c{c}-m{m}",
                    conversation=f"c{c}",
                    prompt=f"question {c}.{m}",
                    feedback="like" if (c + m) % 3 else "dislike",
                    t=c * 10 + m,
                )
            )
    return rows


def test_split_keeps_each_conversation_on_one_side_and_is_stable_as_data_grows() -> None:
    options = SnapshotOptions(heldout_fraction=0.25, split_seed="s1")
    small = snapshot_of_rows(stored(conversations(0, 199)), options).table
    sides = small.groupby(records.CONVERSATION_ID)[records.SPLIT].nunique()
    assert (sides == 1).all()
    heldout_share = (
        small.groupby(records.CONVERSATION_ID)[records.SPLIT].first() == HELDOUT
    ).mean()
    assert 0.15 < heldout_share < 0.35

    grown_rows = conversations(0, 299) + conversations(0, 99, seed_votes=1)
    grown = snapshot_of_rows(stored(grown_rows), options).table
    before = small.groupby(records.CONVERSATION_ID)[records.SPLIT].first()
    after = grown.groupby(records.CONVERSATION_ID)[records.SPLIT].first()
    assert after[before.index].equals(before)

    reseeded = [split_of(c, SnapshotOptions(0.25, "s2")) for c in before.index]
    assert reseeded != before.tolist()


def test_heldout_fraction_zero_puts_everything_in_train() -> None:
    table = snapshot_of_rows(stored(conversations(0, 49)), SnapshotOptions(0.0)).table
    assert set(table[records.SPLIT]) == {TRAIN}


def test_content_id_is_stable_under_row_order_and_changes_with_content() -> None:
    rows = conversations(0, 59)
    snap = snapshot_of_rows(stored(rows))
    shuffled = snapshot_of_rows(stored(random.Random(7).sample(rows, len(rows))))
    assert shuffled.id == snap.id
    pd.testing.assert_frame_equal(shuffled.table, snap.table)
    assert len(snap.id) == 16 and int(snap.id, 16) >= 0

    rows[0] = {**rows[0], records.RESPONSE: "A different answer."}
    assert snapshot_of_rows(stored(rows)).id != snap.id
    assert snapshot_of_rows(stored(rows), SnapshotOptions(split_seed="other")).id != snap.id


def test_counts_add_up_by_split_and_label() -> None:
    snap = snapshot_of_rows(stored(conversations(0, 99)), SnapshotOptions(heldout_fraction=0.3))
    table, c = snap.table, snap.counts
    train = table[table[records.SPLIT] == TRAIN]
    assert c.train_desirable == int(train[records.DESIRABLE].sum())
    assert c.train_undesirable == int((~train[records.DESIRABLE]).sum())
    assert c.total == len(table) == 300
    assert c.heldout_desirable + c.heldout_undesirable > 0


def test_feedback_errors_say_what_is_wrong() -> None:
    with pytest.raises(SnapshotError, match="no feedback rows"):
        snapshot_of_rows(stored([]))
    with pytest.raises(SnapshotError, match=r"lack the columns \['message_id'\]"):
        snapshot_of_rows(stored([event("e1")]).drop_columns(records.MESSAGE_ID))
    retracted = [event("e1"), event("e2", feedback="retract", t=1)]
    with pytest.raises(SnapshotError, match=r"no labelled examples left from 2 rows.*1 retracted"):
        snapshot_of_rows(stored(retracted))


# -- TRL datasets ------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


UNPAIRED = [
    {"prompt": "What is 2+2?", "completion": "4", "label": True},
    {"prompt": "What is 2+2?", "completion": "5", "label": False},
    {"prompt": "Capital of France?", "completion": "Paris", "label": True},
]
PAIRED = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
]


def conversational(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        c = {"prompt": [{"role": "user", "content": r["prompt"]}]}
        for k in ("completion", "chosen", "rejected"):
            if k in r:
                c[k] = [{"role": "assistant", "content": r[k]}]
        if "label" in r:
            c["label"] = r["label"]
        out.append(c)
    return out


def labels(table: pd.DataFrame) -> dict[str, bool]:
    return dict(zip(table[records.COMPLETION], table[records.DESIRABLE], strict=True))


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet])
@pytest.mark.parametrize("style", ["standard", "conversational"])
def test_trl_unpaired(tmp_path: Path, writer: Any, style: str) -> None:
    rows = UNPAIRED if style == "standard" else conversational(UNPAIRED)
    suffix = ".jsonl" if writer is write_jsonl else ".parquet"
    snap = load_training_data(writer(tmp_path / f"kto{suffix}", rows))
    table = snap.table
    assert labels(table) == {"4": True, "5": False, "Paris": True}
    assert set(table[records.SOURCE]) == {"trl-unpaired"}
    if style == "conversational":
        assert table[records.PROMPT].isna().all()
        first = json.loads(table[records.MESSAGES_JSON].iloc[0])
        assert first[0]["role"] == "user"
    # One prompt, one conversation: both answers to 2+2 share a side of the split.
    two_plus_two = table[table[records.COMPLETION].isin(["4", "5"])]
    assert two_plus_two[records.CONVERSATION_ID].nunique() == 1
    assert (snap.counts.total, snap.stats.votes) == (3, 3)


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet])
@pytest.mark.parametrize("style", ["standard", "conversational"])
def test_trl_paired_gives_chosen_desirable_and_rejected_undesirable(
    tmp_path: Path, writer: Any, style: str
) -> None:
    rows = PAIRED if style == "standard" else conversational(PAIRED)
    suffix = ".jsonl" if writer is write_jsonl else ".parquet"
    snap = load_training_data(writer(tmp_path / f"pairs{suffix}", rows))
    assert labels(snap.table) == {"4": True, "5": False, "Paris": True, "Lyon": False}
    assert set(snap.table[records.SOURCE]) == {"trl-paired"}
    assert (snap.stats.rows_read, snap.stats.votes) == (2, 4)


def test_trl_json_array_and_conversation_ids_and_conflicting_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "completion": "a", "label": 1, "conversation_id": "conv-9"},
        {"prompt": "p", "completion": "a", "label": "true", "conversation_id": "conv-9"},
        {"prompt": "p", "completion": "a", "label": 0, "conversation_id": "conv-9"},
    ]
    path = tmp_path / "kto.json"
    path.write_text(json.dumps(rows))
    row = only_row(load_training_data(path))
    assert row[records.CONVERSATION_ID] == "conv-9"
    assert (row[records.VOTES_DESIRABLE], row[records.VOTES_UNDESIRABLE]) == (2, 1)
    assert row[records.DESIRABLE]


def test_trl_ids_agree_across_file_formats(tmp_path: Path) -> None:
    a = load_training_data(write_jsonl(tmp_path / "a.jsonl", UNPAIRED))
    b = load_training_data(write_parquet(tmp_path / "b.parquet", UNPAIRED[::-1]))
    assert a.id == b.id


def test_a_file_of_stored_rows_is_folded_like_the_store(tmp_path: Path) -> None:
    rows = [
        event("e1", user="u1", t=0),
        event("e2", user="u1", feedback="dislike", t=1),
        event("e3", user="u2", message="m2", t=2, response="Call support."),
    ]
    path = write_parquet(tmp_path / "rows.parquet", rows)
    snap = load_training_data(path)
    assert labels(snap.table) == {"Open Settings, then Security.": False, "Call support.": True}
    assert snap.id == snapshot_of_rows(stored(rows)).id
    assert (snap.stats.superseded, snap.window.partitions[0].last_read) == (1, 2)
    # Without its Kafka position a row has no place in the order of events.
    positionless = [{k: v for k, v in r.items() if not k.startswith("kafka_")} for r in rows]
    with pytest.raises(SnapshotError, match=r"lack the columns \['kafka_topic', 'kafka_partition'"):
        load_training_data(write_parquet(tmp_path / "bare.parquet", positionless))


# -- snapshot files ----------------------------------------------------------------


def test_write_read_round_trip_keeps_id_stats_and_options(tmp_path: Path) -> None:
    options = SnapshotOptions(heldout_fraction=0.3, split_seed="x")
    snap = snapshot_of_rows(stored(conversations(0, 29)), options)
    path = write_snapshot(snap, tmp_path / "snaps")
    assert path == tmp_path / "snaps" / snap.id
    assert sorted(p.name for p in path.iterdir()) == ["records.parquet", "snapshot.json"]
    meta = json.loads((path / "snapshot.json").read_text())
    assert meta["id"] == snap.id
    assert meta["counts"]["train_desirable"] == snap.counts.train_desirable
    assert meta["config"] == {
        "heldout_fraction": 0.3,
        "split_seed": "x",
        "tie_policy": "drop",
        "half_life_days": None,
        "half_life_votes": None,
        "recency_floor": 0.0625,
    }

    back = read_snapshot(path)
    assert (back.id, back.counts, back.stats, back.options) == (
        snap.id,
        snap.counts,
        snap.stats,
        options,
    )
    pd.testing.assert_frame_equal(back.table, snap.table)
    # The parquet alone passes through as a dataset, split kept as written.
    passed = load_training_data(path / "records.parquet", SnapshotOptions(split_seed="other"))
    assert passed.id == snap.id and passed.options is None


def test_writing_an_existing_snapshot_is_a_no_op(tmp_path: Path) -> None:
    snap = snapshot_of_rows(stored([event("e1")]))
    first = write_snapshot(snap, tmp_path)
    created = json.loads((first / "snapshot.json").read_text())["created_at"]
    again = write_snapshot(snapshot_of_rows(stored([event("e1"), event("e1", offset=9)])), tmp_path)
    assert again == first
    assert json.loads((first / "snapshot.json").read_text())["created_at"] == created
    assert [p.name for p in tmp_path.iterdir()] == [snap.id]  # no temp dirs left


def test_a_snapshot_changed_after_writing_is_refused(tmp_path: Path) -> None:
    path = write_snapshot(snapshot_of_rows(stored([event("e1")])), tmp_path)
    table = pq.read_table(path / "records.parquet").to_pandas()
    table[records.COMPLETION] = "tampered"
    pq.write_table(pa.Table.from_pandas(table, schema=TRAINING_SCHEMA), path / "records.parquet")
    with pytest.raises(SnapshotError, match="changed after it was written"):
        read_snapshot(path)


# -- bad input ---------------------------------------------------------------------


def bad_file(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        write_jsonl(path, content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", r"empty\.jsonl has no rows"),
        ("blank.jsonl", "\n\n", r"has no rows"),
        (
            "columns.jsonl",
            [{"question": "q", "answer": "a", "label": True}],
            r"unrecognised columns \['answer', 'label', 'question'\]; for TRL unpaired KTO "
            r"it lacks prompt, completion\. Accepted formats: TRL unpaired KTO \(prompt, "
            r"completion, label\); TRL paired preference \(prompt, chosen, rejected\)",
        ),
        (
            "label.jsonl",
            [{"prompt": "p", "completion": "b", "label": "maybe"}],
            r"none of the 1 rows can be read: label at row 1 is str 'maybe'; expected a "
            r"boolean \(true/false or 1/0\)",
        ),
        (
            "label2.jsonl",
            [{"prompt": "p", "completion": "a", "label": 2}],
            r"label at row 1 is int 2; expected a boolean",
        ),
        (
            "completion.jsonl",
            [{"prompt": "p", "completion": 42, "label": True}],
            r"completion at row 1 is int 42, not a string",
        ),
        (
            "chosen.jsonl",
            [{"prompt": "p", "chosen": None, "rejected": "r"}],
            r"chosen at row 1 is missing, not a string",
        ),
        (
            "roles.jsonl",
            [{"prompt": "p", "completion": [{"role": "user", "content": "x"}], "label": True}],
            r"conversational completion at row 1 must be one assistant message, got roles \['user'\]",
        ),
        (
            "prompt.jsonl",
            [{"prompt": "  ", "completion": "a", "label": True}],
            r"prompt at row 1 is empty",
        ),
        (
            "broken.jsonl",
            '{"prompt": "p"}\n{"prompt": \n',
            r"broken\.jsonl line 2 is not valid JSON",
        ),
        ("list.jsonl", "[1, 2]\n", r"item 1 is a int, not an object"),
        (
            "data.csv",
            "prompt,completion,label\n",
            r"expected a \.jsonl, \.json, \.parquet file, got '\.csv'",
        ),
        ("corrupt.parquet", b"PAR1 not really", r"cannot read .*corrupt\.parquet as Parquet"),
    ],
)
def test_bad_input_is_named(tmp_path: Path, name: str, content: Any, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        load_training_data(bad_file(tmp_path, name, content))


def test_an_unreadable_row_is_skipped_counted_and_named_not_fatal(tmp_path: Path) -> None:
    rows = [*UNPAIRED, {"prompt": "p", "completion": "b", "label": "maybe"}]
    snap = load_training_data(bad_file(tmp_path, "kto.jsonl", rows))
    assert labels(snap.table) == {"4": True, "5": False, "Paris": True}
    assert (snap.stats.rows_read, snap.stats.votes) == (4, 3)
    assert snap.stats.skipped_rows == 1
    (reason,) = snap.stats.skipped_reasons
    assert reason.startswith("label at row 4 is str 'maybe'; expected a boolean")
    # The id describes the examples only: the same good rows alone give the same id.
    assert snap.id == load_training_data(write_jsonl(tmp_path / "good.jsonl", UNPAIRED)).id
    # The count and reasons survive a write and read back.
    back = read_snapshot(write_snapshot(snap, tmp_path / "snaps"))
    assert back.stats == snap.stats


def test_a_paired_row_with_an_unreadable_side_is_skipped_whole(tmp_path: Path) -> None:
    rows = [*PAIRED, {"prompt": "p", "chosen": "c", "rejected": None}]
    snap = load_training_data(bad_file(tmp_path, "pairs.jsonl", rows))
    assert labels(snap.table) == {"4": True, "5": False, "Paris": True, "Lyon": False}
    assert (snap.stats.rows_read, snap.stats.votes, snap.stats.skipped_rows) == (3, 4, 1)
    assert snap.stats.skipped_reasons[0].startswith("rejected at row 3 is missing")


def test_skipped_reasons_keep_the_first_five_and_count_them_all(tmp_path: Path) -> None:
    bad = [{"prompt": f"p{i}", "completion": "x", "label": 7} for i in range(8)]
    snap = load_training_data(bad_file(tmp_path, "kto.jsonl", [*bad, *UNPAIRED]))
    assert snap.stats.skipped_rows == 8
    assert [r.split(" is ")[0] for r in snap.stats.skipped_reasons] == [
        f"label at row {i}" for i in range(1, 6)
    ]


def test_a_file_with_no_readable_row_is_refused_with_the_first_reasons(tmp_path: Path) -> None:
    bad = [{"prompt": "  ", "completion": "a", "label": True}] + [
        {"prompt": "p", "completion": 42, "label": True}
    ] * 6
    with pytest.raises(SnapshotError) as refused:
        load_training_data(bad_file(tmp_path, "kto.jsonl", bad))
    message = str(refused.value)
    assert message.startswith("none of the 7 rows can be read: prompt at row 1 is empty")
    assert "completion at row 5 is int 42" in message and "row 6" not in message
    assert message.endswith("(and 2 more)")


@pytest.mark.parametrize("style", ["standard", "conversational"])
def test_an_empty_completion_is_an_answer_that_trains_as_the_end_of_turn_alone(
    tmp_path: Path, style: str, tiny_model_dir: Path
) -> None:
    from connectors.training.models import load_tokenizer
    from pipeline.training.encode import Lengths, encode_records, end_of_turn_id

    rows = [*UNPAIRED, {"prompt": "Say nothing.", "completion": "", "label": True}]
    rows.append({"prompt": "Say nothing twice.", "completion": " \n", "label": False})
    rows = rows if style == "standard" else conversational(rows)
    snap = load_training_data(write_jsonl(tmp_path / "kto.jsonl", rows))
    assert snap.stats.skipped_rows == 0
    table = snap.table
    empty = table[table[records.COMPLETION] == ""]
    assert sorted(empty[records.DESIRABLE]) == [False, True]  # whitespace-only is "" too

    tokenizer = load_tokenizer(tiny_model_dir)
    kept = [r for r in snap.records("train") + snap.records("heldout") if r.completion == ""]
    encoded, report = encode_records(kept, tokenizer, Lengths())
    assert report.kept == 2 and report.dropped_empty_completion == 0
    assert [e.completion_ids for e in encoded] == [(end_of_turn_id(tokenizer),)] * 2


def test_missing_file_and_columns_without_rows(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="does not exist"):
        load_training_data(tmp_path / "nope.jsonl")
    empty = pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(SnapshotError, match="has no rows"):
        load_training_data(tmp_path / "empty.parquet")


def test_a_bad_snapshot_table_is_refused(tmp_path: Path) -> None:
    table = snapshot_of_rows(stored([event("e1")])).table.copy()
    table[records.SPLIT] = "validation"
    pq.write_table(pa.Table.from_pandas(table), tmp_path / "s.parquet")
    with pytest.raises(SnapshotError, match=r"unknown split values \['validation'\]"):
        load_training_data(tmp_path / "s.parquet")


# -- config ------------------------------------------------------------------------


def test_the_snapshot_section_is_the_pipeline_options(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[snapshot]\nheldout_fraction = 0.2\nsplit_seed = "abc"\ntie_policy = "desirable"\n'
    )
    settings = load_settings(path)
    options = SnapshotOptions(0.2, "abc", "desirable")
    assert isinstance(settings.snapshot, SnapshotOptions)
    assert settings.snapshot.as_dict() == options.as_dict()
    assert settings.snapshot.out_dir == "./data/snapshots"
    # A snapshot built with the section records the options alone, and reads back.
    snap = snapshot_of_rows(stored(conversations(0, 9)), settings.snapshot)
    written = write_snapshot(snap, tmp_path / "snaps")
    assert json.loads((written / "snapshot.json").read_text())["config"] == options.as_dict()
    assert read_snapshot(written).options == options
    path.write_text('[snapshot]\ntie_policy = "coin"\n')
    with pytest.raises(ConfigError, match=r"\[snapshot\] tie_policy"):
        load_settings(path)
    path.write_text("[snapshot]\nheldout_fraction = 1.0\n")
    with pytest.raises(ConfigError, match=r"\[snapshot\] heldout_fraction"):
        load_settings(path)


def test_repeated_answers_count_once_or_per_vote_or_as_a_weight(tmp_path: Path) -> None:
    # The model said "4" three times, liked each time, and "5" three times, disliked
    # twice and liked once: "5" is undesirable by the majority, with 2 agreeing votes.
    rows = [
        *([{"prompt": "2+2?", "completion": "4", "label": True}] * 3),
        {"prompt": "2+2?", "completion": "5", "label": False},
        {"prompt": "2+2?", "completion": "5", "label": False},
        {"prompt": "2+2?", "completion": "5", "label": True},
    ]
    snap = load_training_data(
        write_jsonl(tmp_path / "kto.jsonl", rows), SnapshotOptions(heldout_fraction=0.0)
    )
    assert sorted(map(_fields, snap.records("train"))) == [
        ("2+2?", None, "4", True, 1.0),
        ("2+2?", None, "5", False, 1.0),
    ]
    assert sorted(map(_fields, snap.records("train", "keep"))) == sorted(
        [("2+2?", None, "4", True, 1.0)] * 3 + [("2+2?", None, "5", False, 1.0)] * 2
    )
    assert sorted(map(_fields, snap.records("train", "weight"))) == sorted(
        [("2+2?", None, "4", True, 3.0), ("2+2?", None, "5", False, 2.0)]
    )
    assert snap.class_counts("train") == (1, 1)
    assert snap.class_counts("train", "keep") == snap.class_counts("train", "weight") == (3, 2)
    with pytest.raises(ValueError, match="repeats must be one of"):
        snap.records("train", "sum")


def _fields(example: Example) -> tuple:
    return (
        example.prompt,
        example.messages_json,
        example.completion,
        example.desirable,
        example.weight,
    )


# -- recency -----------------------------------------------------------------------


def _changed_mind(first: str, then: str, n_first: int, n_then: int) -> list[dict[str, Any]]:
    """One answer liked or disliked by many users, first one way then the other."""
    rows = [event(f"a{i}", user=f"a{i}", feedback=first, t=i) for i in range(n_first)]
    return rows + [
        event(f"b{i}", user=f"b{i}", feedback=then, t=n_first + i) for i in range(n_then)
    ]


def test_a_half_life_in_votes_lets_recent_votes_outweigh_an_older_majority() -> None:
    rows = stored(_changed_mind("like", "dislike", 8, 3))
    assert only_row(snapshot_of_rows(rows))[records.DESIRABLE]  # 8 likes to 3 dislikes
    weighed = snapshot_of_rows(rows, SnapshotOptions(half_life_votes=2))
    row = only_row(weighed)
    assert not row[records.DESIRABLE]
    # The counts stay the votes cast; only the label and the weight follow their age.
    assert (row[records.VOTES_DESIRABLE], row[records.VOTES_UNDESIRABLE]) == (8, 3)
    assert weighed.recency is not None and weighed.recency.tolist() == [1.0]


def test_a_half_life_in_days_weighs_votes_by_their_age_before_the_newest() -> None:
    day = 86_400
    rows = [event(f"old{i}", user=f"o{i}", feedback="like", t=0) for i in range(3)]
    rows.append(event("new", user="n", feedback="dislike", t=3 * day))
    assert only_row(snapshot_of_rows(stored(rows), SnapshotOptions(half_life_days=30)))[
        records.DESIRABLE
    ]
    assert not only_row(snapshot_of_rows(stored(rows), SnapshotOptions(half_life_days=1)))[
        records.DESIRABLE
    ]


def test_examples_whose_newest_vote_faded_are_left_out_and_counted() -> None:
    old = [event(f"o{i}", user="u", message=f"m{i}", response=f"old {i}", t=i) for i in range(3)]
    new = [
        event(f"n{i}", user="u", message=f"n{i}", response=f"new {i}", t=10 + i) for i in range(8)
    ]
    snap = snapshot_of_rows(stored(old + new), SnapshotOptions(half_life_votes=2))
    # The old answers' newest votes are 8-10 votes old: 2^-4 and less, under the 1/16 floor
    # but the one exactly at it.
    assert snap.stats.faded == 2
    assert sorted(snap.table[records.COMPLETION]) == sorted(
        ["old 2", *(f"new {i}" for i in range(8))]
    )
    weights = {e.completion: e.weight for e in snap.records("train") + snap.records("heldout")}
    assert weights["new 7"] == 1.0
    assert weights["new 3"] == pytest.approx(0.25)  # 4 votes after it: 2 half-lives
    assert weights["old 2"] == pytest.approx(1 / 16)


def test_both_half_lives_at_once_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        SnapshotOptions(half_life_days=1.0, half_life_votes=10)
