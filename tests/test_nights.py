"""Two nights of the loop, the second continuing the first: the real broker, the tiny
model, Prefect's test harness and the session's vLLM (the `cycle` fixture).

Night 1 has nothing served, so even a continual configuration retrains and publishes.
Night 2 trains on the votes about night 1's answers (they name its version) and a replay
sample of the older ones, warm-started from the served adapter with it as the reference,
and its drift from that adapter is measured on answers it samples; a drift limit set
below what any training moves refuses it, and serving stays as it was."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from deploy.local.synthetic import feedback_events
from tests.conftest import Cycle, run_cycle


def test_a_continual_night_trains_on_votes_about_the_served_adapter_from_it(cycle: Cycle):
    cycle.ingest(feedback_events(320, seed=1))
    config = cycle.config(
        cycle={"strategy": "continual", "replay_fraction": 0.5},
        gate={"max_drift": 1e-6},  # below any training's: the limit must refuse night 2
    )

    # Night 1: nothing serves, so the night retrains; a fresh LoRA moves the base
    # model farther than the limit, but with nothing served the drift is from the base.
    first = cycle.config(cycle={"strategy": "continual", "replay_fraction": 0.5})
    state, record = run_cycle(first)
    assert state.name == "Completed", state.message
    assert record["plan"]["strategy"] == "retrain"
    assert record["plan"]["why"] == "nothing is served yet"
    assert record["training"]["init_adapter"] is None
    assert record["training"]["reference_adapter"] is None
    assert record["gate"]["drift"] > 0  # measured against the base model
    assert record["version"] == "v1"

    # A day later, votes about v1's answers: their events name the version that wrote them.
    served = f"{cycle.alias}@v1"
    cycle.ingest(
        feedback_events(200, seed=2, adapter=served, start=dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    )
    state, record = run_cycle(config)

    plan = record["plan"]
    assert plan["strategy"] == "continual", plan
    assert plan["why"].startswith(f"continues {served}")
    # Every new training example is on-policy; the replay adds as many older ones.
    assert plan["new"] > 100 and plan["replay"] == plan["new"]
    assert plan["on_policy"] == plan["new"] and plan["by_adapter"][served] == plan["new"]
    assert plan["on_policy_share"] == pytest.approx(0.5)
    v1 = Path(cycle.registry.path("v1")).resolve()
    assert Path(record["training"]["init_adapter"]).resolve() == v1
    assert Path(record["training"]["reference_adapter"]).resolve() == v1

    # The drift limit refused it: serving is still v1, nothing new registered.
    assert state.name == "Skipped", state.message
    failed = [c["name"] for c in record["gate"]["checks"] if not c["passed"]]
    assert "drift" in failed, record["gate"]
    assert f"nats/token from {served}" in record["reason"]
    assert cycle.registry.history(cycle.alias).current == "v1"
    assert cycle.registry.versions() == ["v1"]
