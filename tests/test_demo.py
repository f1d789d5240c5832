"""`make demo` as a user runs it (`python -m flows.demo`), smaller: the whole loop ends
with its JSON line and chart, and every process it started is gone afterwards, also
after Ctrl-C. Each run starts its own broker and vLLM, as the demo does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def _demo(workdir: Path, model: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "KTO_LOOP_"))}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.demo",
            "--workdir",
            str(workdir),
            "--model-dir",
            str(model),
            "--users",
            "10",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
        env=env,
        cwd=ROOT,
    )


class Children:
    """Every process the demo started, seen while it runs (it may be gone when asked)."""

    def __init__(self, demo: subprocess.Popen) -> None:
        self.seen: dict[int, psutil.Process] = {}
        self._thread = threading.Thread(target=self._watch, args=(demo,), daemon=True)
        self._thread.start()

    def _watch(self, demo: subprocess.Popen) -> None:
        parent = psutil.Process(demo.pid)
        while demo.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in parent.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            time.sleep(0.2)  # the sampling interval of a watcher, not a synchronisation

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.seen.values() if p.is_running() and p.status() != "zombie"]

    def kill(self) -> None:
        """After a failed test: no orphaned broker or vLLM outlives it."""
        for p in self.alive():
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.fixture()
def watch() -> Iterator[Callable[[subprocess.Popen], Children]]:
    """Watch a demo's children; whatever a failed test leaves alive is killed after it."""
    watched: list[Children] = []

    def start(demo: subprocess.Popen) -> Children:
        watched.append(Children(demo))
        return watched[-1]

    yield start
    for children in watched:
        children.kill()


def test_the_demo_runs_the_loop_and_stops_everything_it_started(
    chat_model_dir: Path, tmp_path: Path, watch: Callable[[subprocess.Popen], Children]
) -> None:
    workdir = tmp_path / "demo"
    demo = _demo(workdir, chat_model_dir, tmp_path / "demo.log", "--chats", "260")
    children = watch(demo)
    try:
        out, _ = demo.communicate(timeout=600)
    finally:
        if demo.poll() is None:
            demo.kill()
    log = (tmp_path / "demo.log").read_text()
    assert demo.returncode == 0, log[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert {"liked_before", "liked_after", "gain_pts", "adapter", "seconds"} <= result.keys()
    assert result["status"] == "published" and result["adapter"] == "chat@v1"
    assert result["gain_pts"] == pytest.approx(
        100 * (result["liked_after"] - result["liked_before"]), abs=0.06
    )
    assert Path(result["chart"]).stat().st_size > 10_000
    assert "the loop, before and after one cycle" in out.decode() + log
    run_dir = Path(result["run_dir"])
    assert (run_dir / "logs" / "vllm.log").is_file() and (run_dir / "logs" / "broker.log").is_file()
    assert len(children.seen) >= 2  # the broker and vLLM at least
    wait_until(lambda: not children.alive(), 30, "the demo's processes to exit")


def test_ctrl_c_stops_every_process_the_demo_started(
    chat_model_dir: Path, tmp_path: Path, watch: Callable[[subprocess.Popen], Children]
) -> None:
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.log"
    demo = _demo(workdir, chat_model_dir, log, "--chats", "100000")
    children = watch(demo)
    try:
        # Interrupted while users chat: the broker and vLLM are both up.
        wait_until(
            lambda: ", logs in " in log.read_text() or demo.poll() is not None, 240, "the stack"
        )
        assert demo.poll() is None, log.read_text()[-3000:]
        wait_until(lambda: len(children.alive()) >= 2, 30, "the broker and vLLM processes")
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, log.read_text()[-3000:]
    assert "interrupted" in log.read_text()
    wait_until(lambda: not children.alive(), 60, "the demo's processes to exit")
