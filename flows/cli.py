"""The `kto-loop` command line."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from flows.console import err, settings_from, setup_logging

app = typer.Typer(
    help="kto-loop: production thumbs up/down -> KTO-trained LoRA adapters in vLLM.",
    no_args_is_help=True,
    add_completion=False,
    # Help text is Markdown: a paragraph's lines are joined and rewrapped to the terminal
    # (docstrings break lines where the source does), and "[serving] base_model" stays
    # as written (Rich markup would take "[serving]" for a style and drop it).
    rich_markup_mode="markdown",
)
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: $KTO_LOOP_CONFIG)."),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")]


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
    from flows import ingest_cli

    ingest_cli.ingest(settings_from(config), idle_exit, status, log_level)


@app.command("produce-sample")
def produce_sample(
    config: ConfigOption = None,
    events: Annotated[int, typer.Option(min=0, help="How many valid events.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic users.")] = 0,
    malformed: Annotated[
        bool, typer.Option(help="Also send one message of every malformed kind.")
    ] = False,
    pad_to: Annotated[int, typer.Option(help="Grow responses to about this many chars.")] = 0,
    adapter: Annotated[
        str | None,
        typer.Option(
            "--adapter",
            help="Credit the events to this served version (alias@vN); default: none, "
            "as votes on the base model.",
        ),
    ] = None,
) -> None:
    """Send synthetic feedback events to the feedback topic."""
    from flows import ingest_cli

    ingest_cli.produce_sample(settings_from(config), events, seed, malformed, pad_to, adapter)


@app.command("serve-feedback")
def serve_feedback(
    config: ConfigOption = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Override [feedback_http] host.")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Override [feedback_http] port.")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes serving the port.")
    ] = 1,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve POST /v1/feedback: validate events as ingest does and produce them to the
    feedback topic, answering 202 once the broker has them (also /healthz, /metrics).

    SIGTERM or Ctrl-C stops taking requests, finishes those in flight, flushes the
    producer, and ends the process by that signal (as uvicorn does). Exit codes: 1 could
    not start, 2 bad config.
    """
    from flows import feedback_http_cli

    setup_logging(log_level, rich=sys.stderr.isatty())
    feedback_http_cli.serve(settings_from(config), config, host, port, workers, log_level)


@app.command()
def store(
    config: ConfigOption = None,
    compact: Annotated[
        bool,
        typer.Option(
            "--compact",
            help="First merge each partition's small batch files into files of about "
            "--target-mb (crash-safe; safe beside a running ingest).",
        ),
    ] = False,
    target_mb: Annotated[
        int, typer.Option("--target-mb", min=1, help="Size of a compacted file, MB.")
    ] = 128,
) -> None:
    """Summarise the feedback store: rows, labels, dead letters by kind."""
    from flows import ingest_cli

    ingest_cli.store(settings_from(config), target_mb if compact else None)


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
    from flows import ingest_cli

    ingest_cli.snapshot(settings_from(config), data, out)


@app.command("import")
def import_(
    source: Annotated[Path, typer.Argument(help="An export file, or a directory of them.")],
    from_: Annotated[
        str,
        typer.Option(
            "--from",
            help="openwebui, langsmith, langfuse or openai (TRL datasets: use "
            "`kto-loop snapshot --data`).",
        ),
    ],
    to: Annotated[str, typer.Option("--to", help="kafka (the feedback topic) or snapshot.")] = (
        "kafka"
    ),
    config: ConfigOption = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Base model of records that name none.")
    ] = None,
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key",
            help="LangSmith feedback key / Langfuse score name that is a thumbs (repeat; "
            "'*' for any; default user_score, user_feedback, thumbs, feedback, vote).",
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="A [0, 1] score above is a like, below a dislike.")
    ] = 0.5,
    category: Annotated[
        list[str] | None,
        typer.Option("--category", help="VALUE=like or VALUE=dislike for a word (repeat)."),
    ] = None,
    rating_field: Annotated[
        list[str] | None,
        typer.Option("--rating-field", help="Dotted path of an OpenAI log's thumbs (repeat)."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Report of what was not imported (default ./import-FORMAT-report.jsonl)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Snapshot directory with --to snapshot (default: snapshot.out_dir)."
        ),
    ] = None,
) -> None:
    """Import thumbs from Open WebUI, LangSmith, Langfuse or OpenAI-style logs into the
    feedback topic or a snapshot; the last line of stdout is a JSON summary."""
    from flows import import_cli

    options = import_cli.options_from(model, key, threshold, category, rating_field)
    import_cli.import_feedback(settings_from(config), from_, source, to, options, report, out)


NprocOption = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        min=1,
        help="Processes (GPUs) to train on, launched with torchrun on this machine; the base "
        "model is sharded across them (FSDP2). Default: [train] nproc.",
    ),
]


@app.command()
def train(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="A snapshot (directory or records.parquet), or a TRL .jsonl/.parquet file.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the adapter and its reports.")],
    config: ConfigOption = None,
    base_model: Annotated[
        Path | None,
        typer.Option(
            "--base-model",
            help="Local directory of the causal LM that vLLM serves (default: [serving] "
            "base_model).",
        ),
    ] = None,
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
    nproc: NprocOption = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Train a LoRA adapter with KTO; the last line of stdout is a JSON summary.

    "status" is "trained"; "no_gain" when no evaluated step's sampled answers were
    judged better than the starting point's, so the adapter written is the starting
    point (a fresh LoRA is the base model; with --init-adapter, that adapter), with
    "status_reason" saying so; "unjudged" when the taste model that judges answers was
    too weak to trust (the last step is written; the gate never offers it); "skipped"
    for too little data (no adapter is written). "skipped_rows" counts data rows left
    out as unreadable.

    Exit codes: 0 trained, no_gain, unjudged or skipped (see "status"), 1 the run failed
    (diverged, general-ability bound), 2 bad input.
    """
    from flows import train_cli

    settings = settings_from(config)
    train_cli.launch_if_several(nproc or settings.train.nproc, sys.argv[1:])
    setup_logging(log_level, rich=sys.stderr.isatty())
    train_cli.train(
        settings,
        base_model,
        data,
        out,
        init_adapter=init_adapter,
        reference_adapter=reference_adapter,
        general=general,
        chat_template=chat_template,
        max_steps=max_steps,
        seed=seed,
        resume=resume,
    )


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of the feedback event, for frontend teams."""
    from pipeline.feedback.events import json_schema

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

    serving_cli.register(settings_from(config), adapter_dir, parent, note)


@app.command()
def publish(
    adapter: Annotated[
        str, typer.Option("--adapter", help="A registry version (v7), or an adapter directory.")
    ],
    alias: Annotated[str, typer.Option("--alias", help="The model name clients call.")],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the alias history.")] = "",
    canary: Annotated[
        float | None,
        typer.Option(
            "--canary",
            help="Start a canary instead: the version answers this share of the alias's "
            "conversations (e.g. 0.1), the served version the rest, until `kto-loop "
            "end-canary` or `kto-loop rollback`.",
        ),
    ] = None,
    replace_canary: Annotated[
        bool,
        typer.Option(
            "--replace-canary",
            help="With --canary: end the alias's running canary (as replaced) instead of refusing.",
        ),
    ] = False,
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Serve a version as ALIAS on every replica, all or nothing, without a restart; or,
    with --canary, beside the served version for a share of the conversations."""
    from flows import serving_cli

    if replace_canary and canary is None:
        raise typer.BadParameter("--replace-canary needs --canary", param_hint="--replace-canary")
    setup_logging(log_level, rich=sys.stderr.isatty())
    serving_cli.publish(settings_from(config), adapter, alias, reason, canary, replace_canary)


class CanaryOutcome(StrEnum):
    promoted = "promoted"
    stopped = "stopped"


@app.command("end-canary")
def end_canary(
    alias: Annotated[str, typer.Option("--alias", help="The model name clients call.")],
    outcome: Annotated[
        CanaryOutcome,
        typer.Option(
            "--outcome",
            help="promoted: serve the candidate to everyone; stopped: serve the served "
            "version to everyone again.",
        ),
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the alias history.")] = "",
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """End the alias's canary on every replica, all or nothing (`kto-loop rollback` ends
    it too, as rolled back)."""
    from flows import serving_cli

    setup_logging(log_level, rich=sys.stderr.isatty())
    serving_cli.end_canary(settings_from(config), alias, outcome.value, reason)


@app.command("check-canary")
def check_canary(
    alias: Annotated[
        str | None, typer.Option("--alias", help="The alias ([cycle] alias by default).")
    ] = None,
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Check the alias's canary once: count each arm's live votes and promote, roll back
    or stop it inconclusive when the sequential test is final (what `kto-loop schedule`
    runs every [canary] check_every_minutes). The last line is the check as JSON."""
    from flows.canary import check_canary as check

    setup_logging(log_level, rich=sys.stderr.isatty())
    settings = settings_from(config)
    result = check(settings, alias or settings.cycle.alias)
    verdict = result.get("verdict") or {}
    if verdict:
        err.print(f"{result['status']}: {verdict['reason']}", markup=False)
    else:
        err.print(f"{result['alias']} runs no canary", markup=False)
    typer.echo(json.dumps(result, default=str))


@app.command()
def rollback(
    alias: Annotated[str, typer.Option("--alias", help="The model name clients call.")],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the alias history.")] = "",
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Serve the version before the current one again, on every replica; during a
    canary, end the canary instead (the served version stays)."""
    from flows import serving_cli

    setup_logging(log_level, rich=sys.stderr.isatty())
    serving_cli.rollback(settings_from(config), alias, reason)


@app.command()
def sync(
    alias: Annotated[str, typer.Option("--alias", help="The model name clients call.")],
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Make every replica serve the alias's recorded version and canary (a restarted or new
    replica)."""
    from flows import serving_cli

    setup_logging(log_level, rich=sys.stderr.isatty())
    serving_cli.sync(settings_from(config), alias)


@app.command()
def adapters(
    config: ConfigOption = None,
    lineage: Annotated[
        str | None,
        typer.Option(
            "--lineage",
            help="Trace this version (v7) back to the first: snapshots, feedback windows, "
            "parents and references (no server is asked).",
        ),
    ] = None,
    votes: Annotated[
        bool,
        typer.Option(
            "--votes", help="With --lineage: list the store's votes inside the version's window."
        ),
    ] = False,
) -> None:
    """List versions with their lineage, the aliases, and what each replica serves; or
    trace one version back to the feedback that made it (--lineage, --votes)."""
    from flows import lineage_cli, serving_cli

    settings = settings_from(config)
    if lineage is None:
        if votes:
            raise typer.BadParameter("--votes needs --lineage VERSION", param_hint="--votes")
        serving_cli.adapters(settings)
    elif votes:
        lineage_cli.window_votes(settings, lineage)
    else:
        lineage_cli.lineage(settings, lineage)


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete old versions no alias serves, no rollback needs and no server still reads."""
    from flows import serving_cli

    serving_cli.gc(settings_from(config), dry_run)


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

    setup_logging(log_level, rich=sys.stderr.isatty())
    cycle_cli.run(settings_from(config), config, alias)


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

    setup_logging(log_level, rich=sys.stderr.isatty())
    cycle_cli.schedule(settings_from(config), config, alias, cron, interval, start_server)


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

    cycle_cli.status(settings_from(config), alias or [], runs)


@app.command()
def metrics(
    config: ConfigOption = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of /metrics.")] = 9309,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on: loopback by default; 0.0.0.0 for every interface "
            "(for a Prometheus on another machine)."
        ),
    ] = "127.0.0.1",
    cache_seconds: Annotated[
        float, typer.Option(min=0.0, help="Scrapes this close reuse one reading.")
    ] = 10.0,
    store_refresh_seconds: Annotated[
        float,
        typer.Option(
            min=0.0, help="Least time between two reads of the votes (and most between retries)."
        ),
    ] = 300.0,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve the alignment loop's Prometheus metrics (cycle outcomes, served versions,
    liked share, publish latency) until SIGTERM or Ctrl-C."""
    from flows import metrics_cli

    metrics_cli.metrics(
        settings_from(config), port, host, cache_seconds, store_refresh_seconds, log_level
    )


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
    from flows import simulate_cli

    simulate_cli.simulate(
        settings_from(config),
        model=model,
        prompts=prompts,
        taste=taste,
        users=users,
        chats=chats,
        seed=seed,
        temperature=temperature,
        max_tokens=max_tokens,
        send=send,
    )


@app.command("local-stack")
def local_stack(
    model: Annotated[
        Path, typer.Option("--model", help="The model directory to serve (config.json, weights).")
    ],
    root: Annotated[
        Path, typer.Option("--root", help="Store, registry, snapshots, runs and logs go here.")
    ] = Path("data/local"),
    kafka_port: Annotated[int, typer.Option("--kafka-port", min=1, max=65535)] = 9092,
    vllm_port: Annotated[int, typer.Option("--vllm-port", min=1, max=65535)] = 8000,
    prefect_port: Annotated[int, typer.Option("--prefect-port", min=1, max=65535)] = 4200,
    host: Annotated[
        str, typer.Option("--host", help="The address vLLM listens on (others: 127.0.0.1).")
    ] = "127.0.0.1",
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Check this config against the stack instead of writing ROOT/kto-loop.toml.",
        ),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="vLLM's --dtype.")] = "auto",
    max_model_len: Annotated[
        int | None,
        typer.Option("--max-model-len", min=1, help="Default: the model's, at most 4096."),
    ] = None,
    max_lora_rank: Annotated[int, typer.Option("--max-lora-rank", min=1)] = 8,
) -> None:
    """Start the broker, vLLM (with the swap plugin) on MODEL and a Prefect server, print
    where each listens and the config file to use, and stop them all on Ctrl-C or SIGTERM.

    The vLLM API key comes from KTO_LOOP_SERVING__API_KEY and the admin key from
    KTO_LOOP_SERVING__ADMIN_KEY when set. Exit codes: 130 Ctrl-C, 143 SIGTERM, 1 a part
    failed or died, 2 bad input.
    """
    from flows import local_stack_cli

    options = local_stack_cli.StackOptions(
        model=model,
        root=root.resolve(),
        kafka_port=kafka_port,
        vllm_port=vllm_port,
        prefect_port=prefect_port,
        host=host,
        config=config,
        dtype=dtype,
        max_model_len=max_model_len,
        max_lora_rank=max_lora_rank,
    )
    local_stack_cli.local_stack(options)


if __name__ == "__main__":
    app()
