"""docs/quickstart.md, "Run it for your own chatbot", run from its own code blocks: a model
directory to an adapter published as `chat`, against the real broker, the real vLLM and
a real Prefect server, all started by `kto-loop local-stack` as the page starts them.

The commands are read from the page's ```sh blocks, so the page cannot drift from
what is tested. What differs from a user's terminal, and why:

- `make ...` and `source .venv/bin/activate` are skipped: the tests already run in the
  venv `make` built (its bin/ comes first on PATH);
- `python -m deploy.local.chat_model --out DIR` links DIR to the session's stand-in
  model (`chat_model_dir`, built by the same builder with fewer steps), instead of
  building it again;
- the page's fixed ports (9092, 8000, 4200) become free ones, in the `local-stack`
  command (as its --kafka-port, --vllm-port, --prefect-port) and in every command;
- the commands run in a fresh directory (their `data/` lands there), the stack in the
  background as the page's second terminal, the rest as one script, as one terminal
  runs them (its exports carry from block to block);
- training is capped at a few steps (KTO_LOOP_TRAIN__MAX_STEPS, an ordinary config
  override from the environment) to keep the run short on two cores.

Every process the stack started is gone once the test has stopped it (SIGTERM).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from connectors.serving.adapter_registry import AdapterRegistry
from deploy.local.broker import free_port
from tests.children import Descendants, start_command
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "quickstart.md"
PORTS = {"kafka": 9092, "vllm": 8000, "prefect": 4200}
MODEL_BUILD = "python -m deploy.local.chat_model --out "
SKIPPED = ("make ", "source .venv/bin/activate")


def readme_blocks() -> list[str]:
    """The ```sh blocks of the page, in order."""
    return re.findall(r"```sh\n(.*?)```", PAGE.read_text(), re.S)


def commands(block: str) -> list[str]:
    """A block's commands, continuation lines joined."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_the_readme_section_has_the_steps_this_test_runs() -> None:
    every = [c for block in readme_blocks() for c in commands(block)]
    stack = [c for c in every if c.startswith("kto-loop local-stack")]
    assert len(stack) == 1 and "--model data/my-model" in stack[0]
    for step in ("simulate", "ingest", "run", "status", "snapshot", "train", "publish"):
        assert any(f"kto-loop {step}" in c for c in every), step
    assert any(c.startswith(MODEL_BUILD) for c in every)


@pytest.mark.e2e
def test_a_model_directory_to_a_published_adapter_as_the_readme_says(
    chat_model_dir: Path, tmp_path: Path, watch: Callable[[subprocess.Popen], Descendants]
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    ports = {name: free_port() for name in PORTS}

    def local(command: str) -> str:
        for name, port in PORTS.items():
            command = command.replace(f"127.0.0.1:{port}", f"127.0.0.1:{ports[name]}")
        return command

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "KTO_LOOP_"))}
    env["PATH"] = f"{ROOT / '.venv/bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["KTO_LOOP_TRAIN__MAX_STEPS"] = "40"

    before, stack_command, after = [], None, []
    for block in readme_blocks():
        for command in commands(block):
            if command.startswith(SKIPPED):
                continue
            if command.startswith("kto-loop local-stack"):
                stack_command = command
            elif command.startswith(MODEL_BUILD):
                target = work / command.removeprefix(MODEL_BUILD).split()[0]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(chat_model_dir, target_is_directory=True)
            else:
                (after if stack_command else before).append(local(command))
    assert stack_command is not None and not before, before

    flags = [f"--{name}-port {port}" for name, port in ports.items()]
    stack_log = tmp_path / "stack.log"
    with stack_log.open("wb") as log:
        stack = start_command(
            ["bash", "-c", f"cd {work} && exec {stack_command} {' '.join(flags)}"],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
    children = watch(stack)
    try:
        wait_until(
            lambda: "ready; Ctrl-C" in stack_log.read_text() or stack.poll() is not None,
            300,
            "the local stack",
        )
        assert stack.poll() is None, stack_log.read_text()[-3000:]
        assert stack.stdout is not None
        ready = json.loads(stack.stdout.readline())  # printed right after "ready"
        assert ready["vllm"] == f"http://127.0.0.1:{ports['vllm']}"
        config = Path(ready["config"])
        assert config == work / "data/local/kto-loop.toml" and config.is_file()

        script = tmp_path / "first-terminal.sh"
        script.write_text("set -euo pipefail\n" + "\n".join(after) + "\n")
        done = subprocess.run(
            ["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=420
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-5000:]

        # The cycle ran to completion, and the alias serves what the registry says.
        run = next(json.loads(x) for x in done.stdout.splitlines() if '"prefect_state"' in x)
        # A cycle ends published, or with its judge finding no gain in training or at
        # the gate (skipped): 40 steps on a few hundred votes may not move the model.
        assert run["status"] in {"published", "no_gain", "skipped"}, run
        registry = AdapterRegistry(str(work / "data/local/adapters"))
        current = registry.history("chat").current
        assert current == registry.versions()[-1]
        models = httpx.get(f"{ready['vllm']}/v1/models", timeout=30).json()["data"]
        ids = {m["id"] for m in models}
        assert {"base", "chat", f"chat@{current}"} <= ids, ids
    finally:
        children.record()
        if stack.poll() is None:
            stack.send_signal(signal.SIGTERM)
        code = stack.wait(timeout=120)
    assert code == 128 + signal.SIGTERM, stack_log.read_text()[-3000:]
    assert "every part is stopped" in stack_log.read_text()
    assert len(children.seen) >= 3  # the broker, vLLM and the Prefect server at least
    children.wait_gone(30)
