"""The registry's rules, its storage, and the adapter checks (no server needed)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from connectors.config import ServingConfig
from connectors.serving.adapter_files import base_weight_shapes, read_adapter
from connectors.serving.adapter_registry import AdapterRegistry
from pipeline.serving.adapter_check import AdapterRefused, ServingLimits, check_adapter
from pipeline.serving.registry import (
    AliasHistory,
    RegistryError,
    next_version,
    parse_served_name,
    retention,
    served_name,
)

T = "2026-01-01T00:00:00Z"
T2 = "2026-01-02T00:00:00Z"


def test_versions_are_numbered_after_the_highest() -> None:
    assert next_version([]) == "v1"
    assert next_version(["v1", "v10", "v9"]) == "v11"
    with pytest.raises(RegistryError, match="v1, v2"):
        next_version(["latest"])


def test_served_names_round_trip_and_refuse_bad_aliases() -> None:
    assert served_name("chat", "v3") == "chat@v3"
    assert parse_served_name("chat@v3") == ("chat", "v3")
    assert parse_served_name("chat") is None
    assert parse_served_name("base") is None
    with pytest.raises(RegistryError, match="not usable"):
        served_name("chat@x", "v1")
    with pytest.raises(RegistryError, match="not a version"):
        served_name("chat", "3")


def test_rollback_walks_back_the_promotions() -> None:
    h = AliasHistory("chat")
    assert h.current is None and h.rollback_target is None
    with pytest.raises(RegistryError, match="no earlier version"):
        h.rolled_back(T, "", [])
    for v in ("v1", "v2", "v3"):
        h = h.promoted(v, T, f"train {v}", ["r1"])
    assert (h.current, h.rollback_target) == ("v3", "v2")
    h = h.rolled_back(T, "bad answers", ["r1"])
    assert (h.current, h.rollback_target) == ("v2", "v1")
    assert h.events[-1].action == "rollback" and h.events[-1].previous == "v3"
    h = h.rolled_back(T, "", [])
    assert (h.current, h.rollback_target) == ("v1", None)
    h = h.promoted("v4", T, "", [])
    assert (h.current, h.rollback_target) == ("v4", "v1")
    with pytest.raises(RegistryError, match="already serves"):
        h.promoted("v4", T, "", [])
    assert AliasHistory.from_dict(json.loads(json.dumps(h.as_dict()))) == h


def test_retention_keeps_what_is_served_rolled_back_to_loaded_or_recent() -> None:
    h = AliasHistory("chat").promoted("v2", T, "", []).promoted("v5", T, "", [])
    plan = retention(
        [f"v{i}" for i in range(1, 9)], [h], server_names=["chat@v3", "base", "chat"], keep_last=2
    )
    assert plan.delete == ("v1", "v4", "v6")
    assert plan.keep["v5"] == "served as chat"
    assert plan.keep["v2"] == "rollback target of chat"
    assert plan.keep["v3"].startswith("loaded on a server")
    assert set(plan.keep) == {"v2", "v3", "v5", "v7", "v8"}
    # A server that could not be asked may still read any version.
    assert retention(["v1", "v2"], [h], server_names=None, keep_last=1).delete == ()


def test_gc_keeps_the_versions_successive_rollbacks_return_to() -> None:
    promoted = AliasHistory("chat")
    for v in ("v1", "v2", "v3", "v4", "v5"):
        promoted = promoted.promoted(v, T, "", [])
    versions = [f"v{i}" for i in range(1, 7)]
    plan = retention(versions, [promoted], server_names=[], keep_last=1)
    assert plan.keep == {
        "v5": "served as chat",
        "v4": "rollback target of chat",
        "v3": "rollback target 2 of chat",
        "v2": "rollback target 3 of chat",
        "v6": "among the newest 1",
    }
    assert plan.delete == ("v1",)
    # Three rollbacks in a row each return to a version gc kept.
    h = promoted
    for expected in ("v4", "v3", "v2"):
        h = h.rolled_back(T, "", [])
        assert h.current == expected and expected not in plan.delete
    assert h.rollback_target == "v1"
    fewer = retention(versions, [promoted], server_names=[], keep_last=1, keep_rollbacks=1)
    assert fewer.delete == ("v1", "v2", "v3")
    none = retention(versions, [promoted], server_names=[], keep_last=1, keep_rollbacks=0)
    assert none.delete == ("v1", "v2", "v3", "v4")


def test_retention_keeps_a_version_a_server_loaded_under_a_name_of_any_form() -> None:
    paths = {v: f"/adapters/versions/{v}" for v in ("v1", "v2", "v3")}
    plan = retention(
        paths,
        [],
        server_names=["base", "hand-loaded"],
        keep_last=1,
        server_paths=["/models/base", "/adapters/versions/v1/"],
        version_paths=paths,
    )
    assert plan.delete == ("v2",)
    assert plan.keep["v1"] == "loaded on a server from /adapters/versions/v1"


def _two_promotions() -> AliasHistory:
    return AliasHistory("chat").promoted("v1", T, "", ["r1"]).promoted("v2", T, "", ["r1"])


def test_a_canary_runs_beside_the_served_version_and_moves_no_rollback() -> None:
    h = _two_promotions().canary_started("v3", 0.1, T2, "nightly", ["r1", "r2"])
    assert (h.current, h.rollback_target) == ("v2", "v1")
    canary = h.canary
    assert canary is not None
    assert (canary.version, canary.share, canary.started_at, canary.reason) == (
        "v3",
        0.1,
        T2,
        "nightly",
    )
    start = h.events[-1]
    assert (start.action, start.version, start.previous, start.share) == ("canary", "v3", "v2", 0.1)
    assert start.replicas == ("r1", "r2")
    # A rollback target and the canary's candidate both stay for gc.
    assert h.role_of("v3") == "canary of chat"
    plan = retention(["v1", "v2", "v3", "v4", "v5"], [h], server_names=[], keep_last=1)
    assert plan.delete == ("v4",)
    assert plan.keep["v3"] == "canary of chat"


def test_old_histories_read_and_write_unchanged_and_canary_fields_round_trip() -> None:
    old = {
        "alias": "chat",
        "events": [
            {"action": "promote", "version": "v1", "previous": None, "at": T, "reason": "",
             "replicas": ["r1"]},
        ],
    }  # fmt: skip
    assert AliasHistory.from_dict(old).as_dict() == old
    verdict = {"decision": "promote", "votes": {"candidate": 120, "served": 1100}, "p": [0.1]}
    h = AliasHistory.from_dict(old).canary_started("v2", 0.25, T, "try", ["r1"])
    h = h.canary_ended("promoted", T2, "live votes", ["r1"], verdict=verdict)
    d = json.loads(json.dumps(h.as_dict()))
    assert d["events"][1]["share"] == 0.25 and "outcome" not in d["events"][1]
    assert d["events"][2]["outcome"] == "promoted" and d["events"][2]["verdict"] == verdict
    assert "share" not in d["events"][2] and "verdict" not in d["events"][3]
    assert AliasHistory.from_dict(d) == h


def test_promoting_the_canary_ends_it_as_promoted_and_serves_the_candidate() -> None:
    running = _two_promotions().canary_started("v3", 0.1, T, "", [])
    verdict = {"decision": "promote"}
    h = running.canary_ended("promoted", T2, "better", ["r1"], verdict=verdict)
    assert [e.action for e in h.events[-2:]] == ["canary_end", "promote"]
    end, promote = h.events[-2:]
    assert (end.version, end.previous, end.outcome, end.verdict) == (
        "v3",
        "v2",
        "promoted",
        verdict,
    )
    assert (promote.version, promote.previous) == ("v3", "v2")
    assert (h.current, h.rollback_target, h.canary) == ("v3", "v2", None)
    # A publish of the candidate is the same promotion; of another version, it replaces
    # the canary.
    same = running.promoted("v3", T2, "", [])
    assert [(e.action, e.outcome) for e in same.events[-2:]] == [
        ("canary_end", "promoted"),
        ("promote", None),
    ]
    other = running.promoted("v4", T2, "", [])
    assert [(e.action, e.outcome) for e in other.events[-2:]] == [
        ("canary_end", "replaced"),
        ("promote", None),
    ]
    assert (other.current, other.rollback_target, other.canary) == ("v4", "v2", None)


@pytest.mark.parametrize("outcome", ["rolled_back", "inconclusive", "stopped"])
def test_a_canary_ended_otherwise_keeps_the_served_version(outcome: str) -> None:
    before = _two_promotions()
    h = before.canary_started("v3", 0.5, T, "", []).canary_ended(outcome, T2, "", [])
    assert (h.current, h.rollback_target, h.canary) == ("v2", "v1", None)
    assert (h.events[-1].action, h.events[-1].outcome) == ("canary_end", outcome)
    assert h.role_of("v3") is None


def test_a_rollback_during_a_canary_ends_the_canary_and_the_next_one_rolls_back() -> None:
    h = _two_promotions().canary_started("v3", 0.1, T, "", []).rolled_back(T2, "worse", [])
    assert (h.events[-1].action, h.events[-1].outcome) == ("canary_end", "rolled_back")
    assert (h.current, h.canary) == ("v2", None)
    h = h.rolled_back(T2, "", [])
    assert (h.events[-1].action, h.current) == ("rollback", "v1")


def test_one_canary_per_alias_unless_replaced_and_a_new_canary_reshuffles() -> None:
    first = _two_promotions().canary_started("v3", 0.1, T, "", [])
    with pytest.raises(RegistryError, match="already runs a canary of v3"):
        first.canary_started("v4", 0.1, T, "", [])
    second = first.canary_started("v3", 0.2, T, "again", [], replace=True)
    assert [(e.action, e.outcome) for e in second.events[-2:]] == [
        ("canary_end", "replaced"),
        ("canary", None),
    ]
    assert second.canary is not None and first.canary is not None
    assert second.canary.share == 0.2
    # Same version, same time: still a salt of its own.
    assert second.canary.salt != first.canary.salt


def test_a_canary_is_refused_without_a_served_version_or_a_share_in_0_1() -> None:
    with pytest.raises(RegistryError, match=r"serves nothing yet.*publish v1"):
        AliasHistory("chat").canary_started("v1", 0.1, T, "", [])
    h = _two_promotions()
    with pytest.raises(RegistryError, match="already serves v2"):
        h.canary_started("v2", 0.1, T, "", [])
    for share in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(RegistryError, match="between 0 and 1"):
            h.canary_started("v3", share, T, "", [])
    with pytest.raises(RegistryError, match="runs no canary"):
        h.canary_ended("stopped", T, "", [])
    with pytest.raises(RegistryError, match="unknown canary outcome"):
        h.canary_started("v3", 0.1, T, "", []).canary_ended("maybe", T, "", [])


def test_path_map_translates_to_the_servers_view() -> None:
    s = ServingConfig(path_map={"/mnt/reg": "/adapters", "/mnt/reg/special": "/x"})
    assert s.server_path("/mnt/reg/versions/v1") == "/adapters/versions/v1"
    assert s.server_path("/mnt/reg/special/v1") == "/x/v1"
    assert s.server_path("/mnt/registry/v1") == "/mnt/registry/v1"
    assert s.server_path("/elsewhere/v1") == "/elsewhere/v1"


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from deploy.local.adapters import make_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return [make_random_adapter(tiny_model_dir, root / f"a{s}", seed=s) for s in (1, 2, 3, 4)]


def test_a_registered_version_is_immutable_with_its_lineage(
    adapter_dirs: list[Path], tmp_path: Path
) -> None:
    reg = AdapterRegistry(str(tmp_path / "reg"))
    v1 = reg.add(adapter_dirs[0], note="first")
    v2 = reg.add(adapter_dirs[1], parent="v1")
    assert (v1["version"], v2["version"], v2["parent"]) == ("v1", "v2", "v1")
    assert reg.versions() == ["v1", "v2"]
    weights = Path(reg.path("v1")) / "adapter_model.safetensors"
    assert weights.read_bytes() == (adapter_dirs[0] / "adapter_model.safetensors").read_bytes()
    assert weights.stat().st_mode & 0o222 == 0  # read-only (root could still write)
    with pytest.raises(RegistryError, match="no version v7"):
        reg.add(adapter_dirs[0], parent="v7")
    with pytest.raises(RegistryError, match=r"adapter_config\.json missing"):
        reg.add(tmp_path)
    # No temporary directory is left behind, and deleting works despite read-only files.
    assert sorted(p.name for p in (tmp_path / "reg/versions").iterdir()) == ["v1", "v2"]
    reg.delete("v1")
    assert reg.versions() == ["v2"]


def test_delete_refuses_a_version_an_alias_serves_or_would_roll_back_to(
    adapter_dirs: list[Path], tmp_path: Path
) -> None:
    reg = AdapterRegistry(str(tmp_path / "reg"))
    v1, v2, v3, v4 = (reg.add(adapter_dirs[0])["version"] for _ in range(4))
    reg.save_history(AliasHistory("chat").promoted(v1, T, "", []).promoted(v2, T, "", []))
    with pytest.raises(RegistryError, match=f"{v2} is served as chat"):
        reg.delete(v2)
    with pytest.raises(RegistryError, match=f"{v1} is rollback target of chat"):
        reg.delete(v1)
    reg.delete(v4)
    assert reg.versions() == [v1, v2, v3]
    reg.save_history(reg.history("chat").promoted(v3, T, "", []))
    with pytest.raises(RegistryError, match=f"{v1} is rollback target 2 of chat"):
        reg.delete(v1)
    reg.delete(v1, keep_rollbacks=1)
    assert reg.versions() == [v2, v3]


def _truncated(adapter: Path, where: Path) -> Path:
    shutil.copytree(adapter, where)
    weights = where / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return where


def test_register_and_publish_refuse_a_corrupt_adapter_and_register_nothing(
    adapter_dirs: list[Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from deploy.local.adapters import poison_adapter
    from deploy.local.broker import free_port
    from flows.cli import app

    reg = AdapterRegistry(str(tmp_path / "reg"))
    v1 = reg.add(adapter_dirs[0])["version"]
    config = tmp_path / "kto-loop.toml"
    # No server is reached: the adapter is refused before registering.
    config.write_text(
        f'[registry]\nurl = "{reg.url}"\n'
        f'[serving]\nreplicas = ["http://127.0.0.1:{free_port()}"]\nretries = 1\n'
    )
    c = ["--config", str(config)]
    truncated = _truncated(adapter_dirs[1], tmp_path / "truncated")
    nan = poison_adapter(shutil.copytree(adapter_dirs[1], tmp_path / "nan"))
    runner = CliRunner()
    for directory, reason in [(truncated, "truncated or corrupt"), (nan, "NaN or inf")]:
        registered = runner.invoke(app, ["register", str(directory), *c])
        assert registered.exit_code == 2, registered.output
        assert "not registered" in registered.output and reason in registered.output
        published = runner.invoke(app, ["publish", "--adapter", str(directory), "--alias", "a", *c])
        assert published.exit_code == 2, published.output
        assert "not registered" in published.output and reason in published.output
        assert f"registered {directory} as" not in published.output
    assert reg.versions() == [v1]
    assert sorted(p.name for p in (tmp_path / "reg/versions").iterdir()) == [v1]
    assert reg.history("a").events == ()


def test_lock_all_waits_for_every_held_alias_and_holds_off_new_ones(tmp_path: Path) -> None:
    from filelock import Timeout

    reg = AdapterRegistry(str(tmp_path / "reg"))
    reg.save_history(AliasHistory("chat").promoted("v1", T, "", []))
    waited: list[str] = []
    waiting = threading.Event()
    holding = threading.Event()
    release = threading.Event()

    def gc() -> None:
        def told(alias: str) -> None:
            waited.append(alias)
            waiting.set()

        with reg.lock_all(waiting=told):
            holding.set()
            release.wait(60)

    with reg.lock("fresh"):  # a first publish of an alias with no history yet
        thread = threading.Thread(target=gc, daemon=True)
        thread.start()
        assert waiting.wait(60)
        assert not holding.is_set()
    assert holding.wait(60)
    assert waited == ["fresh"]
    # While gc holds them, no alias, old or new, can be taken.
    for alias in ("chat", "fresh", "brand-new"):
        with pytest.raises(Timeout), reg.lock(alias, timeout_s=0):
            pass
    release.set()
    thread.join(60)
    with reg.lock("brand-new", timeout_s=0):
        pass


def test_concurrent_registrations_get_distinct_versions(
    adapter_dirs: list[Path], tmp_path: Path
) -> None:
    reg = AdapterRegistry(str(tmp_path / "reg"))
    got: list[str] = []
    threads = [
        threading.Thread(target=lambda: got.append(reg.add(adapter_dirs[0])["version"]))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [f"v{i}" for i in range(1, 7)]
    assert reg.versions() == sorted(got, key=lambda v: int(v[1:]))


def test_alias_history_is_saved_whole(tmp_path: Path) -> None:
    reg = AdapterRegistry(str(tmp_path / "reg"))
    assert reg.history("chat").current is None
    h = AliasHistory("chat").promoted("v1", T, "first", ["r"])
    reg.save_history(h)
    assert reg.history("chat") == h
    assert reg.aliases() == ["chat"]
    assert not [p for p in (tmp_path / "reg/aliases").iterdir() if p.name.startswith(".chat")]


def test_a_memory_fsspec_registry_works_without_rename(adapter_dirs: list[Path]) -> None:
    reg = AdapterRegistry("memory://kto-loop-test-reg")
    info = reg.add(adapter_dirs[0])
    assert reg.versions() == [info["version"]]
    with reg.local_copy(info["version"]) as local:
        config, tensors = read_adapter(local)
    assert config["r"] == 8 and tensors
    reg.save_history(AliasHistory("chat").promoted(info["version"], T, "", []))
    assert reg.history("chat").current == info["version"]


def _limits(**kw: object) -> ServingLimits:
    return ServingLimits(max_lora_rank=8, **kw)  # type: ignore[arg-type]


def test_a_good_adapter_passes_every_check(adapter_dirs: list[Path], tiny_model_dir: Path) -> None:
    config, tensors = read_adapter(adapter_dirs[0])
    assert check_adapter(config, tensors, base_weight_shapes(tiny_model_dir), _limits()) == []


def test_bad_adapters_are_refused_with_every_reason(
    adapter_dirs: list[Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    config, tensors = read_adapter(adapter_dirs[0])
    shapes = base_weight_shapes(tiny_model_dir)
    nan = dict(tensors)
    key = sorted(nan)[0]
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    problems = check_adapter({**config, "r": 16}, nan, shapes, _limits())
    assert any("rank 16" in p and "--max-lora-rank 8" in p for p in problems)
    assert any("NaN or inf" in p for p in problems)

    wider = {
        k: torch.zeros(t.shape[0] + (k.endswith("lora_B.weight") * 32), t.shape[1])
        for k, t in tensors.items()
    }
    assert any("do not fit" in p for p in check_adapter(config, wider, shapes, _limits()))
    renamed = {k.replace("q_proj", "query_key_value"): t for k, t in tensors.items()}
    assert any("do not exist" in p for p in check_adapter(config, renamed, shapes, _limits()))
    assert any(
        "fingerprint" in p
        for p in check_adapter(
            config, tensors, None, _limits(base_fingerprint="aaaa"), adapter_base_fingerprint="bbbb"
        )
    )

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text(json.dumps(config))
    data = (adapter_dirs[0] / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterRefused, match="truncated or corrupt"):
        read_adapter(truncated)


def test_a_remote_registry_needs_a_path_map_before_any_server_is_asked(
    adapter_dirs: list[Path],
) -> None:
    from connectors.serving.publish import Publisher

    reg = AdapterRegistry("memory://kto-loop-remote-reg")
    v = reg.add(adapter_dirs[0])["version"]
    assert reg.path(v) == f"memory:///kto-loop-remote-reg/versions/{v}"
    unmapped = Publisher(reg, ServingConfig(replicas=["http://127.0.0.1:9"]))
    with pytest.raises(RegistryError, match=r"set \[serving\] path_map"):
        unmapped.publish("chat", v)
    mapped = Publisher(
        reg,
        ServingConfig(
            replicas=["http://127.0.0.1:9"],
            path_map={"memory:///kto-loop-remote-reg": "/mnt/adapters"},
        ),
    )
    assert mapped.server_path(v) == f"/mnt/adapters/versions/{v}"
    assert reg.history("chat").events == ()


def _writable_copy_of(source: Path, target: Path) -> None:
    """Replace a local version's file with another (the registry keeps them read-only)."""
    target.chmod(0o644)
    target.write_bytes(source.read_bytes())


def test_a_rollback_to_a_deleted_or_changed_version_is_refused_before_any_replica_is_asked(
    adapter_dirs: list[Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from deploy.local.broker import free_port
    from flows.cli import app

    reg = AdapterRegistry(str(tmp_path / "reg"))
    v1, v2, v3, v4, v5 = (reg.add(adapter_dirs[i % 4])["version"] for i in range(5))
    chat = AliasHistory("chat")
    for v in (v1, v2, v3):
        chat = chat.promoted(v, T, "", [])
    reg.save_history(chat.rolled_back(T, "worse", []))
    for f in Path(reg.path(v1)).iterdir():  # gone, as a gc keeping one rollback left it
        f.chmod(0o644)
    shutil.rmtree(reg.path(v1))
    other = AliasHistory("other").promoted(v4, T, "", []).promoted(v5, T, "", [])
    reg.save_history(other)
    weights = "adapter_model.safetensors"
    _writable_copy_of(adapter_dirs[1] / weights, Path(reg.path(v4)) / weights)

    config = tmp_path / "kto-loop.toml"
    # A replica that is down: a rollback that asks it fails with exit 1 instead.
    config.write_text(
        f'[registry]\nurl = "{reg.url}"\n'
        f'[serving]\nreplicas = ["http://127.0.0.1:{free_port()}"]\nretries = 1\n'
    )
    runner = CliRunner()
    gone = runner.invoke(app, ["rollback", "--alias", "chat", "--config", str(config)])
    assert gone.exit_code == 2, gone.output
    assert f"cannot roll back to {v1}" in gone.output and "no longer has it" in gone.output
    changed = runner.invoke(app, ["rollback", "--alias", "other", "--config", str(config)])
    assert changed.exit_code == 2, changed.output
    assert f"{weights} is not the file registered" in changed.output
    assert len(reg.history("chat").events) == 4 and reg.history("chat").current == v2
    assert reg.history("other") == other


# -- on an object store: moto's server speaks the S3 API over HTTP ----------------------


@pytest.fixture()
def s3_registry(s3_bucket: tuple[str, dict]) -> Callable[..., AdapterRegistry]:
    """Opens the registry in a fresh bucket; each call is another client, as another
    machine's would be (its own connections and listing cache)."""
    url, options = s3_bucket
    return lambda **kw: AdapterRegistry(f"{url}/adapters", options, **kw)


def test_registrations_at_once_on_an_object_store_get_distinct_versions_with_their_own_files(
    adapter_dirs: list[Path], s3_registry: Callable[..., AdapterRegistry]
) -> None:
    start = threading.Barrier(len(adapter_dirs))
    got: dict[Path, str] = {}
    failed: list[BaseException] = []

    def register(adapter: Path) -> None:
        reg = s3_registry()
        start.wait(60)
        try:
            got[adapter] = reg.add(adapter)["version"]
        except BaseException as e:
            failed.append(e)

    threads = [threading.Thread(target=register, args=(d,)) for d in adapter_dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failed, failed
    reg = s3_registry()
    assert sorted(got.values()) == reg.versions() == [f"v{i}" for i in range(1, 5)]
    for adapter, version in got.items():
        assert reg.info(version)["source"] == str(adapter.resolve())
        with reg.local_copy(version) as local:
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                assert (local / name).read_bytes() == (adapter / name).read_bytes(), version


def test_an_object_stores_changed_file_is_refused_by_validate_and_before_any_load(
    adapter_dirs: list[Path], s3_registry: Callable[..., AdapterRegistry]
) -> None:
    from connectors.serving.publish import Publisher

    reg = s3_registry()
    v1 = reg.add(adapter_dirs[0])["version"]
    weights = "adapter_model.safetensors"
    # Another adapter's weights: they load and pass every check but the sha256.
    reg.fs.put_file(str(adapter_dirs[1] / weights), f"{reg.path(v1)}/{weights}")
    publisher = Publisher(
        reg,
        ServingConfig(replicas=["http://127.0.0.1:9"], path_map={reg.url: "/mnt/adapters"}),
    )
    refused = f"{weights} is not the file registered"
    with pytest.raises(AdapterRefused, match=refused):
        publisher.validate(v1)
    with pytest.raises(AdapterRefused, match=refused), reg.local_copy(v1):
        pass
    with pytest.raises(AdapterRefused, match=refused):
        publisher.publish("chat", v1)
    assert reg.history("chat").events == ()


def test_an_upload_a_crash_left_is_invisible_and_the_next_register_removes_it(
    adapter_dirs: list[Path], s3_registry: Callable[..., AdapterRegistry]
) -> None:
    reg = s3_registry()
    weights = "adapter_model.safetensors"
    # A writer that died after its first file, before claims existed.
    reg.fs.put_file(str(adapter_dirs[0] / weights), f"{reg.path('v1')}/{weights}")
    assert reg.versions() == []
    v2 = reg.add(adapter_dirs[1])["version"]
    assert v2 == "v2" and reg.versions() == [v2]
    assert not reg.fs.exists(f"{reg.path('v1')}/{weights}")

    def crashed(version: str, age: timedelta) -> None:
        """What a writer leaves that claimed `version` `age` ago and died mid-upload."""
        at = (datetime.now(UTC) - age).isoformat()
        reg.fs.pipe_file(
            f"{reg.url}/claims/{version}", json.dumps({"claimed_at": at, "by": "gone:1"}).encode()
        )
        reg.fs.put_file(str(adapter_dirs[0] / weights), f"{reg.path(version)}/{weights}")

    crashed("v3", timedelta(hours=2))
    crashed("v4", timedelta(seconds=1))  # still within its lease: a live upload
    assert reg.versions() == [v2]
    assert reg.add(adapter_dirs[2])["version"] == "v5"
    assert not reg.fs.exists(f"{reg.path('v3')}/{weights}")
    assert reg.fs.exists(f"{reg.path('v4')}/{weights}")
    assert reg.versions() == [v2, "v5"]
    # A number once claimed is never given out again, even after its files are gone.
    assert s3_registry(upload_lease_s=0.0).sweep() == ["v4"]
    assert reg.add(adapter_dirs[3])["version"] == "v6"
    assert reg.versions() == [v2, "v5", "v6"]


def test_gc_removes_an_abandoned_upload_from_an_object_store(
    adapter_dirs: list[Path], s3_registry: Callable[..., AdapterRegistry], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from deploy.local.broker import free_port
    from flows.cli import app

    reg = s3_registry()
    v1 = reg.add(adapter_dirs[0])["version"]
    weights = "adapter_model.safetensors"
    reg.fs.put_file(str(adapter_dirs[1] / weights), f"{reg.path('v2')}/{weights}")
    endpoint = reg.fs.client_kwargs["endpoint_url"]
    config = tmp_path / "kto-loop.toml"
    config.write_text(
        f'[registry]\nurl = "{reg.url}"\nstorage_options = {{key = "test", secret = "test", '
        f'client_kwargs = {{endpoint_url = "{endpoint}", region_name = "eu-west-1"}}}}\n'
        f'[serving]\nreplicas = ["http://127.0.0.1:{free_port()}"]\nretries = 1\n'
    )
    runner = CliRunner()
    dry = runner.invoke(app, ["gc", "--dry-run", "--config", str(config)])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout.strip().splitlines()[-1])["abandoned_uploads"] == []
    assert reg.fs.exists(f"{reg.path('v2')}/{weights}")
    # No replica answers, so no version is deleted; the upload no server can read goes.
    result = runner.invoke(app, ["gc", "--config", str(config)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["deleted"], out["abandoned_uploads"]) == ([], ["v2"])
    assert not reg.fs.exists(f"{reg.path('v2')}/{weights}")
    assert reg.versions() == [v1]
