"""The `kto-loop` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from kafka.errors import KafkaError
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from connectors.config import ConfigError, Settings, load_settings
from connectors.ingest import IngestError, Ingestor, IngestStats
from connectors.kafka_clients import BrokerUnavailable
from connectors.store import DEAD_LETTERS, FEEDBACK, FeedbackStore

app = typer.Typer(
    help="kto-loop: production thumbs up/down -> KTO-trained LoRA adapters in vLLM.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: $KTO_LOOP_CONFIG)."),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        _fail(exc, 2)


def _fail(exc: Exception, code: int) -> NoReturn:
    # soft_wrap: a path or URL in the message stays whole in logs (no fold at 80 columns).
    err.print(str(exc), style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def _logging(level: str, rich: bool) -> None:
    handler: logging.Handler
    if rich:
        handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, handlers=[handler], force=True)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


class _StatusLine:
    """A one-line live view of an ingest process: rate, lag, dead letters."""

    def __init__(self, stats: IngestStats) -> None:
        self.stats = stats
        self._samples: deque[tuple[float, int]] = deque(maxlen=10)

    def __rich__(self) -> Text:
        s = self.stats
        now = time.monotonic()
        self._samples.append((now, s.consumed))
        t0, c0 = self._samples[0]
        rate = (s.consumed - c0) / (now - t0) if now > t0 else 0.0
        lag = "?" if s.lag is None else f"{s.lag:,}"
        return Text.assemble(
            (f"{s.state:<18}", "bold cyan"),
            f" consumed {s.consumed:>10,}  ",
            (f"{rate:>9,.0f}/s", "green"),
            f"  stored {s.stored:>10,}  lag {lag:>8}  ",
            (f"dead letters {s.dead_lettered:,}", "yellow" if s.dead_lettered else ""),
            f"  partitions {len(s.assigned)}",
        )


@app.command()
def ingest(
    config: ConfigOption = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(help="Exit 0 once the assigned partitions have been quiet this many seconds."),
    ] = None,
    status: Annotated[bool, typer.Option(help="Show a live status line on a terminal.")] = True,
    log_level: LogLevel = "INFO",
) -> None:
    """Consume the feedback topic into the store until SIGTERM or Ctrl-C (finishes the
    batch, commits, exits 0)."""
    settings = _settings(config)
    live = status and err.is_terminal
    _logging(log_level, rich=live)
    try:
        ingestor = Ingestor(settings)
    except IngestError as exc:
        _fail(exc, 2)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("kto_loop").info(
            "%s: finishing the batch, then exiting", signal.Signals(signum).name
        )
        stop.set()
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if live:
            with Live(_StatusLine(ingestor.stats), console=err, refresh_per_second=2):
                stats = ingestor.run(stop, idle_exit_seconds=idle_exit)
        else:
            stats = ingestor.run(stop, idle_exit_seconds=idle_exit)
    except BrokerUnavailable as exc:
        _fail(exc, 3)
    except IngestError as exc:
        _fail(exc, 1)
    typer.echo(
        json.dumps(
            {
                "consumed": stats.consumed,
                "stored": stats.stored,
                "dead_lettered": stats.dead_lettered,
                "batches": stats.batches,
            }
        )
    )


@app.command("produce-sample")
def produce_sample(
    config: ConfigOption = None,
    events: Annotated[int, typer.Option(min=0, help="How many valid events.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic users.")] = 0,
    malformed: Annotated[
        bool, typer.Option(help="Also send one message of every malformed kind.")
    ] = False,
    pad_to: Annotated[int, typer.Option(help="Grow responses to about this many chars.")] = 0,
) -> None:
    """Send synthetic feedback events to the feedback topic."""
    from rich.progress import Progress

    from connectors.produce import produce
    from pipeline.sample import sample_messages

    settings = _settings(config)
    _logging("WARNING", rich=False)
    # A failure is reported once below; kafka-python's per-retry lines add nothing.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    messages = sample_messages(events, seed, pad_to=pad_to, malformed=malformed)
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("producing", total=len(messages))
        try:
            sent = produce(settings.kafka, messages, on_sent=lambda n: progress.advance(task, n))
        except KafkaError as exc:
            servers = ",".join(settings.kafka.bootstrap_servers)
            _fail(RuntimeError(f"could not send to {settings.kafka.topic} at {servers}: {exc}"), 3)
    typer.echo(json.dumps({"sent": sent, "topic": settings.kafka.topic}))


@app.command()
def store(config: ConfigOption = None) -> None:
    """Summarise the feedback store: rows, labels, dead letters by kind."""
    from pipeline import records

    settings = _settings(config)
    fs = FeedbackStore(settings.store.url, settings.store.storage_options)
    rows = fs.read(FEEDBACK)
    dead = fs.read(DEAD_LETTERS)
    table = Table(title=f"feedback store {settings.store.url}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("feedback rows", f"{len(rows):,}")
    table.add_row("distinct events", f"{rows[records.EVENT_ID].nunique():,}")
    for name, count in rows[records.FEEDBACK].value_counts().sort_index().items():
        table.add_row(f"  {name}", f"{count:,}")
    table.add_row("dead letters", f"{len(dead):,}")
    for name, count in dead[records.ERROR_KIND].value_counts().sort_index().items():
        table.add_row(f"  {name}", f"{count:,}")
    Console().print(table)


@app.command()
def snapshot(
    config: ConfigOption = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="A TRL unpaired/paired .jsonl, .json or .parquet file (or a snapshot) "
            "instead of the feedback store.",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Snapshot directory (default: snapshot.out_dir).")
    ] = None,
) -> None:
    """Freeze the store's feedback (or a TRL dataset) into a content-addressed training
    snapshot; the last line of stdout is its JSON summary."""
    from connectors.snapshots import load_training_data, write_snapshot
    from connectors.store import StoreError
    from pipeline.snapshot import SnapshotError, build_snapshot

    settings = _settings(config)
    options = settings.snapshot.options()
    out_dir = out or Path(settings.snapshot.out_dir)
    try:
        if data is None:
            fs = FeedbackStore(settings.store.url, settings.store.storage_options)
            snap = build_snapshot(fs.read(FEEDBACK), options)
            source = settings.store.url
        else:
            snap = load_training_data(data, options)
            source = str(data)
    except SnapshotError as exc:
        _fail(exc, 2)
    except (StoreError, OSError) as exc:
        _fail(RuntimeError(f"could not read {data or settings.store.url}: {exc}"), 1)
    try:
        path = write_snapshot(snap, out_dir)
    except OSError as exc:
        _fail(RuntimeError(f"could not write the snapshot under {out_dir}: {exc}"), 1)

    c, s = snap.counts, snap.stats
    table = Table(title=f"snapshot {snap.id} from {source}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for label, value in [
        ("rows read", s.rows_read),
        ("  duplicates (counted once)", s.duplicates),
        ("  superseded by a later vote", s.superseded),
        ("  retracted", s.retracted),
        ("  unlabelled (neutral rating)", s.unlabelled),
        ("votes counted", s.votes),
        ("  tied examples", s.ties),
        ("  ties dropped", s.ties_dropped),
        ("rows skipped (unreadable)", s.skipped_rows),
        ("train desirable", c.train_desirable),
        ("train undesirable", c.train_undesirable),
        ("heldout desirable", c.heldout_desirable),
        ("heldout undesirable", c.heldout_undesirable),
    ]:
        table.add_row(label, f"{value:,}")
    Console().print(table)
    _warn_skipped(snap)
    typer.echo(
        json.dumps(
            {
                "snapshot": snap.id,
                "path": str(path),
                "examples": c.total,
                "train_desirable": c.train_desirable,
                "train_undesirable": c.train_undesirable,
                "heldout_desirable": c.heldout_desirable,
                "heldout_undesirable": c.heldout_undesirable,
                "skipped_rows": s.skipped_rows,
            }
        )
    )


def _warn_skipped(snap: Any) -> None:
    """Say on stderr which rows of the data were left out, and why (the first few)."""
    s = snap.stats
    if not s.skipped_rows:
        return
    err.print(
        f"warning: {s.skipped_rows} of {s.rows_read} rows skipped: a value in them cannot be read",
        style="yellow",
        markup=False,
    )
    for reason in s.skipped_reasons:
        err.print(f"  {reason}", style="yellow", markup=False, highlight=False)


@app.command()
def train(
    base_model: Annotated[
        Path,
        typer.Option("--base-model", help="Local directory of the causal LM that vLLM serves."),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="A snapshot (directory or records.parquet), or a TRL .jsonl/.parquet file.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the adapter and its reports.")],
    config: ConfigOption = None,
    init_adapter: Annotated[
        Path | None,
        typer.Option("--init-adapter", help="Warm start from this adapter (the served one)."),
    ] = None,
    reference_adapter: Annotated[
        Path | None,
        typer.Option(
            "--reference-adapter", help="Reference = this adapter (continual rounds), not the base."
        ),
    ] = None,
    general: Annotated[
        Path | None,
        typer.Option(
            "--general", help="General held-out records whose NLL is reported before and after."
        ),
    ] = None,
    chat_template: Annotated[
        Path | None,
        typer.Option("--chat-template", help="Jinja chat template for a tokenizer without one."),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Override [train] max_steps.")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override [train] seed.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")
    ] = False,
    log_level: LogLevel = "INFO",
) -> None:
    """Train a LoRA adapter with KTO; the last line of stdout is a JSON summary.

    "status" is "trained"; "no_gain" when no evaluated step beat the starting point on
    the held-out set, so the adapter written is the starting point (a fresh LoRA is the
    base model; with --init-adapter, that adapter), with "status_reason" saying so;
    "skipped" for too little data (no adapter is written). "skipped_rows" counts data
    rows left out as unreadable.

    Exit codes: 0 trained, no_gain or skipped (see "status"), 1 the run failed
    (diverged, general-ability bound), 2 bad input.
    """
    from connectors.snapshots import load_training_data
    from pipeline.balance import choose_weights
    from pipeline.encode import EncodeError
    from pipeline.snapshot import SnapshotError

    _logging(log_level, rich=sys.stderr.isatty())
    settings = _settings(config)
    try:
        snap = load_training_data(data, settings.snapshot.options())
        general_records = []
        if general is not None:
            g = load_training_data(general, settings.snapshot.options())
            general_records = g.records("train") + g.records("heldout")
        template = chat_template.read_text() if chat_template is not None else None
    except SnapshotError as exc:
        _fail(exc, 2)
    except OSError as exc:
        _fail(RuntimeError(f"could not read input: {exc}"), 2)
    _warn_skipped(snap)
    skipped_rows = snap.stats.skipped_rows
    balance = choose_weights(
        *snap.class_counts("train", settings.train.repeats), settings.balance.options()
    )
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

    from pipeline.trainer import DivergedError, GeneralAbilityError, TrainError, TrainInputs
    from pipeline.trainer import train as run_training

    _init_distributed()
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
        result = run_training(
            inputs, settings.train.options(max_steps=max_steps, seed=seed), settings.lora.options()
        )
    except (DivergedError, GeneralAbilityError) as exc:
        _fail(exc, 1)
    except (TrainError, EncodeError) as exc:
        _fail(exc, 2)
    m = result.manifest
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    if result.adapter_dir is None:
        typer.echo(json.dumps({"status": "paused", **m, "skipped_rows": skipped_rows}))
        return
    before = m["metrics"]["heldout_before"] or {}
    after = m["metrics"]["heldout_after"] or {}
    table = Table(title=f"adapter {out}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in ("loss", "accuracy", "reward_desirable", "reward_undesirable", "margin", "kl"):
        table.add_row(f"held-out {key}", _num(before.get(key)), _num(after.get(key)))
    general_nll = (m["metrics"]["general_nll_before"], m["metrics"]["general_nll_after"])
    if general_nll[0] is not None:
        table.add_row("general NLL / token", _num(general_nll[0]), _num(general_nll[1]))
    Console(stderr=True).print(table)
    for warning in m["warnings"]:
        err.print(f"warning: {warning}", style="yellow", markup=False)
    if m["status_reason"]:
        err.print(f"{m['status']}: {m['status_reason']}", style="yellow", markup=False)
    typer.echo(
        json.dumps(
            {
                "status": m["status"],
                "status_reason": m["status_reason"],
                "adapter": str(out),
                "snapshot": snap.id,
                "skipped_rows": skipped_rows,
                "steps": m["steps"],
                "best_step": m["best_step"],
                "lambda_desirable": balance.lambda_desirable,
                "lambda_undesirable": balance.lambda_undesirable,
                "heldout_accuracy_before": before.get("accuracy"),
                "heldout_accuracy_after": after.get("accuracy"),
                "heldout_margin_after": after.get("margin"),
                "heldout_kl_after": after.get("kl"),
                "general_nll_before": general_nll[0],
                "general_nll_after": general_nll[1],
                "seconds": m["seconds"],
            }
        )
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1), join the process group once, here at the entry
    point: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of the feedback event, for frontend teams."""
    from pipeline.events import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)


@app.command()
def register(
    adapter_dir: Annotated[Path, typer.Argument(help="A trained adapter directory.")],
    parent: Annotated[
        str | None, typer.Option("--parent", help="The version it was trained from.")
    ] = None,
    note: Annotated[str, typer.Option("--note", help="Free text kept with the version.")] = "",
    config: ConfigOption = None,
) -> None:
    """Copy an adapter into the registry as the next version (immutable from then on)."""
    from flows import serving_cli

    serving_cli.register(_settings(config), adapter_dir, parent, note)


@app.command()
def publish(
    adapter: Annotated[
        str, typer.Option("--adapter", help="A registry version (v7), or an adapter directory.")
    ],
    alias: Annotated[str, typer.Option("--alias", help="The model name clients call.")],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the alias history.")] = "",
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Serve a version as ALIAS on every replica, all or nothing, without a restart."""
    from flows import serving_cli

    _logging(log_level, rich=sys.stderr.isatty())
    serving_cli.publish(_settings(config), adapter, alias, reason)


@app.command()
def rollback(
    alias: Annotated[str, typer.Option("--alias", help="The model name clients call.")],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the alias history.")] = "",
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Serve the version before the current one again, on every replica."""
    from flows import serving_cli

    _logging(log_level, rich=sys.stderr.isatty())
    serving_cli.rollback(_settings(config), alias, reason)


@app.command()
def sync(
    alias: Annotated[str, typer.Option("--alias", help="The model name clients call.")],
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Make every replica serve the alias's recorded version (a restarted or new replica)."""
    from flows import serving_cli

    _logging(log_level, rich=sys.stderr.isatty())
    serving_cli.sync(_settings(config), alias)


@app.command()
def adapters(config: ConfigOption = None) -> None:
    """List versions with their lineage, the aliases, and what each replica serves."""
    from flows import serving_cli

    serving_cli.adapters(_settings(config))


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete old versions no alias serves, no rollback needs and no server still reads."""
    from flows import serving_cli

    serving_cli.gc(_settings(config), dry_run)


AliasOption = Annotated[
    str | None, typer.Option("--alias", help="The alias to run for (default: [cycle] alias).")
]


@app.command()
def run(
    config: ConfigOption = None, alias: AliasOption = None, log_level: LogLevel = "INFO"
) -> None:
    """Run one alignment cycle now: snapshot, train, gate, register, publish, report.

    Exit codes: 0 completed (published, no_gain: training kept its starting point, or
    skipped with the reason), 1 failed, 2 bad config.
    """
    from flows import cycle_cli

    _logging(log_level, rich=sys.stderr.isatty())
    cycle_cli.run(_settings(config), config, alias)


@app.command()
def schedule(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML config file.")],
    alias: AliasOption = None,
    cron: Annotated[
        str | None, typer.Option("--cron", help="Override [cycle] cron, e.g. '0 3 * * *'.")
    ] = None,
    interval: Annotated[
        float | None, typer.Option("--interval", help="Run every N seconds instead of a cron.")
    ] = None,
    start_server: Annotated[
        bool,
        typer.Option(
            "--start-server/--no-start-server",
            help="Start a local Prefect server when PREFECT_API_URL is not set.",
        ),
    ] = True,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve the nightly cycle as a Prefect deployment (one run at a time) until stopped."""
    from flows import cycle_cli

    _logging(log_level, rich=sys.stderr.isatty())
    cycle_cli.schedule(_settings(config), config, alias, cron, interval, start_server)


@app.command()
def status(
    config: ConfigOption = None,
    alias: Annotated[
        list[str] | None, typer.Option("--alias", help="Aliases to show (default: all).")
    ] = None,
    runs: Annotated[int, typer.Option("--runs", help="Runs to show per alias.")] = 10,
) -> None:
    """The last cycles and their decisions, what each alias serves, and the liked share
    each adapter version earned in production."""
    from flows import cycle_cli

    cycle_cli.status(_settings(config), alias or [], runs)


@app.command()
def simulate(
    config: ConfigOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Alias, version (chat@v7) or base model; default: the "
            "[cycle] alias if served, else the base model.",
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help='Recorded prompts, JSON lines: "text", '
            '{"prompt": ...} or {"messages": [...]}; default: the demo\'s.',
        ),
    ] = None,
    taste: Annotated[
        str, typer.Option("--taste", help="module:function (messages, answer) -> liked?")
    ] = "deploy.local.chat_model:taste",
    users: Annotated[int, typer.Option("--users", min=1)] = 20,
    chats: Annotated[int, typer.Option("--chats", min=1)] = 400,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 1.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 48,
    send: Annotated[
        bool, typer.Option("--send/--no-send", help="Send the votes to the feedback topic.")
    ] = True,
) -> None:
    """Simulated users chat with a served model, rate each answer with a taste, and send
    their votes to Kafka; the last line of stdout is the tally as JSON.

    Exit codes: 0 done, 1 the server or the broker failed, 2 bad input, 3 the broker
    could not be reached (checked before any chat).
    """
    from flows.simulate import simulate as run_simulation
    from flows.user_code import load_callable
    from pipeline.simulation import read_prompts

    settings = _settings(config)
    try:
        taste_fn = load_callable(taste, "--taste")
        if prompts is not None:
            asked = read_prompts(prompts)
        else:
            from deploy.local.chat_model import chat_prompts

            asked = [[{"role": "user", "content": p}] for p in chat_prompts()]
    except (ValueError, OSError) as exc:
        _fail(exc, 2)
    from connectors.vllm_admin import VllmError

    try:
        result = run_simulation(
            settings,
            asked,
            taste_fn,
            model=model,
            users=users,
            chats=chats,
            seed=seed,
            temperature=temperature,
            max_tokens=max_tokens,
            send=send,
            progress=sys.stderr.isatty(),
        )
    except BrokerUnavailable as exc:
        _fail(exc, 3)
    except (VllmError, KafkaError) as exc:
        _fail(exc, 1)
    table = Table(title=f"{result.chats} simulated chats with {result.model}")
    for col in ("served by", "chats", "liked", "liked share"):
        table.add_column(col)
    for name, (n, k) in sorted(result.by_model.items()):
        table.add_row(name, f"{n:,}", f"{k:,}", f"{k / n:.1%}")
    err.print(table)
    if result.failed:
        err.print(f"{result.failed} requests failed, e.g. {result.failures[0]}", style="yellow")
    typer.echo(json.dumps(result.as_dict()))


if __name__ == "__main__":
    app()
