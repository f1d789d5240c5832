"""mkdocs hooks: the site is built from the pages as they read in the repository.

- README.md is the site's home page.
- A page marks where a generated reference goes with `<!-- generated: NAME -->`; the
  build puts the Markdown `reference.py` writes from the code there.
- A link may point anywhere in the repository, as it does for a reader on the
  repository itself (`../bench/README.md`, `../deploy/kto-loop.example.toml`). The
  build brings each such file into the site at the same path and points the link at it;
  a link to a path that does not exist fails the build.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

import reference
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
DOCS = "docs"
GENERATED = {
    "configuration": reference.configuration,
    "commands": reference.commands,
    "code map": reference.code_map,
}
MARKER = re.compile(r"<!-- generated: ([a-z ]+) -->")
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
log = logging.getLogger("mkdocs.hooks.kto_loop")

# Where each page of the site lives in the repository.
_source: dict[str, str] = {}


def _links(markdown: str) -> list[str]:
    """The relative link targets of a page, code blocks left out."""
    found = []
    for match in LINK.finditer(FENCE.sub("", markdown)):
        target = match.group(2).split("#")[0]
        if target and not re.match(r"^[a-z]+:|^/", target):
            found.append(target)
    return found


def _resolve(page_path: str, target: str) -> str:
    """A link's target as a path in the repository; raises when it is not there."""
    path = posixpath.normpath(posixpath.join(posixpath.dirname(page_path), target))
    if path.startswith("..") or not (ROOT / path).exists():
        raise PluginError(f"{page_path}: the link {target!r} points at nothing ({path})")
    if (ROOT / path).is_dir():
        raise PluginError(f"{page_path}: the link {target!r} is a directory; link a file")
    return path


def _site_uri(path: str) -> str:
    """Where a repository file sits in the site: a docs page at its own place, any
    other file at its repository path."""
    if path == "README.md":
        return "index.md"
    return path[len(DOCS) + 1 :] if path.startswith(DOCS + "/") else path


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the README as the home page and every repository file a page links to."""
    _source.clear()
    for file in files.documentation_pages():
        _source[file.src_uri] = f"{DOCS}/{file.src_uri}"
    files.append(File.generated(config, "index.md", abs_src_path=str(ROOT / "README.md")))
    _source["index.md"] = "README.md"
    queue = list(_source.values())
    while queue:
        page_path = queue.pop()
        for target in _links((ROOT / page_path).read_text()):
            path = _resolve(page_path, target)
            uri = _site_uri(path)
            if files.get_file_from_path(uri) is not None:
                continue
            files.append(File(path, str(ROOT), config.site_dir, config.use_directory_urls))
            if path.endswith(".md"):
                _source[uri] = path
                queue.append(path)
    return files


def _relink(markdown: str, page_uri: str) -> str:
    """Links written for the repository, pointed at the same files in the site."""
    page_path = _source[page_uri]

    def site_link(match: re.Match) -> str:
        target, _, anchor = match.group(2).partition("#")
        if not target or re.match(r"^[a-z]+:|^/", target):
            return match.group(0)
        uri = _site_uri(_resolve(page_path, target))
        relative = posixpath.relpath(uri, posixpath.dirname(page_uri) or ".")
        return match.group(1) + relative + (f"#{anchor}" if anchor else "") + match.group(3)

    # Code blocks keep their text: relink only what lies between them.
    out, last = [], 0
    for block in FENCE.finditer(markdown):
        out += [LINK.sub(site_link, markdown[last : block.start()]), block.group(0)]
        last = block.end()
    out.append(LINK.sub(site_link, markdown[last:]))
    return "".join(out)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Fill the generated references in, and point repository links at the site."""

    def generated(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATED:
            raise PluginError(f"{page.file.src_uri}: no generated reference named {name!r}")
        return GENERATED[name]()

    return _relink(MARKER.sub(generated, markdown), page.file.src_uri)
