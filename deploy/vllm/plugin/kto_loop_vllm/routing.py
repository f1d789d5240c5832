"""Which version answers a request for an alias that carries a canary.

A canary puts a candidate version beside the one an alias serves; a `share` of the
alias's routing keys goes to the candidate. A request's routing key is, in order:

1. the `X-KTO-Loop-Route-Key` header;
2. the OpenAI `user` field of the JSON body;
3. the text of the first user message (chat) or the prompt (completions), which stays
   the same over every turn of one conversation.

The arm is `hash(salt, key) < share`: sticky for a key while the canary runs, the same on
every replica (the salt comes with the canary), and reshuffled by the next canary (a new
salt). A request with no key (a malformed body, a prompt-less route) gets the served
version, so routing never fails a request.

`RouteKeys`, an ASGI middleware, reads the key (the body only for POSTs to the chat and
completions routes, and only while some alias has a canary) and puts it in a context
variable; vLLM's handlers look the model up in its name table (`lora_requests[model]`)
in the same context, and the table asks `Canary.pick` which version to return. vLLM
names the answer after the version it used, so every answer says which arm gave it.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ROUTE_KEY_HEADER = "X-KTO-Loop-Route-Key"
# The inference routes whose body holds a conversation, and the field that starts it.
KEYED_ROUTES = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}
CANDIDATE, SERVED = "candidate", "served"


@dataclass
class Route:
    """One request's routing key, and the arm it got per alias (asked once, counted once)."""

    key: str | None
    arms: dict[str, bool] = field(default_factory=dict)


ROUTE: ContextVar[Route | None] = ContextVar("kto_loop_route", default=None)


def in_candidate_arm(salt: str, key: str, share: float) -> bool:
    """True when `key` falls in the candidate's `share` of keys for the canary `salt`."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


class Canary:
    """A candidate version beside an alias's served one, and the requests each arm got.

    Args:
        name: the candidate's loaded name (`chat@v4`).
        request: its LoRARequest, returned for the candidate's arm.
        share: the share of routing keys the candidate gets, in (0, 1).
        salt: what makes this canary's split its own.
    """

    def __init__(self, name: str, request: Any, share: float, salt: str) -> None:
        self.name, self.request, self.share, self.salt = name, request, share, salt
        self.started_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.started = time.monotonic()
        self.routed = {CANDIDATE: 0, SERVED: 0}

    def same(self, request: Any, share: float, salt: str) -> bool:
        return self.request is request and self.share == share and self.salt == salt

    def pick(self, alias: str, served: Any) -> Any:
        """The LoRARequest that answers this request for `alias`: the candidate's or
        `served`. Outside an inference request (no route), the served one."""
        route = ROUTE.get()
        if route is None:
            return served
        arm = route.arms.get(alias)
        if arm is None:
            arm = route.key is not None and in_candidate_arm(self.salt, route.key, self.share)
            route.arms[alias] = arm
            self.routed[CANDIDATE if arm else SERVED] += 1
        return self.request if arm else served

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "share": self.share,
            "salt": self.salt,
            "started_at": self.started_at,
            "routed": dict(self.routed),
        }


def _text(content: Any) -> str | None:
    """A message's text: the string, or its text parts joined (OpenAI's parts format)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return None


def route_key(body: bytes, conversation_field: str) -> str | None:
    """The routing key in a JSON request body: its `user`, else the first user message's
    text (`messages`) or the prompt (`prompt`); None when it has none or is not JSON."""
    try:
        return _key(json.loads(body), conversation_field)
    except (ValueError, RecursionError):  # vLLM answers it with its own 400
        return None


def _key(data: Any, conversation_field: str) -> str | None:
    if not isinstance(data, dict):
        return None
    user = data.get("user")
    if isinstance(user, str) and user:
        return user
    start = data.get(conversation_field)
    if conversation_field == "messages":
        if not isinstance(start, list):
            return None
        firsts = (m for m in start if isinstance(m, dict) and m.get("role") == "user")
        text = _text(next(firsts, {}).get("content"))
        return text or None
    if isinstance(start, str):
        return start or None
    if isinstance(start, list) and start:
        return json.dumps(start)  # token ids, or several prompts
    return None


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """The whole request body, and a `receive` that hands the app the same messages."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break

    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    return b"".join(chunks), replay


class RouteKeys:
    """ASGI middleware: gives each inference request its routing key while any alias has a
    canary (`canaries` is the plugin's alias -> Canary map); costs nothing otherwise.

    Args:
        app: the rest of the ASGI stack.
        canaries: the live map; only its emptiness is read here.
        skip: called with a path; True for paths that never route (the control plane).
    """

    def __init__(self, app: ASGIApp, canaries: dict[str, Canary], skip: Any) -> None:
        self.app, self.canaries, self.skip = app, canaries, skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not self.canaries:
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if self.skip(path):
            await self.app(scope, receive, send)
            return
        key = Headers(scope=scope).get(ROUTE_KEY_HEADER) or None
        if key is None and path in KEYED_ROUTES:
            body, receive = await _buffered(receive)
            key = route_key(body, KEYED_ROUTES[path])
        token = ROUTE.set(Route(key))
        try:
            await self.app(scope, receive, send)
        finally:
            ROUTE.reset(token)
