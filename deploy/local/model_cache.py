"""Tiny models built once per recipe and reused: by every test of a session, by the next
session on the same machine, and by sessions running at the same time (or pytest-xdist
workers), none of which ever sees a half-written model.

An entry is named by a hash of everything that decides its bytes: the builder and its
arguments, the source of the modules that build it, and the versions of torch,
transformers and tokenizers. It is built into a temporary directory beside the cache,
under a file lock per entry, and renamed into place once a manifest of its files' hashes
is written. An entry whose files no longer match its manifest (something wrote into
it) is built again.

    model = tiny_model(Path("data/cache/models"))
    chat = chat_model(Path("data/cache/models"), steps=150)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "model_cache.json"
# Libraries whose releases may change what the same code writes (initial weights, the
# tokenizer's merges, the file formats).
LIBRARIES = ("torch", "transformers", "tokenizers")
TINY_SOURCES = ("deploy.local.tiny_model", "deploy.local.synthetic")
CHAT_SOURCES = (
    *TINY_SOURCES,
    "deploy.local.chat_model",
    "pipeline.training.encode",
    "pipeline.feedback.examples",
)
SHAPED_SOURCES = (*TINY_SOURCES, "deploy.local.shaped_model")


def tiny_model(root: Path, spec: Any = None, chat_template: bool = True) -> Path:
    """`deploy.local.tiny_model.build_tiny_model(out, spec, chat_template=...)`, cached
    under `root`."""
    from deploy.local.tiny_model import TinyModelSpec, build_tiny_model

    spec = spec or TinyModelSpec()
    build = build_tiny_model
    return cached_model(root, "tiny", build, TINY_SOURCES, spec=spec, chat_template=chat_template)


def chat_model(root: Path, seed: int = 0, steps: int = 300) -> Path:
    """`deploy.local.chat_model.build_chat_model(out, seed, steps=steps)` (a short
    fine-tune on two cores), cached under `root`."""
    from deploy.local.chat_model import build_chat_model

    return cached_model(root, "chat", build_chat_model, CHAT_SOURCES, seed=seed, steps=steps)


def shaped_model(root: Path, shape: str, seed: int = 0) -> Path:
    """`deploy.local.shaped_model.build_shaped_model(out, shape, seed)` (a random model
    of realistic shape; qwen2-0.5b is 2 GB), cached under `root`."""
    from deploy.local.shaped_model import build_shaped_model

    return cached_model(root, shape, build_shaped_model, SHAPED_SOURCES, shape=shape, seed=seed)


def cached_model(
    root: Path, name: str, build: Callable[..., Path], sources: Sequence[str], **kwargs: Any
) -> Path:
    """The directory `build(out, **kwargs)` writes, built under `root` the first time
    this recipe is asked for and reused afterwards.

    Args:
        name: the entry's prefix, for people reading the cache directory.
        sources: the modules whose code decides what `build` writes.
    Returns:
        `root/<name>-<hash>`; callers must not write into it.
    """
    recipe = _recipe(build, sources, kwargs)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    entry = root / f"{name}-{key}"
    if intact(entry):  # the common case: no lock needed to read a finished entry
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{entry.name}.lock"):
        if intact(entry):  # built by another session while this one waited
            return entry
        for stale in [*root.glob(f".{entry.name}-*"), entry]:  # a killed build's, a bad one
            if stale.exists():
                log.warning("model cache: removing %s (unfinished or modified)", stale)
                shutil.rmtree(stale)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
        try:
            build(staging, **kwargs)
            files = _hashes(staging)
            staging.chmod(0o755)  # mkdtemp's 0o700: the cache is for every user of the checkout
            (staging / MANIFEST).write_text(
                json.dumps({"recipe": recipe, "files": files}, default=str)
            )
            staging.rename(entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return entry


def _recipe(build: Callable[..., Path], sources: Sequence[str], kwargs: dict[str, Any]) -> dict:
    def plain(value: Any) -> Any:
        return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value

    code = {}
    for module in sources:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"model cache: no source for {module}")
        code[module] = hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()
    return {
        "build": f"{build.__module__}.{build.__qualname__}",
        "arguments": {k: plain(v) for k, v in kwargs.items()},
        "code": code,
        "libraries": {name: importlib.metadata.version(name) for name in LIBRARIES},
    }


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def intact(entry: Path) -> bool:
    """True when `entry` is finished and holds exactly the files its manifest lists."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return _hashes(entry) == manifest.get("files")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive OS file lock: released by the kernel when its holder dies."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
