"""The feedback endpoint under load: `kto-loop serve-feedback` against a bare produce loop.

    python -m bench.feedback_http [--clients 50] [--seconds 15] [--batch 20]

Starts a local broker and the endpoint (the real CLI, as its own process, acks=all),
then measures, in one run on the same broker and topic (6 partitions):

- http: `--clients` concurrent clients (asyncio tasks in this process, one keep-alive
  connection each, speaking HTTP/1.1 over asyncio streams) POST one event each, back
  to back, for `--seconds` after a warm-up. Accepted events/s counts 202s; latency
  is per request, from send to the 202 (which waits for the broker's acknowledgement).
- http-batch: the same clients POST arrays of `--batch` events (how a backend that
  buffers votes would call it).
- bare: one kafka-python producer in this process sends the same number of events the
  http phase accepted (acks=all, the endpoint's linger), waiting for every
  acknowledgement at the end: what the broker takes with no HTTP in front.

Ratios are http / bare and http-batch / bare, events/s. The endpoint's peak RSS comes
from psutil. Every phase checks its answers: anything but 202 is counted as an error
and reported. The last line of stdout is one JSON object; it and a chart go to
bench/results/feedback_http.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvloop
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from connectors.config import Settings, load_settings
from connectors.feedback import kafka_clients
from deploy.local.broker import Broker, free_port, running_broker
from deploy.local.processes import dies_with_this_process
from pipeline.feedback.sample import sample_events

RESULTS = Path("bench/results")
KEY = "bench-" + uuid.uuid4().hex


@dataclass
class Phase:
    name: str
    events: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        out: dict[str, Any] = {
            "events": self.events,
            "events_per_s": round(self.rate, 1),
            "seconds": round(self.seconds, 2),
            "errors": self.errors,
        }
        if lat:
            out.update(
                requests=self.requests,
                latency_p50_ms=round(1000 * lat[len(lat) // 2], 2),
                latency_p99_ms=round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
                latency_max_ms=round(1000 * lat[-1], 2),
            )
        return out


def _events(n: int, tag: str) -> list[bytes]:
    """n valid ~700-byte likes and dislikes with ids unique to this run and phase."""
    out: list[bytes] = []
    for e in sample_events(3 * n + 10, seed=len(tag), pad_to=600):
        if e.get("feedback") not in ("like", "dislike"):
            continue
        e["event_id"] = f"{tag}-{e['event_id']}"
        e["user_id"] = f"{tag}-{e['user_id']}"
        out.append(json.dumps(e).encode())
        if len(out) == n:
            break
    return out


class _Connection:
    """A keep-alive HTTP/1.1 connection that POSTs and reads the status: the load
    generator. httpx's async client spends about 4 ms of CPU per request at 50
    connections, more than the endpoint itself, so it would measure itself."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, head: bytes, body: bytes) -> int:
        self.writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def _client_loop(
    port: int, bodies: list[bytes], phase: Phase, start: float, stop: float
) -> None:
    head = (
        f"POST /v1/feedback HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: "
    ).encode()
    conn = await _Connection.open("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += 1
            sent = time.perf_counter()
            try:
                code = str(await conn.post(head, body))
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                code = type(exc).__name__
                conn.close()
                conn = await _Connection.open("127.0.0.1", port)
            done = time.perf_counter()
            if sent < start:
                continue  # warm-up
            phase.requests += 1
            if code == "202":
                phase.events += body.count(b'"event_id"')
                phase.latencies.append(done - sent)
            else:
                phase.errors[code] = phase.errors.get(code, 0) + 1
    finally:
        conn.close()


async def _http_phase(
    port: int, name: str, clients: int, seconds: float, warmup: float, batch: int
) -> Phase:
    phase = Phase(name)
    per_client = max(1, 4000 // clients)
    bodies: list[list[bytes]] = []
    for c in range(clients):
        events = _events(per_client * batch, f"{name}-{c}-{uuid.uuid4().hex[:6]}")
        if batch == 1:
            bodies.append(events)
        else:
            bodies.append(
                [
                    b"[" + b",".join(events[i : i + batch]) + b"]"
                    for i in range(0, len(events), batch)
                ]
            )
    now = time.perf_counter()
    start, stop = now + warmup, now + warmup + seconds
    tasks = [
        asyncio.create_task(_client_loop(port, bodies[c], phase, start, stop))
        for c in range(clients)
    ]
    with tqdm(total=round(warmup + seconds), desc=name, unit="s", leave=False) as bar:
        while not all(t.done() for t in tasks):
            await asyncio.sleep(1)  # progress display; the tasks run on their own
            bar.update(1)
    await asyncio.gather(*tasks)
    phase.seconds = seconds
    return phase


def _bare_phase(settings: Any, n: int) -> Phase:
    phase = Phase("bare")
    values = _events(n, f"bare-{uuid.uuid4().hex[:6]}")
    keys = [json.loads(v)["conversation_id"].encode() for v in values]
    producer = kafka_clients.producer(settings.kafka, enable_idempotence=False, linger_ms=2)
    try:
        producer.send(settings.kafka.topic, key=b"warm", value=values[0]).get(timeout=30)
        started = time.perf_counter()
        futures = [
            producer.send(settings.kafka.topic, key=k, value=v)
            for k, v in tqdm(zip(keys, values, strict=True), total=n, desc="bare", leave=False)
        ]
        producer.flush()
        for f in futures:
            f.get(timeout=30)
        phase.seconds = time.perf_counter() - started
    finally:
        producer.close()
    phase.events = n
    return phase


@contextlib.contextmanager
def serving_endpoint(name: str) -> Iterator[tuple[Settings, Broker, subprocess.Popen, str]]:
    """A local broker and serve-feedback on a fresh topic `<name>-<random>`, without rate
    limits, with this benchmark's key trusted (a backend's: it names the users of its
    events): (settings, broker, endpoint process, URL). The endpoint is stopped with
    SIGTERM, then the broker."""
    with tempfile.TemporaryDirectory() as tmp, running_broker() as broker:
        root = Path(tmp)
        topic = f"{name}-{uuid.uuid4().hex[:6]}"
        config = root / "kto-loop.toml"
        config.write_text(
            f'[kafka]\nbootstrap_servers = ["{broker.bootstrap}"]\ntopic = "{topic}"\n'
            '[feedback_http]\nrate_per_key = "1000000/second"\nrate_per_user = "1000000/second"\n'
            'trusted_keys = ["bench"]\n'
        )
        settings = load_settings(config)
        kafka_clients.ensure_topics(settings.kafka, [topic])
        process, url = _start_endpoint(config, root / "serve-feedback.log")
        try:
            yield settings, broker, process, url
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def _start_endpoint(config: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "KTO_LOOP_FEEDBACK_HTTP__API_KEYS": json.dumps({"bench": KEY}),
        "KTO_LOOP_FEEDBACK_HTTP__PORT": str(port),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve-feedback", "-c", str(config),
             "--log-level", "WARNING"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
            preexec_fn=dies_with_this_process(),  # SIGTERM when the benchmark ends
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve-feedback exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling the endpoint's health with a deadline
    process.kill()
    raise RuntimeError(f"serve-feedback did not become healthy: {log}")


def _plot(phases: list[Phase], path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar([p.name for p in phases], [p.rate for p in phases], color=["C0", "C1", "C2"])
    ax1.set_ylabel("accepted events/s")
    ax1.set_title("throughput (acks=all)")
    for p in phases:
        if p.latencies:
            ax2.hist([1000 * x for x in p.latencies], bins=60, alpha=0.6, label=p.name)
    ax2.set_xlabel("request latency, ms (until 202)")
    ax2.set_yscale("log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with serving_endpoint("bench") as (settings, _broker, process, url):
        endpoint = psutil.Process(process.pid)
        port = int(url.rsplit(":", 1)[1])
        http = uvloop.run(_http_phase(port, "http", args.clients, args.seconds, args.warmup, 1))
        batched = uvloop.run(
            _http_phase(port, "http-batch", args.clients, args.seconds, args.warmup, args.batch)
        )
        rss = _peak_rss(endpoint)
        bare = _bare_phase(settings, max(http.events, 1000))

    phases = [http, batched, bare]
    result = {
        "bench": "feedback_http",
        "clients": args.clients,
        "batch": args.batch,
        "http": http.summary(),
        "http_batch": batched.summary(),
        "bare": bare.summary(),
        "ratio_http_vs_bare": round(http.rate / bare.rate, 4),
        "ratio_http_batch_vs_bare": round(batched.rate / bare.rate, 4),
        "endpoint_peak_rss_mb": rss,
        "cpus": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feedback_http.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(phases, args.out / "feedback_http.png")
    print(json.dumps(result))


def _peak_rss(process: psutil.Process) -> float | None:
    """The endpoint's peak resident set (VmHWM), in MB, where /proc has it."""
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(process.memory_info().rss / 2**20, 1)


if __name__ == "__main__":
    main()
