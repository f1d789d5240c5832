"""`kto-loop serve-feedback` as a real process, spoken to with a real HTTP client, in front
of the real broker; what it accepted is read back from the topic and through
`kto-loop ingest` into the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
from kafka import KafkaConsumer, TopicPartition

from connectors.feedback.store import FEEDBACK, FeedbackStore
from deploy.local.broker import Broker, free_port, start_broker
from pipeline.feedback.records import FEEDBACK_SCHEMA
from pipeline.feedback.votes import fold_rows
from tests.children import Descendants
from tests.conftest import HASH_KEY, KafkaSetup, wait_until

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parent.parent
KEY = "web-" + "3f9a" * 8


def event(i: int | str, **fields: Any) -> dict[str, Any]:
    return {
        "schema": 1,
        "event_id": f"http-{i}",
        "ts": "2026-12-01T10:00:00Z",
        "conversation_id": f"c-{i}",
        "message_id": f"m-{i}",
        "user_id": f"u-{i}",
        "prompt": f"How do I export invoice {i}?",
        "response": "Open Billing, then Export.",
        "feedback": "like",
        "model": "tiny-chat",
        **fields,
    }


@dataclass
class Endpoint:
    url: str
    process: subprocess.Popen
    log: Path

    def post(
        self, body: Any, *, key: str | None = KEY, headers: dict | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        return httpx.post(f"{self.url}/v1/feedback", json=body, headers=headers, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics").text


@pytest.fixture
def serve_feedback(tmp_path: Path) -> Iterator[Callable[..., Endpoint]]:
    """Start `kto-loop serve-feedback` for a KafkaSetup; every one started is stopped
    with SIGTERM at the end, and must end by it."""
    started: list[Endpoint] = []

    def start(setup: KafkaSetup, *extra: str, **feedback_http: Any) -> Endpoint:
        port = free_port()
        config = setup.config_file({"feedback_http": {"port": port, **feedback_http}})
        log = tmp_path / f"serve-feedback-{port}.log"
        env = {
            **os.environ,
            "KTO_LOOP_EVENTS__USER_HASH_KEY": HASH_KEY,
            "KTO_LOOP_FEEDBACK_HTTP__API_KEYS": json.dumps({"web": KEY}),
        }
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "serve-feedback", "-c", str(config), *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        endpoint = Endpoint(f"http://127.0.0.1:{port}", process, log)
        started.append(endpoint)
        wait_until(lambda: _healthy(endpoint), 60, f"serve-feedback to answer /healthz ({log})")
        return endpoint

    yield start
    for endpoint in started:
        if endpoint.process.poll() is None:
            endpoint.process.send_signal(signal.SIGTERM)
            try:
                code = endpoint.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                endpoint.process.kill()
                raise
            assert code in (0, -signal.SIGTERM), endpoint.log.read_text()


def _healthy(endpoint: Endpoint) -> bool:
    assert endpoint.process.poll() is None, endpoint.log.read_text()
    try:
        return httpx.get(f"{endpoint.url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _topic_values(setup: KafkaSetup) -> list[tuple[bytes, bytes]]:
    """Every (key, value) on the feedback topic, read to its end."""
    s = setup.settings()
    consumer = KafkaConsumer(bootstrap_servers=s.kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        parts = [TopicPartition(s.kafka.topic, p) for p in range(setup.partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        out: list[tuple[bytes, bytes]] = []
        while any(consumer.position(p) < end[p] for p in parts):
            for records in consumer.poll(timeout_ms=1000).values():
                out += [(r.key, r.value) for r in records]
        return out
    finally:
        consumer.close()


def _ingest(setup: KafkaSetup, ingest_processes: Callable[..., Any]) -> Any:
    proc = ingest_processes(setup.config_file(), setup.tmp / "ingest.log", "--idle-exit", "2")
    proc.process.wait(timeout=120)
    assert proc.process.returncode == 0, proc.log()
    return FeedbackStore(str(setup.tmp / "store")).read(FEEDBACK)


def test_posted_events_reach_the_store_exactly_once_through_ingest(
    kafka_setup: KafkaSetup, serve_feedback: Callable[..., Endpoint], ingest_processes: Any
) -> None:
    endpoint = serve_feedback(kafka_setup)
    singles = [event(i) for i in range(12)]
    for e in singles:
        r = endpoint.post(e)
        assert r.status_code == 202, r.text
        assert r.json() == {"accepted": 1, "event_ids": [e["event_id"]]}
    batch = [event(i, feedback="dislike", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], prompt=None) for i in range(12, 30)]  # fmt: skip
    r = endpoint.post(batch)
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 18

    # On the topic: each event once, keyed by its conversation, as it was sent.
    on_topic = _topic_values(kafka_setup)
    assert sorted(json.loads(v)["event_id"] for _, v in on_topic) == sorted(
        e["event_id"] for e in singles + batch
    )
    assert all(k.decode() == json.loads(v)["conversation_id"] for k, v in on_topic)

    stored = _ingest(kafka_setup, ingest_processes)
    assert sorted(stored["event_id"]) == sorted(e["event_id"] for e in singles + batch)
    by_id = stored.set_index("event_id")
    assert by_id.loc["http-3", "desirable"] == True  # noqa: E712 (a numpy bool)
    assert by_id.loc["http-20", "desirable"] == False  # noqa: E712
    assert json.loads(by_id.loc["http-20", "messages_json"])[0]["content"][0]["text"] == "hi"
    assert "ktoloop_feedback_http_events_accepted_total 30.0" in endpoint.metrics()


def test_invalid_events_get_400_naming_each_and_nothing_is_produced(
    kafka_setup: KafkaSetup, serve_feedback: Callable[..., Endpoint]
) -> None:
    endpoint = serve_feedback(kafka_setup)
    body = [event(1), event(2, feedback="meh"), event(3), {**event(4), "ts": "yesterday"}]
    r = endpoint.post(body)
    assert r.status_code == 400
    invalid = r.json()["invalid"]
    assert [(x["index"], x["kind"], x["event_id"]) for x in invalid] == [
        (1, "unknown_feedback", "http-2"),
        (3, "invalid_value", "http-4"),
    ]
    assert "`ts`" in invalid[1]["message"]
    r = httpx.post(f"{endpoint.url}/v1/feedback", content=b"{not json", headers={"X-API-Key": KEY})
    assert (r.status_code, r.json()["invalid"][0]["kind"]) == (400, "not_json")
    r = endpoint.post(event(5, response=None))
    assert (r.status_code, r.json()["invalid"][0]["kind"]) == (400, "missing_field")
    assert endpoint.post([]).status_code == 400

    assert _topic_values(kafka_setup) == []
    metrics = endpoint.metrics()
    assert 'ktoloop_feedback_http_events_rejected_total{reason="unknown_feedback"} 1.0' in metrics
    assert 'ktoloop_feedback_http_requests_total{code="400"} 4.0' in metrics


def test_keys_body_size_and_cors_are_enforced(
    kafka_setup: KafkaSetup, serve_feedback: Callable[..., Endpoint]
) -> None:
    endpoint = serve_feedback(kafka_setup, cors_origins=["https://chat.example.com"])
    assert endpoint.post(event(1), key=None).status_code == 401
    r = endpoint.post(event(1), key="web-" + "0" * 32)
    assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer")
    limit = kafka_setup.settings().ingest.max_event_bytes
    r = endpoint.post(event(2, response="x" * limit))
    assert r.status_code == 413 and "max_event_bytes" in r.json()["error"]

    preflight = {
        "Origin": "https://chat.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = httpx.options(f"{endpoint.url}/v1/feedback", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://chat.example.com"
    r = httpx.options(
        f"{endpoint.url}/v1/feedback", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in r.headers
    r = endpoint.post(event(3), headers={"Origin": "https://chat.example.com"})
    assert r.status_code == 202
    assert r.headers["access-control-allow-origin"] == "https://chat.example.com"
    assert [json.loads(v)["event_id"] for _, v in _topic_values(kafka_setup)] == ["http-3"]


def test_a_user_over_the_rate_limit_gets_429_with_retry_after(
    kafka_setup: KafkaSetup, serve_feedback: Callable[..., Endpoint]
) -> None:
    endpoint = serve_feedback(kafka_setup, rate_per_user="3/minute", rate_per_key="7/minute")
    for i in range(3):
        assert endpoint.post(event(i, user_id="ann")).status_code == 202
    r = endpoint.post(event(3, user_id="ann"))
    assert r.status_code == 429
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert "per user" in r.json()["error"]
    # A request that could never pass says so, without a Retry-After to wait for.
    r = endpoint.post([event(9, user_id="eve")] * 4)
    assert r.status_code == 429 and "retry-after" not in r.headers
    assert "smaller requests" in r.json()["error"]
    # Another user is not held back by ann, until the key's own limit.
    assert endpoint.post([event(4, user_id="bob"), event(5, user_id="cy")]).status_code == 202
    assert endpoint.post([event(6, user_id="bob"), event(7, user_id="cy")]).status_code == 202
    r = endpoint.post(event(8, user_id="dee"))
    assert r.status_code == 429 and "per key" in r.json()["error"]
    accepted = sorted(json.loads(v)["event_id"] for _, v in _topic_values(kafka_setup))
    assert accepted == [f"http-{i}" for i in (0, 1, 2, 4, 5, 6, 7)]
    assert 'ktoloop_feedback_http_rate_limited_total{limit="user"} 2.0' in endpoint.metrics()


def test_worker_processes_share_the_port_and_die_with_the_server(
    kafka_setup: KafkaSetup,
    serve_feedback: Callable[..., Endpoint],
    watch: Callable[[subprocess.Popen], Descendants],
) -> None:
    endpoint = serve_feedback(kafka_setup, "--workers", "2")
    descendants = watch(endpoint.process)
    with httpx.Client() as client:  # fresh connections, so both workers take some
        for i in range(20):
            r = client.post(
                f"{endpoint.url}/v1/feedback",
                json=event(i),
                headers={"Authorization": f"Bearer {KEY}", "Connection": "close"},
            )
            assert r.status_code == 202, r.text
    on_topic = sorted(json.loads(v)["event_id"] for _, v in _topic_values(kafka_setup))
    assert on_topic == sorted(f"http-{i}" for i in range(20))
    workers = wait_until(lambda: descendants.running("spawn_main"), 30, "two workers")
    assert len(workers) >= 2
    endpoint.process.kill()  # SIGKILL: the workers cannot be told, they must notice
    endpoint.process.wait(timeout=30)
    descendants.wait_gone(30)


# -- the broker failing under the endpoint ------------------------------------------
#
# These run on a broker of their own, which they stop and kill. The local broker keeps
# its log in memory, so "is it in the topic" is read while the broker still runs: a
# stopped (SIGSTOP) broker is down to its clients, and comes back with its log.


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = start_broker(log_path=tmp_path / "broker.log")
    yield broker
    if broker.process.poll() is None:
        os.kill(broker.process.pid, signal.SIGCONT)
    broker.stop()


def _own_setup(broker: Broker, tmp_path: Path) -> KafkaSetup:
    setup = KafkaSetup(broker, tmp_path, f"fb-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}")
    setup.create_topics()
    return setup


def test_a_broker_that_goes_away_mid_stream_gives_503s_and_never_a_202_for_a_lost_event(
    own_broker: Broker, tmp_path: Path, serve_feedback: Callable[..., Endpoint]
) -> None:
    setup = _own_setup(own_broker, tmp_path)
    endpoint = serve_feedback(setup, produce_timeout_seconds=2.0, rate_per_key="100000/second")
    answers: dict[str, int] = {}
    stop = threading.Event()

    def post_until_stopped() -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                e = event(f"s{i}")
                r = client.post(f"{endpoint.url}/v1/feedback", json=e, headers={"X-API-Key": KEY})
                answers[e["event_id"]] = r.status_code
                i += 1

    poster = threading.Thread(target=post_until_stopped)
    poster.start()
    try:
        wait_until(lambda: sum(c == 202 for c in answers.values()) >= 20, 60, "20 accepted posts")
        os.kill(own_broker.process.pid, signal.SIGSTOP)
        wait_until(lambda: sum(c == 503 for c in answers.values()) >= 2, 60, "503s")
        os.kill(own_broker.process.pid, signal.SIGCONT)
        n = len(answers)
        wait_until(lambda: list(answers.values())[n:].count(202) >= 5, 60, "202s again")
    finally:
        stop.set()
        poster.join(timeout=60)
    assert set(answers.values()) <= {202, 503}
    on_topic = {json.loads(v)["event_id"] for _, v in _topic_values(setup)}
    accepted = {i for i, c in answers.items() if c == 202}
    assert accepted <= on_topic, f"answered 202 but not in the topic: {accepted - on_topic}"
    assert 'ktoloop_feedback_http_requests_total{code="503"}' in endpoint.metrics()

    # A broker that is gone (killed): 503 at once, and /healthz says so.
    own_broker.process.kill()
    own_broker.process.wait(timeout=30)
    r = endpoint.post(event("after-kill"), timeout=30)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert "nothing was accepted" in r.json()["error"]
    assert httpx.get(f"{endpoint.url}/healthz", timeout=10).status_code == 503


def test_a_retry_after_a_client_timeout_does_not_make_a_second_vote(
    own_broker: Broker,
    tmp_path: Path,
    serve_feedback: Callable[..., Endpoint],
    ingest_processes: Any,
) -> None:
    setup = _own_setup(own_broker, tmp_path)
    endpoint = serve_feedback(setup, produce_timeout_seconds=20.0)
    vote = event("retry", feedback="dislike")
    os.kill(own_broker.process.pid, signal.SIGSTOP)
    with pytest.raises(httpx.ReadTimeout):
        endpoint.post(vote, timeout=1.0)  # the client gives up; the write stays queued
    os.kill(own_broker.process.pid, signal.SIGCONT)
    r = endpoint.post(vote, timeout=30)
    assert r.status_code == 202
    wait_until(lambda: len(_topic_values(setup)) == 2, 60, "the first write to land too")

    stored = _ingest(setup, ingest_processes)
    assert list(stored["event_id"]) == ["http-retry", "http-retry"]  # two offsets...
    fold = fold_rows(pa.Table.from_pandas(stored, schema=FEEDBACK_SCHEMA, preserve_index=False))
    assert fold.table.num_rows == 1  # ...one vote
    assert (fold.state.rows_read, fold.state.events) == (2, 1)
