"""Line up a traced hot-swap bench run: what the server did around each miss.

    python -m bench.timeline DIR        # DIR from `python -m bench.hotswap --trace DIR`

Reads the server's timeline (the plugin's trace: requests, connections, event-loop
stalls, engine steps, swaps, retirements), every client request and every publish, all
on the host's monotonic clock, and prints:

- each failed request with what the server logged for its connection around it;
- the event loop's stalls and the engine's slowest steps, each with the nearest publish;
- the longest waits from handing a request to the engine to its first output;
- the slowest requests, with the engine steps that ran while they waited.

The last line is one JSON object with the counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def nearest_swap(t: float, swaps: list[dict]) -> str:
    if not swaps:
        return "no publish"
    best = min(swaps, key=lambda s: abs(t - s["start"]))
    return (
        f"{t - best['start']:+.2f} s from a publish call ({best['end'] - best['start']:.2f} s long)"
    )


def around(events: list[dict], start: float, end: float, port: int | None) -> list[dict]:
    out = []
    for e in events:
        t = e.get("start", e["mono"])
        if not (start - 2 <= t <= end + 2):
            continue
        if e["event"] in ("conn", "http") and e.get("port") != port:
            continue
        if e["event"] == "step":
            continue
        out.append(e)
    return out


def step_gaps(steps: list[dict]) -> list[tuple[float, float, dict]]:
    """(time, seconds since the previous step reached the API server, the step)."""
    return [(b["mono"], b["mono"] - a["mono"], b) for a, b in itertools.pairwise(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--phase", default="chat", choices=["chat", "peer"])
    parser.add_argument("--top", type=int, default=8, help="how many of each to show")
    args = parser.parse_args()
    d = args.directory
    server = read(d / "server.jsonl")
    clients = read(d / f"clients-{args.phase}.jsonl")
    swaps = read(d / f"swaps-{args.phase}.jsonl")
    if not clients:
        raise SystemExit(f"no client timeline in {d}: run bench.hotswap with --trace {d}")
    t0 = min(c["started"] for c in clients)
    t1 = max(c["ended"] for c in clients)
    server = [e for e in server if t0 - 5 <= e.get("start", e["mono"]) <= t1 + 5]
    stalls = [e for e in server if e["event"] == "loop_stall"]
    steps = [e for e in server if e["event"] == "step"]

    failed = [c for c in clients if not c["ok"]]
    retried = [c for c in clients if c.get("retried")]
    print(
        f"{len(clients)} requests, {len(failed)} failed, {len(retried)} sent twice after a "
        f"dropped connection; {len(swaps)} publishes"
    )
    for c in retried:
        print(
            f"\nSENT TWICE at {c['started'] - t0:.2f} s (port {c['port']}): {c['retried'][:120]}; "
            f"{nearest_swap(c['started'], swaps)}"
        )
    for c in failed:
        print(
            f"\nFAILED at {c['started'] - t0:.2f}-{c['ended'] - t0:.2f} s (port {c['port']}, "
            f"{c['max_tokens']} tokens): {c['error'][:120]}; {nearest_swap(c['started'], swaps)}"
        )
        for e in around(server, c["started"], c["ended"], c["port"]):
            when = e.get("start", e["mono"]) - t0
            rest = {k: v for k, v in e.items() if k not in ("mono", "event", "start")}
            print(f"  {when:8.2f} {e['event']:10} {rest}")

    print(f"\nevent-loop stalls over 100 ms: {len(stalls)}")
    for e in sorted(stalls, key=lambda e: -e["ms"])[: args.top]:
        print(f"  {e['since'] - t0:8.2f} s  {e['ms']:8.0f} ms  {nearest_swap(e['since'], swaps)}")

    gaps = sorted(step_gaps(steps), key=lambda g: -g[1])
    print(f"\nengine steps: {len(steps)}; the longest gaps between two steps' outputs:")
    for t, gap, e in gaps[: args.top]:
        print(
            f"  {t - gap - t0:8.2f} s  {gap * 1000:8.0f} ms  engine {e.get('elapsed_ms')} ms, "
            f"prefill {e.get('prefill_tokens')}, decode {e.get('decode_tokens')}, "
            f"loras {e.get('loras')}; {nearest_swap(t - gap, swaps)}"
        )

    admitted = {e["request"]: e["mono"] for e in server if e["event"] == "admit"}
    waits = sorted(
        ((s["mono"] - admitted[r], admitted[r], r) for s in steps for r in s.get("first", ())
         if r in admitted),
        reverse=True,
    )  # fmt: skip
    print(f"\nrequests handed to the engine: {len(waits)}; the longest waits for a first output:")
    for wait, t, rid in waits[: args.top]:
        print(f"  {t - t0:8.2f} s  {wait * 1000:8.0f} ms  {rid}; {nearest_swap(t, swaps)}")

    slow = sorted((c for c in clients if c["ok"]), key=lambda c: c["started"] - c["ended"])
    print("\nslowest requests:")
    for c in slow[: args.top]:
        during = [s for s in steps if c["started"] <= s["mono"] <= c["ended"]]
        print(
            f"  {c['started'] - t0:8.2f} s  {c['ended'] - c['started']:6.2f} s  "
            f"{c['max_tokens']} tokens, {len(during)} steps meanwhile; "
            f"{nearest_swap(c['started'], swaps)}"
        )
    summary = {
        "requests": len(clients),
        "failed": len(failed),
        "retried": len(retried),
        "loop_stalls": len(stalls),
        "loop_stall_max_ms": max((e["ms"] for e in stalls), default=0),
        "step_gap_max_s": round(gaps[0][1], 3) if gaps else None,
        "first_output_wait_p50_ms": round(statistics.median(w for w, _, _ in waits) * 1000, 1)
        if waits
        else None,
        "first_output_wait_max_ms": round(waits[0][0] * 1000, 1) if waits else None,
        "step_gap_p50_ms": round(statistics.median(g for _, g, _ in gaps) * 1000, 1)
        if gaps
        else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
