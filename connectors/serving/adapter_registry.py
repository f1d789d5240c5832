"""Adapter versions and alias histories on a local directory or any fsspec URL.

    <root>/versions/v7/adapter_model.safetensors   the weights, as trained
    <root>/versions/v7/adapter_config.json
    <root>/versions/v7/trainer_manifest.json       the trainer's manifest, when there is one
    <root>/versions/v7/version.json                lineage (parent, reference, snapshot and
                                                   its feedback window, cycle run), base
                                                   model, metrics, each file's sha256
    <root>/aliases/chat.json                       every promotion and rollback of "chat"
    <root>/claims/v7                               who took the number v7 (object stores)

A version is written under a temporary name and renamed into place (locally), and is
never modified afterwards: servers read these files for as long as they serve the version,
and may read them again whenever they reload an evicted adapter. Only an adapter that
passes the checks (its files load, its weights are finite, and, when the caller gives the
servers' limits, they accept it) becomes a version, and its files are checked against the
sha256 in its version.json whenever they are read to be served or trained from.

Object stores have no rename, so a version is claimed, uploaded, then committed:
claims/vN is created only if absent (a conditional PUT, so two writers never share a
number; a claim is never removed, so no number is used twice), the files are uploaded,
and version.json goes last: a version without it is invisible. A writer gives up when
its upload outlasts half the upload lease, and the next register (or gc) removes an
upload whose claim is older than the whole lease, or that has no claim at all.

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
import socket
import stat
import tempfile
import time
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
from connectors.serving.adapter_files import WEIGHTS, read_adapter
from connectors.training.run_dir import ADAPTER_FILES, MANIFEST, read_manifest
from pipeline.serving.adapter_check import (
    AdapterRefused,
    ServingLimits,
    adapter_problems,
    check_adapter,
)
from pipeline.serving.registry import (
    KEEP_ROLLBACKS,
    AliasHistory,
    RegistryError,
    check_alias,
    next_version,
    version_number,
)
from pipeline.training.manifest import Manifest

TRAINER_MANIFEST = MANIFEST
VERSION_FILE = "version.json"
CLAIMS = "claims"
# Far longer than any upload of an adapter: an uncommitted version whose claim is older
# than this was abandoned by a writer that crashed or was cut off.
UPLOAD_LEASE_S = 3600.0
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


def _stored_name(f: Path) -> str:
    """The name a file of an adapter directory has in a version."""
    return _KEPT_TRAINER_MANIFEST if f.name == TRAINER_MANIFEST else f.name


def _is_version(name: str) -> bool:
    try:
        version_number(name)
    except RegistryError:
        return False
    return True


def _digests(info: Mapping[str, Any]) -> dict[str, str]:
    """file name -> sha256 for every file a version.json vouches for (only the weights
    for a version registered before every file's digest was recorded)."""
    return dict(info.get("files") or {WEIGHTS: info["sha256"]})


def _changed_files(directory: Path, digests: Mapping[str, str]) -> list[str]:
    """A line for each file in `directory` that is missing or whose sha256 differs from
    `digests`; empty when every file is the one registered."""
    problems = []
    for name, expected in sorted(digests.items()):
        if not (directory / name).is_file():
            problems.append(f"{name} is missing")
        elif (got := _sha256(directory / name)) != expected:
            problems.append(
                f"{name} is not the file registered: its sha256 is {got[:16]}..., "
                f"version.json records {expected[:16]}...; register the adapter again"
            )
    return problems


class AdapterRegistry:
    """Versioned adapters and per-alias histories under `url`.

    Args:
        upload_lease_s: on an object store, how long a register may take to upload a
            version; an upload older than this, never committed, is removed.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        upload_lease_s: float = UPLOAD_LEASE_S,
    ) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(root).resolve()) if self.local else root.rstrip("/")
        self.upload_lease_s = upload_lease_s

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- versions -------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Every complete version, oldest first."""
        if not self.local:
            return sorted(
                (v for v, names in self._uploads().items() if VERSION_FILE in names),
                key=version_number,
            )
        base = self._join("versions")
        if not self.fs.exists(base):
            return []
        found = []
        for entry in self.fs.ls(base, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if _is_version(name) and self.fs.exists(f"{entry}/{VERSION_FILE}"):
                found.append(name)
        return sorted(found, key=version_number)

    def _listing(self, folder: str) -> list[str]:
        """Every file under root/folder, as paths below it ("v7/version.json"), read from
        the store now (another machine may have written since any cached listing)."""
        base = self._join(folder)
        self.fs.invalidate_cache(base)
        return [p[len(base) :].strip("/") for p in self.fs.find(base)]

    def _uploads(self) -> dict[str, set[str]]:
        """Each vN under versions/ (committed or not) -> the names of its files."""
        found: dict[str, set[str]] = {}
        for rel in self._listing("versions"):
            name, _, file = rel.partition("/")
            if _is_version(name):
                found.setdefault(name, set()).add(file)
        return found

    def _claims(self) -> set[str]:
        """Every version number ever claimed (on an object store)."""
        return {name for name in self._listing(CLAIMS) if _is_version(name)}

    def path(self, version: str) -> str:
        """Where the version's files are, as this machine sees them (a path or a URL)."""
        version_number(version)
        path = self._join("versions", version)
        return path if self.local else self.fs.unstrip_protocol(path)

    def info(self, version: str) -> dict[str, Any]:
        """The version's version.json."""
        path = f"{self.path(version)}/{VERSION_FILE}"
        self.fs.invalidate_cache(self.path(version))  # it may be new since a listing
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
        """The version's files as a local directory (the directory itself when local),
        each checked against the sha256 its version.json records.

        Raises:
            AdapterRefused: a file is missing or not the one registered; it names the file.
        """
        digests = _digests(self.info(version))
        if self.local:
            directory = Path(self.path(version))
            self._check_files(version, directory, digests)
            yield directory
            return
        with tempfile.TemporaryDirectory(prefix=f"kto-loop-{version}-") as tmp:
            for name in {*ADAPTER_FILES, *digests, VERSION_FILE}:
                with contextlib.suppress(FileNotFoundError):  # named by _check_files
                    self.fs.get(f"{self.path(version)}/{name}", str(Path(tmp) / name))
            self._check_files(version, Path(tmp), digests)
            yield Path(tmp)

    def _check_files(self, version: str, directory: Path, digests: Mapping[str, str]) -> None:
        problems = _changed_files(directory, digests)
        if problems:
            raise AdapterRefused(
                f"{version} ({self.url})", problems, "as its files are not the ones registered"
            )

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
        files = [src / f for f in ADAPTER_FILES] + ([src / TRAINER_MANIFEST] if trainer else [])
        record["files"] = {_stored_name(f): _sha256(f) for f in files}
        write = self._write_version if self.local else self._upload_version
        return write(files, record)

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
        """Write a version into a local registry: copied under a temporary name, renamed
        to the next free number."""
        versions = Path(self.root) / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        tmp = versions / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for f in files:
                shutil.copyfile(f, tmp / _stored_name(f))
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

    def _upload_version(self, files: list[Path], record: dict[str, Any]) -> dict[str, Any]:
        """Write a version into an object store: claim the next number, upload the files,
        commit with version.json (the module docstring says why in that order)."""
        self.sweep()
        started = time.monotonic()
        version = self._claim()
        target = self.path(version)
        record = {"version": version, **record}
        try:
            for f in files:
                self.fs.put_file(str(f), f"{target}/{_stored_name(f)}")
            if time.monotonic() - started > self.upload_lease_s / 2:
                raise RegistryError(
                    f"uploading {version} to {self.url} took more than half the upload lease "
                    f"({self.upload_lease_s:.0f} s), so it is not committed; register again"
                )
            body = json.dumps(record, indent=2).encode()
            self.fs.pipe_file(f"{target}/{VERSION_FILE}", body, mode="create")
        except BaseException:
            # The claim stays: the number is never given out again.
            with contextlib.suppress(OSError):
                self._remove_files(version)
            raise
        return record

    def _claim(self) -> str:
        """Take the next version number for this writer alone (a create-if-absent of
        claims/vN) and return it."""
        number = version_number(next_version({*self._uploads(), *self._claims()}))
        for _ in range(100):
            version = f"v{number}"
            try:
                self._create_claim(version)
                return version
            except FileExistsError:
                number += 1
        raise RegistryError(f"could not claim a version number in {self.url}")

    def _create_claim(self, version: str) -> None:
        body = {"claimed_at": now_iso(), "by": f"{socket.gethostname()}:{os.getpid()}"}
        self.fs.pipe_file(self._join(CLAIMS, version), json.dumps(body).encode(), mode="create")

    def _claimed_at(self, version: str) -> datetime | None:
        """When the version's number was claimed, None for a claim that cannot be read."""
        try:
            body = json.loads(self.fs.cat_file(self._join(CLAIMS, version)))
            return datetime.fromisoformat(body["claimed_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def sweep(self) -> list[str]:
        """Remove abandoned uploads from an object store and return their versions: a
        version without version.json whose claim is older than the upload lease (its
        writer crashed or gave up) or that has no claim (a writer from before claims).
        An upload still within its lease is left to its writer. A local registry has none
        (an interrupted write leaves only a hidden temporary directory)."""
        if self.local:
            return []
        # Uploads first, claims second: every file listed was written after its claim
        # was created, so a live upload cannot be taken for one without a claim.
        uploads = self._uploads()
        claims = self._claims()
        removed = []
        for version, names in sorted(uploads.items()):
            if VERSION_FILE in names:
                continue
            if version in claims:
                at = self._claimed_at(version)
                if at is not None and (datetime.now(UTC) - at).total_seconds() <= (
                    self.upload_lease_s
                ):
                    continue
            else:
                try:
                    self._create_claim(version)  # its number stays taken once emptied
                except FileExistsError:
                    continue  # another sweep claimed it first and removes it
            self._remove_files(version)
            removed.append(version)
        return removed

    def _remove_files(self, version: str) -> None:
        """Delete an object-store version's files, version.json first: a version is
        invisible from its first deletion on, whatever interrupts the rest."""
        base = self._join("versions", version)
        self.fs.invalidate_cache(base)
        names = sorted(self.fs.find(base), key=lambda p: not p.endswith(f"/{VERSION_FILE}"))
        for path in names:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def delete(self, version: str, keep_rollbacks: int = KEEP_ROLLBACKS) -> None:
        """Remove a version's files (only `retention` decides which may go; the caller
        holds `lock_all()`, as gc does).

        Raises:
            RegistryError: an alias serves the version or one of its next
                `keep_rollbacks` rollbacks would return to it.
        """
        roles = [
            r for a in self.aliases() if (r := self.history(a).role_of(version, keep_rollbacks))
        ]
        if roles:
            raise RegistryError(
                f"{version} is {' and '.join(roles)}: it is not deleted; publish or roll back "
                "that alias to another version first"
            )
        if self.local:
            shutil.rmtree(self.path(version), onerror=_make_writable)
        else:
            self._remove_files(version)

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
