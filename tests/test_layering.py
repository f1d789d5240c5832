"""The layering holds: pipeline/ is the pure core (it takes and returns values and does
no I/O), and no function runs over 80 lines.

A cheap guard, not a proof: it reads the imports and calls written in pipeline/'s
source, and what importing it loads. It cannot see I/O done through an object passed
in (a model's save_pretrained reached through a parameter), a library that reads
files on our behalf behind an innocent call, or a name bound by getattr."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = sorted((ROOT / "pipeline").rglob("*.py"))
# Packages that talk to the outside: processes, terminals, plots, HTTP, Kafka, Prefect,
# file systems; and our own outer layers.
FORBIDDEN_IMPORTS = {
    "subprocess", "socket", "shutil", "tempfile", "tqdm", "rich", "matplotlib", "httpx",
    "requests", "kafka", "prefect", "fsspec", "filelock", "connectors", "flows", "deploy",
    "bench",
}  # fmt: skip
# Calls that read the environment or touch files, by the name they are called with.
FORBIDDEN_CALLS = {
    "open", "getenv", "read_text", "write_text", "read_bytes", "write_bytes", "iterdir",
    "mkdir", "unlink", "rmtree", "replace_file", "save", "load", "save_pretrained",
    "from_pretrained", "savefig", "read_parquet", "to_parquet", "read_json", "to_json",
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            if name.split(".")[0] in FORBIDDEN_IMPORTS:
                out.append(f"{path.name}:{node.lineno} imports {name}")
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            out.append(f"{path.name}:{node.lineno} reads os.environ")
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            )
            if name in FORBIDDEN_CALLS:
                out.append(f"{path.name}:{node.lineno} calls {name}()")
    return out


@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_pipeline_module_neither_imports_nor_calls_io(path):
    assert _problems(path) == []


def test_the_guard_sees_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, subprocess\nfrom tqdm.auto import tqdm\nx = os.environ['A']\n"
        "def f(p):\n    import httpx\n    return open(p).read() + p.read_text()\n"
    )
    found = " ".join(_problems(bad))
    for what in ("imports subprocess", "imports tqdm", "os.environ", "imports httpx", "open()"):
        assert what in found


def test_importing_every_pipeline_module_loads_none_of_the_outside_packages():
    # Measured against what the libraries pipeline/ may use load by themselves (torch
    # imports tqdm, for one), so only what pipeline/ brings in counts.
    allowed = "torch, numpy, pandas, pyarrow, jinja2, pydantic, transformers, peft"
    modules = ", ".join(_module_name(p) for p in PIPELINE)
    probe = (
        f"import sys\nimport {allowed}\nbefore = set(sys.modules)\nimport {modules}\n"
        f"new = set(sys.modules) - before\n"
        f"print(' '.join(sorted(m for m in new if m.split('.')[0] in {sorted(FORBIDDEN_IMPORTS)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.split() == []


def test_no_function_in_the_core_connectors_or_flows_runs_over_80_lines():
    long = []
    for folder in ("pipeline", "connectors", "flows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert long == []


# Inside a layer, capabilities stack: a sub-package imports only those listed before it.
ORDER = {
    "pipeline": ["serving", "feedback", "training", "promotion"],
    "connectors": ["feedback", "training", "serving"],
}


def _imported_subpackages(folder: Path, top: str) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                parts = name.split(".")
                if parts[0] == top and len(parts) > 1:
                    found.add(parts[1])
    return found


@pytest.mark.parametrize("top", sorted(ORDER))
def test_sub_packages_import_only_those_below_them(top):
    order = ORDER[top]
    found = {p.name for p in (ROOT / top).iterdir() if (p / "__init__.py").exists()}
    assert found == set(order), f"{top}/ has sub-packages {sorted(found)}; ORDER lists {order}"
    upward = []
    for i, sub in enumerate(order):
        for name in _imported_subpackages(ROOT / top / sub, top):
            if name in order and name != sub and order.index(name) > i:
                upward.append(f"{top}.{sub} imports {top}.{name}")
    assert upward == []
