"""`kto-loop serve-feedback`: an HTTP endpoint in front of the feedback topic.

Browsers cannot speak Kafka, so a thumbs button posts here:

    POST /v1/feedback    one event, or a JSON array of events (schema 1)
    GET  /healthz        200 while a broker listens, else 503
    GET  /metrics        Prometheus text format

Each event is checked by the consumer's own `EventParser`, so the endpoint refuses
exactly what ingest would dead-letter, with the same kind and message. A request is
all or nothing: one invalid event answers 400 naming each bad one, and nothing is
produced. Who votes and when is the endpoint's to say, not the client's
(connectors/feedback/voters.py): each valid event goes to the topic with its voter's
user_id, its event_id in that voter's namespace and its ts clamped to the receive time,
keyed by conversation_id, and 202 is answered only once the broker acknowledged every
one of them (acks=all). When it does not in time, the answer is 503: a 202 is never
given for an event that is not in the topic, and a client that retries a 503 or a
timed-out POST may produce an event twice, which snapshots dedupe by event_id.

Load is bounded: connections and requests at once (`max_connections`, then 503), the
time headers and a body may take, the bytes waiting on the broker (`max_in_flight_bytes`,
then 503 at once rather than a queue), and every event of a request, refused or not,
counts against its key's rate limit before it is parsed.

Starlette rather than FastAPI: the body is validated by our parser from its raw bytes,
so FastAPI's pydantic request models would decode every body a second time for nothing.
Starlette is the ASGI toolkit FastAPI is built on, and brings the CORS middleware.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import gc
import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import msgspec
from kafka.errors import KafkaError
from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from connectors.config import ConfigError, FeedbackHttpConfig, Settings
from connectors.feedback import kafka_clients
from connectors.feedback.voters import Caller, Refused, UserTokens, Voter, Voters, clamp, stamped
from pipeline.feedback.events import EventError, EventParser, FeedbackEvent

log = logging.getLogger("kto_loop.feedback_http")

# How often a missing broker is probed again: requests in between answer 503 at once.
_RECONNECT_SECONDS = 1.0
# What a 503 asks the client to wait before retrying.
_RETRY_AFTER_UNAVAILABLE = 2
# Bodies larger than this are parsed in a worker thread, off the event loop.
_PARSE_IN_THREAD_BYTES = 64 << 10


class Unavailable(RuntimeError):
    """The broker did not take the events; the request may be retried."""


class HttpMetrics:
    """The endpoint's Prometheus series, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "ktoloop_feedback_http_requests",
            "POST /v1/feedback requests by response status",
            ["code"],
            registry=r,
        )
        self.accepted = Counter(
            "ktoloop_feedback_http_events_accepted",
            "Events the broker acknowledged (answered 202)",
            registry=r,
        )
        self.rejected = Counter(
            "ktoloop_feedback_http_events_rejected",
            "Invalid events (answered 400), by dead-letter kind",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "ktoloop_feedback_http_rate_limited",
            "Requests refused by a rate limit (answered 429), by limit",
            ["limit"],
            registry=r,
        )
        self.produce_seconds = Histogram(
            "ktoloop_feedback_http_produce_seconds",
            "From handing a request's events to the producer to the broker's acknowledgement",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )


class TopicSink:
    """One kafka-python producer shared by every request (its batching is what makes
    concurrent requests cheap), built once a broker listens and rebuilt never: the
    client reconnects by itself. Blocking calls run in worker threads."""

    def __init__(self, settings: Settings) -> None:
        self._kafka = settings.kafka
        self._timeout = settings.feedback_http.produce_timeout_seconds
        self._max_bytes = settings.ingest.max_event_bytes
        self._max_in_flight = settings.feedback_http.max_in_flight_bytes
        self._producer: Any = None
        self._lock = threading.Lock()
        # Bytes handed to the producer and not yet acknowledged or failed.
        self.in_flight = 0
        self._flight_lock = threading.Lock()
        self._next_try = 0.0
        self.last_error: str | None = None

    def _connected(self) -> Any:
        with self._lock:
            if self._producer is not None:
                return self._producer
            now = time.monotonic()
            if now < self._next_try:
                raise Unavailable(self.last_error or "connecting to the broker")
            self._next_try = now + _RECONNECT_SECONDS
            try:
                kafka_clients.any_listening(self._kafka.bootstrap_servers, timeout=1.0)
                if self._kafka.create_topics:
                    kafka_clients.ensure_topics(self._kafka, [self._kafka.topic])
                timeout_ms = int(self._timeout * 1000)
                # Not idempotent: kafka-python's idempotent producer stops delivering
                # to a partition once one of its batches expired (a broker that stalled
                # past the timeout), and a duplicate from a retry is harmless here:
                # snapshots dedupe by event_id.
                self._producer = kafka_clients.producer(
                    self._kafka,
                    enable_idempotence=False,
                    linger_ms=2,
                    max_block_ms=timeout_ms,
                    request_timeout_ms=timeout_ms,
                    delivery_timeout_ms=timeout_ms + 2000,
                    max_request_size=self._max_bytes + 4096,
                )
            except (OSError, KafkaError, PermissionError) as exc:
                self.last_error = f"broker at {','.join(self._kafka.bootstrap_servers)}: {exc}"
                raise Unavailable(self.last_error) from None
            self.last_error = None
            return self._producer

    def _reserve(self, size: int) -> None:
        with self._flight_lock:
            if self.in_flight and self.in_flight + size > self._max_in_flight:
                raise Unavailable(
                    f"{self.in_flight} bytes are waiting on the broker "
                    "([feedback_http] max_in_flight_bytes)"
                )
            self.in_flight += size

    def _release(self, size: int, _result: Any = None) -> None:
        with self._flight_lock:
            self.in_flight -= size

    def _send(self, messages: Sequence[tuple[bytes, bytes]], timestamp_ms: int) -> list[Any]:
        """Hand the messages to the producer. Each one's bytes, reserved in flight by
        the caller, are released when the broker acknowledged or failed it, or here when
        it was never handed over."""
        futures = []
        try:
            producer = self._connected()
            for k, v in messages:
                future = producer.send(self._kafka.topic, key=k, value=v, timestamp_ms=timestamp_ms)
                future.add_both(self._release, len(k) + len(v))
                futures.append(future)
        except (Unavailable, KafkaError) as exc:
            self._release(sum(len(k) + len(v) for k, v in messages[len(futures) :]))
            if isinstance(exc, Unavailable):
                raise
            self.last_error = f"producing to {self._kafka.topic}: {type(exc).__name__}: {exc}"
            raise Unavailable(self.last_error) from None
        return futures

    async def produce(self, messages: Sequence[tuple[bytes, bytes]], timestamp_ms: int) -> None:
        """Return once the broker acknowledged every message.

        Raises:
            Unavailable: no broker, a refused write, more than [feedback_http]
                max_in_flight_bytes waiting on the broker already, or no acknowledgement
                within produce_timeout_seconds.
        """
        self._reserve(sum(len(k) + len(v) for k, v in messages))
        futures = await anyio.to_thread.run_sync(self._send, messages, timestamp_ms)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pending = [len(futures)]
        lock = threading.Lock()

        def acknowledged(_metadata: Any) -> None:
            with lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                _notify(loop, done, None)

        def failed(exc: BaseException) -> None:
            _notify(loop, done, exc)

        for future in futures:
            future.add_callback(acknowledged).add_errback(failed)
        try:
            await asyncio.wait_for(done, self._timeout)
        except TimeoutError:
            self.last_error = f"no acknowledgement from the broker within {self._timeout:g} s"
            raise Unavailable(self.last_error) from None
        except KafkaError as exc:
            self.last_error = f"the broker refused the write: {type(exc).__name__}: {exc}"
            raise Unavailable(self.last_error) from None
        self.last_error = None

    def close(self) -> None:
        """Flush and close the producer. What it cannot flush in time was answered
        503 (or is still unanswered), never 202."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.close(timeout=self._timeout)
        except KafkaError as exc:
            log.warning("closing the producer: %s (no event answered 202 is affected)", exc)
            producer.close(timeout=0)


def _notify(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], exc: Any) -> None:
    """Settle `future` from the producer's thread; a request that gave up waiting
    (its loop may be closed at shutdown) needs nothing."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future, exc)


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


@dataclass(frozen=True)
class Limited:
    """A rate limit a request would exceed."""

    limit: str  # "key" or "user"
    message: str
    retry_after: int | None


class RateLimits:
    """Per-key and per-voter limits on events, counted in a moving window."""

    def __init__(self, config: FeedbackHttpConfig) -> None:
        self._limiter = MovingWindowRateLimiter(storage_from_string(config.rate_limit_storage))
        self._per = {
            "key": parse_many(config.rate_per_key),
            "user": parse_many(config.rate_per_user),
        }

    def exhausted(self, limit: str, who: str) -> Limited | None:
        """Whether `who` has no event left under `limit` ("key" or "user"), counting nothing."""
        for item in self._per[limit]:
            if not self._limiter.test(item, limit, who):
                return self._limited(limit, item, who)
        return None

    def take(self, limit: str, costs: collections.Counter[str]) -> Limited | None:
        """Count each `who`'s events against `limit`, or count nothing and say which
        limit the request would exceed."""
        checks = [(item, who, cost) for who, cost in costs.items() for item in self._per[limit]]
        for item, who, cost in checks:
            if cost > item.amount:
                return Limited(
                    limit,
                    f"{cost} events for one {limit} in one request exceed the {limit} limit "
                    f"of {item}; send them in smaller requests",
                    None,
                )
            if not self._limiter.test(item, limit, who, cost=cost):
                return self._limited(limit, item, who)
        for item, who, cost in checks:
            self._limiter.hit(item, limit, who, cost=cost)
        return None

    def _limited(self, limit: str, item: RateLimitItem, who: str) -> Limited:
        reset, _ = self._limiter.get_window_stats(item, limit, who)
        wait = max(1, math.ceil(reset - time.time()))
        return Limited(limit, f"rate limit of {item} per {limit} reached", wait)


def split_body(body: bytes) -> list[bytes]:
    """The events of a request body: the body itself, or each element of a JSON array.

    Raises:
        EventError: an array that is not valid JSON, or an empty one.
    """
    if not body.lstrip(b" \t\r\n\xef\xbb\xbf").startswith(b"["):
        return [body]
    try:
        elements = msgspec.json.decode(body, type=list[msgspec.Raw])
    except msgspec.DecodeError:
        raise EventError(
            "not_json", "the body starts with [ but is not a JSON array of events"
        ) from None
    except RecursionError:
        raise EventError(
            "too_deep", "the body nests arrays/objects deeper than the decoder allows"
        ) from None
    if not elements:
        raise EventError("empty", "the body is an empty array; send at least one event")
    return [bytes(element) for element in elements]


class FeedbackEndpoint:
    """The routes' state: the parser, the voters, the sink, the limits and the metrics."""

    def __init__(self, settings: Settings) -> None:
        config = settings.feedback_http
        if not config.api_keys and not config.allow_anonymous:
            raise ConfigError(
                "[feedback_http] api_keys is empty: set KTO_LOOP_FEEDBACK_HTTP__API_KEYS="
                '\'{"web": "<key>"}\' (make a key with `openssl rand -hex 24`), or set '
                "allow_anonymous = true for a local try-out"
            )
        self.config = config
        self.max_body = settings.ingest.max_event_bytes
        # The hash names voters here (their rate limits, their event ids' namespace);
        # the store hashes the user_id again at ingest. Without a configured key, a key
        # for this process will do, and namespaces change when it restarts.
        key = settings.events.user_hash_key
        hash_key = key.get_secret_value().encode() if key else secrets.token_bytes(16)
        self.parser = EventParser(
            hash_key, settings.events, max_bytes=settings.ingest.max_event_bytes
        )
        self.tokens = UserTokens(config)
        self.voters = Voters(hash_key, config.anonymous_votes)
        self.skew = dt.timedelta(seconds=settings.events.clock_skew_seconds)
        self._keys = [
            (name, key.get_secret_value().encode()) for name, key in config.api_keys.items()
        ]
        self._trusted = set(config.trusted_keys)
        self.sink = TopicSink(settings)
        self.limits = RateLimits(config)
        self.metrics = HttpMetrics()
        self._bootstrap = settings.kafka.bootstrap_servers
        mute = set(config.api_keys) - self._trusted
        if mute and config.user_token_secret is None and not config.anonymous_votes:
            log.warning(
                "the keys %s are browser keys (not in trusted_keys) and can post nothing: set "
                "user_token_secret for user tokens, or anonymous_votes = true",
                ", ".join(sorted(mute)),
            )

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        try:
            await anyio.to_thread.run_sync(self.sink._connected)
        except Unavailable as exc:
            log.warning("%s; answering 503 until it is reachable", exc)
        # What startup made lives as long as the process: out of the collector's way,
        # a request's garbage is collected without walking it (about 5% more requests
        # a second).
        gc.freeze()
        yield
        await anyio.to_thread.run_sync(self.sink.close)

    def _key_name(self, request: Request) -> str | None:
        """The name of the API key the request carries, "anonymous" when allowed."""
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given:
            for name, key in self._keys:
                if hmac.compare_digest(given.encode(), key):
                    return name
            return None
        return "anonymous" if self.config.allow_anonymous else None

    def _caller(self, key: str, request: Request) -> Caller:
        """Who sends the request.

        Raises:
            Refused: a user token that does not verify.
        """
        token = request.headers.get("x-user-token")
        user = self.tokens.user(token) if token else None
        address = request.client.host if request.client else "unknown"
        return Caller(key, key in self._trusted, user, address)

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None when it is larger than the limit.

        Raises:
            TimeoutError: it did not arrive within [feedback_http] body_timeout_seconds.
        """
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return None
        chunks, size = [], 0
        async with asyncio.timeout(self.config.body_timeout_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    return None
                chunks.append(chunk)
        return b"".join(chunks)

    async def post(self, request: Request) -> Response:
        response = await self._post(request)
        self.metrics.requests.labels(str(response.status_code)).inc()
        return response

    async def _post(self, request: Request) -> Response:
        received = dt.datetime.now(dt.UTC)
        key = self._key_name(request)
        if key is None:
            return _error(
                401,
                "missing or unknown API key: send `Authorization: Bearer <key>` with a key "
                "from [feedback_http] api_keys",
                {"WWW-Authenticate": "Bearer"},
            )
        # A key out of events is answered before its body is read.
        if (limited := self.limits.exhausted("key", key)) is not None:
            return self._limited(limited)
        read = await self._read(key, request)
        if isinstance(read, Response):
            self.limits.take("key", collections.Counter({key: 1}))  # refused ones count too
            return read
        caller, raws = read
        # Every event counts against the key, valid or not, before it is parsed.
        if (limited := self.limits.take("key", collections.Counter({key: len(raws)}))) is not None:
            return self._limited(limited)
        if sum(map(len, raws)) > _PARSE_IN_THREAD_BYTES:
            events, refused = await anyio.to_thread.run_sync(self._parse, raws)
        else:
            events, refused = self._parse(raws)
        if refused:
            return _invalid(refused)
        try:
            voters = [self.voters.of(caller, event) for event in events]
        except Refused as exc:
            return _error(exc.status, exc.message)
        charged = collections.Counter(v.charged for v in voters if v.charged is not None)
        if (limited := self.limits.take("user", charged)) is not None:
            return self._limited(limited)
        return await self._produce(events, raws, voters, received)

    async def _read(self, key: str, request: Request) -> tuple[Caller, list[bytes]] | Response:
        """Who sends the request and its events' bytes, or the answer that refuses it
        (a token that does not verify, a body too slow, too large or not events)."""
        try:
            caller = self._caller(key, request)
        except Refused as exc:
            return _error(exc.status, exc.message)
        try:
            body = await self._body(request)
        except TimeoutError:
            return _error(
                408,
                f"the body did not arrive within {self.config.body_timeout_seconds:g} s "
                "([feedback_http] body_timeout_seconds)",
                {"Connection": "close"},
            )
        if body is None:
            return _error(
                413,
                f"the body is larger than {self.max_body} bytes ([ingest] max_event_bytes); "
                "send fewer events per request",
            )
        try:
            raws = split_body(body)
        except EventError as exc:
            self.metrics.rejected.labels(exc.kind).inc()
            return _invalid([_refusal(0, None, exc)])
        if len(raws) > self.config.max_events_per_request:
            return _error(
                413,
                f"{len(raws)} events in one request; at most {self.config.max_events_per_request} "
                "([feedback_http] max_events_per_request)",
            )
        return caller, raws

    def _limited(self, limited: Limited) -> Response:
        self.metrics.rate_limited.labels(limited.limit).inc()
        headers = {"Retry-After": str(limited.retry_after)} if limited.retry_after else {}
        return _error(429, limited.message, headers)

    def _parse(self, raws: list[bytes]) -> tuple[list[FeedbackEvent], list[dict[str, Any]]]:
        events, refused = [], []
        for i, raw in enumerate(raws):
            try:
                events.append(self.parser(raw))
            except EventError as exc:
                self.metrics.rejected.labels(exc.kind).inc()
                refused.append(_refusal(i, raw, exc))
        return events, refused

    async def _produce(
        self,
        events: list[FeedbackEvent],
        raws: list[bytes],
        voters: list[Voter],
        received: dt.datetime,
    ) -> Response:
        started = time.perf_counter()
        messages, event_ids = [], []
        for event, raw, voter in zip(events, raws, voters, strict=True):
            value, event_id = stamped(raw, event, voter, clamp(event.ts, received, self.skew))
            messages.append((event.conversation_id.encode(), value))
            event_ids.append(event_id)
        try:
            await self.sink.produce(messages, int(received.timestamp() * 1000))
        except Unavailable as exc:
            log.warning("answering 503: %s", exc)
            return _error(
                503,
                f"the feedback topic is unavailable ({exc}); nothing was accepted, retry later",
                {"Retry-After": str(_RETRY_AFTER_UNAVAILABLE)},
            )
        self.metrics.produce_seconds.observe(time.perf_counter() - started)
        self.metrics.accepted.inc(len(events))
        return JSONResponse({"accepted": len(events), "event_ids": event_ids}, 202)

    async def health(self, _request: Request) -> Response:
        """200 while a bootstrap server accepts connections, else 503; the last produce
        error, if the last produce failed, is shown either way."""
        body: dict[str, Any] = {"status": "ok"}
        if self.sink.last_error is not None:
            body["last_produce_error"] = self.sink.last_error
        try:
            await anyio.to_thread.run_sync(kafka_clients.any_listening, self._bootstrap, 1.0)
        except OSError as exc:
            return JSONResponse({**body, "status": "unavailable", "broker": str(exc)}, 503)
        return JSONResponse(body)

    async def prometheus(self, _request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _refusal(index: int, raw: bytes | None, exc: EventError) -> dict[str, Any]:
    refusal: dict[str, Any] = {"index": index, "kind": exc.kind, "message": exc.message}
    with contextlib.suppress(msgspec.DecodeError, TypeError, AttributeError, RecursionError):
        event_id = msgspec.json.decode(raw).get("event_id") if raw else None
        if isinstance(event_id, str):
            refusal["event_id"] = event_id
    return refusal


def _invalid(refused: list[dict[str, Any]]) -> Response:
    return JSONResponse(
        {
            "error": f"{len(refused)} invalid event(s); nothing was accepted",
            "accepted": 0,
            "invalid": refused,
        },
        400,
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message, "accepted": 0}, status, headers=headers)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers have not
    all arrived `header_timeout` seconds after its first byte (or after it opened): a
    client that sends its headers a byte at a time holds a connection that long, not
    for ever. uvicorn's keep-alive timeout covers an idle connection between requests;
    `limit_concurrency` bounds how many there are at once."""

    header_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def create_app(settings: Settings) -> Starlette:
    """The endpoint as an ASGI app (serve it with uvicorn, `http=HeaderDeadlineProtocol`).

    Raises:
        ConfigError: no API key configured and anonymous posting not allowed.
    """
    endpoint = FeedbackEndpoint(settings)
    # The protocol is a class uvicorn instantiates per connection, in this process.
    HeaderDeadlineProtocol.header_timeout = endpoint.config.header_timeout_seconds
    middleware = []
    if endpoint.config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=endpoint.config.cors_origins,
                allow_methods=["POST"],
                allow_headers=["authorization", "content-type", "x-api-key", "x-user-token"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=[
            Route("/v1/feedback", endpoint.post, methods=["POST"]),
            Route("/healthz", endpoint.health, methods=["GET"]),
            Route("/metrics", endpoint.prometheus, methods=["GET"]),
        ],
        middleware=middleware,
        lifespan=endpoint.lifespan,
    )
    app.state.endpoint = endpoint
    return app
