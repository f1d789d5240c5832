"""Put an adapter version into service on every replica, all or nothing, and take it back.

The protocol, per alias and under the registry's alias lock:

1. Check the version's files here (present, the ones registered by their sha256,
   loadable, finite, rank within the servers' limit, shapes and fingerprint of the served
   base model). A bad adapter stops here, before any server is touched; a rollback and a
   sync check the version they load the same way.
2. On every replica: load it under its own name `alias@vN` from its own path, and ask it
   a greedy smoke completion. Nothing clients call has changed yet.
3. On every replica: switch the alias to it (the plugin's one-assignment swap), keeping
   the rollback target loaded. If a replica fails, the replicas already switched are
   switched back and the new version is retired where it was loaded.
4. Record the event in the alias's history.

A failure anywhere leaves the served adapter, the registry and the history as they were,
and says which replica failed and why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.config import ServingConfig
from connectors.serving.adapter_files import base_weight_shapes, read_adapter
from connectors.serving.adapter_registry import AdapterRegistry, now_iso
from connectors.serving.fingerprint import model_fingerprint
from connectors.serving.vllm_admin import VllmAdmin, VllmError
from pipeline.serving.adapter_check import AdapterRefused, ServingLimits, check_adapter
from pipeline.serving.registry import AliasHistory, RegistryError, served_name

log = logging.getLogger(__name__)


class PublishError(Exception):
    """The alias was not switched (or was switched back everywhere); nothing changed."""


@dataclass(frozen=True)
class PublishResult:
    alias: str
    version: str
    previous: str | None
    action: str
    replicas: tuple[str, ...]
    seconds: float
    smoke: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "version": self.version,
            "previous": self.previous,
            "action": self.action,
            "replicas": list(self.replicas),
            "seconds": round(self.seconds, 3),
            "smoke": self.smoke,
        }


def admins_for(serving: ServingConfig) -> list[VllmAdmin]:
    """One client per replica, with the inference key and the admin key."""
    key = serving.api_key.get_secret_value() if serving.api_key else None
    admin_key = serving.admin_key.get_secret_value() if serving.admin_key else None
    return [
        VllmAdmin(url, key, serving.timeout_seconds, serving.retries, admin_key=admin_key)
        for url in serving.replicas
    ]


class Publisher:
    """Publishes and rolls back registry versions on a set of replicas.

    Args:
        registry: where versions and alias histories live.
        serving: the replicas' settings (limits, path mapping, smoke prompt).
        admins: one client per replica; built from `serving` when None.
        progress: called with a short line as each step completes (the CLI shows it).
    """

    def __init__(
        self,
        registry: AdapterRegistry,
        serving: ServingConfig,
        admins: Sequence[VllmAdmin] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.serving = serving
        self.admins = list(admins) if admins is not None else admins_for(serving)
        self.progress = progress or (lambda line: log.info("%s", line))

    # -- checks ---------------------------------------------------------------------------

    def limits(self) -> tuple[ServingLimits, Mapping[str, tuple[int, ...]] | None]:
        """What the servers accept, and the served base model's weight shapes (None when
        [serving] base_model is not set)."""
        if not self.serving.base_model:
            return ServingLimits(self.serving.max_lora_rank), None
        return (
            ServingLimits(self.serving.max_lora_rank, model_fingerprint(self.serving.base_model)),
            base_weight_shapes(self.serving.base_model),
        )

    def register(self, adapter_dir: Path, **kwargs: Any) -> dict[str, Any]:
        """Register an adapter directory as the next version, refusing (AdapterRefused,
        nothing registered) one these servers must not serve; return its version.json."""
        limits, shapes = self.limits()
        return self.registry.add(adapter_dir, limits=limits, base_shapes=shapes, **kwargs)

    def validate(self, version: str) -> None:
        """Raise AdapterRefused with every reason the version must not be served (a file
        that is not the one registered, first of all)."""
        info = self.registry.info(version)
        limits, shapes = self.limits()
        with self.registry.local_copy(version) as local:
            config, tensors = read_adapter(local)
        problems = check_adapter(
            config,
            tensors,
            shapes,
            limits,
            adapter_base_fingerprint=info.get("base_model_fingerprint"),
        )
        if problems:
            raise AdapterRefused(version, problems)

    def server_path(self, version: str) -> str:
        """The version's directory as the servers see it ([serving] path_map applied)."""
        path = self.serving.server_path(self.registry.path(version))
        if "://" in path:
            raise RegistryError(
                f"servers load adapters from their own filesystem, and {path} is a URL: mount "
                "the registry on the servers and set [serving] path_map from "
                f"{self.registry.url!r} to the mount point"
            )
        return path

    # -- the protocol ---------------------------------------------------------------------

    def publish(self, alias: str, version: str, reason: str = "") -> PublishResult:
        """Serve `version` as `alias` on every replica (steps 1-4 above)."""
        with self.registry.lock(alias):
            history = self.registry.history(alias)
            after = history.promoted(version, now_iso(), reason, self._urls())
            self._check(version)
            return self._switch(history, after)

    def rollback(self, alias: str, reason: str = "") -> PublishResult:
        """Serve the version before the current one again, on every replica, once its
        files pass the checks a publish makes."""
        with self.registry.lock(alias):
            history = self.registry.history(alias)
            after = history.rolled_back(now_iso(), reason, self._urls())
            target = after.current
            assert target is not None
            if target not in self.registry.versions():
                raise RegistryError(
                    f"{alias} cannot roll back to {target}: {self.registry.url} no longer has "
                    f"it; publish a version instead ([registry] keep_rollbacks says how many "
                    "rollbacks `kto-loop gc` keeps the versions for)"
                )
            self._check(target)
            return self._switch(history, after)

    def sync(self, alias: str) -> PublishResult:
        """Make every replica serve the alias's recorded version (after a replica restart,
        or to add a replica); the history does not change."""
        with self.registry.lock(alias):
            history = self.registry.history(alias)
            if history.current is None:
                raise RegistryError(f"{alias} has never been published: nothing to sync")
            self._check(history.current)
            return self._switch(history, history, record=False)

    def _check(self, version: str) -> None:
        """Step 1, for the version about to be loaded: its path as the servers see it, and
        its files."""
        self.server_path(version)
        self.validate(version)
        self.progress(f"{version}: files checked")

    def _urls(self) -> list[str]:
        return [a.url for a in self.admins]

    def _switch(
        self, before: AliasHistory, after: AliasHistory, record: bool = True
    ) -> PublishResult:
        started = time.monotonic()
        alias, version = after.alias, after.current
        assert version is not None
        target = served_name(alias, version)
        keep = [served_name(alias, after.rollback_target)] if after.rollback_target else []
        path = self.server_path(version)

        loaded: list[VllmAdmin] = []
        smoke: dict[str, str] = {}
        try:
            for admin in self.admins:
                admin.load(target, path)
                loaded.append(admin)
                answer = admin.complete(
                    target, self.serving.smoke_prompt, self.serving.smoke_max_tokens
                )
                if not answer.token_ids and not answer.text:
                    raise VllmError(admin.url, f"{target} gave an empty smoke completion")
                smoke[admin.url] = answer.text
                self.progress(f"{admin.url}: {target} loaded, smoke test answered")
        except VllmError as e:
            self._retire_unserved(loaded, target, before)
            raise PublishError(
                f"{alias} stays on {before.current or 'nothing'}: loading {target} failed "
                f"on {e.replica}: {e}"
            ) from e

        switched: list[VllmAdmin] = []
        try:
            for admin in self.admins:
                admin.swap(alias, target, keep)
                switched.append(admin)
                self.progress(f"{admin.url}: {alias} -> {target}")
        except VllmError as e:
            undone = self._switch_back(switched, before)
            self._retire_unserved(loaded, target, before)
            raise PublishError(
                f"{alias} stays on {before.current or 'nothing'}: switching failed on "
                f"{e.replica}: {e}; switched back on {undone or 'no replica'}"
            ) from e
        if record:
            self.registry.save_history(after)
        last = after.events[-1] if after.events else None
        return PublishResult(
            alias,
            version,
            before.current,
            last.action if (record and last) else "sync",
            tuple(self._urls()),
            time.monotonic() - started,
            smoke,
        )

    def _switch_back(self, switched: list[VllmAdmin], before: AliasHistory) -> list[str]:
        """Point the alias back at what `before` served on replicas already switched."""
        undone = []
        for admin in switched:
            try:
                if before.current is None:
                    # There was no alias before: remove the name again.
                    admin.unload(before.alias)
                else:
                    keep = (
                        [served_name(before.alias, before.rollback_target)]
                        if before.rollback_target
                        else []
                    )
                    admin.swap(before.alias, served_name(before.alias, before.current), keep)
                undone.append(admin.url)
            except VllmError:
                log.exception("switching %s back on %s failed", before.alias, admin.url)
        return undone

    def _retire_unserved(self, loaded: list[VllmAdmin], target: str, before: AliasHistory) -> None:
        """Retire the new version where it was loaded for an aborted publish, unless the
        alias served it already (a sync or a retry of a half-done publish)."""
        if before.current and served_name(before.alias, before.current) == target:
            return
        if before.rollback_target and served_name(before.alias, before.rollback_target) == target:
            return
        for admin in loaded:
            try:
                admin.retire(target)
            except VllmError:
                log.exception("retiring %s on %s failed", target, admin.url)

    # -- observing ------------------------------------------------------------------------

    def served(self) -> dict[str, dict[str, Any] | str]:
        """Per replica, the swap plugin's state, or the error that kept us from it."""
        out: dict[str, dict[str, Any] | str] = {}
        for admin in self.admins:
            try:
                out[admin.url] = admin.swap_state()
            except VllmError as e:
                out[admin.url] = str(e)
        return out
