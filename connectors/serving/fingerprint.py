"""A model directory's identity, cheap enough to compute on every run."""

from __future__ import annotations

import hashlib
from pathlib import Path

_HASHED = ("config.json", "adapter_config.json", "tokenizer_config.json")


def model_fingerprint(path: str | Path) -> str:
    """Hash of a model directory's config and the names and sizes of its files.

    Hashing gigabytes of weights on every run is not worth it: a different model differs
    in its config or its file sizes. Two copies of one model give the same fingerprint.
    """
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.name in _HASHED:
                h.update(f.read_bytes())
    return h.hexdigest()[:16]
