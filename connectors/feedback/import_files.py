"""Reading exports of other tools: JSON arrays, JSON lines and API pages, from a file
or a directory of them.

Each record comes with where it was found: `file:line` in JSON lines (read line by
line), `file[index]` in a JSON array and `file:data[index]` in an API page
({"data": [...], "meta": ...}); arrays are streamed (ijson), one record built at a
time, so an export larger than memory imports, and its first events go out before
its end is read. A line that is not JSON, or that nests deeper than the parser
goes, becomes an `Unmapped` for the import report and the rest is read on; so does
a record of an array nested deeper than MAX_DEPTH, and whatever follows a syntax
error part-way through an array (the records before it were already read). A file
that is not JSON from its start is an `ImportInputError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import ijson

from pipeline.feedback.imports import TOO_DEEP, Unmapped

SUFFIXES = (".json", ".jsonl", ".ndjson")
_LINES = (".jsonl", ".ndjson")
_BOM = "\ufeff"
# Nesting a record of an array may have; deeper ones are reported, not built (no
# export nests this far, and the mappers and the event parser recurse per level).
MAX_DEPTH = 256
_STARTS = ("start_map", "start_array")
_ENDS = ("end_map", "end_array")


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
        head = f.read(4096)
        start = head.lstrip(_BOM + " \t\r\n")[:1]
        if not start and not f.read(1):
            yield Unmapped(label, "empty_file", "the file is empty")
            return
        f.seek(0)
        if file.suffix.lower() in _LINES or (start == "{" and _is_object(f.readline())):
            f.seek(0)
            yield from _read_lines(f, file, label)
            return
    with file.open("rb") as raw:
        if raw.read(3) != b"\xef\xbb\xbf":
            raw.seek(0)
        yield from _stream(raw, file, label)


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line.lstrip(_BOM)), dict)
    except json.JSONDecodeError:
        return False
    except RecursionError:
        return True  # a whole object on the line, too deep to build: a JSON lines file


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
        except RecursionError:
            good += 1  # JSON, only too deep to build
            yield _too_deep(where)
            continue
        good += 1
        if isinstance(value, dict) and isinstance(value.get("data"), list):
            yield from _items(value, where)  # an API page on one line
        else:
            yield where, value
    if bad and not good:
        raise ImportInputError(f"{file} is not JSON lines ({first_error})")


def _stream(f: IO[bytes], file: Path, label: str) -> Iterator[tuple[str, Any] | Unmapped]:
    """The records of one JSON document: an array's items, an API page's data items,
    or the document itself, each built as the parser reaches its end."""
    events = ijson.basic_parse(f, use_float=True)
    read = 0
    where = label
    try:
        event, value = next(events)
        if event == "start_array":
            for i, item in enumerate(_array(events)):
                yield _record(f"{label}[{i}]", item)
                read, where = read + 1, f"{label}[{i + 1}]"
        elif event == "start_map":
            rest: dict[str, Any] = {}
            page = False
            for key in _keys(events):
                event, value = next(events)
                if key == "data" and event == "start_array":
                    page = True
                    for i, item in enumerate(_array(events)):
                        yield _record(f"{label}:data[{i}]", item)
                        read, where = read + 1, f"{label}:data[{i + 1}]"
                else:
                    rest[key] = _build(event, value, events)
            if not page:
                yield _record(label, rest)
        else:
            yield label, value
        for _ in events:  # the parser refuses anything after the document
            pass
    except ijson.JSONError as exc:
        if not read:
            raise ImportInputError(
                f"{file} is not JSON ({exc}); exports are JSON arrays, JSON lines or API pages"
            ) from None
        yield Unmapped(where, "not_json", f"not JSON from here on ({exc}); the rest is not read")


class _TooDeep(Exception):
    """A value nested deeper than MAX_DEPTH (raised once the whole value is read)."""


def _record(where: str, value: Any) -> tuple[str, Any] | Unmapped:
    return _too_deep(where) if value is _TooDeep else (where, value)


def _too_deep(where: str) -> Unmapped:
    return Unmapped(where, "too_deep", TOO_DEEP)


def _array(events: Iterator[tuple[str, Any]]) -> Iterator[Any]:
    """The items of the array whose start_array was just read, each built whole (or
    _TooDeep), up to its end_array."""
    for event, value in events:
        if event == "end_array":
            return
        yield _build(event, value, events)


def _keys(events: Iterator[tuple[str, Any]]) -> Iterator[str]:
    """The keys of the object whose start_map was just read; after each, the caller
    reads that key's value from `events`."""
    for event, value in events:
        if event == "end_map":
            return
        yield value


def _build(event: str, value: Any, events: Iterator[tuple[str, Any]]) -> Any:
    """The value that starts with (event, value), read on from `events` without
    recursion; _TooDeep (the class) when it nests deeper than MAX_DEPTH, once it is
    all read."""
    if event not in _STARTS:
        return value
    stack: list[Any] = [{} if event == "start_map" else []]
    keys: list[str | None] = [None]
    skipping = 0  # levels below a container past MAX_DEPTH, not built
    too_deep = False
    for event, value in events:
        if skipping:
            skipping += (event in _STARTS) - (event in _ENDS)
        elif event == "map_key":
            keys[-1] = value
        elif event in _ENDS:
            done = stack.pop()
            keys.pop()
            if not stack:
                return _TooDeep if too_deep else done
        elif event in _STARTS and len(stack) >= MAX_DEPTH:
            too_deep, skipping = True, 1
        else:
            item = ({} if event == "start_map" else []) if event in _STARTS else value
            parent = stack[-1]
            if isinstance(parent, list):
                parent.append(item)
            else:
                parent[keys[-1]] = item
            if event in _STARTS:
                stack.append(item)
                keys.append(None)
    raise ijson.IncompleteJSONError("the file ends inside a value")


def _items(value: Any, label: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield f"{label}[{i}]", item
    elif isinstance(value, dict) and isinstance(value.get("data"), list):
        for i, item in enumerate(value["data"]):
            yield f"{label}:data[{i}]", item
    else:
        yield label, value
