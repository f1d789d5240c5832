"""What a command needs from its config, checked at its entry point before any work: the
base model directory, the files the config names, the user code it will load.

A missing key found here exits 2 in a moment; found later it would cost a Prefect
start-up, a model load or a snapshot first, and surface as a failed run (exit 1).
"""

from __future__ import annotations

from pathlib import Path

from connectors.config import ConfigError, Settings


def base_model_dir(settings: Settings, given: Path | None = None) -> Path:
    """The base model to train on: `given` (--base-model), else [serving] base_model.

    Raises:
        ConfigError: neither is set, or the directory is not a transformers model.
    """
    if given is not None:
        return model_dir(given, "--base-model")
    if not settings.serving.base_model:
        raise ConfigError(
            "no base model: pass --base-model DIR or set [serving] base_model in the config "
            "(or KTO_LOOP_SERVING__BASE_MODEL) to the served model's directory"
        )
    return model_dir(Path(settings.serving.base_model), "[serving] base_model")


def model_dir(path: Path, where: str) -> Path:
    """`path` if it is a transformers model directory (it has config.json), else a
    ConfigError naming `where` it was set."""
    path = path.expanduser()
    if not path.is_dir():
        raise ConfigError(f"{where}: no model directory at {path}")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{where}: {path} holds no config.json; point it at a transformers model "
            "directory (the one vLLM serves)"
        )
    return path


def check_cycle(settings: Settings) -> None:
    """Everything an alignment cycle reads from the config and could only fail on later:
    [serving] base_model, [cycle] chat_template and general_data, [gate] scorer.

    Raises:
        ConfigError: naming every problem, each with its key.
    """
    from flows.user_code import load_callable

    problems = []
    if not settings.serving.base_model:
        problems.append(
            "[serving] base_model is not set: a cycle trains on the served base model, so "
            "set it (or KTO_LOOP_SERVING__BASE_MODEL) to that model's directory as this "
            "machine sees it"
        )
    else:
        try:
            model_dir(Path(settings.serving.base_model), "[serving] base_model")
        except ConfigError as exc:
            problems.append(str(exc))
    for key in ("chat_template", "general_data"):
        value = getattr(settings.cycle, key)
        if value and not Path(value).expanduser().exists():
            problems.append(f"[cycle] {key}: no file at {value}")
    if settings.gate.scorer:
        try:
            load_callable(settings.gate.scorer, "[gate] scorer")
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(["the cycle cannot run with this configuration:", *problems]))


def check_serving(settings: Settings) -> None:
    """[serving] base_model, when set, must be the served model's directory: publishing
    compares an adapter's shapes and fingerprint with it.

    Raises:
        ConfigError: it is set to something that is not a model directory.
    """
    if settings.serving.base_model:
        model_dir(Path(settings.serving.base_model), "[serving] base_model")
