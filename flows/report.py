"""The markdown report of one alignment cycle (written beside its plots and posted as a
Prefect artifact): counts, class weights and why, metrics before and after training,
the gate's checks and decision, and the version served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.console import number

_METRICS = ("accuracy", "margin", "kl", "reward_desirable", "reward_undesirable", "loss")


def render_report(run: dict[str, Any]) -> str:
    """Markdown for a run record (flows.alignment.RunRecord.as_dict())."""
    lines = [
        f"# Alignment cycle {run['run_id']} for `{run['alias']}`",
        "",
        f"**{run['status']}**: {run.get('reason') or '-'}",
        "",
        f"- started {run['started_at']}, took {_num(run.get('seconds'))} s",
    ]
    steps = run.get("step_seconds") or {}
    if steps:
        lines.append("- step times: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
    if run.get("flow_run_id"):
        lines.append(f"- Prefect flow run `{run['flow_run_id']}`")
    if run.get("version"):
        previous = run.get("previous") or "none"
        lines.append(f"- version `{run['alias']}@{run['version']}` (previous: {previous})")
    snap = run.get("snapshot") or {}
    if snap:
        lines += [
            "",
            "## Feedback",
            "",
            f"Snapshot `{snap.get('id', '?')[:16]}`: {snap.get('votes', 0):,} counted votes from "
            f"{snap.get('rows_read', 0):,} stored events; {run.get('new_votes')} new since the "
            "last run the gate judged.",
            "",
            "| split | desirable | undesirable |",
            "|---|---:|---:|",
        ]
        for side, name in (("train", "train"), ("heldout", "held-out")):
            d, u = snap.get(f"{side}_desirable", 0), snap.get(f"{side}_undesirable", 0)
            lines.append(f"| {name} | {d:,} | {u:,} |")
    plan = run.get("plan") or {}
    if plan:
        lines += [
            "",
            "## What it trained on",
            "",
            f"`{plan.get('strategy')}`: {plan.get('why')}. {plan.get('examples', 0):,} "
            f"examples: {plan.get('new', 0):,} new, {plan.get('replay', 0):,} replayed; "
            f"{plan.get('on_policy', 0):,} answered by the version serving now "
            f"(on-policy share {_num(plan.get('on_policy_share'))}).",
        ]
    balance = run.get("balance") or {}
    if balance:
        lines += [
            "",
            "## Class weights",
            "",
            f"lambda_D = {number(balance['lambda_desirable'], 3)}, lambda_U = "
            f"{number(balance['lambda_undesirable'], 3)}. {balance['explanation']}",
        ]
    training = run.get("training") or {}
    if training:
        lines += _training_lines(training)
    gate = run.get("gate")
    if gate:
        lines += _gate_lines(gate)
    published = run.get("published")
    if published:
        lines += [
            "",
            "## Serving",
            "",
            f"`{run['alias']}` -> `{published.get('version')}` on "
            f"{', '.join(published.get('replicas', [])) or 'its replicas'} "
            f"({published.get('action')}, {_num(published.get('seconds'))} s).",
        ]
    if run.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"- [{Path(p).name}]({Path(p).resolve().as_uri()})" for p in run["plots"]]
    return "\n".join(lines) + "\n"


def _training_lines(training: dict[str, Any]) -> list[str]:
    """The training section: steps, how it ended, held-out metrics before and after."""
    before, after = training.get("heldout_before") or {}, training.get("heldout_after") or {}
    resumed = training.get("resumed_from_step")
    lines = [
        "",
        "## Training",
        "",
        f"{training.get('steps')} of {training.get('planned_steps')} steps, best step "
        f"{training.get('best_step')}"
        + (f", resumed from step {resumed}" if resumed else "")
        + (f"; stopped early: {training['stop_reason']}" if training.get("stopped_early") else "")
        + f" ({_num(training.get('seconds'))} s).",
        "",
        "| held-out | before | after |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {_num(before.get(k))} | {_num(after.get(k))} |" for k in _METRICS]
    lines += [f"- warning: {w}" for w in training.get("warnings", [])]
    lines += [f"- note: {n}" for n in training.get("notes", [])]
    return lines


def _gate_lines(gate: dict[str, Any]) -> list[str]:
    """The gate section: its decision and each check against the serving adapter."""
    verdict = "promote" if gate["promote"] else "refuse"
    lines = [
        "",
        "## Gate",
        "",
        f"Decision: **{verdict}**. {gate['reason']}",
        "",
        f"| check | candidate | {gate['serving_name']} | needs | passed |",
        "|---|---:|---:|---|---|",
    ]
    lines += [
        f"| {c['name']} | {_num(c['candidate'])} | {_num(c['serving'])} | {c['required']} "
        f"| {'yes' if c['passed'] else 'no'} |"
        for c in gate["checks"]
    ]
    return lines


def _num(value: Any) -> str:
    """A value in the report: a float to 4 significant digits, a count whole."""
    return number(value, significant=True)
