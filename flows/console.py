"""What every `kto-loop` command shares: the stderr console, exiting with a message and
a code, logging setup, loading the settings, and how a number is shown.

Commands print tables and progress on stderr (`err`) and end with one JSON line on
stdout; a failure is one red line on stderr and an exit code.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler

from connectors.config import ConfigError, Settings, load_settings

err = Console(stderr=True)


def fail(exc: Exception, code: int) -> NoReturn:
    """Print `exc` on stderr and exit with `code`."""
    # soft_wrap: a path or URL in the message stays whole in logs (no fold at 80 columns).
    err.print(str(exc), style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def settings_from(config: Path | None) -> Settings:
    """The settings of `config` (default: $KTO_LOOP_CONFIG); exit 2 naming what is wrong."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        fail(exc, 2)


def setup_logging(level: str, rich: bool) -> None:
    """Log at `level` to stderr: through the console on a terminal (`rich`), else as
    timestamped lines; kafka-python's own logs at WARNING or above."""
    handler: logging.Handler
    if rich:
        handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, handlers=[handler], force=True)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


def number(value: Any, digits: int = 4, *, significant: bool = False) -> str:
    """`value` for a table or a report: "-" for None, else `digits` decimals; with
    `significant`, a float to `digits` significant digits and anything else as str()
    (a count stays whole instead of turning into 1.235e+05)."""
    if value is None:
        return "-"
    if not significant:
        return f"{value:.{digits}f}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
