"""The local stack the demo runs on: a Kafka-protocol broker, vLLM on the CPU (with the
kto-loop swap plugin), and the store, registry and work directories, all under one
directory with every log in `<root>/logs/`.

    with local_stack(root, model_dir) as stack:
        settings = stack.settings          # everything pointed at the local parts
        ...                                # stopped on the way out, also on Ctrl-C

Each part is health-checked when it starts (the broker answers Kafka metadata, vLLM
answers /health), and a part that fails to start takes the ones already started down
with it, its log tail in the error.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.config import Settings, load_settings
from deploy.local.broker import Broker, running_broker
from deploy.local.vllm_server import VllmServer, start_vllm


@dataclass(frozen=True)
class LocalStack:
    """The running parts and the settings and config file that point at them."""

    root: Path
    broker: Broker
    vllm: VllmServer
    config: Path
    settings: Settings


def stack_sections(root: Path, bootstrap: str, vllm_url: str, model_dir: Path) -> dict[str, Any]:
    """Config sections for the local parts: topic, store, snapshots, registry, the one
    replica and its base model, the cycle's work dir."""
    return {
        "kafka": {
            "bootstrap_servers": [bootstrap],
            "topic": "chat-feedback",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        "store": {"url": str(root / "store")},
        "ingest": {"batch_max_seconds": 1.0},
        "snapshot": {"out_dir": str(root / "snapshots")},
        "registry": {"url": str(root / "adapters")},
        "serving": {"replicas": [vllm_url], "base_model": str(model_dir)},
        "cycle": {"work_dir": str(root / "cycles")},
    }


@contextlib.contextmanager
def local_stack(
    root: Path,
    model_dir: Path,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    kafka_port: int | None = None,
    vllm_port: int | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    host: str = "127.0.0.1",
    config: Path | None = None,
    **vllm_flags: Any,
) -> Iterator[LocalStack]:
    """Start the broker and vLLM on `model_dir`, write `<root>/kto-loop.toml` (the local
    parts, then `overrides` section by section) unless `config` names the file to use,
    and stop both on the way out.

    Args:
        kafka_port, vllm_port: fixed ports (default: free ones).
        api_key: vLLM's --api-key. It is handed over in this process's environment
            (KTO_LOOP_SERVING__API_KEY), as production would, never written to the file.
        admin_key: the servers' control-plane key (see deploy/local/vllm_server.py).
        host: the address vLLM listens on (reached at 127.0.0.1 here).
        vllm_flags: more of `start_vllm`'s flags; dtype float32 and max_model_len 512
            unless given.
    """
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    flags = {"dtype": "float32", "max_model_len": 512, **vllm_flags}
    with running_broker(kafka_port, log_path=logs / "broker.log") as broker:
        vllm = start_vllm(
            model_dir,
            logs / "vllm.log",
            port=vllm_port,
            api_key=api_key,
            admin_key=admin_key,
            host=host,
            **flags,
        )
        try:
            if config is None:
                sections = stack_sections(root, broker.bootstrap, vllm.url, model_dir)
                for name, values in (overrides or {}).items():
                    sections[name] = {**sections.get(name, {}), **values}
                config = root / "kto-loop.toml"
                config.write_text(_toml(sections))
            if api_key is not None:
                os.environ["KTO_LOOP_SERVING__API_KEY"] = api_key
            yield LocalStack(root, broker, vllm, config, load_settings(config))
        finally:
            vllm.stop()


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write config sections (e.g. `stack_sections`' with changes) as a TOML file."""
    path.write_text(_toml(sections))
    return path


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    """TOML of flat sections (JSON's strings, numbers, booleans and lists are TOML's)."""
    lines = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in body.items()]
        lines.append("")
    return "\n".join(lines)
