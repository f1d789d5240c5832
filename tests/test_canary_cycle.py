"""The cycle with a canary, end to end: the real broker, the tiny model, Prefect's test
harness and the session's vLLM (the `cycle` fixture).

A night with something served puts its candidate into a canary instead of publishing it;
live votes on the two versions' answers, checked by the canary flow, promote it or roll it
back, and the verdict lands in the alias history (the lineage), the run record and the
canary log. While a canary runs, the next night waits for it (or replaces it, when told
to)."""

from __future__ import annotations

import datetime as dt
import json
import os

from typer.testing import CliRunner

from deploy.local.synthetic import feedback_events
from flows.canary import canary_log, check_canary
from flows.cli import app
from tests.conftest import Cycle, run_cycle

runner = CliRunner()


def _votes(alias_version: str, liked: int, disliked: int, tag: str) -> list[dict]:
    """Votes by distinct users on answers `alias_version` gave, stamped now."""
    now = dt.datetime.now(dt.UTC)
    return [
        {
            "schema": 1,
            "event_id": f"{tag}-{i}",
            "ts": now.isoformat(),
            "conversation_id": f"{tag}-c{i}",
            "message_id": f"{tag}-m{i}",
            "user_id": f"{tag}-u{i}",
            "prompt": f"question {i}",
            "response": f"answer {i} of {alias_version}",
            "feedback": "like" if i < liked else "dislike",
            "model": "tiny-chat",
            "adapter": alias_version,
        }
        for i in range(liked + disliked)
    ]


def _two_nights(cycle: Cycle, **canary: object) -> tuple:
    """Night 1 publishes v1 to everyone (nothing served: a canary needs something);
    night 2's candidate v2 goes into a canary. Returns the canary config and night 2's
    record."""
    cycle.ingest(feedback_events(320, seed=1))
    config = cycle.config(canary={"enabled": True, "share": 0.5, "min_votes": 40, **canary})
    state, record = run_cycle(config)
    assert record["status"] == "published" and record["version"] == "v1", state.message
    cycle.ingest(feedback_events(200, seed=2, adapter=f"{cycle.alias}@v1"))
    state, record = run_cycle(config)
    assert state.name == "Canary", state.message
    return config, record


def test_a_night_starts_a_canary_and_live_votes_promote_the_better_candidate(
    cycle: Cycle,
) -> None:
    from connectors.config import load_settings

    config, record = _two_nights(cycle)
    assert record["status"] == "canary" and record["version"] == "v2"
    assert "answers 50% of" in record["reason"]
    history = cycle.registry.history(cycle.alias)
    assert history.current == "v1" and history.canary is not None
    assert history.canary.version == "v2" and history.canary.share == 0.5
    with cycle.admin() as admin:
        served = admin.swap_state()["aliases"][cycle.alias]
    assert served["target"] == f"{cycle.alias}@v1"
    assert served["canary"]["target"] == f"{cycle.alias}@v2"

    settings = load_settings(config)
    # Too few votes on the canary's answers: it goes on, and nothing changes.
    cycle.ingest(_votes(f"{cycle.alias}@v2", 10, 0, "early"))
    early = check_canary(settings, cycle.alias)
    assert early["status"] == "continue" and "waiting for 40 votes" in early["verdict"]["reason"]
    assert cycle.registry.history(cycle.alias).canary is not None
    # `kto-loop status` shows the canary's arms and the running estimate.
    result = runner.invoke(app, ["status", "--config", str(config)], env=dict(os.environ))
    assert result.exit_code == 0, result.output
    mine = json.loads(result.stdout.strip().splitlines()[-1])["aliases"][cycle.alias]
    assert mine["canary"]["version"] == "v2"
    assert mine["canary_verdict"]["candidate"]["votes"] == 10
    assert mine["canary_verdict"]["decision"] == "continue"
    # `kto-loop check-canary` runs one check now.
    result = runner.invoke(app, ["check-canary", "--config", str(config)], env=dict(os.environ))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "continue"

    # The next night waits for the verdict ([canary] on_new_candidate = wait).
    cycle.ingest(feedback_events(200, seed=3, adapter=f"{cycle.alias}@v1"))
    state, _ = run_cycle(config)
    assert state.name == "Skipped" and "waits for its verdict" in state.message

    # The users like v2's answers far more than v1's: promoted.
    cycle.ingest(_votes(f"{cycle.alias}@v2", 70, 10, "v2"))
    cycle.ingest(_votes(f"{cycle.alias}@v1", 30, 50, "v1"))
    done = check_canary(settings, cycle.alias)
    assert done["status"] == "promote" and done["outcome"] == "promoted", done
    assert done["verdict"]["lower"] > 0
    history = cycle.registry.history(cycle.alias)
    assert history.current == "v2" and history.canary is None
    end = history.events[-1]
    assert end.action == "promote" and end.version == "v2"
    ended = [e for e in history.events if e.action == "canary_end"]
    assert ended and ended[-1].outcome == "promoted" and ended[-1].verdict is not None
    assert ended[-1].verdict["candidate"]["votes"] == 90  # the 10 early likes count too
    with cycle.admin() as admin:
        served = admin.swap_state()["aliases"][cycle.alias]
    assert served["target"] == f"{cycle.alias}@v2" and not served.get("canary")
    # The run that started the canary records its verdict; the log keeps every check.
    started = next(r for r in cycle.runs.recent() if r["run_id"] == record["run_id"])
    assert started["canary"]["outcome"] == "promoted"
    assert [c["status"] for c in canary_log(settings, cycle.alias)] == [
        "promote",
        "continue",
        "continue",
    ]
    # With no canary left, a check does nothing.
    assert check_canary(settings, cycle.alias)["status"] == "no_canary"


def test_a_worse_candidate_is_rolled_back_and_serving_stays(cycle: Cycle) -> None:
    from connectors.config import load_settings

    config, _ = _two_nights(cycle)
    settings = load_settings(config)
    cycle.ingest(_votes(f"{cycle.alias}@v2", 5, 75, "v2"))
    cycle.ingest(_votes(f"{cycle.alias}@v1", 60, 20, "v1"))
    done = check_canary(settings, cycle.alias)
    assert done["status"] == "rollback" and done["outcome"] == "rolled_back", done
    assert done["verdict"]["upper"] < 0
    history = cycle.registry.history(cycle.alias)
    assert history.current == "v1" and history.canary is None
    with cycle.admin() as admin:
        served = admin.swap_state()["aliases"][cycle.alias]
    assert served["target"] == f"{cycle.alias}@v1" and not served.get("canary")


def test_a_new_night_replaces_a_running_canary_when_told_to(cycle: Cycle) -> None:
    config, _ = _two_nights(cycle, on_new_candidate="replace")
    cycle.ingest(feedback_events(200, seed=3, adapter=f"{cycle.alias}@v1"))
    state, record = run_cycle(config)
    assert state.name == "Canary" and record["version"] == "v3", state.message
    history = cycle.registry.history(cycle.alias)
    assert history.current == "v1" and history.canary is not None
    assert history.canary.version == "v3"
    replaced = [e for e in history.events if e.action == "canary_end"]
    assert [e.outcome for e in replaced] == ["replaced"]
