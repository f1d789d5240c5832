"""Snapshot cost against store size: a full rebuild from every stored row, and a night's
snapshot folded from the vote table after 1% more events.

    python -m bench.snapshot [--sizes 1000000,5000000] [--new-share 0.01]

For each size N, fills a fresh store directly with FeedbackStore.write_batch (no broker;
4 partitions, one file per partition per 5,000 events, as ingest writes them) with
events of a support chatbot: multi-turn conversations sent as chat histories (flat
prompts for some), a few prompts carrying a ~10k-token document of word-like text,
several answers per prompt that many users vote on, likes and dislikes, 1-5 ratings,
retractions, votes changed later by the same user, votes without a user, redelivered
events, and five adapter versions over time. Then, each in its own spawned process
(time and peak RSS, VmHWM, are that process's own):

- first fold: the vote table built from the whole store (once, when it is adopted);
- full: a rebuild from every stored row, folded at once into an empty vote table
  (`votes.snapshot_of_rows(store.read_arrow(...))`);
- incremental: after N * new-share more events, `VoteTable.snapshot()`: fold the new
  files in, build from the table.

The incremental snapshot must be the full rebuild's (same content id: checked). The
goals: incremental under 5% of full's time at the largest size, and under 2 GB peak
RSS. A chart and the results go to bench/results/snapshot.{png,json}; the last line
of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import logging
import multiprocessing
import os
import random
import shutil
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from connectors.feedback.store import FEEDBACK, FeedbackStore
from pipeline.feedback import records

RESULTS = Path("bench/results")
PARTITIONS = 4
BATCH = 5000  # [ingest] batch_max_events' default
TOPIC = "feedback"
GOAL_SHARE = 0.05
TEXT_COLUMNS = (records.PROMPT, records.MESSAGES_JSON, records.RESPONSE)
GOAL_RSS_MB = 2048
console = Console(stderr=True)
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class BenchError(RuntimeError):
    pass


# -- the events ----------------------------------------------------------------------


@dataclasses.dataclass
class Pools:
    """The texts events draw from: prompts (flat or chat histories as JSON) and several
    answers to each; users as their stored hashes."""

    prompts: pa.Array  # str
    is_messages: np.ndarray  # bool per prompt
    answers: pa.Array  # str, ANSWERS per prompt
    users: pa.Array  # str


ANSWERS = 3


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(n)]


def make_pools(n_events: int, seed: int) -> Pools:
    """About one prompt per 250 events (so ~75 votes per answer at 5M), 1.5% of them
    holding one of 40 documents of ~10k tokens; 40% of histories multi-turn."""
    rng = random.Random(seed)
    vocab = _words(rng, 20000)

    def text(words: int) -> str:
        return " ".join(rng.choices(vocab, k=words))

    docs = [text(7500) for _ in range(40)]  # ~10k tokens each
    n_prompts = max(50, n_events // 250)
    prompts, is_messages = [], []
    for _ in range(n_prompts):
        question = text(rng.randint(6, 30)) + "?"
        if rng.random() < 0.015:
            question = f"{rng.choice(docs)}\n\n{question}"
        if rng.random() < 0.3:
            prompts.append(question)
            is_messages.append(False)
            continue
        turns = [{"role": "system", "content": "You are a helpful support assistant."}]
        for _ in range(rng.choice([0, 0, 0, 1, 2, 3]) if rng.random() < 0.4 else 0):
            turns.append({"role": "user", "content": text(rng.randint(5, 25))})
            turns.append({"role": "assistant", "content": text(rng.randint(20, 80))})
        turns.append({"role": "user", "content": question})
        prompts.append(json.dumps(turns))
        is_messages.append(True)
    answers = [text(rng.randint(20, 120)) for _ in range(n_prompts * ANSWERS)]
    users = [f"{rng.getrandbits(128):032x}" for _ in range(max(100, n_events // 20))]
    return Pools(pa.array(prompts), np.array(is_messages), pa.array(answers), pa.array(users))


class EventMaker:
    """Feedback rows as ingest stores them, batch by batch, deterministic for a seed."""

    def __init__(self, pools: Pools, total: int, seed: int) -> None:
        self.pools = pools
        self.total = total  # events over the whole run: spreads adapters and time
        self.rng = np.random.default_rng(seed)
        self.made = 0
        self.offsets = [0] * PARTITIONS
        # Per partition, earlier rows to change votes on or deliver again: a producer's
        # retry and a user's next vote are keyed by conversation, like the first.
        self.recent: dict[int, pa.Table] = {}
        self.text_bytes = 0  # prompt, messages and response text made, uncompressed

    def batch(self, n: int, partition: int) -> pa.Table:
        rng, pools = self.rng, self.pools
        i = np.arange(self.made, self.made + n)
        self.made += n
        n_prompts = len(pools.prompts)
        prompt = rng.integers(0, n_prompts, n)
        answer = prompt * ANSWERS + rng.integers(0, ANSWERS, n)
        conversation = rng.integers(0, max(1, self.total // 6), n)
        turn = rng.integers(0, 4, n)
        user = rng.integers(0, len(pools.users), n)
        roll = rng.random(n)
        liked = rng.random(n) < np.where(answer % ANSWERS == 0, 0.8, 0.35)
        feedback = np.where(liked, "like", "dislike").astype(object)
        rating = np.full(n, None, dtype=object)
        rated = roll < 0.12
        rating[rated] = rng.integers(1, 6, int(rated.sum()))
        feedback[rated] = "rating"
        feedback[(roll >= 0.12) & (roll < 0.15)] = "retract"
        desirable = np.where(feedback == "like", True, np.where(feedback == "dislike", False, None))
        desirable[rated] = [None if r == 3 else bool(r >= 4) for r in rating[rated]]
        ts_us = (START.timestamp() + i * (90 * 86400 / self.total)) * 1e6
        messages = pools.is_messages[prompt]
        prompt_text = pools.prompts.take(pa.array(prompt))
        no_user = rng.random(n) < 0.1
        users = pools.users.take(pa.array(user)).to_pylist()
        columns = {
            records.EVENT_ID: [f"e{k}" for k in i],
            records.TS: pa.array(ts_us.astype("int64"), pa.timestamp("us", tz="UTC")),
            records.CONVERSATION_ID: [f"c{c}" for c in conversation],
            records.MESSAGE_ID: [f"c{c}-m{t}" for c, t in zip(conversation, turn, strict=True)],
            records.USER_HASH: [None if x else u for x, u in zip(no_user, users, strict=True)],
            records.PROMPT: pa.array(
                [None if m else p for m, p in zip(messages, prompt_text.to_pylist(), strict=True)]
            ),
            records.MESSAGES_JSON: pa.array(
                [p if m else None for m, p in zip(messages, prompt_text.to_pylist(), strict=True)]
            ),
            records.RESPONSE: pools.answers.take(pa.array(answer)),
            records.FEEDBACK: feedback.tolist(),
            records.RATING: pa.array(rating.tolist(), pa.int8()),
            records.DESIRABLE: pa.array(desirable.tolist(), pa.bool_()),
            records.MODEL: ["tiny-chat"] * n,
            records.ADAPTER: [f"chat@v{1 + 5 * k // self.total}" for k in i],
            records.SCHEMA: pa.array(np.ones(n, dtype=np.int16)),
        }
        table = _with_provenance(columns, ts_us, n)
        table = self._changes_and_redeliveries(table, partition)
        for column in TEXT_COLUMNS:
            self.text_bytes += pc.sum(pc.binary_length(table[column])).as_py() or 0
        # Stored in this partition, at its next offsets (a redelivery's are new ones).
        first = self.offsets[partition]
        self.offsets[partition] += table.num_rows
        table = _replace(table, records.KAFKA_PARTITION, np.full(n, partition, dtype=np.int32))
        return _replace(table, records.KAFKA_OFFSET, np.arange(first, first + n, dtype=np.int64))

    def _changes_and_redeliveries(self, table: pa.Table, partition: int) -> pa.Table:
        """5% of a batch: a user changing an earlier vote (same message, later ts); 1%:
        an earlier event delivered again (same event id and ts, a later offset)."""
        earlier = self.recent.get(partition)
        if earlier is not None:
            n = table.num_rows
            take = self.rng.integers(0, earlier.num_rows, n // 20)
            changed = earlier.take(pa.array(take))
            flip = pa.array(
                [
                    "like" if f != "like" else "dislike"
                    for f in changed[records.FEEDBACK].to_pylist()
                ]
            )
            keep = table.schema
            changed = changed.set_column(
                keep.get_field_index(records.EVENT_ID),
                keep.field(records.EVENT_ID),
                pa.array([f"{e}-changed" for e in changed[records.EVENT_ID].to_pylist()]),
            )
            changed = _replace(changed, records.FEEDBACK, flip)
            changed = _replace(changed, records.DESIRABLE, pc.equal(flip, "like"))
            changed = _replace(changed, records.RATING, pa.nulls(len(flip), pa.int8()))
            changed = _replace(changed, records.TS, table[records.TS].slice(0, len(flip)))
            again = earlier.take(pa.array(self.rng.integers(0, earlier.num_rows, n // 100)))
            head = table.slice(0, n - len(changed) - len(again))
            table = pa.concat_tables([head, changed, again])
        self.recent[partition] = table.slice(0, min(2000, table.num_rows))
        return table


def _replace(table: pa.Table, name: str, values: Any) -> pa.Table:
    i = table.schema.get_field_index(name)
    field = table.schema.field(i)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    array = (
        values.cast(field.type) if isinstance(values, pa.Array) else pa.array(values, field.type)
    )
    return table.set_column(i, field, array)


def _with_provenance(columns: dict[str, Any], ts_us: np.ndarray, n: int) -> pa.Table:
    """The rows with the columns ingest adds (partition and offsets set by the caller)."""
    columns = {
        **columns,
        records.KAFKA_TOPIC: [TOPIC] * n,
        records.KAFKA_PARTITION: np.zeros(n, dtype=np.int32),
        records.KAFKA_OFFSET: np.zeros(n, dtype=np.int64),
        records.KAFKA_TIMESTAMP: (ts_us // 1000).astype("int64"),
        records.INGESTED_AT: (ts_us + 2e6).astype("int64"),
        records.INGESTED_BY: ["bench"] * n,
    }
    arrays = []
    for f in records.FEEDBACK_SCHEMA:
        value = columns[f.name]
        if isinstance(value, pa.Array | pa.ChunkedArray):
            arrays.append(value.cast(f.type))
        else:
            arrays.append(pa.array(value, f.type))
    return pa.Table.from_arrays(arrays, schema=records.FEEDBACK_SCHEMA)


def fill(store: FeedbackStore, maker: EventMaker, n: int) -> None:
    """Store n more events, one file per partition per BATCH events."""
    done = 0
    while done < n:
        for partition in range(PARTITIONS):
            size = min(BATCH, n - done)
            if size <= 0:
                break
            rows = maker.batch(size, partition)
            first = rows[records.KAFKA_OFFSET][0].as_py()
            store.write_batch(FEEDBACK, TOPIC, partition, first, first + size - 1, rows)
            done += size


# -- measuring -----------------------------------------------------------------------


def hwm_mb() -> float:
    """This process's own peak RSS (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError("/proc/self/status has no VmHWM line")


def _measure_in_child(kind: str, root: str, out: Any) -> None:
    from connectors.feedback.vote_table import VoteTable
    from pipeline.feedback.votes import FOLD_COLUMNS, snapshot_of_rows

    logging.basicConfig(level=logging.WARNING)
    gc.collect()
    store = FeedbackStore(root)
    started = time.perf_counter()
    if kind == "first_fold":
        state = VoteTable(store).fold()
        result: dict[str, Any] = {"rows_read": state.rows_read, "events": state.events}
    else:
        if kind == "full":
            snap = snapshot_of_rows(store.read_arrow(FEEDBACK, columns=FOLD_COLUMNS))
        else:
            snap = VoteTable(store).snapshot()
        result = {"snapshot": snap.id, "examples": len(snap.table), "votes": snap.stats.votes}
        result["rows_read"] = snap.stats.rows_read
    seconds = time.perf_counter() - started
    out.put({"seconds": round(seconds, 2), "peak_rss_mb": round(hwm_mb()), **result})


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def measure(kind: str, root: Path, cap_mb: float) -> dict[str, Any]:
    """`kind` in a fresh spawned process: its time and peak RSS are its own. A process
    past `cap_mb` of RSS is killed (the machine is shared) and reported as such."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=_measure_in_child, args=(kind, str(root), out))
    started = time.perf_counter()
    child.start()
    while child.is_alive():
        rss = _rss_mb(child.pid or 0)
        if rss > cap_mb:
            child.kill()
            child.join()
            seconds = round(time.perf_counter() - started, 1)
            console.print(f"  [yellow]{kind}: killed at {rss:,.0f} MB RSS after {seconds} s[/]")
            return {
                "seconds": None,
                "peak_rss_mb": None,
                "killed_over_mb": cap_mb,
                "after_s": seconds,
            }
        child.join(0.2)
    if child.exitcode != 0:
        raise BenchError(f"{kind} failed with exit code {child.exitcode}")
    return out.get(timeout=60)


def _dir_mb(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return round(total / (1 << 20), 1)


def run_size(n: int, new_share: float, seed: int, workdir: Path, cap_mb: float) -> dict[str, Any]:
    root = workdir / f"store-{n}"
    store = FeedbackStore(str(root))
    new = max(1, round(n * new_share))
    maker = EventMaker(make_pools(n, seed), n + new, seed)
    started = time.perf_counter()
    fill(store, maker, n)
    fill_s = time.perf_counter() - started
    console.print(f"{n:,} events stored in {fill_s:.0f} s ({_dir_mb(root / FEEDBACK):,} MB)")
    first = measure("first_fold", root, cap_mb)
    console.print(f"  first fold: {first}")
    fill(store, maker, new)
    incremental = measure("incremental", root, cap_mb)
    console.print(f"  incremental after {new:,} more: {incremental}")
    full = measure("full", root, cap_mb)
    console.print(f"  full rebuild: {full}")
    if full["seconds"] is not None and incremental["snapshot"] != full["snapshot"]:
        ids = f"incremental {incremental['snapshot']} != full {full['snapshot']}"
        raise BenchError(f"at {n} events: {ids}")
    result = {
        "events": n,
        "new_events": new,
        "store_mb": _dir_mb(root / FEEDBACK),
        "text_mb": round(maker.text_bytes / (1 << 20), 1),
        "vote_table_mb": _dir_mb(root / "votes"),
        "files": len(store.files(FEEDBACK)),
        "fill_s": round(fill_s, 1),
        "first_fold": first,
        "full": full,
        "incremental": incremental,
        "incremental_share": (
            None if full["seconds"] is None else round(incremental["seconds"] / full["seconds"], 4)
        ),
    }
    shutil.rmtree(root)
    return result


def write_chart(path: Path, rows: list[dict[str, Any]], cap_gb: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    lines = (("full", "full rebuild", "#888"), ("incremental", "incremental (+1%)", "#2a7"))
    for key, label, color in lines:
        done = [r for r in rows if r[key]["seconds"] is not None]
        sizes = [r["events"] for r in done]
        left.plot(sizes, [r[key]["seconds"] for r in done], "o-", label=label, color=color)
        right.plot(sizes, [r[key]["peak_rss_mb"] for r in done], "o-", label=label, color=color)
        killed = [r for r in rows if r[key]["seconds"] is None]
        if killed:
            at = [r["events"] for r in killed]
            left.plot(at, [r[key]["after_s"] for r in killed], "^", color=color,
                      label=f"{label}: killed at {cap_gb:g} GB, still running")  # fmt: skip
            right.plot(at, [cap_gb * 1024] * len(at), "^", color=color)
    right.axhline(GOAL_RSS_MB, ls="--", color="#c33", label="goal: 2 GB")
    left.set(title="snapshot time", xlabel="events in the store", ylabel="seconds")
    right.set(title="peak RSS (VmHWM)", xlabel="events in the store", ylabel="MB")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,5000000", help="store sizes, comma-separated")
    parser.add_argument("--new-share", type=float, default=0.01, help="new events, share of N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="snapshot", help="results name under bench/results/")
    parser.add_argument(
        "--cap-gb", type=float, default=12, help="kill a measurement past this RSS (shared machine)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="kto-bench-snapshot-"))
    try:
        cap_mb = args.cap_gb * 1024
        rows = [run_size(n, args.new_share, args.seed, workdir, cap_mb) for n in sizes]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    largest = rows[-1]
    full, incremental = largest["full"], largest["incremental"]
    # A full rebuild killed at the cap ran at least that long: a bound on the share.
    full_s = full["seconds"] if full["seconds"] is not None else full["after_s"]
    share = None if incremental["seconds"] is None else round(incremental["seconds"] / full_s, 4)
    result = {
        "sizes": sizes,
        "new_share": args.new_share,
        "partitions": PARTITIONS,
        "batch_events": BATCH,
        "cap_gb": args.cap_gb,
        "runs": rows,
        "largest": largest["events"],
        "full_s_at_largest": full["seconds"],
        "full_killed_at_largest_after_s": full.get("after_s"),
        "incremental_s_at_largest": incremental["seconds"],
        "incremental_share_at_largest": share if full["seconds"] is not None else None,
        "incremental_share_at_most": share,
        "incremental_peak_rss_mb_at_largest": incremental.get("peak_rss_mb"),
        "goal_time_met": share is not None and share < GOAL_SHARE,
        "goal_rss_met": (incremental.get("peak_rss_mb") or float("inf")) < GOAL_RSS_MB,
        "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result)
    (RESULTS / f"{args.out}.json").write_text(line + "\n")
    write_chart(RESULTS / f"{args.out}.png", rows, args.cap_gb)
    print(line)


if __name__ == "__main__":
    main()
