"""HTTP client for one vLLM replica: models, LoRA load/unload, our swap routes, completions.

vLLM answers expected failures with a JSON error and a status; those become exceptions
whose message says what to do. Only calls that are safe to repeat are retried (reads, the
swap, which sets the alias to a target and so means the same the second time, and setting
or ending a canary, likewise); a
load is checked against the server's state instead of being sent twice. A completion
whose connection dropped before any answer came (the server closed an idle keep-alive
connection as the request went out, a replica restarted) is sent once more: it changes
nothing on the server. Each such retry is counted in `retried`, never hidden.

Two keys: the inference key (vLLM's --api-key) goes as `Authorization: Bearer` on every
call; the admin key (the server's KTO_LOOP_ADMIN_KEY) goes in its own header,
`X-KTO-Loop-Admin-Key`, on control-plane calls only (load, unload, swap, canary, retire,
the swap state), so it never travels with an inference request.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

log = logging.getLogger(__name__)

SWAP_PREFIX = "/v1/kto-loop"
# The plugin's names (deploy/vllm/plugin/kto_loop_vllm/plugin.py): the header the admin
# key travels in, and the error type its refusals carry.
ADMIN_HEADER = "X-KTO-Loop-Admin-Key"
ADMIN_ERROR_TYPE = "KtoLoopAdminAuth"


class VllmError(Exception):
    """A replica refused or failed a call; `replica` is its URL."""

    def __init__(self, replica: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{replica}: {message}")
        self.replica = replica
        self.status = status


class ServerUnreachable(VllmError):
    """No answer from the replica (down, wrong URL, or a timeout)."""


class ConnectionDropped(ServerUnreachable):
    """The connection failed or closed before an answer came (not a timeout: a slow
    server is not asked twice)."""


class AdapterNotFound(VllmError):
    """The server cannot read the adapter (path) or does not know the name."""


class PluginMissing(VllmError):
    """The replica lacks the kto-loop swap routes."""


class AdminKeyRefused(VllmError):
    """The replica refused a control-plane call: no admin key (401), a wrong one, or a
    server that has none and is not bound to loopback (403)."""


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    token_ids: tuple[int, ...]
    finish_reason: str | None


_RETRYABLE = (ServerUnreachable,)
_LORA_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def _as_error(
    url: str, method: str, path: str, status: int, message: str, kind: str | None = None
) -> VllmError:
    """The exception for a vLLM error answer, with what to do about it."""
    where = f"{method} {path}: {status}"
    route_missing = message in ("Not Found", "Method Not Allowed")
    if kind == ADMIN_ERROR_TYPE:
        # The plugin's own refusal; its message says which key to set, and where.
        return AdminKeyRefused(url, f"{where}: {message}", status)
    if status == 401:
        return VllmError(
            url,
            f"{where}: the server wants an API key: set KTO_LOOP_SERVING__API_KEY (or "
            "[serving] api_key) to the value of vLLM's --api-key",
            status,
        )
    if route_missing and path.startswith(SWAP_PREFIX):
        return PluginMissing(
            url,
            f"{where}: the server has no kto-loop swap routes: install deploy/vllm/plugin "
            "into vLLM's environment and start vLLM with VLLM_PLUGINS=kto_loop_swap",
            status,
        )
    if route_missing and path in _LORA_ROUTES:
        return VllmError(
            url,
            f"{where}: runtime LoRA updates are off: start vLLM with --enable-lora and "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
            status,
        )
    if status == 404 and path == "/v1/load_lora_adapter":
        return AdapterNotFound(
            url,
            f"{where}: {message} The server cannot read that directory: put the registry "
            "where the servers mount it and map the path with [serving] path_map",
            status,
        )
    if status == 404:
        return AdapterNotFound(url, f"{where}: {message}", status)
    if path == "/v1/load_lora_adapter" and status == 400:
        # vLLM refuses an adapter it cannot serve with 400; its wording is not ours to
        # parse, so the usual way out is given as a possibility.
        return VllmError(
            url,
            f"{where}: {message} If the adapter's rank is above the server's "
            "--max-lora-rank, train with a smaller [lora] r or raise vLLM's --max-lora-rank "
            "(and [serving] max_lora_rank)",
            status,
        )
    if status in (502, 503, 504):
        return ServerUnreachable(url, f"{where}: {message}", status)
    if status >= 500:
        return VllmError(url, f"{where}: {message} (the server's log says more)", status)
    return VllmError(url, f"{where}: {message}", status)


class VllmAdmin:
    """One replica's admin and completion endpoints.

    Args:
        url: the server's base URL, e.g. http://10.0.0.5:8000.
        api_key: the value given to vLLM's --api-key, or None.
        timeout_s: per-call timeout; loads of large adapters take longer than reads.
        retries: attempts for idempotent calls.
        transport: an httpx transport (tests inject faults with it).
        admin_key: the server's KTO_LOOP_ADMIN_KEY, sent on control-plane calls only.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
        *,
        admin_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._admin_headers = {ADMIN_HEADER: admin_key} if admin_key else {}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport
        )
        self._retrying = retry(
            retry=retry_if_exception_type(_RETRYABLE),
            stop=stop_after_attempt(max(1, retries)),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        )
        # Inference: once more at once, and only for a dropped connection.
        self._resending = retry(
            retry=retry_if_exception_type(ConnectionDropped),
            stop=stop_after_attempt(2),
            before_sleep=lambda state: self._count_retry(),
            reraise=True,
        )
        self._lock = threading.Lock()
        self.retried = 0  # inference requests sent a second time after a dropped connection

    def _count_retry(self) -> None:
        with self._lock:
            self.retried += 1

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> VllmAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, method: str, path: str, json: Any = None, admin: bool = False
    ) -> httpx.Response:
        headers = self._admin_headers if admin else None
        try:
            response = self._client.request(method, path, json=json, headers=headers)
        except httpx.TransportError as e:
            dropped = isinstance(e, httpx.NetworkError | httpx.RemoteProtocolError)
            kind = ConnectionDropped if dropped else ServerUnreachable
            raise kind(self.url, f"no answer to {method} {path} ({type(e).__name__}: {e})") from e
        if response.status_code >= 400:
            message, kind = _error_message(response)
            raise _as_error(self.url, method, path, response.status_code, message, kind)
        return response

    def _idempotent(
        self, method: str, path: str, json: Any = None, admin: bool = False
    ) -> httpx.Response:
        return self._retrying(self._call)(method, path, json, admin)

    def _inference(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self._resending(self._call)("POST", path, body)

    def health(self) -> bool:
        """True when the server answers /health with 200."""
        try:
            return self._client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def models(self) -> list[str]:
        """Every model name the server accepts (base, aliases, loaded versions)."""
        data = self._idempotent("GET", "/v1/models").json()
        return [m["id"] for m in data.get("data", [])]

    def base_models(self) -> list[str]:
        """The names the server serves its base model(s) under (cards with no parent)."""
        data = self._idempotent("GET", "/v1/models").json()
        return [m["id"] for m in data.get("data", []) if not m.get("parent")]

    def model_cards(self) -> list[dict[str, Any]]:
        """/v1/models as listed: one card per name (`id`), with the directory it was
        loaded from (`root`; an adapter's path as the server reads it)."""
        return list(self._idempotent("GET", "/v1/models").json().get("data", []))

    def swap_state(self) -> dict[str, Any]:
        """The swap plugin's view: aliases, loaded adapters, retirements, engine ids."""
        return self._idempotent("GET", f"{SWAP_PREFIX}/aliases", admin=True).json()

    def load(self, name: str, path: str) -> None:
        """Load the adapter at `path` (the server's view) under `name`.

        Loading is not repeated blindly: if the name is already loaded from the same path
        (an earlier attempt that timed out), that counts as done; from another path, it is
        an error, since vLLM would serve the old weights under that name.
        """
        state = self.swap_state()
        for a in state["adapters"]:
            if a["name"] == name:
                if a["path"] == path:
                    return
                raise VllmError(
                    self.url,
                    f"{name} is already loaded from {a['path']}, not {path}: a version's "
                    "name must always mean the same files",
                )
        self._call(
            "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, admin=True
        )

    def load_inplace(self, name: str, path: str) -> None:
        """vLLM's own in-place reload of `name` from `path`. kto-loop never uses it (it
        re-reads the adapter on every step afterwards); the hot-swap bench measures it."""
        self._call(
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": name, "lora_path": path, "load_inplace": True},
            admin=True,
        )

    def unload(self, name: str) -> None:
        """vLLM's own unload: forgets the name (the engine keeps the adapter's slot)."""
        self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name}, admin=True)

    def swap(self, alias: str, target: str, keep: list[str]) -> dict[str, Any]:
        """Point `alias` at the loaded version `target`; keep `keep` loaded as well."""
        return self._idempotent(
            "POST", f"{SWAP_PREFIX}/aliases/{alias}", {"target": target, "keep": keep}, admin=True
        ).json()

    def set_canary(self, alias: str, target: str, share: float, salt: str) -> dict[str, Any]:
        """Send `share` of the alias's routing keys to the loaded version `target`, split by
        `salt`; setting the same canary again changes nothing."""
        body = {"target": target, "share": share, "salt": salt}
        return self._idempotent(
            "POST", f"{SWAP_PREFIX}/aliases/{alias}/canary", body, admin=True
        ).json()

    def remove_canary(self, alias: str) -> dict[str, Any] | None:
        """End the alias's canary (every key gets the served version); the canary that
        ended, with its counts per arm, or None when there was none."""
        path = f"{SWAP_PREFIX}/aliases/{alias}/canary"
        return self._idempotent("DELETE", path, admin=True).json().get("canary")

    def retire(self, name: str) -> None:
        """Retire a loaded version once no request uses it (no-op if not loaded)."""
        try:
            self._idempotent("DELETE", f"{SWAP_PREFIX}/adapters/{name}", admin=True)
        except AdapterNotFound:
            return

    def complete(
        self, model: str, prompt: str | list[int], max_tokens: int = 16, **params: Any
    ) -> Completion:
        """A greedy completion (temperature 0 unless given) from `model`."""
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "return_token_ids": True,
            **params,
        }
        data = self._inference("/v1/completions", body).json()
        choice = data["choices"][0]
        return Completion(
            text=choice.get("text") or "",
            model=data.get("model", model),
            token_ids=tuple(choice.get("token_ids") or ()),
            finish_reason=choice.get("finish_reason"),
        )

    def chat(
        self, model: str, messages: list[dict[str, str]], max_tokens: int = 16, **params: Any
    ) -> Completion:
        """A greedy chat completion (temperature 0 unless given) from `model`: the prompt
        is rendered by the server's chat template, as for the users."""
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            **params,
        }
        data = self._inference("/v1/chat/completions", body).json()
        choice = data["choices"][0]
        return Completion(
            text=(choice.get("message") or {}).get("content") or "",
            model=data.get("model", model),
            token_ids=(),
            finish_reason=choice.get("finish_reason"),
        )


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    """(message, error type) of an error answer; the type is None when there is none."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase, None
    if not isinstance(body, dict):
        return str(body), None
    error = body.get("error", body)
    if isinstance(error, dict):
        kind = error.get("type")
        message = str(error.get("message") or error.get("detail") or error)
        return message, kind if isinstance(kind, str) else None
    return str(error), None
