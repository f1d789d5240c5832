"""vLLM's error answers become errors that say what to do (the mapping alone; the
calls themselves are tested against a real server in test_serving.py)."""

from __future__ import annotations

import pytest

from connectors.serving.vllm_admin import (
    ADMIN_ERROR_TYPE,
    AdapterNotFound,
    AdminKeyRefused,
    PluginMissing,
    ServerUnreachable,
    VllmError,
    _as_error,
)

URL = "http://replica-1:8000"


@pytest.mark.parametrize(
    ("method", "path", "status", "message", "kind", "says"),
    [
        (
            "GET",
            "/v1/kto-loop/aliases",
            401,
            "Unauthorized",
            VllmError,
            "KTO_LOOP_SERVING__API_KEY",
        ),
        (
            "GET",
            "/v1/kto-loop/aliases",
            404,
            "Not Found",
            PluginMissing,
            "VLLM_PLUGINS=kto_loop_swap",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            404,
            "Not Found",
            VllmError,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            404,
            "No adapter found for /x",
            AdapterNotFound,
            "path_map",
        ),
        (
            "POST",
            "/v1/kto-loop/aliases/chat",
            404,
            "'chat@v2' is not loaded",
            AdapterNotFound,
            "not loaded",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            400,
            "LoRA rank 16 is greater than max_lora_rank 8",
            VllmError,
            "--max-lora-rank",
        ),
        ("POST", "/v1/completions", 503, "overloaded", ServerUnreachable, "overloaded"),
        ("POST", "/v1/load_lora_adapter", 500, "boom", VllmError, "server's log"),
    ],
)
def test_error_answers_say_what_to_do(
    method: str, path: str, status: int, message: str, kind: type, says: str
) -> None:
    error = _as_error(URL, method, path, status, message)
    assert type(error) is kind
    assert says in str(error) and URL in str(error) and error.status == status


def test_the_plugins_refusals_are_admin_key_errors_and_vllms_own_401_is_the_api_key() -> None:
    message = "the control plane wants the admin key: set KTO_LOOP_SERVING__ADMIN_KEY"
    for status in (401, 403):
        error = _as_error(URL, "POST", "/v1/load_lora_adapter", status, message, ADMIN_ERROR_TYPE)
        assert type(error) is AdminKeyRefused and error.status == status
        assert "KTO_LOOP_SERVING__ADMIN_KEY" in str(error) and URL in str(error)
    vllms = _as_error(URL, "POST", "/v1/load_lora_adapter", 401, "Unauthorized")
    assert type(vllms) is VllmError and "KTO_LOOP_SERVING__API_KEY" in str(vllms)
