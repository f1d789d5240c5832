"""The canary check: live votes on a running canary decide whether its candidate is
promoted, rolled back, or stopped inconclusive (pipeline/promotion/canary.py).

`canary_check` is a Prefect flow; `kto-loop schedule` serves it every [canary]
check_every_minutes beside the nightly cycle, and `kto-loop canary check` runs it once.
A check reads the vote table as it stands (no lock: the cycle's folds go on), counts
each arm's votes since the canary started, and acts only on a final verdict. Every
check is appended to the alias's canary log (`<work_dir>/<alias>/canary.jsonl`); a
final one also goes into the history's canary_end event (the version's lineage) and
into the record of the cycle run that started the canary.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from prefect import flow

from connectors.config import Settings, load_settings
from connectors.cycle_runs import CycleRuns
from connectors.feedback.store import FEEDBACK, FeedbackStore
from connectors.feedback.vote_table import VoteTable
from connectors.serving.adapter_registry import AdapterRegistry, now_iso
from connectors.serving.publish import Publisher
from deploy.local.processes import die_with_scheduler
from pipeline.promotion.canary import Arm, Verdict, arm_votes, verdict
from pipeline.serving.registry import INCONCLUSIVE, PROMOTED, ROLLED_BACK, Canary, served_name

log = logging.getLogger("kto_loop.canary")

# What a final verdict does to the canary.
OUTCOME_OF = {"promote": PROMOTED, "rollback": ROLLED_BACK, "inconclusive": INCONCLUSIVE}


def canary_verdict(
    settings: Settings,
    alias: str,
    now: dt.datetime | None = None,
    registry: AdapterRegistry | None = None,
) -> tuple[Canary, Verdict] | None:
    """`alias`'s canary and the verdict its votes give now (None when none runs);
    nothing is changed."""
    registry = registry or AdapterRegistry(settings.registry.url, settings.registry.storage_options)
    history = registry.history(alias)
    canary = history.canary
    if canary is None or history.current is None:
        return None
    served, candidate = served_name(alias, history.current), served_name(alias, canary.version)
    started = dt.datetime.fromisoformat(canary.started_at)
    now = now or dt.datetime.now(dt.UTC)
    hours = max(0.0, (now - started).total_seconds() / 3600)
    store = FeedbackStore(settings.store.url, settings.store.storage_options)
    if store.count(FEEDBACK) == 0:
        arms = (Arm(served, 0, 0), Arm(candidate, 0, 0))
    else:
        votes, _ = VoteTable(store).read()
        arms = arm_votes(votes, served, candidate, started)
    return canary, verdict(*arms, hours, settings.canary.rules())


def check_canary(settings: Settings, alias: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """Check `alias`'s canary once and act on a final verdict; return what happened
    ({"status": "no_canary"} when none runs)."""
    registry = AdapterRegistry(settings.registry.url, settings.registry.storage_options)
    found = canary_verdict(settings, alias, now, registry)
    if found is None:
        return {"status": "no_canary", "alias": alias}
    canary, result = found
    served, candidate = result.served.name, result.candidate.name
    record: dict[str, Any] = {
        "at": now_iso(),
        "alias": alias,
        "status": result.decision,
        "served": served,
        "candidate": candidate,
        "share": canary.share,
        "started_at": canary.started_at,
        "verdict": result.as_dict(),
    }
    if result.final:
        publisher = Publisher(registry, settings.serving)
        outcome = OUTCOME_OF[result.decision]
        ended = publisher.end_canary(alias, outcome, result.reason, verdict=result.as_dict())
        record["outcome"] = outcome
        record["published"] = ended.as_dict()
        _note_in_run(settings, alias, canary.version, result, outcome)
        log.info("canary of %s ended %s: %s", candidate, outcome, result.reason)
    else:
        log.info("canary of %s goes on: %s", candidate, result.reason)
    CycleRuns(settings.cycle.work_dir, alias).append_canary_check(record)
    return record


def _note_in_run(
    settings: Settings, alias: str, version: str, result: Verdict, outcome: str
) -> None:
    """Put the verdict into the record of the cycle run that started the canary."""
    runs = CycleRuns(settings.cycle.work_dir, alias)
    for record in runs.recent(n=50):
        if record.get("version") == version and record.get("status") == "canary":
            record["canary"] = {"outcome": outcome, "at": now_iso(), **result.as_dict()}
            runs.save(record)
            return


def canary_log(settings: Settings, alias: str, n: int = 20) -> list[dict[str, Any]]:
    """The newest n checks of `alias`'s canaries, newest first."""
    return CycleRuns(settings.cycle.work_dir, alias).canary_checks(n)


@flow(
    name="kto-loop-canary-check",
    log_prints=False,
    validate_parameters=True,
    on_running=[die_with_scheduler],
)
def canary_check(config: str | None = None, alias: str | None = None) -> dict[str, Any]:
    """Check `alias`'s canary (default: [cycle] alias) with the settings in `config`."""
    settings = load_settings(Path(config) if config else None)
    return check_canary(settings, alias or settings.cycle.alias)
