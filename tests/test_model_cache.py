"""The tiny-model cache (deploy/local/model_cache.py): a recipe is built once and reused,
also by other processes building it at the same moment; a changed recipe, builder code
or a modified entry builds again; a failed build leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.local.model_cache import MANIFEST, cached_model, intact
from deploy.local.processes import dies_with_this_process

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("deploy.local.model_cache",)


def build(out: Path, size: int, log: Path) -> Path:
    """A stand-in builder: a few files whose content depends on `size`; each call is
    logged to `log`."""
    with log.open("a") as f:
        f.write(f"{size}\n")
    (out / "weights").mkdir()
    for i in range(20):
        (out / "weights" / f"part-{i}.bin").write_bytes(bytes([i]) * size)
    (out / "config.json").write_text(json.dumps({"size": size}))
    return out


def test_a_recipe_is_built_once_and_reused(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    first = cached_model(tmp_path / "cache", "toy", build, SOURCES, size=64, log=log)
    again = cached_model(tmp_path / "cache", "toy", build, SOURCES, size=64, log=log)
    other = cached_model(tmp_path / "cache", "toy", build, SOURCES, size=65, log=log)

    assert first == again != other
    assert log.read_text().split() == ["64", "65"]
    assert json.loads((first / "config.json").read_text()) == {"size": 64}
    assert intact(first) and intact(other)
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["recipe"]["arguments"]["size"] == 64
    assert set(manifest["recipe"]["code"]) == set(SOURCES)
    entries = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert sorted(entries) == sorted([first.name, other.name])


def test_a_modified_entry_is_built_again(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    model = cached_model(tmp_path / "cache", "toy", build, SOURCES, size=8, log=log)
    (model / "weights" / "part-3.bin").write_bytes(b"written by a careless test")
    assert not intact(model)

    again = cached_model(tmp_path / "cache", "toy", build, SOURCES, size=8, log=log)

    assert again == model and intact(again)
    assert (model / "weights" / "part-3.bin").read_bytes() == bytes([3]) * 8
    assert log.read_text().split() == ["8", "8"]


def test_other_builder_code_is_another_entry(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    one = cached_model(tmp_path / "cache", "toy", build, SOURCES, size=8, log=log)
    two = cached_model(
        tmp_path / "cache", "toy", build, (*SOURCES, "deploy.local.synthetic"), size=8, log=log
    )
    assert one != two and len(log.read_text().split()) == 2


def test_a_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path: Path) -> None:
    def broken(out: Path) -> Path:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("the builder failed")

    with pytest.raises(RuntimeError, match="the builder failed"):
        cached_model(tmp_path / "cache", "toy", broken, SOURCES)
    left = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert left == []
    log = tmp_path / "builds.log"
    model = cached_model(tmp_path / "cache", "toy", build, SOURCES, size=8, log=log)
    assert intact(model) and log.read_text().split() == ["8"]


# Several processes ask for one recipe at once, as pytest-xdist workers or two sessions
# on one machine do: each gets the finished entry, and only one builds it.
CONCURRENT = """
import json, sys
from pathlib import Path
from deploy.local.model_cache import cached_model, intact

def build(out, size, log):
    with open(log, "a") as f:
        f.write("built\\n")
    for i in range(200):
        (out / f"part-{i}.bin").write_bytes(bytes([i % 256]) * size)
    return out

root, log = Path(sys.argv[1]), Path(sys.argv[2])
model = cached_model(root, "toy", build, ("deploy.local.model_cache",), size=4096, log=log)
files = sorted(p.name for p in model.iterdir())
print(json.dumps({"model": str(model), "intact": intact(model), "files": len(files)}))
"""


def test_processes_asking_at_once_get_one_finished_entry_built_once(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    args = [sys.executable, "-c", CONCURRENT, str(tmp_path / "cache"), str(log)]
    processes = [
        subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=dies_with_this_process(),
        )
        for _ in range(8)
    ]
    answers = []
    for p in processes:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        answers.append(json.loads(out))

    assert len({a["model"] for a in answers}) == 1
    assert all(a["intact"] and a["files"] == 201 for a in answers)  # 200 parts, the manifest
    assert log.read_text().split() == ["built"]
