"""`kto-loop serve-feedback` under siege: slow clients hold hundreds of connections while
the broker stalls, and valid clients keep posting.

    python -m bench.feedback_http_siege [--slow 500] [--stall-seconds 60] [--posters 8]

Half the slow connections send their headers a byte at a time, half send complete
headers and then their body a byte at a time; each one the endpoint closes is opened
again, so the pressure stays. After a warm-up the broker is stopped (SIGSTOP) for
--stall-seconds, then resumed. Reported: the endpoint's peak RSS (and its RSS before
the siege), what valid posts were answered, how many slow connections the endpoint
closed, and whether every event answered 202 is in the topic (none lost). Last line:
one JSON object; also bench/results/feedback_http_siege.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from kafka import KafkaConsumer, TopicPartition

from bench.feedback_http import KEY, RESULTS, serving_endpoint


@dataclass
class Siege:
    """What a siege saw."""

    rss_before_mb: float = 0.0
    peak_rss_mb: float = 0.0
    answers: collections.Counter[int] = field(default_factory=collections.Counter)
    accepted: set[str] = field(default_factory=set)
    slow_closed: int = 0
    slow_open_peak: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "rss_before_mb": round(self.rss_before_mb, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "answers": {str(k): v for k, v in sorted(self.answers.items())},
            "accepted": len(self.accepted),
            "slow_closed_by_endpoint": self.slow_closed,
            "slow_open_peak": self.slow_open_peak,
        }


def _event(i: str) -> dict[str, Any]:
    return {
        "schema": 1, "event_id": f"siege-{i}", "ts": "2026-12-01T10:00:00Z",
        "conversation_id": f"c-{i}", "message_id": f"m-{i}", "user_id": f"u-{i}",
        "prompt": "How do I export an invoice?", "response": "Open Billing, then Export.",
        "feedback": "like", "model": "tiny-chat",
    }  # fmt: skip


def _slow_socket(port: int, n: int, key: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    if n % 2:  # complete headers, then a body that never finishes
        head = (
            f"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        sock.send(head.encode())
    else:  # headers that never finish
        sock.send(b"POST /v1/feedback HTTP/1.1\r\n")
    return sock


def _drip(sock: socket.socket) -> bool:
    """One more byte; False when the endpoint closed the connection."""
    try:
        if sock.recv(65536, socket.MSG_PEEK) == b"":
            return False
    except BlockingIOError:
        pass
    except OSError:
        return False
    try:
        sock.send(b"x")
    except BlockingIOError:
        return True
    except OSError:
        return False
    return True


def siege(
    url: str,
    endpoint_pid: int,
    stall: Callable[[], None],
    resume: Callable[[], None],
    *,
    slow: int = 500,
    stall_seconds: float = 60.0,
    posters: int = 8,
    key: str = KEY,
) -> Siege:
    """Hold `slow` slow connections and post valid events from `posters` threads; after
    20 accepted posts call `stall()`, `stall_seconds` later `resume()`, and stop once
    posts are accepted again."""
    port = int(url.rsplit(":", 1)[1])
    process = psutil.Process(endpoint_pid)
    result = Siege(rss_before_mb=process.memory_info().rss / 2**20)
    done = threading.Event()
    lock = threading.Lock()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                result.peak_rss_mb = max(result.peak_rss_mb, process.memory_info().rss / 2**20)
            done.wait(0.2)

    def hold() -> None:
        opened = 0
        socks: list[socket.socket] = []
        while not done.is_set():
            while len(socks) < slow and not done.is_set():
                try:
                    socks.append(_slow_socket(port, opened, key))
                    opened += 1
                except OSError:
                    break
            result.slow_open_peak = max(result.slow_open_peak, len(socks))
            alive = []
            for sock in socks:
                if _drip(sock):
                    alive.append(sock)
                else:
                    result.slow_closed += 1
                    sock.close()
            socks = alive
            done.wait(1.0)
        for sock in socks:
            sock.close()

    def post(worker: int) -> None:
        i = 0
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                event = _event(f"{worker}-{i}")
                i += 1
                try:
                    r = client.post(
                        f"{url}/v1/feedback", json=event, headers={"Authorization": f"Bearer {key}"}
                    )
                except httpx.TransportError:
                    with lock:
                        result.answers[0] += 1
                    continue
                with lock:
                    result.answers[r.status_code] += 1
                    if r.status_code == 202:
                        result.accepted.update(r.json()["event_ids"])

    threads = [threading.Thread(target=sample), threading.Thread(target=hold)]
    threads += [threading.Thread(target=post, args=(w,)) for w in range(posters)]
    for t in threads:
        t.start()
    try:
        _until(lambda: result.answers[202] >= 20, 120, "20 accepted posts")
        stall()
        try:
            time.sleep(stall_seconds)  # the stall itself is what is measured
        finally:
            resume()
        accepted = result.answers[202]
        _until(lambda: result.answers[202] >= accepted + 20, 120, "posts accepted again")
    finally:
        done.set()
        for t in threads:
            t.join(timeout=120)
    return result


def _until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.1)  # polling with a deadline


def topic_event_ids(bootstrap: list[str], topic: str) -> set[str]:
    """Every event_id on the topic, read to its end."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        ids: set[str] = set()
        while any(consumer.position(p) < end[p] for p in parts):
            for records in consumer.poll(timeout_ms=1000).values():
                ids.update(json.loads(r.value)["event_id"] for r in records)
        return ids
    finally:
        consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", type=int, default=500)
    parser.add_argument("--stall-seconds", type=float, default=60.0)
    parser.add_argument("--posters", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with serving_endpoint("siege") as (settings, broker, process, url):
        pid = broker.process.pid
        result = siege(
            url,
            process.pid,
            lambda: os.kill(pid, signal.SIGSTOP),
            lambda: os.kill(pid, signal.SIGCONT),
            slow=args.slow,
            stall_seconds=args.stall_seconds,
            posters=args.posters,
        )
        on_topic = topic_event_ids(settings.kafka.bootstrap_servers, settings.kafka.topic)

    out = {
        "bench": "feedback_http_siege",
        "slow_connections": args.slow,
        "stall_seconds": args.stall_seconds,
        **result.summary(),
        "lost_after_202": len(result.accepted - on_topic),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feedback_http_siege.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
