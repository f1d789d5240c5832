"""`kto-loop serve-feedback` as a real process, spoken to with a real HTTP client, in front
of the real broker; what it accepted is read back from the topic and through
`kto-loop ingest` into the store."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pandas as pd
import pyarrow as pa
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bench.feedback_http_siege import siege, topic_event_ids
from connectors.feedback.store import FEEDBACK, FeedbackStore
from deploy.local.broker import Broker, free_port, start_broker
from deploy.local.processes import dies_with_this_process
from pipeline.feedback.events import hash_user
from pipeline.feedback.records import FEEDBACK_SCHEMA
from pipeline.feedback.votes import fold_rows, is_counted
from tests.children import Descendants
from tests.conftest import HASH_KEY, KafkaSetup, wait_until

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parent.parent
# The backend's key, trusted to name users, and a browser key, which names no one.
KEY = "backend-" + "3f9a" * 8
BROWSER_KEY = "web-" + "77c1" * 8
TOKEN_SECRET = "b5" * 32
# Where the endpoint puts the ids of events posted with KEY.
NS = "k.backend:"


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
            "KTO_LOOP_FEEDBACK_HTTP__API_KEYS": json.dumps({"backend": KEY, "web": BROWSER_KEY}),
            "KTO_LOOP_FEEDBACK_HTTP__TRUSTED_KEYS": '["backend"]',
            "KTO_LOOP_FEEDBACK_HTTP__USER_TOKEN_SECRET": TOKEN_SECRET,
        }
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "serve-feedback", "-c", str(config), *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                preexec_fn=dies_with_this_process(),  # SIGTERM if the session dies first
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
        assert r.json() == {"accepted": 1, "event_ids": [NS + e["event_id"]]}
    batch = [event(i, feedback="dislike", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], prompt=None) for i in range(12, 30)]  # fmt: skip
    r = endpoint.post(batch)
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 18

    # On the topic: each event once, keyed by its conversation, its id in the key's
    # namespace.
    on_topic = _topic_values(kafka_setup)
    assert sorted(json.loads(v)["event_id"] for _, v in on_topic) == sorted(
        NS + e["event_id"] for e in singles + batch
    )
    assert all(k.decode() == json.loads(v)["conversation_id"] for k, v in on_topic)

    stored = _ingest(kafka_setup, ingest_processes)
    assert sorted(stored["event_id"]) == sorted(NS + e["event_id"] for e in singles + batch)
    by_id = stored.set_index("event_id")
    assert by_id.loc[NS + "http-3", "desirable"] == True  # noqa: E712 (a numpy bool)
    assert by_id.loc[NS + "http-20", "desirable"] == False  # noqa: E712
    assert json.loads(by_id.loc[NS + "http-20", "messages_json"])[0]["content"][0]["text"] == "hi"
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
    assert [json.loads(v)["event_id"] for _, v in _topic_values(kafka_setup)] == [NS + "http-3"]


def test_a_user_over_the_rate_limit_gets_429_with_retry_after(
    kafka_setup: KafkaSetup, serve_feedback: Callable[..., Endpoint]
) -> None:
    # The key's limit counts every event posted with it, refused ones too: 12 here.
    endpoint = serve_feedback(kafka_setup, rate_per_user="3/minute", rate_per_key="12/minute")
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
    assert accepted == [f"{NS}http-{i}" for i in (0, 1, 2, 4, 5, 6, 7)]
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
    assert on_topic == sorted(f"{NS}http-{i}" for i in range(20))
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
    on_topic = {json.loads(v)["event_id"].removeprefix(NS) for _, v in _topic_values(setup)}
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
    assert list(stored["event_id"]) == [NS + "http-retry"] * 2  # two offsets...
    fold = fold_rows(pa.Table.from_pandas(stored, schema=FEEDBACK_SCHEMA, preserve_index=False))
    assert fold.table.num_rows == 1  # ...one vote
    assert (fold.state.rows_read, fold.state.events) == (2, 1)


# -- who votes, and when --------------------------------------------------------------


def _token(user: str, **claims: Any) -> str:
    """What the app's backend gives its signed-in user (docs/getting-feedback-in.md)."""
    now = int(time.time())
    payload = {"sub": user, "aud": "kto-loop-feedback", "iat": now, "exp": now + 600, **claims}
    return jwt.encode(payload, TOKEN_SECRET, algorithm="HS256")


def _browser(endpoint: Endpoint, body: Any, user: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"X-User-Token": _token(user)} if user else {}
    return endpoint.post(body, key=BROWSER_KEY, headers=headers, **kw)


def _votes_on(stored: Any, message_id: str) -> tuple[int, int]:
    """(likes, dislikes) that count on a message, by the one vote rule."""
    rows = pa.Table.from_pandas(stored, schema=FEEDBACK_SCHEMA, preserve_index=False)
    votes = fold_rows(rows).table
    counted = votes.filter(is_counted(votes)).to_pandas()
    liked = counted[counted["message_id"] == message_id]["desirable"]
    return int(liked.sum()), int((~liked).sum())


def test_a_browser_key_cannot_change_retract_or_outvote_another_users_vote(
    kafka_setup: KafkaSetup, serve_feedback: Callable[..., Endpoint], ingest_processes: Any
) -> None:
    """The attack as one holding only the page's key would make it, on default settings
    (anonymous votes off) and with a user token of the attacker's own."""
    endpoint = serve_feedback(kafka_setup)
    # User A's like arrives from the app's own Kafka producer.
    a_like = event("a", user_id="A", ts="2026-12-01T10:00:00Z")
    s = kafka_setup.settings()
    producer = KafkaProducer(bootstrap_servers=s.kafka.bootstrap_servers, acks="all")
    producer.send(s.kafka.topic, key=b"c-a", value=json.dumps(a_like).encode()).get(timeout=30)
    producer.close()

    future, past = "2262-01-01T00:00:00Z", "1970-01-01T00:00:01Z"
    attacks = [
        event("x1", user_id="A", feedback="retract", ts=future),  # in A's name, dated 2262
        event("x2", user_id="A", feedback="dislike", ts=future),
        {**event("a"), "user_id": None, "feedback": "dislike", "ts": past},  # A's event_id
        *[event(f"x{i}", user_id=None, feedback="dislike", message_id="m-a",
                conversation_id="c-a", ts=future) for i in range(300)],
    ]  # fmt: skip
    for attack in attacks[:3]:
        assert _browser(endpoint, attack).status_code == 403
    r = _browser(endpoint, attacks[3:])
    assert r.status_code == 403 and "anonymous_votes" in r.json()["error"]
    # The same with the attacker's own token: naming A is refused; the rest are
    # mallory's own votes, her ids in her namespace, her ts clamped to the endpoint's clock.
    r = _browser(endpoint, attacks[0], user="mallory")
    assert r.status_code == 403 and "not the X-User-Token's user" in r.json()["error"]
    r = _browser(endpoint, attacks[2], user="mallory")
    assert r.status_code == 202 and r.json()["event_ids"][0].endswith(":http-a")
    assert r.json()["event_ids"][0] != "http-a"
    mallory = {**attacks[2], "feedback": "retract", "ts": future, "event_id": "http-x3"}
    assert _browser(endpoint, mallory, user="mallory").status_code == 202
    for i in range(300):  # each one replaces mallory's previous vote: one voter
        body = {**attacks[3], "event_id": f"http-y{i}"}
        r = _browser(endpoint, body, user="mallory")
        assert r.status_code in (202, 429), r.text

    stored = _ingest(kafka_setup, ingest_processes)
    assert _votes_on(stored, "m-a") == (1, 1)  # A's like stands; mallory is one dislike
    assert "http-a" in set(stored["event_id"])  # A's own event, untouched
    on_a = stored[stored["message_id"] == "m-a"]
    assert on_a["ts"].max() < pd.Timestamp.now(tz="UTC") + pd.Timedelta(minutes=6)
    assert set(on_a["user_hash"]) == {
        hash_user("A", HASH_KEY.encode()),
        hash_user("mallory", HASH_KEY.encode()),
    }


def test_user_tokens_are_verified_and_name_the_voter(
    kafka_setup: KafkaSetup, serve_feedback: Callable[..., Endpoint]
) -> None:
    endpoint = serve_feedback(kafka_setup)
    r = _browser(endpoint, event(1, user_id=None), user="ann")
    assert r.status_code == 202
    (event_id,) = r.json()["event_ids"]
    assert event_id.startswith("u.") and event_id.endswith(":http-1")
    # The user_id the token names may be repeated; another is refused.
    assert _browser(endpoint, event(2, user_id="ann"), user="ann").status_code == 202
    assert _browser(endpoint, event(3, user_id="bob"), user="ann").status_code == 403
    # Tokens that do not verify: another secret, expired, another audience, no sub.
    now = int(time.time())
    bad = [
        jwt.encode({"sub": "ann", "aud": "kto-loop-feedback", "exp": now + 60}, "c" * 64, "HS256"),
        _token("ann", exp=now - 120),
        _token("ann", aud="another-app"),
        jwt.encode({"aud": "kto-loop-feedback", "exp": now + 60}, TOKEN_SECRET, "HS256"),
        "not-a-token",
    ]
    for token in bad:
        r = endpoint.post(event(4, user_id=None), key=BROWSER_KEY, headers={"X-User-Token": token})
        assert r.status_code == 401, (token, r.text)
        assert "X-User-Token" in r.json()["error"]
    # The backend's trusted key names users itself.
    assert endpoint.post(event(5, user_id="cy")).status_code == 202
    on_topic = {json.loads(v)["event_id"]: json.loads(v) for _, v in _topic_values(kafka_setup)}
    assert sorted(e["user_id"] for e in on_topic.values()) == ["ann", "ann", "cy"]
    assert on_topic[event_id]["user_id"] == "ann"


def test_anonymous_votes_count_as_one_voter_per_address(
    kafka_setup: KafkaSetup, serve_feedback: Callable[..., Endpoint], ingest_processes: Any
) -> None:
    """10,000 anonymous dislikes from one address, with X-Forwarded-For made up for each:
    that address's votes under its limit, one voter, not 10,000."""
    endpoint = serve_feedback(
        kafka_setup, anonymous_votes=True, rate_per_user="50/minute", rate_per_key="100000/minute"
    )
    answers: collections.Counter[int] = collections.Counter()
    with httpx.Client(timeout=30) as client:
        for i in range(0, 10_000, 5):
            body = [event(f"n{i + j}", user_id=None, feedback="dislike", message_id="m-a", conversation_id="c-a") for j in range(5)]  # fmt: skip
            r = client.post(
                f"{endpoint.url}/v1/feedback",
                json=body,
                headers={
                    "Authorization": f"Bearer {BROWSER_KEY}",
                    "X-Forwarded-For": f"10.0.{i % 250}.9",
                },
            )
            answers[r.status_code] += len(body)
    assert answers[202] == 50 and answers[429] == 9_950, answers
    stored = _ingest(kafka_setup, ingest_processes)
    assert len(stored) == 50 and stored["user_hash"].nunique() == 1
    assert _votes_on(stored, "m-a") == (0, 1)


def test_refused_events_count_against_the_key_and_too_deep_is_a_400(
    kafka_setup: KafkaSetup, serve_feedback: Callable[..., Endpoint]
) -> None:
    endpoint = serve_feedback(kafka_setup, rate_per_key="6/minute")
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (b"[" + deep + b"]", b'{"schema": 1, "x": ' + deep + b"}"):
        r = httpx.post(f"{endpoint.url}/v1/feedback", content=body, headers={"X-API-Key": KEY})
        assert (r.status_code, r.json()["invalid"][0]["kind"]) == (400, "too_deep"), r.text
    r = endpoint.post([event(1, feedback="meh")] * 3)
    assert r.status_code == 400
    # 2 + 3 events refused so far: one valid event is the sixth, a second is over.
    assert endpoint.post(event(2)).status_code == 202
    r = endpoint.post(event(3))
    assert r.status_code == 429 and "per key" in r.json()["error"]


def test_slow_clients_and_a_stalled_broker_leave_memory_bounded_and_lose_nothing(
    own_broker: Broker, tmp_path: Path, serve_feedback: Callable[..., Endpoint]
) -> None:
    """500 connections sending headers or a body a byte a second, while the broker
    stalls: they are closed at their deadlines, valid posts are answered 202 or 503
    (503 at once once max_in_flight_bytes wait on the broker), memory stays bounded
    and every 202 is in the topic. bench.feedback_http_siege runs it with a 60 s stall."""
    setup = _own_setup(own_broker, tmp_path)
    endpoint = serve_feedback(
        setup,
        header_timeout_seconds=2.0,
        body_timeout_seconds=3.0,
        produce_timeout_seconds=3.0,
        max_in_flight_bytes=1 << 16,
        rate_per_key="100000/second",
        rate_per_user="100000/second",
    )
    pid = own_broker.process.pid
    result = siege(
        endpoint.url,
        endpoint.process.pid,
        lambda: os.kill(pid, signal.SIGSTOP),
        lambda: os.kill(pid, signal.SIGCONT),
        slow=500,
        stall_seconds=10.0,
        posters=16,
        key=KEY,
    )
    assert set(result.answers) <= {202, 503}, result.answers
    assert result.answers[503] > 0 and result.slow_open_peak == 500
    assert result.slow_closed >= 500  # each slow one closed at its deadline, and again
    assert result.peak_rss_mb - result.rss_before_mb < 100, result.summary()
    on_topic = topic_event_ids([own_broker.bootstrap], setup.topic)
    assert result.accepted and result.accepted <= on_topic


def test_a_stalled_broker_sheds_load_past_the_in_flight_bound_instead_of_queueing(
    own_broker: Broker, tmp_path: Path, serve_feedback: Callable[..., Endpoint]
) -> None:
    """Requests whose events would put more than max_in_flight_bytes on a stalled
    broker are answered 503 at once, naming the bound; those within it wait, and are
    202 and in the topic once the broker is back."""
    setup = _own_setup(own_broker, tmp_path)
    endpoint = serve_feedback(
        setup,
        produce_timeout_seconds=60.0,
        max_in_flight_bytes=1 << 16,
        rate_per_user="1000/second",
    )
    assert endpoint.post(event("warm")).status_code == 202  # the producer is connected
    os.kill(own_broker.process.pid, signal.SIGSTOP)
    answers: dict[str, httpx.Response] = {}

    def post(i: int) -> None:
        answers[f"http-b{i}"] = endpoint.post(event(f"b{i}", response="x" * 4000), timeout=120)

    posters = [threading.Thread(target=post, args=(i,)) for i in range(40)]  # 160 KB in all
    try:
        for t in posters:
            t.start()
        shed = lambda: [r for r in answers.values() if r.status_code == 503]  # noqa: E731
        # About 4.3 KB a request: 15 fit in 64 KiB, the other 25 are turned away.
        wait_until(lambda: len(shed()) >= 24, 30, "503s for what the bound cannot hold")
        assert len(answers) == len(shed())  # the others still wait on the broker
        assert all("max_in_flight_bytes" in r.json()["error"] for r in shed())
    finally:
        os.kill(own_broker.process.pid, signal.SIGCONT)
        for t in posters:
            t.join(timeout=120)
    codes = collections.Counter(r.status_code for r in answers.values())
    assert codes[202] + codes[503] == 40 and codes[202] >= 10, codes
    on_topic = {json.loads(v)["event_id"] for _, v in _topic_values(setup)}
    assert {NS + i for i, r in answers.items() if r.status_code == 202} <= on_topic
