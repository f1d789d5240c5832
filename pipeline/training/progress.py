"""How long work reports its progress without the core knowing about terminals: the
entry point passes a bar factory (tqdm's signature), the core calls it."""

from __future__ import annotations

from typing import Any, Protocol


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...


class Progress(Protocol):
    """Makes a bar: `tqdm.auto.tqdm` is one."""

    def __call__(self, *, total: int, initial: int, desc: str, unit: str) -> Bar: ...


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def silent(*, total: int, initial: int, desc: str, unit: str) -> Bar:
    """A bar that shows nothing."""
    return _Silent()
