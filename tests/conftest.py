"""Shared fixtures: one real Kafka-protocol broker per test session, per-test topics,
config files and ingest processes, and polling with a deadline (never sleeps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connectors.config import Settings, load_settings
from deploy.local.broker import Broker, start_broker

HASH_KEY = "9f86d081884c7d659a2feaa0c55ad015"  # 128 bits of hex, as required
# Offline, Prefect's telemetry errors on a locked SQLite database (docs/architecture.md).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)  # the poll interval of a deadline loop


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    b = start_broker(log_path=log)
    yield b
    b.stop()


@dataclass
class KafkaSetup:
    """A fresh topic, group and store for one test, on the session broker."""

    broker: Broker
    tmp: Path
    topic: str
    group: str
    partitions: int = 3

    def create_topics(self, partitions: int | None = None) -> None:
        """Create a fresh topic (and its DLQ) with this many partitions. Topics are
        created before anything is produced: Tansu drops records sent while it
        auto-creates one."""
        from connectors.feedback.kafka_clients import ensure_topics

        if partitions is not None:
            self.partitions = partitions
            self.topic = f"fb-{uuid.uuid4().hex[:8]}"
        s = self.settings()
        ensure_topics(s.kafka, [s.kafka.topic, s.kafka.dead_letter_topic])

    def settings(self, **ingest: Any) -> Settings:
        return load_settings(None, **self.overrides(**ingest))

    def overrides(self, **ingest: Any) -> dict[str, Any]:
        return {
            "kafka": {
                "bootstrap_servers": [self.broker.bootstrap],
                "topic": self.topic,
                "group_id": self.group,
                "partitions": self.partitions,
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            },
            "store": {"url": str(self.tmp / "store")},
            "ingest": {"batch_max_events": 500, "batch_max_seconds": 0.5, **ingest},
            "events": {"user_hash_key": HASH_KEY},
        }

    def config_file(self, sections: dict[str, dict[str, Any]] | None = None, **ingest: Any) -> Path:
        """A TOML file of `overrides`, plus `sections` (e.g. {"feedback_http": {...}})."""
        o = self.overrides(**ingest)
        o["events"] = {}  # the key comes from the environment, as in production
        o.update(sections or {})
        path = self.tmp / f"kto-loop-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(_toml(o))
        return path


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def kafka_setup(broker: Broker, tmp_path: Path) -> KafkaSetup:
    setup = KafkaSetup(broker, tmp_path, f"fb-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}")
    setup.create_topics()
    return setup


class IngestProcess:
    """`kto-loop ingest` as a child process, its log in a file; `env` adds variables
    (e.g. KTO_LOOP_FAULT_POINT, connectors/faults.py)."""

    def __init__(
        self, config: Path, log: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115
        env = {**os.environ, "KTO_LOOP_EVENTS__USER_HASH_KEY": HASH_KEY, **(env or {})}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "ingest",
                "--config",
                str(config),
                "--no-status",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, out.decode()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log.close()


@pytest.fixture
def ingest_processes() -> Iterator[Callable[..., IngestProcess]]:
    started: list[IngestProcess] = []

    def start(
        config: Path, log: Path, *extra: str, env: dict[str, str] | None = None
    ) -> IngestProcess:
        p = IngestProcess(config, log, *extra, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


@pytest.fixture
def watch() -> Iterator[Callable[[subprocess.Popen], Any]]:
    """Watch the processes a command started (tests/children.py); after the test, the
    command and whatever it left alive are killed, so a failed test orphans nothing."""
    from tests.children import Descendants

    watched: list[Descendants] = []

    def start(root: subprocess.Popen) -> Descendants:
        watched.append(Descendants(root))
        return watched[-1]

    yield start
    for descendants in watched:
        descendants.kill()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-style chat model with a locally trained tokenizer, built once."""
    from deploy.local.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), TinyModelSpec())


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model briefly fine-tuned on the synthetic chat corpus: its sampled
    answers mix liked and disliked styles and end their turn. Built once."""
    from deploy.local.chat_model import build_chat_model

    return build_chat_model(tmp_path_factory.mktemp("chat-model"), steps=150)


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real vLLM server for the session (from .venv-vllm, with the swap plugin), on the
    tiny model in float32 so that greedy answers match peft's token for token. It wants an
    API key for every call and an admin key for the control plane (load, swap, retire),
    and retires idle versions after 1 s instead of 10 (the tests wait for it)."""
    import secrets

    from deploy.local.vllm_server import start_vllm

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    server = start_vllm(
        tiny_model_dir,
        log,
        api_key=secrets.token_hex(16),
        admin_key=secrets.token_hex(16),
        retire_grace_s=1.0,
        dtype="float32",
        max_model_len=512,
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _second_replica(
    vllm_server: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from deploy.local.vllm_server import start_vllm

    log = tmp_path_factory.mktemp("vllm-2") / "vllm.log"
    server = start_vllm(
        tiny_model_dir,
        log,
        api_key=vllm_server.api_key,
        admin_key=vllm_server.admin_key,
        trace=log.parent / "trace.jsonl",
        retire_grace_s=1.0,
        dtype="float32",
        max_model_len=512,
    )
    yield server
    server.stop()


@pytest.fixture
def second_replica(_second_replica: Any) -> Any:
    """A second real vLLM server, started once per session like `vllm_server` and with
    the same keys (one [serving] config holds both), tracing to `env["KTO_LOOP_TRACE"]`.
    A test may kill it: the next test that asks for it gets it restarted on the same
    port, knowing no adapters."""
    import httpx

    server = _second_replica
    try:
        healthy = httpx.get(f"{server.url}/health", timeout=5.0).status_code == 200
    except httpx.TransportError:
        healthy = False
    if not healthy:
        if server.process.poll() is None:
            server.kill()
        server.restart()
    return server
