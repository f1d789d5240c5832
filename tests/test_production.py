"""Production liked share per adapter, counted from the vote table: hand-worked cases of
which votes count (dedupe, latest vote, retraction, neutral ratings), the adapter rows
and their order."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.feedback.production import LIKED_SHARE_COLUMNS, NO_ADAPTER, liked_share_by_adapter
from pipeline.feedback.records import FEEDBACK_SCHEMA
from pipeline.feedback.votes import VOTE_TABLE_SCHEMA, fold_rows
from tests.rows import T0, event


def votes(rows: list[dict[str, Any]]) -> pa.Table:
    """The vote table of stored rows (the store's Arrow schema) folded at once."""
    return fold_rows(pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA)).table


def shares(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int, float]]:
    """adapter -> (votes, liked, liked_share), in the table's order."""
    table = liked_share_by_adapter(votes(rows))
    return {r.adapter: (r.votes, r.liked, r.liked_share) for r in table.itertuples(index=False)}


def test_two_adapters_get_their_own_liked_share_and_vote_time_range() -> None:
    rows = [
        event("a1", user="u1", message="m1", t=0, adapter="chat@v1"),
        event("a2", user="u2", message="m1", t=5, feedback="dislike", adapter="chat@v1"),
        event("b1", user="u1", message="m2", t=10, adapter="chat@v2"),
        event("b2", user="u2", message="m2", t=20, adapter="chat@v2"),
        event("b3", user="u3", message="m2", t=30, adapter="chat@v2"),
        event("b4", user="u4", message="m2", t=40, feedback="dislike", adapter="chat@v2"),
    ]
    table = liked_share_by_adapter(votes(rows))
    assert list(table.columns) == list(LIKED_SHARE_COLUMNS)
    assert shares(rows) == {"chat@v1": (2, 1, 0.5), "chat@v2": (4, 3, 0.75)}
    v2 = table.iloc[1]
    assert v2.first_vote_ts == T0 + dt.timedelta(seconds=10)
    assert v2.last_vote_ts == T0 + dt.timedelta(seconds=40)


def test_a_redelivered_event_counts_once() -> None:
    rows = [event("e1", t=0), event("e1", t=0), event("e2", user="u2", feedback="dislike")]
    assert shares(rows) == {"chat@v1": (2, 1, 0.5)}


def test_a_later_vote_of_a_user_on_a_message_replaces_the_earlier_one() -> None:
    rows = [event("e2", feedback="dislike", t=10), event("e1", feedback="like", t=0)]
    assert shares(rows) == {"chat@v1": (1, 0, 0.0)}


def test_a_retraction_withdraws_the_vote() -> None:
    rows = [
        event("e1", user="u1", t=0),
        event("e2", user="u2", feedback="dislike", t=1),
        event("e3", user="u1", feedback="retract", t=2),
    ]
    assert shares(rows) == {"chat@v1": (1, 0, 0.0)}


def test_a_neutral_rating_is_not_counted() -> None:
    rows = [event("e1", user="u1", rating=3), event("e2", user="u2", rating=5)]
    assert shares(rows) == {"chat@v1": (1, 1, 1.0)}


def test_a_vote_counts_without_prompt_or_response_text() -> None:
    rows = [
        event("e1", user="u1", prompt=None, response=None),
        event("e2", user="u2", feedback="dislike"),
    ]
    assert shares(rows) == {"chat@v1": (2, 1, 0.5)}


def test_votes_without_an_adapter_are_reported_under_none_last() -> None:
    rows = [
        event("e1", user="u1", message="m1", adapter=None),
        event("e2", user="u2", message="m2", adapter="chat@v1", feedback="dislike"),
    ]
    assert shares(rows) == {"chat@v1": (1, 0, 0.0), NO_ADAPTER: (1, 1, 1.0)}
    assert list(liked_share_by_adapter(votes(rows)).adapter) == ["chat@v1", NO_ADAPTER]


def test_each_version_is_compared_with_its_aliases_previous_version_in_points() -> None:
    def cast(adapter: str, liked: int, disliked: int) -> list[dict[str, Any]]:
        return [
            event(
                f"{adapter}-{i}",
                user=f"u{i}",
                message=adapter,
                adapter=adapter,
                feedback="like" if i < liked else "dislike",
            )
            for i in range(liked + disliked)
        ]

    rows = [
        *cast("chat@v1", 1, 3),
        *cast("chat@v3", 3, 1),
        *cast("assist@v2", 1, 1),
        *cast("custom", 1, 0),
    ]
    table = liked_share_by_adapter(votes(rows)).set_index("adapter")
    assert table.loc["chat@v3", "vs_previous_pts"] == pytest.approx(50.0)
    for first in ("assist@v2", "chat@v1", "custom"):
        assert pd.isna(table.loc[first, "vs_previous_pts"]), first


def test_versions_sort_by_number_per_alias_and_other_names_follow() -> None:
    names = ["chat@v10", "custom-lora", "chat@v2", "assist@v3", "chat@v1", None]
    rows = [event(f"e{i}", message=f"m{i}", adapter=a) for i, a in enumerate(names)]
    table = liked_share_by_adapter(votes(rows))
    assert list(table.adapter) == [
        "assist@v3",
        "chat@v1",
        "chat@v2",
        "chat@v10",
        "custom-lora",
        NO_ADAPTER,
    ]


@pytest.mark.parametrize(
    "table",
    [
        VOTE_TABLE_SCHEMA.empty_table(),
        votes([event("e1", rating=3), event("e2", user="u2", feedback="retract")]),
    ],
    ids=["no-votes", "no-counted-votes"],
)
def test_no_counted_votes_give_an_empty_table_with_the_columns(table: pa.Table) -> None:
    shares = liked_share_by_adapter(table)
    assert shares.empty
    assert list(shares.columns) == list(LIKED_SHARE_COLUMNS)
