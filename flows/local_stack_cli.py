"""`kto-loop local-stack`: the local parts for your own model on one machine, until
Ctrl-C or SIGTERM.

Starts the broker (deploy/local/broker.py), vLLM with the kto-loop swap plugin on the
model (deploy/local/vllm_server.py, from .venv-vllm) and a Prefect server
(deploy/local/prefect_server.py) on fixed ports, each health-checked; creates the
feedback topic; writes the config file that points at them (or checks the one given);
prints where each part listens, then one JSON line on stdout. Every part stops when
the command ends, whatever ends it (deploy/local/processes.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from connectors.config import ConfigError, Settings, load_settings
from flows.console import err, fail
from flows.preflight import model_dir

API_KEY_ENV = "KTO_LOOP_SERVING__API_KEY"
ADMIN_KEY_ENV = "KTO_LOOP_SERVING__ADMIN_KEY"
# vLLM's context on the CPU is bounded by its KV cache (VLLM_CPU_KVCACHE_SPACE, 1 GiB by
# default here): a model's own limit (32k for many) would not fit.
DEFAULT_MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class StackOptions:
    """What `local-stack` was asked for."""

    model: Path
    root: Path
    kafka_port: int
    vllm_port: int
    prefect_port: int
    host: str
    config: Path | None
    dtype: str
    max_model_len: int | None
    max_lora_rank: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def vllm_url(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"


def local_stack(options: StackOptions) -> None:
    """Check the options, start the parts, wait for Ctrl-C or SIGTERM, stop them.

    Exit codes: 130 after Ctrl-C, 143 after SIGTERM (every part stopped), 1 when a part
    failed to start or died, 2 for bad input (no model, no .venv-vllm, a port in use,
    a --config that points elsewhere).
    """
    from deploy.local.processes import interruptible

    model, max_model_len, python = _checked(options)
    api_key = os.environ.get(API_KEY_ENV) or None
    admin_key = os.environ.get(ADMIN_KEY_ENV) or None
    if not admin_key and not _loopback(options.host):
        fail(
            ValueError(
                f"vLLM on {options.host} with no admin key would refuse every publish: set "
                f"{ADMIN_KEY_ENV} (the plugin's KTO_LOOP_ADMIN_KEY), or use --host 127.0.0.1"
            ),
            2,
        )
    previous_hup = signal.signal(signal.SIGHUP, _hang_up)  # a closed terminal stops it too
    try:
        with interruptible():
            _run(options, model, max_model_len, python, api_key, admin_key)
    except KeyboardInterrupt:
        err.print("interrupted: every part is stopped", style="yellow")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except RuntimeError as exc:  # a part that did not start: the others are stopped
        fail(exc, 1)
    except SystemExit as exc:
        if exc.code in (128 + signal.SIGTERM, 128 + signal.SIGHUP):
            err.print("terminated: every part is stopped", style="yellow")
        raise
    finally:
        signal.signal(signal.SIGHUP, previous_hup)


def _checked(options: StackOptions) -> tuple[Path, int, str]:
    """The model directory, vLLM's max model length and its interpreter; exit 2 naming
    what is wrong before anything starts."""
    from deploy.local.vllm_server import vllm_python

    try:
        model = model_dir(options.model, "--model").resolve()
    except ConfigError as exc:
        fail(exc, 2)
    try:
        python = vllm_python()
    except FileNotFoundError as exc:
        fail(exc, 2)
    for flag, port in (
        ("--kafka-port", options.kafka_port),
        ("--vllm-port", options.vllm_port),
        ("--prefect-port", options.prefect_port),
    ):
        if _in_use(port):
            fail(ValueError(f"port {port} is in use (a stack already running?): pass {flag}"), 2)
    if options.config is not None:
        try:
            settings = load_settings(options.config)
        except ConfigError as exc:
            fail(exc, 2)
        problems = _mismatches(settings, options, model)
        if problems:
            lines = [f"{options.config} does not point at this stack:", *problems]
            lines.append("fix it, or leave out --config to have one written")
            fail(ConfigError("\n".join(lines)), 2)
        store, topic = settings.store.url, settings.kafka.topic
    else:
        store, topic = str(options.root / "store"), "chat-feedback"
    if _holds_feedback(store, topic):
        # The broker keeps its log in memory: a new one numbers offsets from 0 again,
        # and the store, keyed by offsets, would take the new votes for stored ones.
        fail(
            ValueError(
                f"the store {store} already holds feedback from an earlier broker, and this "
                "one starts empty, so new votes would be lost there: pass a new --root, "
                "or a --config whose [store] url is a new directory"
            ),
            2,
        )
    return model, options.max_model_len or _max_model_len(model), python


def _holds_feedback(store: str, topic: str) -> bool:
    """Whether a local store has stored batches of `topic`."""
    from connectors.feedback.store import FEEDBACK, FeedbackStore

    if "://" in store:
        return False  # object storage: not this machine's broker's to judge
    directory = Path(FeedbackStore(store).partition_dir(FEEDBACK, topic, 0)).parent
    return directory.is_dir() and any(directory.rglob("*.parquet"))


def _mismatches(settings: Settings, options: StackOptions, model: Path) -> list[str]:
    """How `settings` differ from the stack about to start, one line per key."""
    problems = []
    if settings.kafka.bootstrap_servers != [options.bootstrap]:
        problems.append(
            f"[kafka] bootstrap_servers is {settings.kafka.bootstrap_servers}, "
            f'the broker: ["{options.bootstrap}"]'
        )
    if [url.rstrip("/") for url in settings.serving.replicas] != [options.vllm_url]:
        problems.append(
            f'[serving] replicas is {settings.serving.replicas}, vLLM: ["{options.vllm_url}"]'
        )
    base = settings.serving.base_model
    if not base or Path(base).expanduser().resolve() != model:
        problems.append(f"[serving] base_model is {base!r}, the served model: {str(model)!r}")
    if settings.serving.max_lora_rank != options.max_lora_rank:
        problems.append(
            f"[serving] max_lora_rank is {settings.serving.max_lora_rank}, vLLM's "
            f"--max-lora-rank: {options.max_lora_rank}"
        )
    return problems


def _run(
    options: StackOptions,
    model: Path,
    max_model_len: int,
    python: str,
    api_key: str | None,
    admin_key: str | None,
) -> None:
    from connectors.feedback.kafka_clients import ensure_topics
    from deploy.local.prefect_server import start_prefect_server
    from deploy.local.stack import local_stack

    root, logs = options.root, options.root / "logs"
    err.print(
        f"starting the broker, vLLM on {model} and Prefect (health-checked; vLLM takes "
        f"a minute or more); logs in {logs}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    with contextlib.ExitStack() as parts:
        stack = parts.enter_context(
            local_stack(
                root,
                model,
                _overrides(model, options),
                kafka_port=options.kafka_port,
                vllm_port=options.vllm_port,
                api_key=api_key,
                admin_key=admin_key,
                host=options.host,
                config=options.config.resolve() if options.config else None,
                dtype=options.dtype,
                max_model_len=max_model_len,
                max_lora_rank=options.max_lora_rank,
                python=python,
            )
        )
        kafka = stack.settings.kafka
        ensure_topics(kafka, [kafka.topic, kafka.dead_letter_topic])
        prefect = start_prefect_server(
            logs / "prefect.log", port=options.prefect_port, home=root / "prefect"
        )
        parts.callback(prefect.stop)
        ready = {
            "broker": stack.broker.bootstrap,
            "topic": kafka.topic,
            "vllm": stack.vllm.url,
            "model": str(model),
            "prefect": prefect.url,
            "config": str(stack.config),
            "logs": str(logs),
            "api_key": api_key is not None,
        }
        _print_ready(ready, options)
        typer.echo(json.dumps(ready))
        _watch(
            {
                "the broker": (stack.broker.process, logs / "broker.log"),
                "vLLM": (stack.vllm.process, logs / "vllm.log"),
                "Prefect": (prefect.process, logs / "prefect.log"),
            }
        )


def _overrides(model: Path, options: StackOptions) -> dict[str, dict[str, Any]]:
    """Config sections beyond the parts' addresses: vLLM's rank limit, and for the demo
    model (it says what it is in chat_model.json) the demo's training settings."""
    from flows.demo_model import DEMO_OVERRIDES

    sections: dict[str, dict[str, Any]] = {"serving": {"max_lora_rank": options.max_lora_rank}}
    if (model / "chat_model.json").is_file():
        sections |= DEMO_OVERRIDES
    return sections


def _print_ready(ready: dict[str, Any], options: StackOptions) -> None:
    key = (
        f"clients send {API_KEY_ENV} as the bearer token"
        if ready["api_key"]
        else f"no API key (set {API_KEY_ENV} before starting to require one)"
    )
    lines = [
        f"broker   {ready['broker']}  topic {ready['topic']} (and {ready['topic']}.dlq)",
        f"vLLM     {ready['vllm']}/v1  models: base (the base model), and the alias once "
        f"published; {key}",
        f"Prefect  {ready['prefect']}  (UI at {ready['prefect'].removesuffix('/api')}); "
        f"export PREFECT_API_URL={ready['prefect']}",
        f"config   {ready['config']}  (kto-loop <command> --config {ready['config']})",
        f"logs     {ready['logs']}",
        "ready; Ctrl-C or SIGTERM stops every part",
    ]
    if not _loopback(options.host):
        lines.insert(2, f"         vLLM listens on {options.host}:{options.vllm_port}")
    for line in lines:
        err.print(line, markup=False, highlight=False, soft_wrap=True)


def _watch(parts: dict[str, tuple[Any, Path]]) -> None:
    """Return never: wait for a signal, or exit 1 when a part dies, naming its log."""
    while True:
        for name, (process, log) in parts.items():
            if process.poll() is not None:
                fail(RuntimeError(f"{name} exited ({process.returncode}); see {log}"), 1)
        time.sleep(1.0)  # how soon a dead part is noticed; signals interrupt the wait


def _hang_up(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _max_model_len(model: Path) -> int:
    """The model's own context length (config.json), at most DEFAULT_MAX_MODEL_LEN."""
    config = json.loads((model / "config.json").read_text())
    own = config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN
    return min(int(own), DEFAULT_MAX_MODEL_LEN)
