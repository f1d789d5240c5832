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


OURS = ("pipeline", "connectors", "flows", "deploy")
MODULES = sorted(p for top in OURS for p in (ROOT / top).rglob("*.py") if "build" not in p.parts)


def _private_imports(path: Path, module: str) -> list[str]:
    """`from <one of our modules> import _name` in `module`, another one."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
            continue
        if node.module.split(".")[0] not in OURS or node.module == module:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                out.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
    return out


def test_no_module_imports_another_modules_private_names():
    found = [p for path in MODULES for p in _private_imports(path, _module_name(path))]
    assert found == [], "make the shared piece public, or move it where both can import it"


_ENV_CHANGES = {"setdefault", "update", "pop", "popitem", "clear", "putenv", "unsetenv"}


def _writes_environ(node: ast.AST) -> bool:
    """An assignment to or deletion of os.environ[...], or a call that changes the
    environment (os.environ.setdefault/update/pop..., os.putenv)."""
    if isinstance(node, ast.Assign | ast.Delete):
        targets = node.targets
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        targets = [node.target]
    else:
        targets = []
    for target in targets:
        if isinstance(target, ast.Subscript) and ast.unparse(target.value).endswith("environ"):
            return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        owner = ast.unparse(node.func.value)
        return node.func.attr in _ENV_CHANGES and (owner.endswith("environ") or owner == "os")
    return False


def _import_time_env_writes(path: Path) -> list[str]:
    """Environment writes that run when the module is imported: anywhere outside a
    function (module-level blocks and class bodies run at import)."""
    out = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if _writes_environ(node):
            out.append(f"{path.name}:{node.lineno} writes the environment")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return out


def test_no_module_writes_the_environment_when_imported():
    found = [problem for path in MODULES for problem in _import_time_env_writes(path)]
    assert found == [], "write it in the entry point or in the function that needs it"


def test_the_import_guards_see_what_they_look_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nfrom connectors.feedback.store import _os_errors, FEEDBACK\n"
        "from flows.probe import _own\n"
        "os.environ.setdefault('A', '1')\nif True:\n    os.environ['B'] = '2'\n"
        "class C:\n    os.putenv('C', '3')\n"
        "def f():\n    os.environ['D'] = '4'\n    from flows.demo import _x\n"
    )
    assert _private_imports(probe, "flows.probe") == [
        "flows.probe:2 imports connectors.feedback.store._os_errors",
        "flows.probe:11 imports flows.demo._x",
    ]
    assert _import_time_env_writes(probe) == [
        f"probe.py:{n} writes the environment" for n in (4, 6, 8)
    ]


def _imports_of_ours(path: Path, modules: set[str]) -> set[str]:
    """Our modules that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            names = []
        found.update(n for n in names if n in modules)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the path from its smallest module back to it."""
    cycles = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                cycles.add(tuple(path))
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return [list(c) for c in sorted(cycles)]


def test_no_import_cycles_between_our_modules():
    # A lazy import inside a function counts: it still ties the two modules together.
    names = {_module_name(p): p for p in MODULES}
    graph = {m: _imports_of_ours(p, set(names)) - {m} for m, p in names.items()}
    assert _cycles(graph) == [], "move what both need where both can import it"


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
