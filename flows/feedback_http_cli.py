"""`kto-loop serve-feedback`: serve the feedback endpoint with uvicorn until SIGTERM or
Ctrl-C (uvicorn stops taking requests, finishes those in flight, and the producer
flushes before the process exits).

One process serves about 1,500 single-event requests a second on one core (see
bench/feedback_http.py); `--workers N` runs N processes on one port, each with its own
producer. Each then keeps its own rate-limit counters unless [feedback_http]
rate_limit_storage names a shared Redis.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from uvicorn.supervisors import Multiprocess

from connectors.config import CONFIG_ENV, ConfigError, Settings, load_settings
from connectors.feedback.feedback_http import HeaderDeadlineProtocol, create_app
from deploy.local.processes import die_with_parent
from flows.console import err, fail

# What each worker process imports: it reads the same config file and environment.
_FACTORY = "flows.feedback_http_cli:worker_app"


def worker_app() -> Starlette:
    """A worker's app, from $KTO_LOOP_CONFIG and the environment. The worker ends
    (SIGTERM: it finishes its requests and flushes) when the serving process ends,
    even by SIGKILL."""
    die_with_parent(os.getppid(), signal.SIGTERM)
    return create_app(load_settings())


def serve(
    settings: Settings,
    config_path: Path | None,
    host: str | None,
    port: int | None,
    workers: int,
    log_level: str,
) -> None:
    """Exit 2 on a configuration error, 1 when the server could not start."""
    try:
        app = create_app(settings)  # checks the config here, before any worker starts
    except ConfigError as exc:
        fail(exc, 2)
    config = settings.feedback_http
    host = host or config.host
    port = config.port if port is None else port
    options = {
        "host": host,
        "port": port,
        "log_level": log_level.lower(),
        "access_log": False,
        "timeout_graceful_shutdown": config.produce_timeout_seconds + 5,
        "server_header": False,
        "http": HeaderDeadlineProtocol,
        "limit_concurrency": config.max_connections,
        # The client address (an anonymous voter's identity) is the connection's own
        # unless a proxy in forwarded_allow_ips says otherwise.
        "proxy_headers": bool(config.forwarded_allow_ips),
        "forwarded_allow_ips": ",".join(config.forwarded_allow_ips) or None,
    }
    err.print(
        f"feedback endpoint on http://{host}:{port}/v1/feedback ({workers} process"
        f"{'es' if workers > 1 else ''}) -> topic {settings.kafka.topic} at "
        f"{','.join(settings.kafka.bootstrap_servers)}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if workers > 1:
        if config_path is not None:
            os.environ[CONFIG_ENV] = str(config_path.resolve())
        uvicorn_config = uvicorn.Config(_FACTORY, factory=True, workers=workers, **options)
        sock = uvicorn_config.bind_socket()
        Multiprocess(uvicorn_config, sockets=[sock]).run()
        return
    server = uvicorn.Server(uvicorn.Config(app, **options))
    server.run()
    if not server.started:
        fail(RuntimeError(f"the feedback endpoint could not start on {host}:{port}"), 1)
