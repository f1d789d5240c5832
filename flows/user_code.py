"""Load a function the user names as "module:function" in the config or on the command
line (the gate's scorer, the simulator's taste)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """The function `spec` names; `what` says where it was configured, for the error.

    Raises:
        ValueError: the module or the function cannot be found, or it is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f'{what} must be "module:function", got {spec!r}')
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot load {spec!r} ({what}): {exc}; it must be an importable module and a "
            "function in it"
        ) from None
    if not callable(found):
        raise ValueError(f"{spec!r} ({what}) is not callable")
    return found
