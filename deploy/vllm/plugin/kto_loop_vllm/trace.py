"""A timeline of what the API server does, for lining a publish up against clients.

Off unless `KTO_LOOP_TRACE` names a file. Then the plugin appends one JSON object per
line to it, each with `mono` (CLOCK_MONOTONIC seconds, the same clock in every process
on the host, so the engine's and the clients' times line up with it) and `event`:

- `http`: every request the server answered: method, path, client port, status, start
  and end;
- `conn`: uvicorn's connection made / lost lines (start vLLM with
  `--uvicorn-log-level trace` for them), with the client port;
- `loop_stall`: the API server's event loop did not run for `ms` milliseconds (over
  STALL_MS), so it read no socket and answered no request meanwhile;
- `admit`: the API server handing a request to the engine (`request`, its id);
- `step`: each engine step's output reaching the API server: the engine's own time for
  the step (`elapsed_ms`, with `--enable-logging-iteration-details`), the ids of the
  requests whose first output it carries (`first`), its prefill and
  decode tokens, the running and waiting requests, and the adapters the unfinished
  requests use (name -> count: how many LoRAs a batch can touch);
- `swap`, `retire`: the plugin's own steps, with how long each took.

The `admit` and `step` events wrap the engine client's input and output calls, vLLM
internals the plugin's tests pin; everything else stays outside vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

TRACE_ENV = "KTO_LOOP_TRACE"
STALL_MS = 100.0
TICK_S = 0.02


class Trace:
    """Appends timestamped events to a JSON-lines file; does nothing without one."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115

    @classmethod
    def from_env(cls) -> Trace:
        return cls(os.environ.get(TRACE_ENV) or None)

    def __bool__(self) -> bool:
        return self._file is not None

    def __call__(self, event: str, **fields: Any) -> None:
        if self._file is not None:
            line = {"mono": time.monotonic(), "event": event, **fields}
            self._file.write(json.dumps(line, default=str) + "\n")


class TraceRequests:
    """ASGI middleware: one `http` event per request, from its first byte to its last."""

    def __init__(self, app: ASGIApp, trace: Trace) -> None:
        self.app = app
        self.trace = trace
        self.connections: logging.Handler | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.trace:
            await self.app(scope, receive, send)
            return
        if self.connections is None:
            # Only now: uvicorn replaces its loggers' handlers when it starts serving.
            self.connections = _ConnectionLines(self.trace)
            logging.getLogger("uvicorn.error").addHandler(self.connections)
        start = time.monotonic()
        status: list[int] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or (None, None)
            self.trace(
                "http",
                method=scope.get("method"),
                path=scope.get("path"),
                port=client[1],
                status=status[0] if status else None,
                start=start,
                end=time.monotonic(),
            )


class _ConnectionLines(logging.Handler):
    """uvicorn's trace-level connection lines, as `conn` events."""

    def __init__(self, trace: Trace) -> None:
        super().__init__(level=1)
        self.trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.DEBUG:
            return
        args = record.args if isinstance(record.args, tuple) else ()
        self.trace("conn", line=record.getMessage(), port=_port(args))


def _port(args: tuple) -> int | None:
    """The client port from uvicorn's '%s:%d - ' prefix argument, when there is one."""
    for arg in args:
        if isinstance(arg, str) and ":" in arg:
            tail = arg.split(" - ")[0].rsplit(":", 1)[-1]
            if tail.isdigit():
                return int(tail)
    return None


async def watch_loop(trace: Trace) -> None:
    """Record every time the event loop came back more than STALL_MS late."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(TICK_S)
        late_ms = (time.monotonic() - before - TICK_S) * 1000
        if late_ms > STALL_MS:
            trace("loop_stall", ms=round(late_ms, 1), since=before)


def trace_engine_steps(
    engine: Any, trace: Trace, loras: Callable[[], dict[str, int]] = dict
) -> bool:
    """Wrap the engine client's input and output calls: each request handed over becomes
    an `admit` event, each step's output a `step` event.

    Returns False (and traces nothing) when this vLLM has no such calls.
    """
    core = getattr(engine, "engine_core", None)
    get_output = getattr(core, "get_output_async", None)
    add_request = getattr(core, "add_request_async", None)
    if get_output is None or add_request is None:
        return False
    started: set[str] = set()  # requests that have had their first output

    async def traced_add(request: Any) -> Any:
        trace("admit", request=getattr(request, "request_id", None))
        return await add_request(request)

    async def traced_output() -> Any:
        outputs = await get_output()
        stats = getattr(outputs, "scheduler_stats", None)
        details = getattr(stats, "iteration_details", None)
        first = []
        for out in getattr(outputs, "outputs", None) or ():
            rid = getattr(out, "request_id", None)
            if rid not in started:
                first.append(rid)
                started.add(rid)
            if getattr(out, "finish_reason", None) is not None:
                started.discard(rid)
        trace(
            "step",
            engine_mono=getattr(outputs, "timestamp", None),
            outputs=len(getattr(outputs, "outputs", ()) or ()),
            first=first,
            elapsed_ms=getattr(details, "elapsed_ms", None),
            prefill_tokens=getattr(details, "num_ctx_tokens", None),
            decode_tokens=getattr(details, "num_generation_tokens", None),
            running=getattr(stats, "num_running_reqs", None),
            waiting=getattr(stats, "num_waiting_reqs", None),
            loras=loras(),
        )
        return outputs

    core.get_output_async = traced_output
    core.add_request_async = traced_add
    return True


def start(
    trace: Trace, engine: Any, loras: Callable[[], dict[str, int]] = dict
) -> list[asyncio.Task]:
    """Start tracing this server's event loop and engine steps; `loras` counts the
    unfinished requests per adapter."""
    if not trace:
        return []
    if engine is not None and not trace_engine_steps(engine, trace, loras):
        trace(
            "note",
            text="this vLLM's engine client lacks get_output_async or add_request_async: "
            "no admit or step events",
        )
    return [asyncio.get_running_loop().create_task(watch_loop(trace))]
