"""Reading exports of other tools: JSON arrays, JSON lines and API pages, from a file
or a directory of them.

Each record comes with where it was found: `file:line` in JSON lines (streamed line
by line), `file[index]` in a JSON array and `file:data[index]` in an API page
({"data": [...], "meta": ...}); both of those are read whole. A line that is not
JSON becomes an `Unmapped` for the import report; a file that is not JSON at all
is an `ImportInputError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.feedback.imports import Unmapped

SUFFIXES = (".json", ".jsonl", ".ndjson")
_LINES = (".jsonl", ".ndjson")
_BOM = "\ufeff"


class ImportInputError(ValueError):
    """Input that cannot be read as an export: missing, empty of files, or not JSON."""


def export_files(path: Path) -> list[Path]:
    """The files to read: `path` itself, or the .json/.jsonl/.ndjson files under the
    directory `path`, in name order (hidden ones left out).

    Raises:
        ImportInputError: the path does not exist, or the directory holds no such file.
    """
    if path.is_file():
        _sniff(path)
        return [path]
    if not path.exists():
        raise ImportInputError(f"{path} does not exist; give an export file or a directory")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ImportInputError(f"{path} holds no {', '.join(SUFFIXES)} file to import")
    for file in files:
        _sniff(file)
    return files


def _sniff(file: Path) -> None:
    """Refuse, before anything is sent, a file whose first character cannot start JSON
    (an HTML error page or a CSV saved under a .json name)."""
    try:
        with file.open("rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    except OSError as exc:
        raise ImportInputError(f"could not read {file}: {exc}") from None
    if head and head[:1] not in (b"[", b"{"):
        raise ImportInputError(
            f"{file} is not JSON (it starts with {head[:20]!r}); exports are JSON arrays, "
            "JSON lines or API pages"
        )


def read_records(path: Path) -> Iterator[tuple[str, Any] | Unmapped]:
    """Every record of the export at `path`, with where it was found, and an Unmapped
    for each line that is not JSON.

    Raises:
        ImportInputError: as export_files, or a file that is not UTF-8 JSON (a JSON
            lines file none of whose lines is).
    """
    root = path if path.is_dir() else path.parent
    for file in export_files(path):
        label = str(file.relative_to(root))
        try:
            yield from _read_file(file, label)
        except UnicodeDecodeError as exc:
            raise ImportInputError(f"{file} is not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ImportInputError(f"could not read {file}: {exc}") from None


def _read_file(file: Path, label: str) -> Iterator[tuple[str, Any] | Unmapped]:
    with file.open(encoding="utf-8") as f:
        first = f.readline()
        start = first.lstrip(_BOM + " \t\r\n")[:1]
        if not start and not f.read(1):
            yield Unmapped(label, "empty_file", "the file is empty")
            return
        if file.suffix.lower() in _LINES or (start == "{" and _is_object(first)):
            f.seek(0)
            yield from _read_lines(f, file, label)
            return
        f.seek(0)
        try:
            value = json.loads(f.read().lstrip(_BOM))
        except json.JSONDecodeError as exc:
            raise ImportInputError(
                f"{file} is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "exports are JSON arrays, JSON lines or API pages"
            ) from None
    yield from _items(value, label)


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line.lstrip(_BOM)), dict)
    except json.JSONDecodeError:
        return False


def _read_lines(f: Any, file: Path, label: str) -> Iterator[tuple[str, Any] | Unmapped]:
    good = bad = 0
    first_error = ""
    for number, line in enumerate(f, start=1):
        text = line.lstrip(_BOM).strip() if number == 1 else line.strip()
        if not text:
            continue
        where = f"{label}:{number}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            bad += 1
            first_error = first_error or f"line {number}: {exc.msg}"
            yield Unmapped(where, "not_json", f"not JSON: {exc.msg} at column {exc.colno}")
            continue
        good += 1
        if isinstance(value, dict) and isinstance(value.get("data"), list):
            yield from _items(value, where)  # an API page on one line
        else:
            yield where, value
    if bad and not good:
        raise ImportInputError(f"{file} is not JSON lines ({first_error})")


def _items(value: Any, label: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield f"{label}[{i}]", item
    elif isinstance(value, dict) and isinstance(value.get("data"), list):
        for i, item in enumerate(value["data"]):
            yield f"{label}:data[{i}]", item
    else:
        yield label, value
