"""The alignment cycle end to end, under Prefect (a test harness server), with feedback
from a real broker, the tiny model, and the session's real vLLM server: Kafka events to
a new adapter answering in vLLM; too little data skipped; a candidate no better than
the serving adapter never served (training on contrary votes keeps its starting point,
so nothing is gated or registered; a briefly trained one is refused by the gate); a second run refused while one trains; a killed run resumed with no
half-registered version; the schedule firing runs on a local Prefect server; and no
Prefect server or run left behind when `run` or `schedule` is stopped or killed (started
with SIGINT ignored, as a background job is).

Each test uses its own alias on the shared server, so tests do not see each other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deploy.local.broker import free_port
from deploy.local.synthetic import feedback_events
from flows.cli import app
from pipeline.feedback.snapshot import SnapshotOptions, split_of
from tests.children import Descendants, start_command
from tests.conftest import HASH_KEY, Cycle, Greedy, run_cycle, wait_until

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _heldout(conversation: str) -> bool:
    return split_of(conversation, SnapshotOptions(heldout_fraction=0.2)) == "heldout"


def test_full_cycle_from_kafka_events_to_a_new_adapter_answering_in_vllm(
    cycle: Cycle, greedy: Greedy
) -> None:
    cycle.ingest(feedback_events(320, seed=1))
    config = cycle.config(gate={"scorer": "tests.scorers:constant", "generation_prompts": 4})

    state, record = run_cycle(config)

    assert state.is_completed() and state.name == "Completed", state.message
    assert record["status"] == "published" and record["version"] == "v1"
    assert record["snapshot"]["votes"] == 320 and record["new_votes"] == 320
    assert record["gate"]["promote"] and {c["name"] for c in record["gate"]["checks"]} == {
        "accuracy",
        "margin",
        "kl",
        "drift",
        "generation_score",
    }
    assert 0 < record["gate"]["drift"] <= 0.25  # from the base model, on its own answers
    assert record["plan"]["strategy"] == "retrain" and record["plan"]["on_policy"] == 0
    after = record["training"]["heldout_after"]
    assert after["accuracy"] > 0.75 and after["margin"] > 0
    with cycle.admin() as admin:
        assert cycle.alias in admin.models()
        assert admin.swap_state()["aliases"][cycle.alias]["target"] == f"{cycle.alias}@v1"
        prompt = [5, 17, 42, 99, 7]
        answer = admin.complete(cycle.alias, prompt, 8, ignore_eos=True)
    assert answer.model == f"{cycle.alias}@v1"
    assert list(answer.token_ids) == greedy(Path(cycle.registry.path("v1")), prompt, 8)
    assert cycle.registry.info("v1")["snapshot_id"] == record["snapshot"]["id"]
    # Its lineage: this run, and the snapshot's feedback window (nothing served before).
    info = cycle.registry.info("v1")
    window = info["snapshot_window"]
    assert info["run_id"] == record["run_id"] and info["parent"] is None
    assert window["builds_on"] == {"run_id": record["run_id"], "alias": cycle.alias}
    assert window["votes_desirable"] + window["votes_undesirable"] == 320
    assert sum(p["rows_read"] for p in window["partitions"]) == record["snapshot"]["rows_read"]
    assert cycle.registry.history(cycle.alias).current == "v1"
    assert not cycle.runs.candidate_dir.exists()
    report = Path(record["report"]).read_text()
    assert "## Gate" in report and f"{cycle.alias}@v1" in report
    assert {Path(p).name for p in record["plots"]} == {"training.png", "gate.png"}
    assert all(Path(p).stat().st_size > 1000 for p in record["plots"])
    assert _artifact_markdown(cycle.alias).startswith(f"# Alignment cycle {record['run_id']}")

    # Nothing new since: the next run is skipped, and serving stays.
    state, record = run_cycle(config)
    assert state.name == "Skipped" and "0 new votes" in state.message
    assert cycle.registry.versions() == ["v1"]

    # Simulated users chat with the alias; their votes name v1 and status counts them.
    simulated = _simulate(config)
    assert (simulated["model"], simulated["chats"], simulated["sent"]) == (cycle.alias, 12, 12)
    assert list(simulated["by_model"]) == [f"{cycle.alias}@v1"]
    cycle.consume(config)
    result = runner.invoke(app, ["status", "--config", str(config)], env=dict(os.environ))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    mine = summary["aliases"][cycle.alias]
    assert mine["current"] == "v1"
    assert [r["status"] for r in mine["runs"]] == ["skipped", "published"]
    assert mine["replicas"][cycle.vllm.url]["serves"] == "v1"
    shares = {r["adapter"]: r for r in summary["liked_share"]}
    v1 = shares[f"{cycle.alias}@v1"]
    assert (v1["votes"], v1["liked"]) == (12, simulated["liked"])
    assert shares["(none)"]["votes"] == 320


def test_simulated_users_votes_reach_the_store_naming_the_model_that_answered(
    cycle: Cycle,
) -> None:
    cycle.setup.create_topics(partitions=2)
    config = cycle.config()
    simulated = _simulate(config)
    with cycle.admin() as admin:
        (base,) = admin.base_models()
    assert (simulated["model"], simulated["sent"], simulated["failed"]) == (base, 12, 0)

    rows = cycle.consume(config)
    assert len(rows) == 12 and set(rows["model"]) == {base} and rows["adapter"].isna().all()
    assert int(rows["desirable"].sum()) == simulated["liked"]
    assert rows["user_hash"].nunique() == 3

    bad = runner.invoke(app, ["simulate", "--config", str(config), "--taste", "nowhere:taste"])
    assert bad.exit_code == 2 and "--taste" in bad.output


def _simulate(config: Path) -> dict[str, Any]:
    """`kto-loop simulate`: 12 chats by 3 users, votes sent; its JSON line."""
    args = ["--chats", "12", "--users", "3", "--max-tokens", "8"]
    result = runner.invoke(app, ["simulate", "--config", str(config), *args], env=dict(os.environ))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _artifact_markdown(alias: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"kto-loop-{alias}"]))
        )
    assert found, "no artifact"
    return max(found, key=lambda a: a.created).data


def test_too_little_data_is_skipped_and_nothing_is_trained_or_published(cycle: Cycle) -> None:
    config = cycle.config()
    state, record = run_cycle(config)  # an empty store
    assert state.name == "Skipped" and "no feedback" in state.message

    cycle.ingest(feedback_events(30, seed=2))
    state, record = run_cycle(config)

    assert state.is_completed() and state.name == "Skipped"
    assert "30 new votes" in state.message and "min_new_votes=50" in state.message
    assert record["status"] == "skipped" and not record["trained"]
    assert cycle.registry.versions() == []
    assert not cycle.runs.candidate_dir.exists()
    with cycle.admin() as admin:
        assert cycle.alias not in admin.models()
    assert Path(record["report"]).is_file()

    result = runner.invoke(app, ["run", "--config", str(config)], env=dict(os.environ))
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert (line["status"], line["prefect_state"], line["version"]) == ("skipped", "Skipped", None)
    assert "min_new_votes=50" in line["reason"] and Path(line["report"]).is_file()
    bad = cycle.tmp / "bad.toml"
    bad.write_text('[cycle]\nalias = "no spaces allowed"\n')
    result = runner.invoke(app, ["run", "--config", str(bad)])
    assert result.exit_code == 2 and "[cycle] alias" in result.output


def test_a_candidate_no_better_than_the_serving_adapter_is_never_served(
    cycle: Cycle,
) -> None:
    cycle.ingest(feedback_events(320, seed=1))
    state, _ = run_cycle(cycle.config())
    assert state.name == "Completed", state.message
    with cycle.admin() as admin:
        before = admin.complete(cycle.alias, [5, 17, 42], 8, ignore_eos=True)

    def serving_is_unchanged() -> None:
        assert cycle.registry.versions() == ["v1"]
        assert cycle.registry.history(cycle.alias).current == "v1"
        assert not cycle.runs.candidate_dir.exists()
        with cycle.admin() as admin:
            after = admin.complete(cycle.alias, [5, 17, 42], 8, ignore_eos=True)
            loaded = [a["name"] for a in admin.swap_state()["adapters"]]
            assert [n for n in loaded if n.startswith(cycle.alias)] == [f"{cycle.alias}@v1"]
        assert (after.model, after.token_ids) == (before.model, before.token_ids)

    # Contrary feedback on the training side only: the held-out votes stay honest, so
    # every step trained on it scores worse on them than the start, which training
    # keeps. Nothing is gated, registered or published.
    poisoned = feedback_events(400, seed=3, flip=lambda c: not _heldout(c))
    cycle.ingest(poisoned, store="store-poisoned")
    config = cycle.config(store="store-poisoned", cycle={"min_new_votes": 1})
    state, record = run_cycle(config)

    assert state.name == "No gain", state.message
    assert record["status"] == "no_gain" and record["trained"]
    assert record["reason"].startswith("training kept its starting point: no evaluated step")
    assert record["training"]["status"] == "no_gain" and record["training"]["best_step"] == 0
    assert record["gate"] is None and record["version"] is None
    assert "**no_gain**" in Path(record["report"]).read_text()
    serving_is_unchanged()
    # Its data was judged: the same snapshot is not trained again.
    result = runner.invoke(app, ["run", "--config", str(config)], env=dict(os.environ))
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert (line["status"], line["prefect_state"]) == ("skipped", "Skipped")
    assert "0 new votes" in line["reason"]

    # Honest feedback (80 votes more than the poisoned run judged), but two steps of
    # it: the candidate trained (it beat its start) and the gate refuses it against v1.
    cycle.ingest(feedback_events(480, seed=3), store="store-brief")
    brief = {"max_steps": 2, "eval_every": 1}
    state, record = run_cycle(
        cycle.config(store="store-brief", cycle={"min_new_votes": 1}, train=brief)
    )

    assert state.name == "Skipped" and "candidate refused" in state.message, state.message
    assert record["training"]["status"] == "trained" and record["training"]["best_step"] == 2
    assert record["trained"] and not record["gate"]["promote"]
    failed = {c["name"] for c in record["gate"]["checks"] if not c["passed"]}
    assert {"accuracy", "margin"} <= failed
    assert record["gate"]["serving_name"] == f"{cycle.alias}@v1"
    serving_is_unchanged()
    statuses = [r["status"] for r in cycle.runs.recent()]
    assert statuses == ["skipped", "skipped", "no_gain", "published"]


def test_a_cycle_judged_by_answers_publishes_nothing_its_judge_does_not_find_better(
    cycle: Cycle,
) -> None:
    # The shipped defaults: the trainer and the gate judge by sampled answers. One
    # pass at this rate barely moves the tiny model's answers, so either training keeps
    # its start (its judge found no step better on fresh samples) or the gate's answers
    # check refuses the candidate; either way the record says what the judge saw, and
    # nothing is registered or served.
    cycle.ingest(feedback_events(320, seed=1))
    shipped = {"selection": "judge", "judge_answers": 64}
    state, record = run_cycle(cycle.config(train=shipped, gate={"judge": "answers"}))

    judge = record["training"]["judge"]
    assert judge is not None and isinstance(judge["trusted"], bool), record["training"]
    assert state.name in ("No gain", "Skipped"), state.message
    if state.name == "No gain":
        assert record["training"]["status"] == "no_gain" and judge["trusted"]
        assert "the judge estimates a liked share" in record["reason"]
        assert record["gate"] is None
    else:
        answers = record["gate"]["answers"]
        assert not record["gate"]["promote"] and answers is not None
        assert "its answers" in record["gate"]["reason"]
    assert cycle.registry.versions() == []


def test_a_generation_check_that_refuses_retires_the_loaded_candidate(cycle: Cycle) -> None:
    cycle.ingest(feedback_events(320, seed=1))
    # Every answer scores the same, and the candidate must beat what serves by 0.5.
    gate = {"scorer": "tests.scorers:constant", "generation_prompts": 4, "min_score_gain": 0.5}

    state, record = run_cycle(cycle.config(gate=gate))

    assert state.name == "Skipped" and "generation_score 1 against 1" in state.message
    assert record["gate"]["serving_name"] == "the base model"
    assert cycle.registry.history(cycle.alias).current is None
    with cycle.admin() as admin:
        assert cycle.alias not in admin.models()
        wait_until(
            lambda: f"{cycle.alias}@v1" not in {a["name"] for a in admin.swap_state()["adapters"]},
            30,
            "the refused candidate retired from the server",
        )


def test_a_failed_publish_changes_no_replica_and_the_next_run_publishes_the_same_candidate(
    cycle: Cycle,
) -> None:
    cycle.ingest(feedback_events(320, seed=1))
    dead = f"http://127.0.0.1:{free_port()}"
    broken = cycle.config(
        serving={"replicas": [cycle.vllm.url, dead], "retries": 1},
        cycle={"publish_retries": 1, "publish_retry_delay_seconds": 0},
    )

    state, _ = run_cycle(broken)

    assert state.is_failed() and dead in state.message and "stays on nothing" in state.message
    (failed,) = cycle.runs.recent()
    assert failed["status"] == "failed" and failed["version"] == "v1"
    assert dead in Path(failed["report"]).read_text()
    assert cycle.registry.history(cycle.alias).current is None
    with cycle.admin() as admin:
        assert cycle.alias not in admin.models()

    state, record = run_cycle(cycle.config())

    assert state.name == "Completed", state.message
    assert record["version"] == "v1" and cycle.registry.versions() == ["v1"]
    assert record["training"]["seconds"] == failed["training"]["seconds"]  # not trained again
    assert cycle.registry.history(cycle.alias).current == "v1"


def test_a_second_run_is_refused_while_one_trains_and_a_killed_run_resumes_cleanly(
    cycle: Cycle, tmp_path: Path, watch: Callable[[subprocess.Popen], Descendants]
) -> None:
    cycle.ingest(feedback_events(320, seed=1))
    # Three epochs, a checkpoint every step: a long enough run to catch in the middle.
    config = cycle.config(train={"epochs": 3, "checkpoint_every": 1, "eval_every": 10})
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "KTO_LOOP_EVENTS__USER_HASH_KEY": HASH_KEY,
    }
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "first-run.log"
    with log.open("wb") as out:
        first = start_command(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(config)], stdout=out, env=env
        )
    started = watch(first)
    checkpoint = cycle.runs.candidate_dir / "checkpoint" / "state.pt"
    wait_until(
        lambda: checkpoint.is_file() or first.poll() is not None, 240, "a training checkpoint"
    )
    assert first.poll() is None, log.read_text()[-3000:]
    holder = cycle.runs.holder()
    assert holder is not None and holder["pid"] == first.pid

    second, record = run_cycle(config)
    assert second.name == "Skipped", second.message
    assert f"another run of alias {cycle.alias!r} is in progress" in second.message
    assert str(first.pid) in second.message
    assert not record["trained"]

    assert started.record(), "no temporary Prefect server"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    started.wait_gone(60)  # the run's Prefect server died with it
    assert cycle.registry.versions() == []

    third, record = run_cycle(config)

    assert third.name == "Completed", third.message
    assert record["training"]["resumed_from_step"] >= 1
    assert cycle.registry.versions() == ["v1"]
    versions_dir = Path(cycle.registry.url) / "versions"
    assert sorted(p.name for p in versions_dir.iterdir()) == ["v1"]  # no half-written copy
    statuses = [r["status"] for r in cycle.runs.recent()]
    assert statuses == ["published", "skipped", "crashed"]


def _schedule(config: Path, log: Path) -> subprocess.Popen:
    """`kto-loop schedule` every 2 s on a local Prefect server it starts, with SIGINT
    ignored (as a background job or a service starts it)."""
    env = {**os.environ, "KTO_LOOP_EVENTS__USER_HASH_KEY": HASH_KEY}
    env.pop("PREFECT_API_URL", None)
    # Prefect's runner asks for due runs every 10 s by default; every second here.
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"
    args = ["schedule", "--config", str(config), "--interval", "2"]
    with log.open("wb") as out:
        return start_command([sys.executable, "-m", "flows.cli", *args], stdout=out, env=env)


def test_schedule_fires_runs_on_a_local_prefect_server(
    cycle: Cycle, tmp_path: Path, watch: Callable[[subprocess.Popen], Descendants]
) -> None:
    # An empty store: every run ends skipped at once. The canary check is served too,
    # every 3 s.
    config = cycle.config(canary={"enabled": True, "check_every_minutes": 0.05})
    log = tmp_path / "schedule.log"
    process = _schedule(config, log)
    started = watch(process)
    wait_until(
        lambda: len(cycle.runs.recent()) >= 2 or process.poll() is not None,
        240,
        "two scheduled runs",
    )
    wait_until(
        lambda: log.read_text().count("kto-loop-canary-check") >= 2 or process.poll() is not None,
        120,
        "two scheduled canary checks",
    )
    assert process.poll() is None, log.read_text()[-3000:]
    assert started.running("prefect server start")

    process.send_signal(signal.SIGINT)

    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    started.wait_gone(60)  # the Prefect server and every run's process
    runs = cycle.runs.recent()
    assert all(r["status"] == "skipped" and "no feedback" in r["reason"] for r in runs)
    assert len({r["flow_run_id"] for r in runs}) == len(runs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_schedule_leaves_neither_its_server_nor_a_training_run_behind(
    signum: int, cycle: Cycle, tmp_path: Path, watch: Callable[[subprocess.Popen], Descendants]
) -> None:
    cycle.ingest(feedback_events(320, seed=1))
    # Three epochs: a run that trains long enough to be caught in the middle.
    config = cycle.config(train={"epochs": 3})
    log = tmp_path / "schedule.log"
    process = _schedule(config, log)
    started = watch(process)
    holder = wait_until(
        lambda: cycle.runs.holder() or process.poll() is not None, 240, "a scheduled run"
    )
    assert process.poll() is None, log.read_text()[-3000:]
    assert holder["pid"] in {p.pid for p in started.record()}  # the run's own process

    process.send_signal(signum)

    process.wait(timeout=60)
    started.wait_gone(60)  # the Prefect server, and the run that was training
    assert cycle.registry.versions() == []


def test_the_work_pool_deployment_deploys_and_a_worker_runs_the_cycle(
    cycle: Cycle, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    config = cycle.config()  # an empty store: the run ends skipped at once
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),  # the harness's server
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "KTO_LOOP_HOME": str(ROOT),
    }

    def prefect(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    prefect("work-pool", "create", "kto-loop", "--type", "process", "--overwrite")
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect/prefect.yaml")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("kto-loop-alignment/chat-nightly")
    assert deployment.work_pool_name == "kto-loop"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.global_concurrency_limit.limit == 1
    with get_client(sync_client=True) as client:
        check = client.read_deployment_by_name("kto-loop-canary-check/chat-canary-check")
    assert [(s.schedule.interval.total_seconds(), s.active) for s in check.schedules] == [
        (600.0, False)
    ]

    prefect(
        "deployment", "run", "kto-loop-alignment/chat-nightly",
        "--param", f"config={config}", "--param", f"alias={cycle.alias}",
    )  # fmt: skip
    prefect("worker", "start", "--pool", "kto-loop", "--run-once")

    (record,) = cycle.runs.recent()
    assert record["status"] == "skipped" and "no feedback" in record["reason"]
    assert record["flow_run_id"]
