"""No process outlives the command that started it: the shared child helper
(deploy/local/processes.py), the broker launcher and `kto-loop ingest`, each started as
a background job starts it (SIGINT ignored), then stopped by SIGINT, SIGTERM or SIGKILL.
The Prefect server of `kto-loop schedule` is checked in test_cycle.py, the demo's
broker, vLLM and Prefect server in test_demo.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.local.broker import free_port
from deploy.local.processes import interruptible, start_child, stop_child
from tests.children import Descendants, start_command
from tests.conftest import HASH_KEY, KafkaSetup, wait_until

# The exit status each signal leaves: Ctrl-C is a clean stop, SIGTERM exits 143 after
# cleaning up (as the shell reports a terminated job), SIGKILL cleans nothing up.
SIGNALS = {
    "SIGINT": (signal.SIGINT, 0),
    "SIGTERM": (signal.SIGTERM, 128 + signal.SIGTERM),
    "SIGKILL": (signal.SIGKILL, -signal.SIGKILL),
}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_child_hears_sigint_even_when_its_parent_ignores_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = start_child(
            _python("import signal; print(signal.getsignal(signal.SIGINT).__name__)"),
            log_path=out,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert child.wait(timeout=30) == 0
    assert out.read_text().strip() == "default_int_handler"


def _child_with_a_sleeping_child(
    log: Path, ignore_sigterm: bool = False, grandchild_dies_with_it: bool = False
) -> tuple[subprocess.Popen, Descendants]:
    """A child (start_child) that starts a grandchild sleeping 600 s, once it has said
    so; every process under it watched."""
    child = start_child(
        _python(f"""
            import signal, subprocess, sys, time
            from deploy.local.processes import dies_with_this_process
            if {ignore_sigterm}:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(600)"],
                preexec_fn=dies_with_this_process() if {grandchild_dies_with_it} else None,
            )
            print("ready", flush=True)
            time.sleep(600)
            """),
        log_path=log,
    )
    descendants = Descendants(child)
    try:
        wait_until(lambda: "ready" in log.read_text(), 60, "the child to start its own")
        assert len(descendants.record()) == 1  # the grandchild
    except BaseException:
        descendants.kill()
        raise
    return child, descendants


def test_stop_kills_a_child_that_ignores_sigterm_and_everything_it_started(
    tmp_path: Path,
) -> None:
    child, descendants = _child_with_a_sleeping_child(tmp_path / "log", ignore_sigterm=True)
    try:
        assert stop_child(child, timeout=1) == -signal.SIGKILL
        descendants.wait_gone(10)
    finally:
        descendants.kill()


def test_a_process_started_to_die_with_its_parent_ends_when_the_parent_is_killed(
    tmp_path: Path,
) -> None:
    child, descendants = _child_with_a_sleeping_child(
        tmp_path / "log", grandchild_dies_with_it=True
    )
    try:
        child.kill()  # no chance to clean up
        child.wait(timeout=30)
        descendants.wait_gone(10)
    finally:
        descendants.kill()


@pytest.mark.broker
@pytest.mark.parametrize("name", list(SIGNALS))
def test_the_broker_launcher_leaves_no_broker_behind(
    name: str, tmp_path: Path, watch: Callable[[subprocess.Popen], Descendants]
) -> None:
    signum, code = SIGNALS[name]
    log = tmp_path / "launcher.log"
    with log.open("wb") as out:
        launcher = start_command(
            [sys.executable, "-m", "deploy.local.broker", "--port", str(free_port())],
            stdout=out,
        )
    descendants = watch(launcher)
    wait_until(
        lambda: "listening" in log.read_text() or launcher.poll() is not None, 60, "the broker"
    )
    assert launcher.poll() is None, log.read_text()
    (tansu,) = descendants.record()
    assert tansu.name().startswith("tansu")

    launcher.send_signal(signum)

    assert launcher.wait(timeout=30) == code, log.read_text()
    descendants.wait_gone(30)


@pytest.mark.parametrize("name", list(SIGNALS))
def test_ingest_stops_on_each_signal_even_started_with_sigint_ignored(
    name: str,
    kafka_setup: KafkaSetup,
    tmp_path: Path,
    watch: Callable[[subprocess.Popen], Descendants],
) -> None:
    signum, _ = SIGNALS[name]
    log = tmp_path / "ingest.log"
    config = kafka_setup.config_file()
    env = {**os.environ, "KTO_LOOP_EVENTS__USER_HASH_KEY": HASH_KEY}
    with log.open("wb") as out:
        ingest = start_command(
            [sys.executable, "-m", "flows.cli", "ingest", "--config", str(config), "--no-status"],
            stdout=out,
            env=env,
        )
    descendants = watch(ingest)
    wait_until(
        lambda: "assigned partitions: fb" in log.read_text() or ingest.poll() is not None,
        120,
        "the consumer to join its group",
    )
    assert ingest.poll() is None, log.read_text()[-3000:]
    descendants.record()

    ingest.send_signal(signum)

    # Ctrl-C and SIGTERM both finish the batch, commit and exit 0.
    assert ingest.wait(timeout=60) == (-signal.SIGKILL if signum == signal.SIGKILL else 0)
    descendants.wait_gone(30)


@pytest.mark.prefect
@pytest.mark.parametrize("name", list(SIGNALS))
def test_kto_loop_run_leaves_no_prefect_server_behind(
    name: str, tmp_path: Path, watch: Callable[[subprocess.Popen], Descendants]
) -> None:
    signum, _ = SIGNALS[name]
    model = tmp_path / "model"  # enough to pass the entry point's check; never loaded
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = tmp_path / "kto-loop.toml"
    config.write_text(
        f'[store]\nurl = "{tmp_path / "store"}"\n[cycle]\nwork_dir = "{tmp_path / "cycles"}"\n'
        f'[serving]\nbase_model = "{model}"\n'
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env["KTO_LOOP_EVENTS__USER_HASH_KEY"] = HASH_KEY
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = start_command(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(config)], stdout=out, env=env
        )
    descendants = watch(run)
    # Signalled while its temporary Prefect server starts (an empty store would end the
    # run too soon after).
    wait_until(
        lambda: descendants.running("prefect server start") or run.poll() is not None,
        120,
        "the temporary Prefect server",
    )
    assert run.poll() is None, log.read_text()[-3000:]

    run.send_signal(signum)

    # Ctrl-C aborts (exit 130, as typer does), SIGTERM exits 143, SIGKILL kills.
    assert run.wait(timeout=60) == {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}[name]
    descendants.wait_gone(30)


def test_interruptible_turns_sigterm_into_a_clean_exit_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc, interruptible():
        signal.raise_signal(signal.SIGTERM)
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
