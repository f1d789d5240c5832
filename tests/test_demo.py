"""`make demo` as a user runs it (`python -m flows.demo`), smaller: the whole loop ends
with its JSON line and chart, and every process it started (the broker, vLLM and its
engine, the Prefect server) is gone afterwards, also after Ctrl-C or a SIGKILL, and
also when it was started with SIGINT ignored, as `make demo &` starts it. Each run
starts its own broker, vLLM and Prefect server, as the demo does; the two that are
stopped start at the same time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.children import Descendants, start_command
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e


def _demo(workdir: Path, model: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`python -m flows.demo` with SIGINT ignored; stdout piped, stderr to `log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "KTO_LOOP_"))}
    args = ["--workdir", str(workdir), "--model-dir", str(model), "--users", "10", *extra]
    with log.open("wb") as err:
        return start_command(
            [sys.executable, "-m", "flows.demo", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )


def test_the_demo_runs_the_loop_and_stops_everything_it_started(
    chat_model_dir: Path, tmp_path: Path, watch: Callable[[subprocess.Popen], Descendants]
) -> None:
    workdir = tmp_path / "demo"
    demo = _demo(workdir, chat_model_dir, tmp_path / "demo.log", "--chats", "600")
    children = watch(demo)
    out, _ = demo.communicate(timeout=600)
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
    # Quiet: no library's warnings or progress bars, and none of ours (nothing to change).
    noise = [s for s in log.splitlines() if "Warning" in s or "WARNING" in s or "it/s]" in s]
    assert noise == [], noise
    run_dir = Path(result["run_dir"])
    logs = run_dir / "logs"
    assert {"vllm.log", "broker.log", "prefect.log"} <= {p.name for p in logs.iterdir()}
    assert len(children.seen) >= 3  # the broker, vLLM and the Prefect server at least
    children.wait_gone(30)


STOPS = {"SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}


@dataclass
class StoppingDemo:
    """A demo started to be stopped, its stderr in `log`, every process it starts watched."""

    process: subprocess.Popen
    log: Path
    children: Descendants


@pytest.fixture(scope="module")
def stopping_demos(
    chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, StoppingDemo]]:
    """One demo for each signal the stop test sends, all started at once: starting the
    stack (a broker, vLLM and a Prefect server each) is most of what a stop test costs,
    and the stacks start side by side. Whatever a test leaves running is killed here."""
    demos = {}
    for name in STOPS:
        tmp = tmp_path_factory.mktemp(f"stopped-demo-{name}")
        log = tmp / "demo.log"
        demo = _demo(tmp / "demo", chat_model_dir, log, "--chats", "100000")
        demos[name] = StoppingDemo(demo, log, Descendants(demo))
    yield demos
    for demo in demos.values():
        demo.children.kill()


@pytest.mark.parametrize("name", list(STOPS))
def test_a_stopped_demo_leaves_no_process_behind(
    name: str, stopping_demos: dict[str, StoppingDemo]
) -> None:
    demo = stopping_demos[name]
    log = demo.log
    # Stopped while users chat: the broker, vLLM and the Prefect server are all up.
    wait_until(
        lambda: ", logs in " in log.read_text() or demo.process.poll() is not None, 300, "the stack"
    )
    assert demo.process.poll() is None, log.read_text()[-3000:]
    demo.children.record()
    servers = psutil.Process(demo.process.pid).children()
    assert len(servers) >= 3, [p.cmdline()[:3] for p in servers]

    demo.process.send_signal(STOPS[name])

    demo.process.wait(timeout=120)
    if name == "SIGINT":
        assert demo.process.returncode == 130, log.read_text()[-3000:]
        assert "interrupted" in log.read_text()
    else:
        assert demo.process.returncode == -signal.SIGKILL
    demo.children.wait_gone(60)
