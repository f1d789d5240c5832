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

A canary goes the same way, with step 3 setting the canary instead of switching the
alias: the candidate answers a share of the alias's conversations on every replica, or
on none. Ending it promotes the candidate (steps 1-4, and the switch ends the canary in
the same step), or removes the canary from every replica; either is all or nothing too,
and a replica switched or ended before one failed gets the canary back.
"""

from __future__ import annotations

import dataclasses
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
from pipeline.serving.registry import (
    PROMOTED,
    AliasHistory,
    Canary,
    RegistryError,
    served_name,
)

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
    share: float | None = None  # a canary's, when one started or runs on
    outcome: str | None = None  # how a canary ended
    routed: dict[str, dict[str, int]] = field(default_factory=dict)  # an ended canary's

    def as_dict(self) -> dict[str, Any]:
        d = {
            "alias": self.alias,
            "version": self.version,
            "previous": self.previous,
            "action": self.action,
            "replicas": list(self.replicas),
            "seconds": round(self.seconds, 3),
            "smoke": self.smoke,
        }
        optional = {"share": self.share, "outcome": self.outcome, "routed": self.routed}
        return d | {k: v for k, v in optional.items() if v}


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
        files pass the checks a publish makes. During a canary, end the canary instead
        (outcome "rolled_back"): the served version stays."""
        with self.registry.lock(alias):
            history = self.registry.history(alias)
            after = history.rolled_back(now_iso(), reason, self._urls())
            if history.canary is not None:
                return self._end_everywhere(history, after)
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
        """Make every replica serve the alias's recorded version and run its recorded
        canary, or none (after a replica restart, or to add a replica); the history does
        not change."""
        with self.registry.lock(alias):
            history = self.registry.history(alias)
            if history.current is None:
                raise RegistryError(f"{alias} has never been published: nothing to sync")
            self._check(history.current)
            result = self._switch(history, history, record=False)
            if history.canary is None:
                # A replica that missed the end of a canary still routes it.
                self._end_everywhere(history, history, record=False)
                return result
            self._check(history.canary.version)
            canary = self._set_everywhere(history, history, record=False)
            smoke = {u: f"{result.smoke[u]} | {canary.smoke[u]}" for u in result.smoke}
            return PublishResult(
                alias,
                history.current,
                None,
                "sync",
                result.replicas,
                result.seconds + canary.seconds,
                smoke,
                share=history.canary.share,
            )

    def start_canary(
        self, alias: str, version: str, share: float, reason: str = "", replace: bool = False
    ) -> PublishResult:
        """Serve `version` to `share` of the alias's conversations beside the served
        version, on every replica or none: the checks and the load and smoke test of a
        publish, then the canary on every replica.

        Args:
            share: the share of routing keys (conversations, users) for the candidate,
                in (0, 1).
            replace: end a running canary (as "replaced") instead of refusing.

        Raises:
            PublishError: nothing is served yet (publish instead), or a replica failed
                (the canary is removed where it was set, the candidate retired where it
                was loaded, the history unchanged).
            RegistryError: a canary runs already (without `replace`), a bad share, a
                version the registry lacks.
        """
        with self.registry.lock(alias):
            history = self.registry.history(alias)
            if history.current is None:
                raise PublishError(
                    f"{alias} serves nothing yet: a canary runs beside a served version; "
                    f"publish {version} instead"
                )
            after = history.canary_started(version, share, now_iso(), reason, self._urls(), replace)
            self._check(version)
            return self._set_everywhere(history, after)

    def end_canary(
        self, alias: str, outcome: str, reason: str = "", verdict: dict[str, Any] | None = None
    ) -> PublishResult:
        """End the alias's canary on every replica, all or nothing, and record it with
        `outcome` and `verdict` (kept as given).

        "promoted" switches the alias to the candidate as a publish does (the switch ends
        the canary); any other outcome ("rolled_back", "inconclusive", "stopped")
        removes the canary and keeps the served version. If a replica fails, the
        replicas already switched or ended get the canary back and the history is
        unchanged (PublishError).
        """
        with self.registry.lock(alias):
            history = self.registry.history(alias)
            after = history.canary_ended(outcome, now_iso(), reason, self._urls(), verdict)
            if outcome != PROMOTED:
                return self._end_everywhere(history, after)
            assert after.current is not None
            self._check(after.current)
            return dataclasses.replace(self._switch(history, after), outcome=PROMOTED)

    def _check(self, version: str) -> None:
        """Step 1, for the version about to be loaded: its path as the servers see it, and
        its files."""
        self.server_path(version)
        self.validate(version)
        self.progress(f"{version}: files checked")

    def _urls(self) -> list[str]:
        return [a.url for a in self.admins]

    def _load_everywhere(
        self, before: AliasHistory, version: str
    ) -> tuple[list[VllmAdmin], dict[str, str]]:
        """Step 2: load `version` on every replica and ask each for a smoke completion;
        the replicas it was loaded on, and their answers. A failure retires it where it
        was loaded (unless `before` still needs it) and raises PublishError."""
        alias = before.alias
        target = served_name(alias, version)
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
                f"{_keeps(before)}: loading {target} failed on {e.replica}: {e}"
            ) from e
        return loaded, smoke

    def _switch(
        self, before: AliasHistory, after: AliasHistory, record: bool = True
    ) -> PublishResult:
        started = time.monotonic()
        alias, version = after.alias, after.current
        assert version is not None
        target = served_name(alias, version)
        keep = [served_name(alias, after.rollback_target)] if after.rollback_target else []
        loaded, smoke = self._load_everywhere(before, version)

        switched: list[VllmAdmin] = []
        routed: dict[str, dict[str, int]] = {}  # of a canary the switch ended
        try:
            for admin in self.admins:
                answer = admin.swap(alias, target, keep)
                switched.append(admin)
                self.progress(f"{admin.url}: {alias} -> {target}")
                if answer.get("canary_ended"):
                    routed[admin.url] = answer["canary_ended"]["routed"]
        except VllmError as e:
            undone = self._switch_back(switched, before)
            self._retire_unserved(loaded, target, before)
            raise PublishError(
                f"{_keeps(before)}: switching failed on {e.replica}: {e}; switched back on "
                f"{undone or 'no replica'}"
            ) from e
        return self._done(after, record, version, before.current, started, smoke, routed=routed)

    def _switch_back(self, switched: list[VllmAdmin], before: AliasHistory) -> list[str]:
        """Point the alias back at what `before` served, and give it back `before`'s
        canary, on replicas already switched."""
        undone = []
        alias, canary = before.alias, before.canary
        for admin in switched:
            try:
                if before.current is None:
                    # There was no alias before: remove the name again.
                    admin.unload(alias)
                else:
                    keep = [served_name(alias, v) for v in (before.rollback_target,) if v]
                    keep += [served_name(alias, canary.version)] if canary else []
                    admin.swap(alias, served_name(alias, before.current), keep)
                    if canary is not None:
                        _set(admin, alias, canary)
                undone.append(admin.url)
            except VllmError:
                log.exception("switching %s back on %s failed", alias, admin.url)
        return undone

    def _set_everywhere(
        self, before: AliasHistory, after: AliasHistory, record: bool = True
    ) -> PublishResult:
        """Load and smoke-test `after`'s canary on every replica, then set it on every
        replica; on a failure, give the replicas set so far `before`'s canary (or none)
        back."""
        started = time.monotonic()
        alias, canary = after.alias, after.canary
        assert canary is not None and after.current is not None
        target = served_name(alias, canary.version)
        loaded, smoke = self._load_everywhere(before, canary.version)
        done: list[VllmAdmin] = []
        try:
            for admin in self.admins:
                _set(admin, alias, canary)
                done.append(admin)
                self.progress(f"{admin.url}: {alias} canary {target} at {canary.share:g}")
        except VllmError as e:
            undone = self._restore_canary(done, before)
            self._retire_unserved(loaded, target, before)
            raise PublishError(
                f"{_keeps(before)}: setting the canary of {target} failed on {e.replica}: "
                f"{e}; undone on {undone or 'no replica'}"
            ) from e
        return self._done(
            after, record, canary.version, after.current, started, smoke, share=canary.share
        )

    def _end_everywhere(
        self, before: AliasHistory, after: AliasHistory, record: bool = True
    ) -> PublishResult:
        """Remove the alias's canary from every replica; on a failure, give the replicas
        ended so far `before`'s canary back."""
        started = time.monotonic()
        alias, canary = before.alias, before.canary
        ended: list[VllmAdmin] = []
        routed: dict[str, dict[str, int]] = {}
        try:
            for admin in self.admins:
                state = admin.remove_canary(alias)
                ended.append(admin)
                if state is not None:
                    routed[admin.url] = state["routed"]
                    self.progress(f"{admin.url}: {alias} canary {state['target']} ended")
        except VllmError as e:
            undone = self._restore_canary(ended, before)
            raise PublishError(
                f"{_keeps(before)}: ending the canary failed on {e.replica}: {e}; given "
                f"back on {undone or 'no replica'}"
            ) from e
        version = canary.version if canary else (after.current or "")
        return self._done(after, record, version, after.current, started, routed=routed)

    def _done(
        self,
        after: AliasHistory,
        record: bool,
        version: str,
        previous: str | None,
        started: float,
        smoke: dict[str, str] | None = None,
        **fields: Any,
    ) -> PublishResult:
        """Step 4: record `after` (unless a sync), and what was done."""
        if record:
            self.registry.save_history(after)
        last = after.events[-1] if (record and after.events) else None
        return PublishResult(
            after.alias,
            version,
            previous,
            last.action if last else "sync",
            tuple(self._urls()),
            time.monotonic() - started,
            smoke or {},
            outcome=last.outcome if last else None,
            **fields,
        )

    def _restore_canary(self, admins: list[VllmAdmin], before: AliasHistory) -> list[str]:
        """Give these replicas `before`'s canary again, or none when it ran none."""
        undone = []
        for admin in admins:
            try:
                if before.canary is None:
                    admin.remove_canary(before.alias)
                else:
                    _set(admin, before.alias, before.canary)
                undone.append(admin.url)
            except VllmError:
                log.exception("restoring the canary of %s on %s failed", before.alias, admin.url)
        return undone

    def _retire_unserved(self, loaded: list[VllmAdmin], target: str, before: AliasHistory) -> None:
        """Retire the new version where it was loaded for an aborted publish or canary,
        unless the alias served it already or runs it as its canary (a sync, a retry of a
        half-done publish, a promotion that failed)."""
        needed = (before.current, before.rollback_target, before.canary and before.canary.version)
        if any(v and served_name(before.alias, v) == target for v in needed):
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


def _set(admin: VllmAdmin, alias: str, canary: Canary) -> None:
    admin.set_canary(alias, served_name(alias, canary.version), canary.share, canary.salt)


def _keeps(before: AliasHistory) -> str:
    """What the alias keeps serving after a failed step, for the error message."""
    kept = f"{before.alias} stays on {before.current or 'nothing'}"
    if before.canary is not None:
        kept += f" with its canary of {before.canary.version} at {before.canary.share:g}"
    return kept
