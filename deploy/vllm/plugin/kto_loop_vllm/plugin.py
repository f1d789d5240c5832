"""Routes added to vLLM's own server: switch an alias between loaded LoRA versions.

vLLM's runtime LoRA endpoints cannot replace a served adapter safely (see
deploy/vllm/README.md for what each built-in way does wrong). This plugin adds the missing
step. Every version is loaded with vLLM's own `/v1/load_lora_adapter` under a unique name
(`chat@v3`) and its own path; then

    POST /v1/kto-loop/aliases/{alias}   {"target": "chat@v3", "keep": ["chat@v2"]}

points the alias's entry in the server's name table at that version's request object in
one assignment, under the alias's lock. The alias never disappears (no request 404s), the
engine sees a new name and path (no stale prefix-cache blocks, no re-read on every step),
and a long generation still running on the old version keeps its own name and id.

Versions the alias left, apart from `keep`, are retired: removed from the name table and
from the engine (which `/v1/unload_lora_adapter` does not do, so slots and memory would
pile up), once no request has looked them up for `KTO_LOOP_RETIRE_GRACE_S` seconds and
none in flight uses them. Retiring a version still in use kills vLLM's worker.

    GET /v1/kto-loop/aliases            what each alias serves, what is loaded and in use

An alias can carry a canary, a candidate version that answers a share of its requests:

    POST   /v1/kto-loop/aliases/{alias}/canary  {"target": "chat@v4", "share": 0.1, "salt": "..."}
    DELETE /v1/kto-loop/aliases/{alias}/canary

Which request goes where is `routing.py`'s business. A swap to the canary's target
promotes it and ends the canary in the same assignment; a swap to any other version ends
it too. A candidate the canary left retires like any version the alias left.

These routes, vLLM's own `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, and
the SageMaker-style `/adapters` routes vLLM adds beside them form the control plane. It
is for admins only: a request to it must carry the admin key (`KTO_LOOP_ADMIN_KEY` in
the server's environment) in the `X-KTO-Loop-Admin-Key` header, which is not the
inference key every client holds (vLLM's `--api-key`, still checked first under /v1).
Without the header the answer is 401; with a wrong key, 403. A server with no admin
key serves the control plane only when it is bound to loopback (or a Unix socket);
otherwise every control-plane request gets 403 saying what to set.

The routes read vLLM internals (the serving-models name table, its per-name locks, the
output processor's request states), so the plugin refuses to attach to a vLLM it was not
tested with.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import time
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from kto_loop_vllm import trace as tracing
from kto_loop_vllm.routing import Canary, RouteKeys

# A child of "vllm": its lines go wherever vLLM sends its own.
log = logging.getLogger("vllm.kto_loop_swap")

PLUGIN_NAME = "kto_loop_swap"
TESTED_VLLM = ("0.32.",)
SEPARATOR = "@"
PREFIX = "/v1/kto-loop"

ADMIN_KEY_ENV = "KTO_LOOP_ADMIN_KEY"
ADMIN_HEADER = "X-KTO-Loop-Admin-Key"
ADMIN_ERROR_TYPE = "KtoLoopAdminAuth"
# The control plane: our routes, vLLM's runtime LoRA routes, and the SageMaker-style
# adapter routes vLLM registers with them (outside /v1, so --api-key never guards them).
ADMIN_PREFIXES = (PREFIX, "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters")


class SwapRequest(BaseModel):
    target: str = Field(description="a loaded adapter name, e.g. chat@v3")
    keep: list[str] = Field(
        default_factory=list,
        description="loaded versions of this alias to keep (the rollback target)",
    )


class CanaryRequest(BaseModel):
    target: str = Field(description="a loaded version of the alias, e.g. chat@v4")
    share: float = Field(description="the share of routing keys it answers, in (0, 1)")
    salt: str = Field(description="what makes this canary's split its own (its id)")


class LookupTable(dict):
    """vLLM's name -> LoRARequest table, remembering when each adapter was last looked up,
    and routing an alias with a canary.

    The serving handlers fetch a request's adapter with `table[model]`; a lookup means a
    request may reach the engine with that adapter a moment later, so a retirement waits
    until no lookup happened for the grace period. For an alias in `canaries`, the
    canary picks the served version or the candidate by the request's routing key.
    """

    def __init__(
        self, *args: Any, canaries: dict[str, Canary] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.last_lookup: dict[str, float] = {}
        self.canaries: dict[str, Canary] = {} if canaries is None else canaries

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        canary = self.canaries.get(key)
        if canary is not None:
            value = canary.pick(key, value)
        self.last_lookup[value.lora_name] = time.monotonic()
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return default


class SwapState:
    """What the routes share: the serving models object, the engine and the retirements."""

    def __init__(
        self,
        models: Any,
        engine: Any,
        grace_s: float,
        trace: tracing.Trace | None = None,
        canaries: dict[str, Canary] | None = None,
    ) -> None:
        self.models = models
        self.engine = engine
        self.grace_s = grace_s
        self.trace = trace or tracing.Trace(None)
        self.background: list[asyncio.Task] = []
        self.retiring: dict[str, Any] = {}  # name -> LoRARequest waiting to be retired
        self.retired = 0
        self.retire_task: asyncio.Task | None = None
        self.served_by_alias: dict[str, set[str]] = {}
        self.swaps = 0
        self.canaries: dict[str, Canary] = {} if canaries is None else canaries

    def pointed_at(self, request: Any, name: str) -> bool:
        """True when an alias or a canary still points at `request` (loaded as `name`)."""
        table = self.models.lora_requests
        return any(k != name and v is request for k, v in dict.items(table)) or any(
            c.request is request for c in self.canaries.values()
        )

    def in_flight(self) -> dict[str, int]:
        """Requests the engine is working on, by adapter name."""
        counts: dict[str, int] = {}
        for state in list(self.engine.output_processor.request_states.values()):
            name = getattr(state, "lora_name", None)
            if name:
                counts[name] = counts.get(name, 0) + 1
        return counts

    async def retire_idle(self) -> None:
        """Retire every waiting version that is idle; loop while some still wait."""
        while self.retiring:
            try:
                await self._retire_pass()
            except Exception:  # keep retiring later rather than leave versions loaded forever
                log.exception("retiring LoRA adapters")
            await asyncio.sleep(min(0.25, self.grace_s / 4 or 0.05))

    async def _retire_pass(self) -> None:
        now = time.monotonic()
        busy = self.in_flight()
        table: LookupTable = self.models.lora_requests
        for name, request in list(self.retiring.items()):
            if self.pointed_at(request, name):
                # An alias went back to it (a rollback), or a canary: it stays, and stops
                # waiting.
                del self.retiring[name]
                continue
            last = table.last_lookup.get(name, 0.0)
            if busy.get(name) or now - last < self.grace_s:
                continue
            async with self.models.lora_resolver_lock[name]:
                if self.pointed_at(request, name):
                    del self.retiring[name]  # pointed at again while we waited for the lock
                    continue
                if dict.get(table, name) is request:
                    dict.__delitem__(table, name)
            del self.retiring[name]
            removing = time.monotonic()
            try:
                await self.engine.remove_lora(request.lora_int_id)
            except Exception:  # the engine already dropped it: nothing left to free
                log.exception("removing %s (id %d) from the engine", name, request.lora_int_id)
            self.trace("retire", name=name, id=request.lora_int_id, start=removing)
            self.retired += 1
            log.info("retired LoRA adapter %s (id %d)", name, request.lora_int_id)

    def schedule_retirement(self, requests: dict[str, Any]) -> None:
        """Retire these (name -> LoRARequest) once idle."""
        self.retiring.update(requests)
        if self.retiring and (self.retire_task is None or self.retire_task.done()):
            self.retire_task = asyncio.get_running_loop().create_task(self.retire_idle())


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": "KtoLoopSwapError", "code": status}},
    )


def is_admin_path(path: str) -> bool:
    """True for a path of the control plane (see ADMIN_PREFIXES)."""
    return any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES)


def loopback_only(host: str | None, uds: str | None) -> bool:
    """True when vLLM listens on loopback or a Unix socket only.

    vLLM binds `(args.host or "", args.port)`, or `args.uds` when set: no host means every
    interface. A host name other than localhost is not resolved here: it counts as
    reachable from elsewhere.
    """
    if uds:
        return True
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AdminPolicy:
    """Who may use the control plane on this server; set in init_state from vLLM's args.

    Attributes:
        key: the admin key (None: no key configured).
        loopback: the server listens on loopback or a Unix socket only.
        bind: where it listens, for messages.
    """

    def __init__(self) -> None:
        self.ready = False
        self.key: bytes | None = None
        self.loopback = False
        self.bind = "?"

    def configure(self, key: str | None, host: str | None, uds: str | None, port: Any) -> None:
        self.key = key.encode() if key else None
        self.loopback = loopback_only(host, uds)
        self.bind = f"unix:{uds}" if uds else f"{host or '0.0.0.0'}:{port}"
        self.ready = True

    def refusal(self, presented: str | None) -> tuple[int, str] | None:
        """(status, message) when a control-plane request must be refused, else None."""
        if not self.ready:
            return 503, "the kto-loop plugin is not initialised on this server yet"
        if self.key is None:
            if self.loopback:
                return None
            return (
                403,
                f"the control plane is off: this server listens on {self.bind} and has no "
                f"admin key. Set {ADMIN_KEY_ENV} in vLLM's environment (and the same value "
                "as KTO_LOOP_SERVING__ADMIN_KEY for kto-loop), or bind vLLM to 127.0.0.1",
            )
        if presented is None:
            return (
                401,
                f"the control plane wants the admin key in the {ADMIN_HEADER} header: set "
                f"KTO_LOOP_SERVING__ADMIN_KEY to the value of the server's {ADMIN_KEY_ENV}",
            )
        if not hmac.compare_digest(presented.encode(), self.key):
            return (
                403,
                f"the admin key in {ADMIN_HEADER} is wrong: set KTO_LOOP_SERVING__ADMIN_KEY "
                f"to the value of the server's {ADMIN_KEY_ENV} (not vLLM's --api-key)",
            )
        return None


class AdminGuard:
    """ASGI middleware: control-plane requests pass only under the AdminPolicy.

    Added before vLLM's own middleware, so it runs inside vLLM's --api-key check.
    """

    def __init__(self, app: ASGIApp, policy: AdminPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if is_admin_path(path):
                refused = self.policy.refusal(Headers(scope=scope).get(ADMIN_HEADER))
                if refused is not None:
                    status, message = refused
                    if status == 403:
                        log.warning("control-plane request refused: %s %s", scope["method"], path)
                    response = JSONResponse(
                        status_code=status,
                        content={
                            "error": {"message": message, "type": ADMIN_ERROR_TYPE, "code": status}
                        },
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


router = APIRouter()


def _state(request: Request) -> SwapState | None:
    return getattr(request.app.state, "kto_loop_swap", None)


@router.post(PREFIX + "/aliases/{alias}")
async def swap(alias: str, body: SwapRequest, request: Request) -> JSONResponse:
    """Point `alias` at the loaded adapter `body.target` in one assignment."""
    state = _state(request)
    if state is None:
        return _error(503, "the kto-loop swap plugin has no engine on this server")
    models = state.models
    table: LookupTable = models.lora_requests
    if models.is_base_model(alias):
        return _error(400, f"{alias!r} is a served base model name; choose another alias")
    if SEPARATOR in alias:
        return _error(400, f"{alias!r} contains {SEPARATOR!r}, which marks version names")
    if not body.target.startswith(alias + SEPARATOR):
        return _error(400, f"target {body.target!r} is not a version of {alias!r} ({alias}@vN)")
    if body.target not in table:
        return _error(
            404,
            f"adapter {body.target!r} is not loaded on this server: load it first with "
            "POST /v1/load_lora_adapter",
        )
    asked = time.monotonic()
    async with models.lora_resolver_lock[alias]:
        locked = time.monotonic()
        target = dict.__getitem__(table, body.target)
        previous = dict.get(table, alias)
        canary = state.canaries.get(alias)
        # Promoting the canary's target, or serving anything else, ends the canary in the
        # same step; a swap to what the alias already serves leaves it running.
        ended = None
        if canary is not None and (canary.request is target or previous is not target):
            ended = state.canaries.pop(alias)
        table[alias] = target  # the one step clients can observe
        state.swaps += 1
    if state.trace:
        state.trace(
            "swap",
            alias=alias,
            target=body.target,
            previous=previous and previous.lora_name,
            start=asked,
            locked=locked,
            in_flight=state.in_flight(),
        )
    # Only versions this alias served before are retired: a version loaded for the next
    # publish, or under another alias, is not this swap's to drop.
    served_before = state.served_by_alias.setdefault(alias, set())
    if previous is not None:
        served_before.add(previous.lora_name)
    keep = {body.target, *body.keep}
    stale = {n: dict.get(table, n) for n in served_before if n not in keep}
    if previous is not None and previous.lora_name in stale:
        # Loaded under the bare alias name, its only entry was just overwritten.
        stale[previous.lora_name] = previous
    if ended is not None and ended.name not in keep:
        stale[ended.name] = ended.request  # a candidate the alias did not take
    if alias in state.canaries:
        stale.pop(state.canaries[alias].name, None)
    served_before.difference_update(stale)
    served_before.add(body.target)
    state.schedule_retirement({n: r for n, r in stale.items() if r is not None})
    log.info("alias %s -> %s (was %s)", alias, body.target, previous and previous.lora_name)
    if ended is not None:
        log.info("alias %s: canary of %s ended by the swap", alias, ended.name)
    live = state.canaries.get(alias)
    return JSONResponse(
        {
            "alias": alias,
            "target": body.target,
            "path": target.lora_path,
            "previous": previous.lora_name if previous is not None else None,
            "retiring": sorted(state.retiring),
            "canary": live.as_dict() if live is not None else None,
            "canary_ended": ended.as_dict() if ended is not None else None,
        }
    )


def _check_canary(alias: str, body: CanaryRequest, table: dict) -> tuple[int, str] | None:
    """(status, message) when the canary cannot be set on this server, else None."""
    served = dict.get(table, alias)
    if served is None or served.lora_name == alias:
        return (
            409,
            f"{alias!r} serves no version on this server: a canary goes beside a served "
            "version (publish it, or sync the alias to this replica, first)",
        )
    if not body.target.startswith(alias + SEPARATOR):
        return 400, f"target {body.target!r} is not a version of {alias!r} ({alias}@vN)"
    entry = dict.get(table, body.target)
    if entry is None or entry.lora_name != body.target:
        return (
            404,
            f"adapter {body.target!r} is not loaded on this server: load it first with "
            "POST /v1/load_lora_adapter",
        )
    if entry is served:
        return 400, f"{alias!r} already serves {body.target!r}: a canary needs another version"
    if not 0.0 < body.share < 1.0:
        return 400, f"share {body.share!r} is not in (0, 1): the candidate's share of keys"
    if not body.salt:
        return 400, "salt is empty: give each canary its own (its id)"
    return None


@router.post(PREFIX + "/aliases/{alias}/canary")
async def set_canary(alias: str, body: CanaryRequest, request: Request) -> JSONResponse:
    """Route `body.share` of the alias's routing keys to the loaded version `body.target`.

    Setting the same canary again changes nothing (its counts go on); another one replaces
    it, and the old candidate retires unless something still points at it.
    """
    state = _state(request)
    if state is None:
        return _error(503, "the kto-loop swap plugin has no engine on this server")
    table = state.models.lora_requests
    async with state.models.lora_resolver_lock[alias]:
        refused = _check_canary(alias, body, table)
        if refused is not None:
            return _error(*refused)
        candidate = dict.__getitem__(table, body.target)
        old = state.canaries.get(alias)
        if old is not None and old.same(candidate, body.share, body.salt):
            canary = old
        else:
            canary = Canary(body.target, candidate, body.share, body.salt)
            state.canaries[alias] = canary
        state.retiring.pop(body.target, None)
        served = dict.get(table, alias).lora_name
    replaced = old if old is not None and old is not canary else None
    if replaced is not None and replaced.request is not candidate:
        state.schedule_retirement({replaced.name: replaced.request})
    if canary is not old:
        state.trace("canary", alias=alias, target=body.target, share=body.share)
        log.info("alias %s: canary of %s at %.3f beside %s", alias, body.target, body.share, served)
    return JSONResponse(
        {
            "alias": alias,
            "served": served,
            "canary": canary.as_dict(),
            "replaced": replaced.as_dict() if replaced is not None else None,
        }
    )


@router.delete(PREFIX + "/aliases/{alias}/canary")
async def end_canary(alias: str, request: Request) -> JSONResponse:
    """End the alias's canary: every key gets the served version again, and the candidate
    retires once idle. Without a canary, nothing changes (`canary` is null)."""
    state = _state(request)
    if state is None:
        return _error(503, "the kto-loop swap plugin has no engine on this server")
    async with state.models.lora_resolver_lock[alias]:
        ended = state.canaries.pop(alias, None)
    if ended is not None:
        state.schedule_retirement({ended.name: ended.request})
        state.trace("canary_end", alias=alias, target=ended.name)
        log.info("alias %s: canary of %s ended", alias, ended.name)
    return JSONResponse({"alias": alias, "canary": ended.as_dict() if ended else None})


@router.delete(PREFIX + "/adapters/{name}")
async def retire(name: str, request: Request) -> JSONResponse:
    """Retire a loaded version once idle (a version loaded for a publish that was abandoned).

    Refused while an alias points at it: swap the alias away first.
    """
    state = _state(request)
    if state is None:
        return _error(503, "the kto-loop swap plugin has no engine on this server")
    table = state.models.lora_requests
    entry = dict.get(table, name)
    if entry is None or entry.lora_name != name:
        return _error(404, f"adapter {name!r} is not loaded on this server")
    users = [k for k, v in dict.items(table) if v is entry and k != name]
    if users:
        return _error(409, f"{name!r} is served as {users}: swap that alias away from it first")
    canaries = [a for a, c in state.canaries.items() if c.request is entry]
    if canaries:
        return _error(409, f"{name!r} is the canary of {canaries}: end that canary first")
    state.schedule_retirement({name: entry})
    return JSONResponse({"name": name, "retiring": sorted(state.retiring)})


@router.get(PREFIX + "/aliases")
async def aliases(request: Request) -> JSONResponse:
    """What each alias serves, every loaded adapter, and what the engine holds."""
    state = _state(request)
    if state is None:
        return _error(503, "the kto-loop swap plugin has no engine on this server")
    table = state.models.lora_requests
    busy = state.in_flight()
    out_aliases = {
        k: {
            "target": v.lora_name,
            "path": v.lora_path,
            "id": v.lora_int_id,
            "canary": state.canaries[k].as_dict() if k in state.canaries else None,
        }
        for k, v in dict.items(table)
        if k != v.lora_name
    }
    adapters = [
        {
            "name": k,
            "id": v.lora_int_id,
            "path": v.lora_path,
            "in_flight": busy.get(k, 0),
            "retiring": k in state.retiring,
        }
        for k, v in dict.items(table)
        if k == v.lora_name
    ]
    engine_ids = sorted(await state.engine.list_loras())
    return JSONResponse(
        {
            "aliases": out_aliases,
            "adapters": adapters,
            "retiring": sorted(state.retiring),
            "retired": state.retired,
            "engine_lora_ids": engine_ids,
            "swaps": state.swaps,
            "grace_s": state.grace_s,
        }
    )


@router.get("/v1/models")
async def models_with_aliases(request: Request) -> JSONResponse:
    """vLLM's model list, with each alias listed under its own name.

    vLLM lists adapters by their internal names, so an alias would show only as the
    version it points at; clients discover the names they may call here.
    """
    models = request.app.state.openai_serving_models
    listing = await models.show_available_models()
    data = listing.model_dump()
    table = models.lora_requests
    for card, (key, lora) in zip(
        data["data"][len(models.base_model_paths) :], dict.items(table), strict=False
    ):
        if key != lora.lora_name:
            card["id"] = key
    return JSONResponse(content=data)


class SwapPlugin:
    """The `vllm.endpoint_plugins` entry point (enable with VLLM_PLUGINS=kto_loop_swap)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.policy = AdminPolicy()
        self.trace = tracing.Trace.from_env()
        # alias -> its canary: read by the routing middleware and the name table, changed
        # by the canary and swap routes.
        self.canaries: dict[str, Canary] = {}

    def attach_router(self, app: FastAPI) -> None:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
        if not version.startswith(TESTED_VLLM) and not os.environ.get(
            "KTO_LOOP_PLUGIN_ALLOW_UNTESTED"
        ):
            raise RuntimeError(
                f"kto-loop swap plugin is tested on vLLM {TESTED_VLLM} and this is {version}: "
                "it reads vLLM internals, so run its tests against this vLLM, then set "
                "KTO_LOOP_PLUGIN_ALLOW_UNTESTED=1"
            )
        app.include_router(router)
        # Added before vLLM adds its own middleware, so vLLM's --api-key check runs first.
        app.add_middleware(AdminGuard, policy=self.policy)
        app.add_middleware(RouteKeys, canaries=self.canaries, skip=is_admin_path)
        if self.trace:
            app.add_middleware(tracing.TraceRequests, trace=self.trace)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        key = os.environ.get(ADMIN_KEY_ENV) or None
        inference_keys = list(getattr(args, "api_key", None) or [])
        inference_keys.append(os.environ.get("VLLM_API_KEY") or "")
        if key is not None and key in inference_keys:
            raise RuntimeError(
                f"{ADMIN_KEY_ENV} equals vLLM's API key, which every inference client "
                "holds: choose a different admin key"
            )
        host, uds = getattr(args, "host", None), getattr(args, "uds", None)
        self.policy.configure(key, host, uds, getattr(args, "port", "?"))
        if key is not None:
            log.info("kto-loop control plane: requests need the %s header", ADMIN_HEADER)
        elif self.policy.loopback:
            log.warning(
                "kto-loop control plane: no %s, open to callers on this host (%s)",
                ADMIN_KEY_ENV,
                self.policy.bind,
            )
        else:
            log.warning(
                "kto-loop control plane OFF: no %s and the server listens on %s; set %s "
                "to publish adapters here",
                ADMIN_KEY_ENV,
                self.policy.bind,
                ADMIN_KEY_ENV,
            )
        if engine_client is None or getattr(state, "openai_serving_models", None) is None:
            return
        models = state.openai_serving_models
        models.lora_requests = LookupTable(models.lora_requests, canaries=self.canaries)
        grace = float(os.environ.get("KTO_LOOP_RETIRE_GRACE_S", "10"))
        swap_state = SwapState(models, engine_client, grace, self.trace, self.canaries)
        swap_state.background = tracing.start(self.trace, engine_client, swap_state.in_flight)
        state.kto_loop_swap = swap_state
        log.info("kto-loop swap plugin ready (retire grace %.1f s)", grace)
        if self.trace:
            log.info("kto-loop trace: appending events to %s", self.trace.path)
