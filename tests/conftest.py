"""Shared fixtures: one real Kafka-protocol broker and one real vLLM server per test
session, tiny models built once per machine, per-test topics, config files and ingest
processes, the cycle's alias and Prefect harness, and polling with a deadline (never
sleeps). Each test is marked with the real parts it needs, from the fixtures it uses.

Every test run loads this file, so torch, peft, Prefect's flows and the adapter registry
(which imports torch) are imported by the fixtures that use them: a run of a few unit
tests does not wait for them."""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
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

import pytest
from kafka import KafkaConsumer, TopicPartition

from connectors.config import Settings, load_settings
from connectors.cycle_runs import CycleRuns
from connectors.feedback.ingest import Ingestor
from connectors.feedback.produce import produce
from connectors.feedback.store import FEEDBACK, FeedbackStore
from connectors.serving.vllm_admin import VllmAdmin
from deploy.local.broker import Broker, start_broker
from deploy.local.processes import dies_with_this_process
from pipeline.feedback import records
from pipeline.feedback.sample import encode

ROOT = Path(__file__).resolve().parent.parent
HASH_KEY = "9f86d081884c7d659a2feaa0c55ad015"  # 128 bits of hex, as required
MODEL_CACHE = ROOT / "data" / "cache" / "models"
# Offline, Prefect's telemetry errors on a locked SQLite database (docs/architecture.md).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# The real parts, a marker each (pyproject.toml); `make test-fast` deselects them all.
PARTS = ("broker", "vllm", "training", "prefect", "e2e")
# A test gets a part's marker from the fixtures it uses, so none can be forgotten; a test
# that starts a part itself (a command that starts a broker, a demo) names it.
PART_OF_FIXTURE = {
    "broker": "broker",
    "vllm_server": "vllm",
    "_second_replica": "vllm",
    "chat_model_dir": "training",
    "prefect_harness": "prefect",
    "cycle": "e2e",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by them
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the parts it needs (e2e: all of them), and `integration`, the
    union, on every test that needs one."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for part in {PART_OF_FIXTURE[f] for f in used & PART_OF_FIXTURE.keys()}:
            item.add_marker(part)
        if item.get_closest_marker("e2e"):
            for part in PARTS:
                item.add_marker(part)
        if any(item.get_closest_marker(part) for part in PARTS):
            item.add_marker("integration")
        elif item.get_closest_marker("integration"):
            raise pytest.UsageError(
                f"{item.nodeid} is marked integration: mark the part it needs instead "
                f"({', '.join(PARTS)}); integration is added from those"
            )


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
                # A consumer started after one was killed gets its partitions once the
                # dead one's session expires: 3.5 s here instead of 10.5 s with 6 s.
                "session_timeout_ms": 2000,
                "heartbeat_interval_ms": 500,
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


def assert_each_offset_in_exactly_one_file(store: FeedbackStore, topic: str) -> None:
    """Raw files: batch ranges of a partition never overlap, and every stored offset is
    in the file whose range covers it."""
    seen: collections.Counter[tuple[int, int]] = collections.Counter()
    for path in store.files(FEEDBACK):
        partition = int(re.search(r"partition=(\d+)", path).group(1))
        table = store._read_files([path], FEEDBACK)
        first, last = (int(x) for x in Path(path).stem.split("-"))
        for offset in table[records.KAFKA_OFFSET].to_pylist():
            assert first <= offset <= last, (path, offset)
            seen[(partition, offset)] += 1
    assert seen and max(seen.values()) == 1, [k for k, v in seen.items() if v > 1][:5]
    for partition in {p for p, _ in seen}:
        ranges = [(f.first, f.last) for f in store.batch_files(FEEDBACK, topic, partition)]
        for (_, last), (first, _) in itertools.pairwise(ranges):
            assert first == last + 1, f"partition {partition}: ranges {ranges} overlap or gap"


def committed_offsets(setup: KafkaSetup) -> dict[int, int | None]:
    """The offset the setup's group committed on each partition (None: nothing yet)."""
    consumer = KafkaConsumer(
        bootstrap_servers=setup.broker.bootstrap, group_id=setup.group, enable_auto_commit=False
    )
    try:
        return {
            p: consumer.committed(TopicPartition(setup.topic, p)) for p in range(setup.partitions)
        }
    finally:
        consumer.close(autocommit=False)


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
            cwd=ROOT,
            preexec_fn=dies_with_this_process(signal.SIGTERM),  # if the session dies first
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
def model_cache() -> Path:
    """Where tiny models are kept between sessions, one entry per recipe
    (deploy/local/model_cache.py; under data/, so git ignores it and `make clean` empties
    it)."""
    return MODEL_CACHE


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache: Path) -> Iterator[Path]:
    """A tiny Llama-style chat model with a locally trained tokenizer, built once per
    machine. Tests must not write into it: the session fails at its end if one did."""
    from deploy.local.model_cache import tiny_model

    yield from _unchanged(tiny_model(model_cache))


@pytest.fixture(scope="session")
def chat_model_dir(model_cache: Path) -> Iterator[Path]:
    """The tiny model briefly fine-tuned on the synthetic chat corpus: its sampled
    answers mix liked and disliked styles and end their turn. Built once per machine;
    tests must not write into it."""
    from deploy.local.model_cache import chat_model

    yield from _unchanged(chat_model(model_cache, steps=150))


def _unchanged(model: Path) -> Iterator[Path]:
    from deploy.local.model_cache import intact

    yield model
    if not intact(model):
        pytest.fail(f"a test wrote into the cached model {model}: copy it first")


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


class Greedy:
    """peft's greedy continuation, token by token (the reference for vLLM's answers)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.cache: dict[tuple, list[int]] = {}

    def __call__(self, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
        import torch
        from peft import PeftModel

        key = (str(adapter), tuple(prompt), n)
        if key in self.cache:
            return self.cache[key]
        model = self.base if adapter is None else PeftModel.from_pretrained(self.base, adapter)
        ids = torch.tensor([prompt])
        out: list[int] = []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(model(ids).logits[0, -1].argmax())
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        if adapter is not None:
            model.unload()
        self.cache[key] = out
        return out


@pytest.fixture(scope="session")
def greedy(tiny_model_dir: Path) -> Greedy:
    return Greedy(tiny_model_dir)


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness (a temporary API server and database) for a module's flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# The cycle's training settings: large enough to move the tiny model in a few dozen steps
# (as in test_trainer.py).
CYCLE_TRAIN = {
    "beta": 0.1,
    "learning_rate": 2e-3,
    "batch_size": 8,
    "max_length": 96,
    "max_prompt_length": 64,
    "eval_every": 5,
    "early_stopping_patience": 0,
    "sft_weight": 0.0,
    "eos_guard": 0.0,
    # One pass: these tests are about the cycle, not about how far training goes.
    "epochs": 1,
    # These tests are about the cycle's mechanics, which one pass of likelihood-judged
    # training moves reliably; judging by answers is covered by tests/test_answer_check.py
    # and test_a_cycle_judged_by_answers_publishes_nothing_its_judge_does_not_find_better.
    "selection": "heldout_loss",
}
# Likewise for the gate.
CYCLE_GATE = {"judge": "likelihood"}


class Cycle:
    """One test's alias, store, registry and work dir, and its config files."""

    def __init__(self, setup: KafkaSetup, vllm: Any, model: Path, tmp: Path) -> None:
        from connectors.serving.adapter_registry import AdapterRegistry

        self.setup, self.vllm, self.model, self.tmp = setup, vllm, model, tmp
        self.alias = f"cyc-{uuid.uuid4().hex[:6]}"
        self.registry = AdapterRegistry(str(tmp / "adapters"))
        self.runs = CycleRuns(tmp / "cycles", self.alias)

    def config(self, store: str = "store", **sections: dict[str, Any]) -> Path:
        base: dict[str, dict[str, Any]] = {
            **self.setup.overrides(),
            "store": {"url": str(self.tmp / store)},
            "snapshot": {"heldout_fraction": 0.2, "out_dir": str(self.tmp / "snapshots")},
            "balance": {"min_examples": 32, "min_per_class": 8},
            "train": CYCLE_TRAIN,
            "gate": CYCLE_GATE,
            "lora": {"r": 8},
            "registry": {"url": str(self.tmp / "adapters")},
            "serving": {
                "replicas": [self.vllm.url],
                "base_model": str(self.model),
                "max_lora_rank": 8,
            },
            "cycle": {
                "alias": self.alias,
                "work_dir": str(self.tmp / "cycles"),
                "min_new_votes": 50,
            },
        }
        for name, values in sections.items():
            base[name] = {**base.get(name, {}), **values}
        path = self.tmp / f"kto-loop-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(_toml(base))
        return path

    def ingest(self, events: list[dict], store: str = "store") -> None:
        """Send events through the broker and store them with a real consumer."""
        self.setup.create_topics(partitions=2)
        produce(self.setup.settings().kafka, [encode(e) for e in events])
        settings = self.setup.settings()
        settings = settings.model_copy(
            update={"store": settings.store.model_copy(update={"url": str(self.tmp / store)})}
        )
        ingestor = Ingestor(settings)
        stop, errors = threading.Event(), []

        def target() -> None:
            try:
                ingestor.run(stop)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        wait_until(
            lambda: ingestor.stats.stored >= len(events) or errors, 90, f"{len(events)} stored"
        )
        stop.set()
        thread.join(30)
        assert not errors

    def consume(self, config: Path, store: str = "store") -> Any:
        """Store what the config's topic holds, with a real consumer; the store's rows."""
        ingestor = Ingestor(load_settings(config))
        ingestor.run(threading.Event(), idle_exit_seconds=2.0)
        return ingestor.store.read()

    def admin(self) -> VllmAdmin:
        return VllmAdmin(self.vllm.url, self.vllm.api_key, admin_key=self.vllm.admin_key)


@pytest.fixture()
def cycle(
    prefect_harness: None,
    kafka_setup: KafkaSetup,
    vllm_server: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Cycle:
    """A Cycle on the session's broker and vLLM, its keys in the environment as a
    scheduled run would find them, its flows run under the module's Prefect harness."""
    monkeypatch.setenv("KTO_LOOP_SERVING__API_KEY", vllm_server.api_key)
    monkeypatch.setenv("KTO_LOOP_SERVING__ADMIN_KEY", vllm_server.admin_key)
    monkeypatch.setenv("KTO_LOOP_EVENTS__USER_HASH_KEY", HASH_KEY)
    return Cycle(kafka_setup, vllm_server, tiny_model_dir, tmp_path)


def run_cycle(config: Path) -> tuple[Any, dict[str, Any]]:
    """`alignment_cycle` on a config file: its final state and its record ({} unless it
    completed)."""
    from flows.alignment import alignment_cycle

    state = alignment_cycle(config=str(config), return_state=True)
    return state, state.result(raise_on_failure=False) if state.is_completed() else {}


# -- object storage: moto's server speaks the S3 API over HTTP ------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server in a thread of this process, for the session: its URL."""
    from moto.server import ThreadedMotoServer

    # Its HTTP server logs each request at INFO to the stderr of the test that started it,
    # which pytest has closed by the next test.
    requests = logging.getLogger("werkzeug")
    level = requests.level
    requests.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    requests.setLevel(level)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> tuple[str, dict]:
    """A fresh bucket on it: its s3:// URL and the storage options that reach it. Each
    filesystem made from them is a client of its own (its connections, its listing
    cache), as another machine's would be."""
    import fsspec

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    options = {
        "key": "test",
        "secret": "test",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "eu-west-1"},
        "skip_instance_cache": True,
    }
    fsspec.filesystem("s3", **options).mkdir(bucket)
    return f"s3://{bucket}", options
