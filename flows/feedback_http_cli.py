"""`kto-loop serve-feedback`: serve the feedback endpoint with uvicorn until SIGTERM or
Ctrl-C (uvicorn stops taking requests, finishes those in flight, and the producer
flushes before the process exits)."""

from __future__ import annotations

import uvicorn

from connectors.config import ConfigError, Settings
from connectors.feedback_http import create_app
from flows.console import err, fail


def serve(settings: Settings, host: str | None, port: int | None, log_level: str) -> None:
    """Exit 2 on a configuration error, 1 when the server could not start."""
    try:
        app = create_app(settings)
    except ConfigError as exc:
        fail(exc, 2)
    config = settings.feedback_http
    host = host or config.host
    port = config.port if port is None else port
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level.lower(),
            access_log=False,
            timeout_graceful_shutdown=config.produce_timeout_seconds + 5,
            server_header=False,
        )
    )
    err.print(
        f"feedback endpoint on http://{host}:{port}/v1/feedback -> topic {settings.kafka.topic} "
        f"at {','.join(settings.kafka.bootstrap_servers)}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    server.run()
    if not server.started:
        fail(RuntimeError(f"the feedback endpoint could not start on {host}:{port}"), 1)
