"""The documentation builds, and what can drift from the code is generated from it.

`mkdocs build --strict` fails on a broken link or anchor, in the pages and in every
repository file they link to (docs/hooks.py). The reference pages are filled in from
the code at build time, so the test checks that they name every configuration key,
every command and every module. The README's quickstart is a shortcut through
docs/quickstart.md, whose commands tests/test_first_hour.py runs: every command of the
shortcut must be one of those.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import typer

from connectors.config import Settings
from flows.cli import app

ROOT = Path(__file__).resolve().parent.parent


def _fields(model: type) -> list[str]:
    fields = getattr(model, "__pydantic_fields__", None)
    return list(fields if fields is not None else model.model_fields)


def _commands(markdown: str) -> list[str]:
    """The commands of a page's ```sh blocks: continuations joined, `&&` split,
    comments and padding dropped."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split(" # ")[0].split("&&"):
                if command.strip():
                    found.append(" ".join(command.split()))
    return found


def test_the_site_builds_strictly_with_every_key_command_and_module(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    configuration = (site / "configuration" / "index.html").read_text()
    for section, info in Settings.model_fields.items():
        assert f"[{section}]" in configuration, section
        for key in _fields(info.annotation):
            if key != "stop_after_steps":  # a run control, not a key
                assert f"<code>{key}</code>" in configuration, f"[{section}] {key}"

    cli = (site / "cli" / "index.html").read_text()
    for command in typer.main.get_command(app).commands:
        assert f">kto-loop {command}<" in cli, command

    architecture = (site / "architecture" / "index.html").read_text()
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name != "__init__.py":
            assert str(path.relative_to(ROOT)) in architecture, path


def test_the_readme_quickstart_is_a_shortcut_through_the_tested_page() -> None:
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["make", "demo"], ["make", "test"]]
    assert len(lines) <= 300
    shortcut = _commands(readme)
    assert shortcut
    walked = _commands((ROOT / "docs" / "quickstart.md").read_text())
    assert [c for c in shortcut if c not in walked] == []
