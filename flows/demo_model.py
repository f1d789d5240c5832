"""The model the demo serves (the user's, or the demo model built here) and the config
sections the demo trains it with; `python -m flows.demo` and its --nights use both."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from rich.console import Console

# Training settings for the demo model; a real model (--model-dir) keeps the config
# defaults. The toy's taste is an exact match with a few templates: at the default beta,
# pushing a disliked answer down spreads its probability over near-misses of the liked
# ones (docs/training.md: Defaults, and why); beta 2 lets the push stop once an answer is on the
# right side. Its prompts and answers are short: shorter sequences train faster.
DEMO_OVERRIDES: dict[str, dict[str, Any]] = {
    "train": {"beta": 2.0, "max_length": 128, "max_prompt_length": 64},
}


def demo_model(
    args: argparse.Namespace, run_dir: Path, console: Console
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The model to serve (--model-dir, the --config's [serving] base_model, or the demo
    model built under `run_dir`) and the config sections that override the defaults for
    it."""
    from deploy.local.chat_model import build_chat_model

    user = _user_sections(args.config)
    given = args.model_dir or (user.get("serving") or {}).get("base_model")
    if given:
        model = Path(given).resolve()
    else:
        with console.status("building the demo model (tokenizer, weights, a short SFT)"):
            model = build_chat_model(run_dir / "model", seed=args.seed)
    # The demo model says what it is (chat_model.json); any other model keeps the
    # config defaults, made for real models. The user's sections come last.
    overrides = dict(DEMO_OVERRIDES) if (model / "chat_model.json").is_file() else {}
    for name in ("snapshot", "balance", "train", "lora", "gate"):
        if name in user:
            overrides[name] = {**overrides.get(name, {}), **user[name]}
    return model, overrides


def _user_sections(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    with path.open("rb") as f:
        return tomllib.load(f)
