"""`kto-loop train`: a LoRA adapter trained with KTO from a snapshot or a TRL file.

Prints the class weights and why on stderr, a before/after table of the held-out
metrics, and ends with one JSON line on stdout. Under torchrun, rank 0 reports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.table import Table

from connectors.config import ConfigError, Settings
from flows.console import err, fail, number
from flows.ingest_cli import warn_skipped
from flows.preflight import base_model_dir
from pipeline.training.manifest import Manifest


def train(
    settings: Settings,
    base_model: Path | None,
    data: Path,
    out: Path,
    *,
    init_adapter: Path | None,
    reference_adapter: Path | None,
    general: Path | None,
    chat_template: Path | None,
    max_steps: int | None,
    seed: int | None,
    resume: bool,
) -> None:
    """Train `base_model` (default: [serving] base_model) on `data` into `out` and print
    the JSON summary ("status": trained, no_gain, unjudged, skipped or
    paused). Exit 1 when the
    run failed (diverged, general-ability bound), 2 for bad input."""
    from pipeline.feedback.balance import choose_weights
    from pipeline.training.encode import EncodeError

    try:
        options = settings.train.overridden(max_steps=max_steps, seed=seed)
        base_model = base_model_dir(settings, base_model)
    except (ValueError, ConfigError) as exc:
        fail(exc, 2)
    snap, general_records, template = _read_inputs(settings, data, general, chat_template)
    warn_skipped(snap)
    skipped_rows = snap.stats.skipped_rows
    balance = choose_weights(*snap.class_counts("train", settings.train.repeats), settings.balance)
    err.print(balance.explanation, markup=False, highlight=False)
    if balance.skip_reason is not None:
        typer.echo(
            json.dumps(
                {
                    "status": "skipped",
                    "reason": balance.skip_reason,
                    "snapshot": snap.id,
                    "skipped_rows": skipped_rows,
                }
            )
        )
        return

    from flows.training import TrainInputs, join_process_group, run_training
    from pipeline.training.errors import DivergedError, GeneralAbilityError, TrainError

    join_process_group()
    inputs = TrainInputs.from_snapshot(
        snap,
        balance,
        base_model,
        out,
        settings.train.repeats,
        general=general_records,
        init_adapter=init_adapter,
        reference_adapter=reference_adapter,
        chat_template=template,
        resume=resume,
        progress=True,
    )
    try:
        result = run_training(inputs, options, settings.lora)
    except (DivergedError, GeneralAbilityError) as exc:
        fail(exc, 1)
    except (TrainError, EncodeError) as exc:
        fail(exc, 2)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    if result.manifest is None:
        paused = {"status": "paused", "step": result.step, "steps": result.planned_steps}
        typer.echo(json.dumps(paused | {"skipped_rows": skipped_rows}))
        return
    _report(result.manifest, out, snap.id, skipped_rows, balance)


def _read_inputs(
    settings: Settings, data: Path, general: Path | None, chat_template: Path | None
) -> tuple[Any, list[Any], str | None]:
    """The snapshot to train on, the general held-out records and the chat template;
    exit 2 when one cannot be read."""
    from connectors.feedback.snapshots import load_training_data
    from pipeline.feedback.snapshot import SnapshotError

    try:
        snap = load_training_data(data, settings.snapshot)
        general_records = []
        if general is not None:
            g = load_training_data(general, settings.snapshot)
            general_records = g.records("train") + g.records("heldout")
        template = chat_template.read_text() if chat_template is not None else None
    except SnapshotError as exc:
        fail(exc, 2)
    except OSError as exc:
        fail(RuntimeError(f"could not read input: {exc}"), 2)
    return snap, general_records, template


def _report(m: Manifest, out: Path, snapshot_id: str, skipped_rows: int, balance: Any) -> None:
    """The held-out metrics before and after as a table on stderr, the manifest's
    warnings and notes, then the JSON summary on stdout."""
    before = m.metrics.heldout_before or {}
    after = m.metrics.heldout_after or {}
    table = Table(title=f"adapter {out}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in ("loss", "accuracy", "reward_desirable", "reward_undesirable", "margin", "kl"):
        table.add_row(f"held-out {key}", number(before.get(key)), number(after.get(key)))
    general_nll = (m.metrics.general_nll_before, m.metrics.general_nll_after)
    if general_nll[0] is not None:
        table.add_row("general NLL / token", number(general_nll[0]), number(general_nll[1]))
    err.print(table)
    for warning in m.warnings:
        err.print(f"warning: {warning}", style="yellow", markup=False)
    for note in m.notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    if m.status_reason:
        err.print(f"{m.status}: {m.status_reason}", style="yellow", markup=False)
    typer.echo(
        json.dumps(
            {
                "status": m.status,
                "status_reason": m.status_reason,
                "adapter": str(out),
                "snapshot": snapshot_id,
                "skipped_rows": skipped_rows,
                "steps": m.steps,
                "best_step": m.best_step,
                "lambda_desirable": balance.lambda_desirable,
                "lambda_undesirable": balance.lambda_undesirable,
                "heldout_accuracy_before": before.get("accuracy"),
                "heldout_accuracy_after": after.get("accuracy"),
                "heldout_margin_after": after.get("margin"),
                "heldout_kl_after": after.get("kl"),
                "general_nll_before": general_nll[0],
                "general_nll_after": general_nll[1],
                "seconds": m.seconds,
            }
        )
    )


def launch_if_several(nproc: int, argv: list[str]) -> None:
    """`launch` when nproc > 1 and this is not yet one of torchrun's ranks."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        launch(nproc, argv)


def launch(nproc: int, argv: list[str]) -> NoReturn:
    """Become `torchrun` running this same command (without --nproc) in `nproc`
    processes on this machine. torchrun passes SIGINT and SIGTERM on to the ranks and
    stops them all when one fails; each rank also ends if torchrun itself is killed."""
    args = _without_nproc(argv)
    if not args or args[0] != "train":
        args = ["train", *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", str(nproc), "-m", "flows.cli", *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, torchrun)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
