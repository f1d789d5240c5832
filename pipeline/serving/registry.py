"""The adapter registry's rules: version names, alias histories and retention.

Values in, values out: where the versions and histories are kept is
`connectors.serving.adapter_registry`'s business, and what a server still reads is asked of the
servers by the caller. A version, once written, never changes; an alias is a history of
events, and what it serves now, what a rollback returns to and the canary it runs are read
off that history.

A canary puts a candidate beside the served version for a share of the alias's traffic.
One runs per alias at a time; it ends promoted (the candidate is served), rolled back,
inconclusive or stopped (the served version stays), or replaced by the next canary or a
publish of another version. Canary events never move the promote/rollback stack: only
the promotion that ends a canary does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PROMOTE = "promote"
ROLLBACK = "rollback"
# The actions that change what an alias serves.
ACTIONS = (PROMOTE, ROLLBACK)
CANARY = "canary"
CANARY_END = "canary_end"
EVENT_ACTIONS = (*ACTIONS, CANARY, CANARY_END)
# How a canary ended.
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
INCONCLUSIVE = "inconclusive"
STOPPED = "stopped"
REPLACED = "replaced"
OUTCOMES = (PROMOTED, ROLLED_BACK, INCONCLUSIVE, STOPPED, REPLACED)

_VERSION = re.compile(r"^v([1-9][0-9]*)$")
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SERVED_SEPARATOR = "@"
# How many versions gc keeps for successive rollbacks of an alias, unless told otherwise.
KEEP_ROLLBACKS = 3


class RegistryError(Exception):
    """A registry operation that cannot go ahead; the message says what to do."""


def version_number(version: str) -> int:
    """The N of a version named `vN`, or a RegistryError naming the expected form."""
    m = _VERSION.match(version)
    if not m:
        raise RegistryError(f"{version!r} is not a version name: versions are v1, v2, ...")
    return int(m.group(1))


def next_version(existing: Iterable[str]) -> str:
    """The name after the highest existing version (`v1` for an empty registry)."""
    return f"v{max((version_number(v) for v in existing), default=0) + 1}"


def check_alias(alias: str) -> str:
    """Return `alias` if clients may call it as a model name, else raise RegistryError."""
    if not _ALIAS.match(alias):
        raise RegistryError(
            f"alias {alias!r} is not usable: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return alias


def served_name(alias: str, version: str) -> str:
    """The name a version is loaded under in vLLM: `alias@vN`.

    vLLM treats two adapter requests with the same name as one adapter whatever their ids,
    so every version needs its own name; clients keep calling the alias.
    """
    version_number(version)
    return f"{check_alias(alias)}{SERVED_SEPARATOR}{version}"


def parse_served_name(name: str) -> tuple[str, str] | None:
    """(alias, version) for a name made by `served_name`, None for any other model name."""
    alias, sep, version = name.rpartition(SERVED_SEPARATOR)
    if not sep or not _ALIAS.match(alias) or not _VERSION.match(version):
        return None
    return alias, version


def check_share(share: float) -> float:
    """Return `share` if a canary may take it (strictly between 0 and 1), else raise."""
    if not (isinstance(share, int | float) and math.isfinite(share) and 0.0 < share < 1.0):
        raise RegistryError(
            f"canary share {share!r} is not between 0 and 1 (exclusive): e.g. 0.1 sends a "
            "tenth of the alias's conversations to the candidate; publish to serve it to all"
        )
    return float(share)


@dataclass(frozen=True)
class AliasEvent:
    """One change of what an alias serves, or of its canary.

    Attributes:
        action: "promote", "rollback", "canary" (a canary starts) or "canary_end".
        version: the version the alias serves after a promote or rollback; the candidate
            of a canary event.
        previous: the version it served before (None for the first promotion); the
            served version beside a canary.
        at: ISO-8601 UTC time of the event.
        reason: why, in the operator's or the flow's words.
        replicas: the server URLs switched.
        share: a canary's share of routing keys (canary events only).
        outcome: how a canary ended, one of OUTCOMES (canary_end only).
        verdict: what decided the end (the live-vote test's numbers), kept as given.
    """

    action: str
    version: str
    previous: str | None
    at: str
    reason: str = ""
    replicas: tuple[str, ...] = ()
    share: float | None = None
    outcome: str | None = None
    verdict: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.action not in EVENT_ACTIONS:
            raise RegistryError(f"unknown alias action {self.action!r}: use one of {EVENT_ACTIONS}")
        version_number(self.version)
        if self.action == CANARY:
            check_share(self.share)  # type: ignore[arg-type]
        if self.action == CANARY_END and self.outcome not in OUTCOMES:
            raise RegistryError(f"unknown canary outcome {self.outcome!r}: use one of {OUTCOMES}")

    def as_dict(self) -> dict:
        d = {
            "action": self.action,
            "version": self.version,
            "previous": self.previous,
            "at": self.at,
            "reason": self.reason,
            "replicas": list(self.replicas),
        }
        # Only when set: histories written before canaries read and write unchanged.
        optional = {"share": self.share, "outcome": self.outcome, "verdict": self.verdict}
        return d | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping) -> AliasEvent:
        return cls(
            action=d["action"],
            version=d["version"],
            previous=d.get("previous"),
            at=d["at"],
            reason=d.get("reason", ""),
            replicas=tuple(d.get("replicas", ())),
            share=d.get("share"),
            outcome=d.get("outcome"),
            verdict=d.get("verdict"),
        )


@dataclass(frozen=True)
class Canary:
    """The canary an alias runs.

    Attributes:
        version: the candidate.
        share: its share of the alias's routing keys.
        started_at: when it started (ISO-8601 UTC).
        salt: this canary's own split of keys, the same on every replica (a new canary
            reshuffles who sees the candidate).
        reason: why it started.
    """

    version: str
    share: float
    started_at: str
    salt: str
    reason: str


@dataclass(frozen=True)
class AliasHistory:
    """Every event of one alias, oldest first."""

    alias: str
    events: tuple[AliasEvent, ...] = field(default_factory=tuple)

    def _stack(self) -> list[str]:
        # A promotion pushes a version, a rollback pops back to the one below it: two
        # rollbacks after three promotions serve the first version again.
        stack: list[str] = []
        for e in self.events:
            if e.action == PROMOTE:
                stack.append(e.version)
            elif e.action == ROLLBACK and stack:
                stack.pop()
        return stack

    @property
    def canary(self) -> Canary | None:
        """The canary the alias runs, None when it runs none."""
        running = None
        for i, e in enumerate(self.events):
            if e.action == CANARY:
                salt = f"{self.alias}/{e.version}/{e.at}/{i}"
                running = Canary(e.version, e.share or 0.0, e.at, salt, e.reason)
            else:  # whatever else happens to the alias ends it
                running = None
        return running

    @property
    def current(self) -> str | None:
        """The version the alias serves, None before its first promotion."""
        stack = self._stack()
        return stack[-1] if stack else None

    @property
    def rollback_target(self) -> str | None:
        """The version a rollback would serve, None when there is nothing to go back to."""
        stack = self._stack()
        return stack[-2] if len(stack) >= 2 else None

    @property
    def rollback_targets(self) -> tuple[str, ...]:
        """The versions successive rollbacks would serve, the next one first."""
        return tuple(reversed(self._stack()[:-1]))

    def role_of(self, version: str, rollbacks: int = KEEP_ROLLBACKS) -> str | None:
        """Why this alias needs `version` ("served as chat", "rollback target of chat",
        "rollback target 2 of chat" for the one a second rollback serves), counting the
        first `rollbacks` rollback targets; None when it does not."""
        if version == self.current:
            return f"served as {self.alias}"
        canary = self.canary
        if canary is not None and version == canary.version:
            return f"canary of {self.alias}"
        targets = self.rollback_targets[:rollbacks]
        if version not in targets:
            return None
        n = targets.index(version) + 1
        return f"rollback target{f' {n}' if n > 1 else ''} of {self.alias}"

    def promoted(self, version: str, at: str, reason: str, replicas: Iterable[str]) -> AliasHistory:
        """The history with `version` promoted on top of the current one. A canary ends
        with it: promoted when `version` is its candidate, else replaced."""
        if version == self.current:
            raise RegistryError(f"{self.alias} already serves {version}: nothing to promote")
        canary = self.canary
        if canary is not None:
            outcome = PROMOTED if version == canary.version else REPLACED
            history = self._canary_end(outcome, at, reason, replicas, None)
        else:
            history = self
        event = AliasEvent(PROMOTE, version, self.current, at, reason, tuple(replicas))
        return AliasHistory(self.alias, (*history.events, event))

    def canary_started(
        self,
        version: str,
        share: float,
        at: str,
        reason: str,
        replicas: Iterable[str],
        replace: bool = False,
    ) -> AliasHistory:
        """The history with a canary of `version` beside the served version.

        Raises:
            RegistryError: nothing is served yet, `version` is served already, the share
                is not in (0, 1), or a canary runs and `replace` is False (with it, the
                running one ends as replaced).
        """
        version_number(version)
        check_share(share)
        if self.current is None:
            raise RegistryError(
                f"{self.alias} serves nothing yet: a canary runs beside a served version; "
                f"publish {version} instead"
            )
        if version == self.current:
            raise RegistryError(f"{self.alias} already serves {version}: nothing to canary")
        history = self
        running = self.canary
        if running is not None:
            if not replace:
                raise RegistryError(
                    f"{self.alias} already runs a canary of {running.version} (since "
                    f"{running.started_at}): end it first, or replace it"
                )
            history = self._canary_end(REPLACED, at, reason, replicas, None)
        event = AliasEvent(CANARY, version, self.current, at, reason, tuple(replicas), share=share)
        return AliasHistory(self.alias, (*history.events, event))

    def canary_ended(
        self,
        outcome: str,
        at: str,
        reason: str,
        replicas: Iterable[str],
        verdict: dict[str, Any] | None = None,
    ) -> AliasHistory:
        """The history with the running canary ended: `outcome` "promoted" also promotes
        its candidate; any other keeps the served version."""
        running = self.canary
        if running is None:
            raise RegistryError(f"{self.alias} runs no canary: nothing to end")
        if outcome == PROMOTED:
            history = self._canary_end(outcome, at, reason, replicas, verdict)
            event = AliasEvent(PROMOTE, running.version, self.current, at, reason, tuple(replicas))
            return AliasHistory(self.alias, (*history.events, event))
        return self._canary_end(outcome, at, reason, replicas, verdict)

    def _canary_end(
        self,
        outcome: str,
        at: str,
        reason: str,
        replicas: Iterable[str],
        verdict: dict[str, Any] | None,
    ) -> AliasHistory:
        running = self.canary
        assert running is not None
        event = AliasEvent(
            CANARY_END,
            running.version,
            self.current,
            at,
            reason,
            tuple(replicas),
            outcome=outcome,
            verdict=verdict,
        )
        return AliasHistory(self.alias, (*self.events, event))

    def rolled_back(self, at: str, reason: str, replicas: Iterable[str]) -> AliasHistory:
        """The history with the current version withdrawn in favour of the one before it;
        during a canary, the canary ended as rolled back instead (the served version
        stays)."""
        if self.canary is not None:
            return self._canary_end(ROLLED_BACK, at, reason, replicas, None)
        target = self.rollback_target
        if target is None:
            raise RegistryError(
                f"{self.alias} has no earlier version to roll back to "
                f"(it serves {self.current or 'nothing'}); publish a version instead"
            )
        event = AliasEvent(ROLLBACK, target, self.current, at, reason, tuple(replicas))
        return AliasHistory(self.alias, (*self.events, event))

    def as_dict(self) -> dict:
        return {"alias": self.alias, "events": [e.as_dict() for e in self.events]}

    @classmethod
    def from_dict(cls, d: Mapping) -> AliasHistory:
        return cls(d["alias"], tuple(AliasEvent.from_dict(e) for e in d.get("events", ())))


@dataclass(frozen=True)
class Retention:
    """What a clean-up may delete, and why each kept version stays."""

    delete: tuple[str, ...]
    keep: dict[str, str]


def retention(
    versions: Iterable[str],
    histories: Iterable[AliasHistory],
    server_names: Iterable[str] | None,
    keep_last: int,
    server_paths: Iterable[str] = (),
    version_paths: Mapping[str, str] | None = None,
    keep_rollbacks: int = KEEP_ROLLBACKS,
) -> Retention:
    """Decide which versions' files may be deleted.

    A version stays when an alias serves it or runs it as a canary, when one of the next
    `keep_rollbacks`
    rollbacks of an alias would return to it, when any server still knows it under any
    name (a served adapter whose directory vanishes kills vLLM, and vLLM reloads an
    evicted adapter from its path), or when it is among the newest `keep_last`.

    Args:
        versions: every version in the registry.
        histories: every alias's history.
        server_names: model names the servers list (each replica's `/v1/models`); None
            when a server could not be asked, which keeps every version.
        keep_last: how many of the newest versions to keep regardless.
        server_paths: the directories the servers' listed adapters were loaded from.
        version_paths: each version's directory as the servers see it, to match a
            version loaded under a name of another form against `server_paths`.
        keep_rollbacks: how many rollbacks in a row each alias can make (one keeps
            only the version the next rollback serves).
    """
    versions = sorted(versions, key=version_number)
    keep: dict[str, str] = {}
    if server_names is None:
        return Retention((), {v: "a server could not be asked what it reads" for v in versions})
    for h in histories:
        canary = h.canary
        for v in (h.current, canary.version if canary else None, *h.rollback_targets):
            role = h.role_of(v, keep_rollbacks) if v else None
            if v and role:
                keep.setdefault(v, role)
    for name in server_names:
        parsed = parse_served_name(name)
        if parsed:
            keep.setdefault(parsed[1], f"loaded on a server as {name}")
    loaded_from = {p.rstrip("/") for p in server_paths}
    for v, path in (version_paths or {}).items():
        if path.rstrip("/") in loaded_from:
            keep.setdefault(v, f"loaded on a server from {path}")
    for v in versions[max(0, len(versions) - keep_last) :]:
        keep.setdefault(v, f"among the newest {keep_last}")
    return Retention(tuple(v for v in versions if v not in keep), keep)
