"""Adapter versions and alias histories on a local directory or any fsspec URL.

    <root>/versions/v7/adapter_model.safetensors   the weights, as trained
    <root>/versions/v7/adapter_config.json
    <root>/versions/v7/trainer_manifest.json       the trainer's manifest, when there is one
    <root>/versions/v7/version.json                lineage (parent, reference, snapshot and
                                                   its feedback window, cycle run), base
                                                   model, metrics
    <root>/aliases/chat.json                       every promotion and rollback of "chat"

A version is written under a temporary name and renamed into place (locally), or written
with version.json last (object stores, which have no rename; a directory without it is
ignored), and is never modified afterwards: servers read these files for as long as they
serve the version, and may read them again whenever they reload an evicted adapter.
Only an adapter that passes the checks (its files load, its weights are finite, and,
when the caller gives the servers' limits, they accept it) becomes a version.

Locks (a local registry): `lock(alias)` holds one alias (publish, rollback, sync);
`lock_all()` holds every alias at once (gc). A gate lock, held by lock_all() throughout
and by lock(alias) only while it makes its alias's lock file, keeps a publish of a new
alias from slipping past a gc that has already listed the aliases.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock, Timeout
from fsspec.implementations.local import LocalFileSystem

from connectors.feedback.store import fsync_dir, write_local_atomic
from connectors.serving.adapter_files import read_adapter
from connectors.training.run_dir import ADAPTER_FILES, MANIFEST, read_manifest
from pipeline.serving.adapter_check import (
    AdapterRefused,
    ServingLimits,
    adapter_problems,
    check_adapter,
)
from pipeline.serving.registry import (
    AliasHistory,
    RegistryError,
    check_alias,
    next_version,
    version_number,
)
from pipeline.training.manifest import Manifest

TRAINER_MANIFEST = MANIFEST
VERSION_FILE = "version.json"
_KEPT_TRAINER_MANIFEST = "trainer_manifest.json"
# No alias can have this lock's name: aliases' lock files are ".<alias>.lock", and an
# alias cannot contain "+".
_GATE_LOCK = "+gate.lock"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class AdapterRegistry:
    """Versioned adapters and per-alias histories under `url`."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(root).resolve()) if self.local else root.rstrip("/")

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- versions -------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Every complete version, oldest first."""
        base = self._join("versions")
        if not self.fs.exists(base):
            return []
        found = []
        for entry in self.fs.ls(base, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("v") and self.fs.exists(f"{entry}/{VERSION_FILE}"):
                with contextlib.suppress(RegistryError):
                    version_number(name)
                    found.append(name)
        return sorted(found, key=version_number)

    def path(self, version: str) -> str:
        """Where the version's files are, as this machine sees them (a path or a URL)."""
        version_number(version)
        path = self._join("versions", version)
        return path if self.local else self.fs.unstrip_protocol(path)

    def info(self, version: str) -> dict[str, Any]:
        """The version's version.json."""
        path = f"{self.path(version)}/{VERSION_FILE}"
        if not self.fs.exists(path):
            known = ", ".join(self.versions()[-5:]) or "none yet"
            raise RegistryError(
                f"no version {version} in {self.url} (latest: {known}); "
                "register an adapter directory with `kto-loop register DIR`"
            )
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def find(self, adapter_dir: str | Path) -> str | None:
        """The newest version whose weights are byte-identical to this directory's (a run
        resumed after registering must not register its adapter twice), or None."""
        digest = _sha256(Path(adapter_dir) / "adapter_model.safetensors")
        for version in reversed(self.versions()):
            if self.info(version).get("sha256") == digest:
                return version
        return None

    @contextlib.contextmanager
    def local_copy(self, version: str) -> Iterator[Path]:
        """The version's files as a local directory (the directory itself when local)."""
        if self.local:
            yield Path(self.path(version))
            return
        with tempfile.TemporaryDirectory(prefix=f"kto-loop-{version}-") as tmp:
            for name in (*ADAPTER_FILES, VERSION_FILE):
                self.fs.get(f"{self.path(version)}/{name}", str(Path(tmp) / name))
            yield Path(tmp)

    def add(
        self,
        adapter_dir: str | Path,
        *,
        parent: str | None = None,
        snapshot_id: str | None = None,
        snapshot_window: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        note: str = "",
        limits: ServingLimits | None = None,
        base_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> dict[str, Any]:
        """Check a trained adapter directory, copy it in as the next version, and return
        its version.json.

        Base model, snapshot id and window, warm start, reference and metrics come from
        the trainer's manifest.json; `snapshot_id` and `snapshot_window` override them.

        Args:
            parent: the version it continues (default: its warm start's); must exist.
            run_id: the cycle run that trained it.
            limits: what the servers accept; with it (and `base_shapes`, the served base
                model's weight shapes) the adapter must pass every check a publish makes.
                Without it, only what no server would serve is refused.

        Raises:
            AdapterRefused: the files do not load (truncated, corrupt) or the adapter fails
                a check; nothing is registered.
            RegistryError: not an adapter directory, or an unknown parent.
        """
        src = Path(adapter_dir)
        missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
        if missing:
            raise RegistryError(
                f"{src} is not a LoRA adapter directory: {', '.join(missing)} missing "
                "(point at the directory `kto-loop train --out` wrote)"
            )
        if parent is not None:
            self.info(parent)
        trainer = read_manifest(src)
        refused = "and not registered"
        try:
            adapter_config, tensors = read_adapter(src)
        except AdapterRefused as e:
            raise AdapterRefused(str(src), e.problems, refused) from None
        if limits is None:
            problems = adapter_problems(adapter_config, tensors)
        else:
            problems = check_adapter(
                adapter_config,
                tensors,
                base_shapes,
                limits,
                adapter_base_fingerprint=trainer.base_model_fingerprint if trainer else None,
            )
        del tensors
        if problems:
            raise AdapterRefused(str(src), problems, refused)
        record = {
            "parent": parent,
            "created_at": now_iso(),
            "source": str(src.resolve()),
            "sha256": _sha256(src / "adapter_model.safetensors"),
            "base_model": (trainer.base_model if trainer else None)
            or adapter_config.get("base_model_name_or_path"),
            "base_model_fingerprint": trainer.base_model_fingerprint if trainer else None,
            "snapshot_id": snapshot_id or (trainer.snapshot_id if trainer else None),
            "metrics": asdict(trainer.metrics) if trainer else {},
            "lora": {
                "r": adapter_config.get("r"),
                "alpha": adapter_config.get("lora_alpha"),
                "target_modules": adapter_config.get("target_modules"),
            },
            "note": note,
        }
        record.update(self._lineage(record, trainer, snapshot_window, run_id))
        files = [src / f for f in ADAPTER_FILES]
        if trainer is not None:
            files.append(src / TRAINER_MANIFEST)
        return self._write_version(files, record)

    def _lineage(
        self,
        record: Mapping[str, Any],
        trainer: Manifest | None,
        snapshot_window: Mapping[str, Any] | None,
        run_id: str | None,
    ) -> dict[str, Any]:
        """The lineage fields of a new version.json besides parent and snapshot_id: the
        snapshot's window, the run, the warm start and the reference (the parent, when
        none was given, is the warm start's version)."""
        init = self._named(trainer.init_adapter if trainer else None)
        reference = self._named(trainer.reference_adapter if trainer else None)
        if snapshot_window is None and trainer is not None:
            snapshot_window = trainer.extra.get("snapshot_window")
        return {
            "parent": record["parent"] or (init or {}).get("version"),
            "snapshot_window": dict(snapshot_window) if snapshot_window else None,
            "run_id": run_id,
            "init_adapter": init,
            "reference": {"base_model": record["base_model"], **(reference or {"path": None})},
        }

    def _named(self, adapter: str | None) -> dict[str, Any] | None:
        """{"path", "version"} of an adapter directory a run started from or referred
        to: "version" is this registry's version with byte-identical weights whose
        version.json the directory holds (a version's directory or a local copy of it),
        else None. None for no directory."""
        if adapter is None:
            return None
        path = Path(adapter)
        version = None
        with contextlib.suppress(OSError, ValueError, RegistryError):
            named = json.loads((path / VERSION_FILE).read_text()).get("version")
            digest = _sha256(path / "adapter_model.safetensors")
            if named and self.info(named).get("sha256") == digest:
                version = named
        return {"path": adapter, "version": version}

    def _write_version(self, files: list[Path], record: dict[str, Any]) -> dict[str, Any]:
        def dest_name(f: Path) -> str:
            return _KEPT_TRAINER_MANIFEST if f.name == TRAINER_MANIFEST else f.name

        if self.local:
            versions = Path(self.root) / "versions"
            versions.mkdir(parents=True, exist_ok=True)
            tmp = versions / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                for f in files:
                    shutil.copyfile(f, tmp / dest_name(f))
                for _ in range(100):
                    version = next_version(self.versions())
                    full = {"version": version, **record}
                    (tmp / VERSION_FILE).write_text(json.dumps(full, indent=2))
                    for f in tmp.iterdir():
                        f.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
                        with f.open("rb") as fh:
                            os.fsync(fh.fileno())
                    try:
                        # A rename onto an existing version fails: two writers cannot
                        # both get the same number, and a written version never changes.
                        tmp.rename(versions / version)
                    except OSError:
                        (tmp / VERSION_FILE).chmod(stat.S_IRUSR | stat.S_IWUSR)
                        continue
                    fsync_dir(versions)
                    return full
                raise RegistryError(f"could not allocate a version number in {versions}")
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, onerror=_make_writable)
        version = next_version(self.versions())
        target = self.path(version)
        if self.fs.exists(target):
            raise RegistryError(
                f"{target} exists without {VERSION_FILE} (an interrupted write?): remove it "
                "after checking no server reads it, then register again"
            )
        record = {"version": version, **record}
        for f in files:
            self.fs.put_file(str(f), f"{target}/{dest_name(f)}")
        with self.fs.open(f"{target}/{VERSION_FILE}", "w") as out:
            out.write(json.dumps(record, indent=2))
        return record

    def delete(self, version: str) -> None:
        """Remove a version's files (only `retention` decides which may go; the caller
        holds `lock_all()`, as gc does).

        Raises:
            RegistryError: an alias serves the version or would roll back to it.
        """
        roles = [r for a in self.aliases() if (r := self.history(a).role_of(version))]
        if roles:
            raise RegistryError(
                f"{version} is {' and '.join(roles)}: it is not deleted; publish or roll back "
                "that alias to another version first"
            )
        target = self.path(version)
        if self.local:
            shutil.rmtree(target, onerror=_make_writable)
        else:
            self.fs.rm(target, recursive=True)

    # -- aliases --------------------------------------------------------------------------

    def history(self, alias: str) -> AliasHistory:
        """The alias's events (empty before its first promotion)."""
        path = self._join("aliases", f"{check_alias(alias)}.json")
        if not self.fs.exists(path):
            return AliasHistory(alias)
        with self.fs.open(path, "r") as f:
            return AliasHistory.from_dict(json.load(f))

    def aliases(self) -> list[str]:
        base = self._join("aliases")
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(n.removesuffix(".json") for n in names if n.endswith(".json"))

    def save_history(self, history: AliasHistory) -> None:
        """Replace the alias's history in one step (rename locally, one PUT remotely)."""
        body = json.dumps(history.as_dict(), indent=2)
        path = self._join("aliases", f"{check_alias(history.alias)}.json")
        if self.local:
            write_local_atomic(path, body.encode())
        else:
            with self.fs.open(path, "w") as f:
                f.write(body)

    def _locks(self) -> Path:
        locks = Path(self.root) / "aliases"
        locks.mkdir(parents=True, exist_ok=True)
        return locks

    @contextlib.contextmanager
    def lock(self, alias: str, timeout_s: float = 600.0) -> Iterator[None]:
        """Hold the alias: publishes, rollbacks and syncs of one alias, and gc, run one at
        a time.

        A file lock on a local registry; a remote registry has no lock here, so run one
        publisher per alias (the scheduled flow's concurrency limit does that).
        """
        if not self.local:
            yield
            return
        locks = self._locks()
        path = locks / f".{check_alias(alias)}.lock"
        with FileLock(str(locks / _GATE_LOCK), timeout=timeout_s):
            path.touch()  # a gc holding the gate sees this alias and waits for it
        with FileLock(str(path), timeout=timeout_s):
            yield

    @contextlib.contextmanager
    def lock_all(
        self, timeout_s: float = 600.0, waiting: Callable[[str], None] | None = None
    ) -> Iterator[None]:
        """Hold every alias at once (gc): no publish, rollback or sync runs meanwhile,
        and none starts until this ends. `waiting` is told each alias it has to wait for.
        """
        if not self.local:
            yield
            return
        locks = self._locks()
        with FileLock(str(locks / _GATE_LOCK), timeout=timeout_s), contextlib.ExitStack() as held:
            names = {p.name[1:].removesuffix(".lock") for p in locks.glob(".*.lock")}
            for alias in sorted(names | set(self.aliases())):
                lock = FileLock(str(locks / f".{alias}.lock"))
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    if waiting is not None:
                        waiting(alias)
                    lock.acquire(timeout=timeout_s)
                held.callback(lock.release)
            yield


def _make_writable(func: Any, path: str, exc_info: Any) -> None:
    os.chmod(path, stat.S_IRWXU)
    func(path)
