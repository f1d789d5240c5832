"""kafka-python clients built from config: admin (topics), producer, consumer, with a
clear, retried wait for a broker that is not there yet."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import (
    KafkaTimeoutError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential,
)

from connectors.config import KafkaConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long one client waits for its first broker before we log and back off.
_BOOTSTRAP_TIMEOUT_MS = 5000


class BrokerUnavailable(RuntimeError):
    """No broker answered within the configured time."""


class _NoListener(OSError):
    """No bootstrap server accepts TCP connections."""


def any_listening(servers: list[str], timeout: float = 2.0) -> None:
    errors = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return
        except (OSError, ValueError) as exc:
            errors.append(f"{server}: {exc}")
    raise _NoListener("; ".join(errors))


def wait_for_broker(
    connect: Callable[[], T],
    kafka: KafkaConfig,
    *,
    timeout_seconds: float = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> T:
    """Call `connect` until the broker answers, backing off from 0.5 s to 10 s and
    logging each miss. timeout_seconds=0 waits forever (or until should_stop()).

    A TCP probe runs first: kafka-python 3.0 leaves a network thread behind for
    every client whose bootstrap fails, so clients are built only once a bootstrap
    server listens.

    Raises:
        BrokerUnavailable: when timeout_seconds passes, or should_stop() turns true.
    """

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "Kafka broker not reachable at %s (%s); retrying in %.1f s. Check "
            "[kafka] bootstrap_servers and that the broker is up.",
            ",".join(kafka.bootstrap_servers),
            exc if isinstance(exc, _NoListener) else type(exc).__name__,
            state.next_action.sleep if state.next_action else 0.0,
        )

    def stop(state: RetryCallState) -> bool:
        if should_stop():
            return True
        return (stop_after_delay(timeout_seconds) if timeout_seconds else stop_never)(state)

    def attempt() -> T:
        any_listening(kafka.bootstrap_servers)
        return connect()

    retrying = Retrying(
        retry=retry_if_exception_type((KafkaTimeoutError, _NoListener)),
        wait=wait_exponential(multiplier=0.5, min=0.5, max=10),
        stop=stop,
        before_sleep=before_sleep,
        reraise=True,
    )
    started = time.monotonic()
    try:
        return retrying(attempt)
    except (KafkaTimeoutError, _NoListener):
        raise BrokerUnavailable(
            f"no Kafka broker reachable at {','.join(kafka.bootstrap_servers)} after "
            f"{time.monotonic() - started:.0f} s; check [kafka] bootstrap_servers, the network "
            "and the security settings"
        ) from None


def admin_client(kafka: KafkaConfig) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_timeout_ms=_BOOTSTRAP_TIMEOUT_MS, **kafka.client_kwargs())


def ensure_topics(kafka: KafkaConfig, topics: list[str]) -> list[str]:
    """Create the topics that do not exist yet (with [kafka] partitions and
    replication_factor); return the names created. Topics must exist before anything
    is produced to them: some brokers drop records sent while they auto-create one."""
    admin = admin_client(kafka)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if not missing:
            return []
        new = [NewTopic(t, kafka.partitions, kafka.replication_factor) for t in missing]
        try:
            admin.create_topics(new)
        except TopicAlreadyExistsError:
            pass
        except TopicAuthorizationFailedError:
            raise PermissionError(
                f"not allowed to create topics {missing}; create them with your Kafka tooling "
                "or grant CreateTopics, or set [kafka] create_topics = false"
            ) from None
        _wait_for_metadata(admin, missing)
        log.info("created topics %s (%d partitions)", missing, kafka.partitions)
        return missing
    finally:
        admin.close()


def _wait_for_metadata(admin: KafkaAdminClient, topics: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(topics) <= set(admin.list_topics()):
            return
        time.sleep(0.05)  # polling the broker's metadata, not synchronising threads
    raise TimeoutError(f"topics {topics} did not appear in the broker's metadata")


def producer(kafka: KafkaConfig, **options: Any) -> KafkaProducer:
    """A producer that waits for all in-sync replicas."""
    kwargs = {
        "acks": "all",
        "linger_ms": 5,
        "bootstrap_timeout_ms": _BOOTSTRAP_TIMEOUT_MS,
        **kafka.client_kwargs(),
        **options,
    }
    return KafkaProducer(**kwargs)


def consumer(kafka: KafkaConfig, **options: Any) -> KafkaConsumer:
    """A group consumer with auto-commit off: offsets are committed only once stored."""
    kwargs = {
        "group_id": kafka.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": kafka.auto_offset_reset,
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "bootstrap_timeout_ms": _BOOTSTRAP_TIMEOUT_MS,
        **kafka.client_kwargs(),
        **options,
    }
    return KafkaConsumer(**kwargs)
