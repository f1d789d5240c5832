"""Production liked share per adapter version: did a promotion help real users?

Offline evaluation scores an adapter on held-out examples; this is the measure that
matters after a promotion: of the votes real users gave on answers each served adapter
version wrote, how many were likes. Comparing `chat@v3`'s liked share with `chat@v2`'s
says whether promoting v3 helped the people using it.

Votes are counted from the vote table (pipeline/feedback/votes.py), as a snapshot counts
them: a redelivered event once, only a user's latest event per message, retractions
withdrawn, neutral ratings left out. Unlike a snapshot, a vote counts even when its row
holds no prompt or response text: a like is a like whatever was stored with it.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from pipeline.feedback.records import ADAPTER, DESIRABLE, TS
from pipeline.feedback.votes import is_counted
from pipeline.serving.registry import parse_served_name, version_number

# The adapter row of votes on answers served without an adapter (the base model, or
# events from clients that did not say).
NO_ADAPTER = "(none)"
VOTES = "votes"
LIKED = "liked"
LIKED_SHARE = "liked_share"
FIRST_VOTE_TS = "first_vote_ts"
LAST_VOTE_TS = "last_vote_ts"
VS_PREVIOUS_PTS = "vs_previous_pts"
LIKED_SHARE_COLUMNS = (
    ADAPTER,
    VOTES,
    LIKED,
    LIKED_SHARE,
    VS_PREVIOUS_PTS,
    FIRST_VOTE_TS,
    LAST_VOTE_TS,
)


def liked_share_by_adapter(votes: pa.Table) -> pd.DataFrame:
    """The share of counted votes that were likes, per adapter the answers were served by.

    Args:
        votes: a vote table (votes.VOTE_TABLE_SCHEMA), as the feedback store's vote
            table folds it (connectors/feedback/vote_table.py).

    Returns:
        One row per adapter with columns adapter (str; NO_ADAPTER for answers served
        without one), votes (int), liked (int), liked_share (float, liked / votes),
        vs_previous_pts (100 x the change in liked share from the same alias's previous
        version with votes; NaN for an alias's first and for other names),
        first_vote_ts and last_vote_ts (the ts range of the counted votes). Rows are
        ordered by alias, then version number (`chat@v2` before `chat@v10`); names not
        of the form `alias@vN` follow by name, and NO_ADAPTER comes last. No counted
        votes (or no rows) give an empty frame with these columns.
    """
    counted = votes.filter(is_counted(votes)).select([ADAPTER, DESIRABLE, TS]).to_pandas()
    if counted.empty:
        return _empty()
    counted[ADAPTER] = counted[ADAPTER].fillna(NO_ADAPTER).astype(str)
    counted[DESIRABLE] = counted[DESIRABLE].astype(bool)
    grouped = counted.groupby(ADAPTER, sort=False)
    table = pd.DataFrame(
        {
            VOTES: grouped.size().astype("int64"),
            LIKED: grouped[DESIRABLE].sum().astype("int64"),
            FIRST_VOTE_TS: grouped[TS].min(),
            LAST_VOTE_TS: grouped[TS].max(),
        }
    )
    table[LIKED_SHARE] = table[LIKED] / table[VOTES]
    table = table.loc[sorted(table.index, key=_version_order)]
    aliases = pd.Series(
        [(parse_served_name(a) or (None, None))[0] for a in table.index], index=table.index
    )
    previous = table[LIKED_SHARE].groupby(aliases).shift(1)  # rows without an alias drop out
    table[VS_PREVIOUS_PTS] = (100 * (table[LIKED_SHARE] - previous)).reindex(table.index)
    return table.rename_axis(ADAPTER).reset_index()[list(LIKED_SHARE_COLUMNS)]


def _version_order(adapter: str) -> tuple[int, str, int]:
    """Sort key: served names by alias and version number, other names by name, then
    NO_ADAPTER."""
    if adapter == NO_ADAPTER:
        return (2, "", 0)
    parsed = parse_served_name(adapter)
    if parsed is None:
        return (1, adapter, 0)
    alias, version = parsed
    return (0, alias, version_number(version))


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {
            ADAPTER: pd.Series(dtype=str),
            VOTES: pd.Series(dtype="int64"),
            LIKED: pd.Series(dtype="int64"),
            LIKED_SHARE: pd.Series(dtype="float64"),
            VS_PREVIOUS_PTS: pd.Series(dtype="float64"),
            FIRST_VOTE_TS: pd.Series(dtype="datetime64[us, UTC]"),
            LAST_VOTE_TS: pd.Series(dtype="datetime64[us, UTC]"),
        }
    )
