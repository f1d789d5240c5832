"""The alignment cycle as a Prefect flow, one alias at a time:

    snapshot the store -> enough new feedback since the last judged run? -> class
    weights -> train a LoRA adapter with KTO -> gate it against the adapter serving
    now -> register -> (generation check) -> publish to every vLLM replica -> report

The flow only wires; each step's logic lives in pipeline/ or connectors/. Reading the
store and publishing retry (both are safe to repeat); training never retries: a run
that dies mid-training leaves a checkpoint that the next run on the same snapshot
resumes, or discards when the snapshot has changed.

Final states: Completed (a version was published), Completed named "Skipped" with the
reason as its message (another run holds the alias, too little new feedback, the gate
said no), Completed named "No gain" when training kept its starting point (nothing is
gated, registered or published; the run record's status is "no_gain"), or Failed with
the cause. Every run leaves a record and a markdown report
(also a Prefect artifact) with its plots beside it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from connectors.config import Settings, load_settings
from connectors.cycle_runs import CycleBusy, CycleRuns
from connectors.feedback.snapshots import load_training_data, write_snapshot
from connectors.feedback.store import FEEDBACK, FeedbackStore, StoreError
from connectors.feedback.vote_table import VoteTable
from connectors.serving.adapter_registry import AdapterRegistry, now_iso
from connectors.serving.publish import Publisher
from connectors.serving.vllm_admin import ServerUnreachable, VllmError
from deploy.local.processes import die_with_scheduler
from flows.report import render_report
from flows.user_code import load_callable
from pipeline.feedback.balance import Balance, choose_weights
from pipeline.feedback.continual import class_counts, new_votes, votes_since
from pipeline.feedback.examples import Example
from pipeline.feedback.snapshot import NothingToSnapshot, Snapshot, SnapshotOptions
from pipeline.promotion.canary import counted_since
from pipeline.promotion.cycle import NightPlan, Strategy, continues, plan_night
from pipeline.promotion.gate import (
    GateDecision,
    GenerationScores,
    Measurements,
    judge,
    too_few_heldout,
)
from pipeline.promotion.loop_metrics import CANARY
from pipeline.promotion.sampling import chat_prompts
from pipeline.promotion.shift import detect_shift
from pipeline.serving.registry import AliasHistory, served_name
from pipeline.training.manifest import NO_GAIN, Manifest

log = logging.getLogger("kto_loop.cycle")

PUBLISHED, SKIPPED, FAILED = "published", "skipped", "failed"


@dataclass
class RunRecord:
    """What a run did, saved as it goes (runs/<run_id>.json) and reported at the end."""

    run_id: str
    alias: str
    started_at: str
    flow_run_id: str | None = None
    status: str = "running"
    reason: str = ""
    finished_at: str | None = None
    seconds: float | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)
    snapshot: dict[str, Any] = field(default_factory=dict)
    new_votes: int | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    balance: dict[str, Any] = field(default_factory=dict)
    trained: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    version: str | None = None
    previous: str | None = None
    published: dict[str, Any] | None = None
    shift: dict[str, Any] | None = None
    canary: dict[str, Any] | None = None
    report: str | None = None
    plots: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class _Skip(Exception):
    """The run ends Completed, named Skipped, for this reason."""


class _NoGain(_Skip):
    """Training kept its starting point: the run ends Completed, named No gain."""


# ---------------------------------------------------------------- tasks


def _only_io_errors(exceptions: tuple[type[BaseException], ...]) -> Callable[..., bool]:
    """A retry condition: the task failed with one of `exceptions`, raised or as the
    cause of what was raised (a publish that failed because a replica was unreachable)."""

    def retry(task: Any, task_run: Any, state: State) -> bool:
        try:
            state.result()
        except BaseException as exc:
            while exc is not None:
                if isinstance(exc, exceptions):
                    return True
                exc = exc.__cause__
        return False

    return retry


@task(
    name="snapshot-store",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_only_io_errors((StoreError, OSError)),
    cache_policy=NO_CACHE,
)
def snapshot_store(
    settings: Settings,
    builds_on: dict[str, str | None] | None = None,
    window_days: float | None = None,
    read_up_to: dict[tuple[str, int], int] | None = None,
    options: SnapshotOptions | None = None,
) -> tuple[Snapshot, Path, Snapshot | None] | str:
    """Freeze the store's feedback (the votes of the last `window_days`, when given)
    into a snapshot (content-addressed, so a retry writes the same one), its window
    naming the ids in `builds_on` (run_id, alias, version); with `read_up_to` (the
    offsets the last judged run read), also the snapshot of the votes stored since
    (None when they label nothing). `options` replaces [snapshot]'s (a night that
    weighs votes differently). Or say why there is nothing to freeze yet."""
    fs = FeedbackStore(settings.store.url, settings.store.storage_options)
    if fs.count(FEEDBACK) == 0:
        return f"no feedback in the store {settings.store.url} yet"
    # One fold of the store files added since the last snapshot: the whole snapshot,
    # the window and the new votes are all built from the table it leaves.
    votes = VoteTable(fs)
    options = options or settings.snapshot
    table, state = votes.folded()
    try:
        if window_days is None:
            snap = votes.snapshot(options, (table, state))
        else:
            now = dt.datetime.now(dt.UTC)
            snap = votes.snapshot(options, votes_since(table, window_days, now))
    except NothingToSnapshot as exc:
        return str(exc)
    if snap.window is not None and builds_on:
        snap = replace(snap, window=snap.window.built_on(**builds_on))
    new = None
    if read_up_to is not None:
        with contextlib.suppress(NothingToSnapshot):
            new = votes.snapshot(options, new_votes(table, read_up_to))
    return snap, write_snapshot(snap, Path(settings.snapshot.out_dir)), new


@task(name="train-candidate", retries=0, cache_policy=NO_CACHE)
def train_candidate(
    settings: Settings,
    runs: CycleRuns,
    snap: Snapshot,
    plan: NightPlan,
    balance: Balance,
    run_id: str,
) -> Manifest:
    """Train the candidate on the plan's examples (warm-started from, and referenced
    to, the served adapter when the plan continues it); resume the checkpoint a crashed
    run left on this snapshot and plan, or reuse the adapter it finished; start afresh
    on any other."""
    registry = AdapterRegistry(settings.registry.url, settings.registry.storage_options)
    with _local_version(registry, plan.reference) as served_dir:
        return _train_on(settings, runs, snap, plan, balance, run_id, served_dir)


def _train_on(
    settings: Settings,
    runs: CycleRuns,
    snap: Snapshot,
    plan: NightPlan,
    balance: Balance,
    run_id: str,
    served_dir: Path | None,
) -> Manifest:
    from connectors.training.run_dir import read_manifest
    from flows.training import TrainInputs, run_training_on
    from pipeline.training.errors import CheckpointMismatch

    cycle = settings.cycle
    out = runs.candidate_dir
    key = plan.candidate_key
    resume = runs.candidate_snapshot() == key
    finished = read_manifest(out) if resume else None
    if finished is not None:
        log.info("reusing the candidate a previous run finished on snapshot %s", snap.id)
        return finished
    if not resume:
        runs.fresh_candidate(key, run_id)
    general = []
    if cycle.general_data:
        g = load_training_data(cycle.general_data, settings.snapshot)
        general = g.records("train") + g.records("heldout")
    inputs = TrainInputs.from_snapshot(
        snap,
        balance,
        _base_model(settings),
        out,
        settings.train.repeats,
        general=general,
        chat_template=_chat_template(settings),
        resume=resume,
        progress=sys.stderr.isatty(),
        extra_manifest={"training_set": plan.train.summary()},
    )
    inputs = replace(
        inputs,
        train=plan.train.examples,
        heldout=plan.heldout,
        init_adapter=served_dir,
        reference_adapter=served_dir,
    )
    options, lora = settings.train, settings.lora
    try:
        result = run_training_on(inputs, options, lora, options.nproc)
    except CheckpointMismatch as exc:
        if not resume:
            raise
        # Same snapshot, other options or base model: the checkpoint is of no use.
        log.warning("discarding the candidate checkpoint: %s", exc)
        runs.fresh_candidate(key, run_id)
        result = run_training_on(replace(inputs, resume=False), options, lora, options.nproc)
    assert result.manifest is not None  # the cycle never pauses a run
    return result.manifest


@task(name="measure-candidate", retries=0, cache_policy=NO_CACHE)
def measure_candidate(
    settings: Settings,
    registry: AdapterRegistry,
    alias: str,
    candidate: Path,
    plan: NightPlan,
    train: list[Example],
) -> Measurements:
    """What the gate compares: the candidate and the serving version scored on the
    plan's held-out examples; with [gate] max_drift, the candidate's drift from the
    serving one on its own answers; judging by answers, both sides' answers to held-out
    prompts judged by a taste model fit on the `train` votes. Nothing is scored when
    the held-out examples are too few for the gate to judge."""
    from flows.adapter_scores import AnswerRequest, DriftRequest, score_adapters

    serving = registry.history(alias).current
    gate, heldout = settings.gate, plan.gate_heldout
    serving_name = served_name(alias, serving) if serving else "the base model"
    measured = Measurements(serving_name, len(heldout), continual=plan.continual)
    if too_few_heldout(len(heldout), gate) is not None:
        return measured
    drift = None
    if gate.measures_drift:
        reference = "serving" if serving else None
        drift = DriftRequest(
            "candidate", reference, gate.drift_prompts, gate.drift_max_tokens, settings.train.seed
        )
    with _local_version(registry, serving) as serving_dir:
        scores = score_adapters(
            _base_model(settings),
            {"serving": serving_dir, "candidate": candidate},
            heldout,
            settings.train,
            _chat_template(settings),
            drift,
            AnswerRequest(train) if gate.measures_answers else None,
        )
    return replace(
        measured,
        candidate=scores.metrics["candidate"],
        serving=scores.metrics["serving"],
        drift=scores.drift.per_token if scores.drift else None,
        answers=scores.answers,
    )


@task(name="register", retries=0, cache_policy=NO_CACHE)
def register_candidate(
    registry: AdapterRegistry, candidate: Path, parent: str | None, snap: Snapshot, run_id: str
) -> str:
    """Register the candidate with its lineage (parent, snapshot and its feedback window,
    this run), or find it registered by an earlier attempt."""
    existing = registry.find(candidate)
    if existing is not None:
        log.info("the candidate is already registered as %s", existing)
        return existing
    record = registry.add(
        candidate,
        parent=parent,
        snapshot_id=snap.id,
        snapshot_window=snap.window.as_dict() if snap.window else None,
        run_id=run_id,
        note=f"cycle {run_id}",
    )
    return record["version"]


@task(
    name="generation-check",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_only_io_errors((ServerUnreachable,)),
    cache_policy=NO_CACHE,
)
def generation_check(
    settings: Settings, publisher: Publisher, alias: str, version: str, heldout: list[Example]
) -> GenerationScores:
    """Ask the first replica the prompts of the `heldout` examples, once through the
    alias (what serves now; the base model when nothing does) and once through the
    candidate loaded under its own name, and score both sets of answers with the
    configured scorer."""
    gate = settings.gate
    scorer = load_callable(gate.scorer or "", "[gate] scorer")
    admin = publisher.admins[0]
    candidate = served_name(alias, version)
    admin.load(candidate, publisher.server_path(version))
    current = publisher.registry.history(alias).current
    serving_model = alias if current else admin.base_models()[0]
    scores: dict[str, list[float]] = {"candidate": [], "serving": []}
    for prompt in chat_prompts(heldout, gate.generation_prompts):
        for side, model in (("candidate", candidate), ("serving", serving_model)):
            answer = admin.chat(model, prompt, max_tokens=gate.generation_max_tokens).text
            scores[side].append(float(scorer(prompt, answer)))
    return GenerationScores.of(scores["candidate"], scores["serving"])


@task(
    name="publish",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_only_io_errors((ServerUnreachable,)),
    cache_policy=NO_CACHE,
)
def publish_version(publisher: Publisher, alias: str, version: str, run_id: str) -> dict[str, Any]:
    """Publish on every replica, all or nothing (a retry starts from the old state;
    retries and their delay come from [cycle])."""
    if publisher.registry.history(alias).current == version:
        return {"alias": alias, "version": version, "action": "already served"}
    return publisher.publish(alias, version, reason=f"alignment cycle {run_id}").as_dict()


@task(
    name="start-canary",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_only_io_errors((ServerUnreachable,)),
    cache_policy=NO_CACHE,
)
def start_canary(
    publisher: Publisher, alias: str, version: str, run_id: str, share: float, replacing: bool
) -> dict[str, Any]:
    """Start the canary on every replica, all or nothing (a retry starts from the old
    state)."""
    canary = publisher.registry.history(alias).canary
    if canary is not None and canary.version == version:
        return {"alias": alias, "version": version, "action": "canary already running"}
    reason = f"alignment cycle {run_id}"
    return publisher.start_canary(alias, version, share, reason, replace=replacing).as_dict()


# ---------------------------------------------------------------- the flow


@flow(
    name="kto-loop-alignment",
    log_prints=False,
    validate_parameters=True,
    on_running=[die_with_scheduler],
)
def alignment_cycle(config: str | None = None, alias: str | None = None) -> State:
    """One alignment cycle for `alias` (default: [cycle] alias) with the settings in
    `config` (a TOML file; default $KTO_LOOP_CONFIG, then defaults and environment)."""
    settings = load_settings(config)
    alias = alias or settings.cycle.alias
    runs = CycleRuns(settings.cycle.work_dir, alias)
    started = time.monotonic()
    run = RunRecord(
        run_id=dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6],
        alias=alias,
        started_at=now_iso(),
        flow_run_id=_flow_run_id(),
    )
    try:
        with runs.lock(run.run_id, settings.cycle.lock_wait_seconds):
            runs.save(run.as_dict())
            for crashed in runs.mark_crashed(run.run_id):
                log.warning("run %s died before it finished; this run takes over", crashed)
            _cycle(settings, alias, runs, run)
    except _NoGain as exc:
        run.status, run.reason = NO_GAIN, str(exc)
    except (_Skip, CycleBusy) as exc:
        run.status, run.reason = SKIPPED, str(exc)
    except Exception as exc:
        run.status, run.reason = FAILED, f"{type(exc).__name__}: {exc}"
        _finish(runs, run, started)
        raise
    _finish(runs, run, started)
    if run.status == SKIPPED:
        return Completed(name="Skipped", message=f"skipped: {run.reason}", data=run.as_dict())
    if run.status == CANARY:
        return Completed(name="Canary", message=run.reason, data=run.as_dict())
    if run.status == NO_GAIN:
        return Completed(name="No gain", message=f"no gain: {run.reason}", data=run.as_dict())
    return Completed(message=run.reason, data=run.as_dict())


def _cycle(settings: Settings, alias: str, runs: CycleRuns, run: RunRecord) -> None:
    _base_model(settings)  # fail before any work when it is not configured
    registry = AdapterRegistry(settings.registry.url, settings.registry.storage_options)
    history = registry.history(alias)
    served = history.current
    _wait_for_canary(settings, history)
    strategy, options = _respond_to_shift(settings, alias, served, runs, run)
    snap, new = _take_snapshot(settings, alias, runs, run, served, strategy, options)
    plan = _plan(settings, alias, served, snap, new, run, strategy)
    balance = _choose_balance(settings, plan, run)
    report_dir = _train(settings, runs, run, snap, plan, balance)
    _promote(settings, alias, runs, run, snap, plan, report_dir)


def _plan(
    settings: Settings,
    alias: str,
    served: str | None,
    snap: Snapshot,
    new: Snapshot | None,
    run: RunRecord,
    strategy: Strategy,
) -> NightPlan:
    """Tonight's plan (pipeline/promotion/cycle.py), recorded and logged."""
    plan = plan_night(
        strategy,
        alias,
        served,
        snap,
        new,
        settings.train.repeats,
        settings.cycle.replay_fraction,
        settings.gate,
    )
    run.plan = plan.record()
    train = plan.train
    log.info(
        "%s: %s; %d examples (%d new, %d replayed), on-policy share %.2f",
        plan.strategy,
        plan.why,
        len(train.examples),
        train.new,
        train.replay,
        train.on_policy_share,
    )
    return plan


def _wait_for_canary(settings: Settings, history: AliasHistory) -> None:
    """Skip the night while a canary runs, unless a new candidate may replace it."""
    canary = history.canary
    if canary is None or settings.canary.on_new_candidate == "replace":
        return
    raise _Skip(
        f"a canary of {served_name(history.alias, canary.version)} runs since "
        f"{canary.started_at}: the night waits for its verdict ([canary] on_new_candidate "
        "= wait)"
    )


def _respond_to_shift(
    settings: Settings, alias: str, served: str | None, runs: CycleRuns, run: RunRecord
) -> tuple[Strategy, SnapshotOptions]:
    """Tonight's strategy and snapshot options: as configured, unless the served
    version's liked share fell below its own past since the last judged run (the
    users' taste shifted); then, by [cycle] on_shift, the votes get a half-life of half
    the votes cast since that run, and the night retrains from the base."""
    cycle, options = settings.cycle, settings.snapshot
    last = runs.last_judged()
    if served is None or last is None:
        return cycle.strategy, options
    fs = FeedbackStore(settings.store.url, settings.store.storage_options)
    if fs.count(FEEDBACK) == 0:
        return cycle.strategy, options
    since = dt.datetime.fromisoformat(last["started_at"])
    votes, _ = VoteTable(fs).read()
    shift = detect_shift(votes, served_name(alias, served), since, cycle.shift_alpha)
    run.shift = shift.as_dict()
    if not shift.shifted or cycle.on_shift == "ignore":
        log.info("shift check: %s", shift.reason)
        return cycle.strategy, options
    half_life = max(1, counted_since(votes, since) // 2)
    strategy: Strategy = "retrain" if cycle.on_shift == "retrain" else cycle.strategy
    run.shift["response"] = (
        f"{strategy}, votes weighed with a half-life of {half_life} votes (half of those "
        f"cast since run {last['run_id']})"
    )
    log.warning("%s: %s", shift.reason, run.shift["response"])
    return strategy, replace(options, half_life_votes=half_life, half_life_days=None)


def _take_snapshot(
    settings: Settings,
    alias: str,
    runs: CycleRuns,
    run: RunRecord,
    served: str | None,
    strategy: Strategy,
    options: SnapshotOptions,
) -> tuple[Snapshot, Snapshot | None]:
    """Snapshot the store, its window naming this run and what the alias serves; skip
    unless enough votes came since the last judged run. A continual night (something
    serves) also learns which examples were voted on since that run; a retrain reads
    the last `[cycle] window_days` only."""
    builds_on = {"run_id": run.run_id, "alias": alias, "version": served}
    last = runs.last_judged()
    cycle = settings.cycle
    continual = continues(strategy, served)
    read_up_to = _read_up_to(last) if continual else None
    window = None if continual else cycle.window_days
    with _timed(run, "snapshot"):
        taken = snapshot_store(settings, builds_on, window, read_up_to, options)
    if isinstance(taken, str):
        raise _Skip(taken)
    snap, snap_path, new = taken
    c = snap.counts
    run.snapshot = {
        "id": snap.id,
        "path": str(snap_path),
        "votes": snap.stats.votes,
        "rows_read": snap.stats.rows_read,
        **{k: getattr(c, k) for k in vars(c)},
        "read_up_to": [
            [p.topic, p.partition, p.last_read]
            for p in (snap.window.partitions if snap.window else ())
        ],
    }
    run.new_votes = snap.stats.votes - (last["snapshot"]["votes"] if last else 0)
    if last and last["snapshot"].get("id") == snap.id:
        run.new_votes = 0
    if run.new_votes < settings.cycle.min_new_votes:
        since = f"since run {last['run_id']}" if last else "in the store"
        raise _Skip(
            f"{max(run.new_votes, 0)} new votes {since}, fewer than cycle.min_new_votes="
            f"{settings.cycle.min_new_votes}"
        )
    return snap, new


def _read_up_to(last: dict[str, Any] | None) -> dict[tuple[str, int], int]:
    """The offsets the last judged run's snapshot read, per topic partition (none: every
    vote is new)."""
    if last is None:
        return {}
    return {(t, int(p)): int(o) for t, p, o in last.get("snapshot", {}).get("read_up_to", [])}


def _choose_balance(settings: Settings, plan: NightPlan, run: RunRecord) -> Balance:
    balance = choose_weights(*class_counts(plan.train.examples), settings.balance)
    run.balance = {
        "lambda_desirable": balance.lambda_desirable,
        "lambda_undesirable": balance.lambda_undesirable,
        "explanation": balance.explanation,
    }
    if balance.skip_reason is not None:
        raise _Skip(balance.skip_reason)
    return balance


def _train(
    settings: Settings,
    runs: CycleRuns,
    run: RunRecord,
    snap: Snapshot,
    plan: NightPlan,
    balance: Balance,
) -> Path:
    """Train the candidate and record it; stop with no gain when it kept its start.
    Returns the run's report directory (its plots are there)."""
    with _timed(run, "train"):
        manifest = train_candidate(settings, runs, snap, plan, balance, run.run_id)
    run.trained = True
    run.training = {
        "status": manifest.status,
        "status_reason": manifest.status_reason,
        "judge": manifest.judge,
        "steps": manifest.steps,
        "planned_steps": manifest.planned_steps,
        "best_step": manifest.best_step,
        "stopped_early": manifest.stopped_early,
        "stop_reason": manifest.stop_reason,
        "resumed_from_step": manifest.resumed_from_step,
        "seconds": manifest.seconds,
        "heldout_before": manifest.metrics.heldout_before,
        "heldout_after": manifest.metrics.heldout_after,
        "warnings": list(manifest.warnings),
        "notes": list(manifest.notes),
        # A continual night starts from the served adapter and measures against it.
        "init_adapter": manifest.init_adapter,
        "reference_adapter": manifest.reference_adapter,
    }
    report_dir = runs.report_dir(run.run_id)
    for plot in manifest.plots:
        shutil.copyfile(runs.candidate_dir / plot, report_dir / Path(plot).name)
        run.plots.append(str(report_dir / Path(plot).name))
    runs.save(run.as_dict())
    if manifest.status == NO_GAIN:
        # The candidate is the starting point: gating it would only measure noise.
        runs.clear_candidate()
        raise _NoGain(f"training kept its starting point: {manifest.status_reason}")
    return report_dir


def _promote(
    settings: Settings,
    alias: str,
    runs: CycleRuns,
    run: RunRecord,
    snap: Snapshot,
    plan: NightPlan,
    report_dir: Path,
) -> None:
    """Gate the candidate, register it, run the generation check when the gate asks
    for it, and publish it; skip with the gate's reason when it is refused."""
    registry = AdapterRegistry(settings.registry.url, settings.registry.storage_options)
    with _timed(run, "gate"):
        train = snap.records("train", "weight")
        measured = measure_candidate(settings, registry, alias, runs.candidate_dir, plan, train)
        decision = judge(measured, settings.gate)
    run.previous = registry.history(alias).current
    _record_gate(run, decision, report_dir)
    if not decision.promote:
        runs.clear_candidate()
        raise _Skip(decision.reason)

    with _timed(run, "register"):
        version = register_candidate(registry, runs.candidate_dir, run.previous, snap, run.run_id)
    run.version = version
    runs.save(run.as_dict())
    publisher = Publisher(registry, settings.serving)
    if decision.generation_due:
        with _timed(run, "generation_check"):
            scores = generation_check(settings, publisher, alias, version, plan.gate_heldout)
        decision = judge(replace(decision.measured, generation=scores), settings.gate)
        _record_gate(run, decision, report_dir)
        if not decision.promote:
            _retire_quietly(publisher, served_name(alias, version))
            runs.clear_candidate()
            raise _Skip(decision.reason)

    if settings.canary.enabled and run.previous is not None:
        _start_canary(settings, publisher, alias, version, run)
        runs.clear_candidate()
        return
    publish = publish_version.with_options(
        retries=settings.cycle.publish_retries,
        retry_delay_seconds=settings.cycle.publish_retry_delay_seconds,
    )
    with _timed(run, "publish"):
        run.published = publish(publisher, alias, version, run.run_id)
    runs.clear_candidate()
    run.status = PUBLISHED
    run.reason = f"published {served_name(alias, version)} as {alias}"


def _start_canary(
    settings: Settings, publisher: Publisher, alias: str, version: str, run: RunRecord
) -> None:
    """Put the candidate beside the served version for [canary] share of the alias's
    conversations; live votes decide (flows/canary.py)."""
    start = start_canary.with_options(
        retries=settings.cycle.publish_retries,
        retry_delay_seconds=settings.cycle.publish_retry_delay_seconds,
    )
    share = settings.canary.share
    replacing = settings.canary.on_new_candidate == "replace"
    with _timed(run, "publish"):
        run.published = start(publisher, alias, version, run.run_id, share, replacing)
    run.status = CANARY
    run.reason = (
        f"started a canary: {served_name(alias, version)} answers {share:.0%} of {alias}'s "
        f"conversations beside {served_name(alias, run.previous or '')}; live votes decide"
    )


@contextlib.contextmanager
def _timed(run: RunRecord, step: str) -> Iterator[None]:
    """Add the step's wall time to the run record, also when it fails."""
    started = time.monotonic()
    try:
        yield
    finally:
        run.step_seconds[step] = round(time.monotonic() - started, 3)


def _record_gate(run: RunRecord, decision: GateDecision, report_dir: Path) -> None:
    from connectors.plots import plot_gate

    run.gate = decision.as_dict()
    if decision.checks:
        name = decision.measured.serving_name
        path = plot_gate(run.gate["checks"], name, decision.promote, report_dir / "gate.png")
        if str(path) not in run.plots:
            run.plots.append(str(path))


def _finish(runs: CycleRuns, run: RunRecord, started: float) -> None:
    run.finished_at = now_iso()
    run.seconds = round(time.monotonic() - started, 3)
    report_dir = runs.report_dir(run.run_id)
    markdown = render_report(run.as_dict())
    (report_dir / "report.md").write_text(markdown)
    run.report = str(report_dir / "report.md")
    runs.save(run.as_dict())
    _artifact(markdown, run.alias)


def _artifact(markdown: str, alias: str) -> None:
    """The report as a Prefect markdown artifact, keyed by alias so that the UI shows
    each alias's runs as one artifact's history."""
    from prefect.artifacts import create_markdown_artifact

    key = "kto-loop-" + "".join(ch if ch.isalnum() else "-" for ch in alias.lower())
    try:
        create_markdown_artifact(markdown, key=key, description=f"alignment cycle of {alias}")
    except Exception:
        log.exception("could not create the Prefect artifact (the report is on disk)")


# ---------------------------------------------------------------- helpers


def _base_model(settings: Settings) -> Path:
    if not settings.serving.base_model:
        raise ValueError(
            "[serving] base_model is not set: a cycle trains on the served base model, so "
            "set it to that model's directory as this machine sees it"
        )
    return Path(settings.serving.base_model)


def _chat_template(settings: Settings) -> str | None:
    path = settings.cycle.chat_template
    return Path(path).read_text() if path else None


def _local_version(registry: AdapterRegistry, version: str | None) -> Any:
    if version is None:
        return contextlib.nullcontext(None)
    return registry.local_copy(version)


def _retire_quietly(publisher: Publisher, name: str) -> None:
    try:
        publisher.admins[0].retire(name)
    except VllmError:
        log.exception("could not retire %s after the generation check refused it", name)


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    value = flow_run.id
    return str(value) if value else None


def run_cycle(config: str | None = None, alias: str | None = None) -> State:
    """Run one cycle now (ephemeral Prefect unless PREFECT_API_URL points at a server);
    return its final state."""
    return alignment_cycle(config=config, alias=alias, return_state=True)
