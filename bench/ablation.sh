#!/usr/bin/env bash
# The ablation behind the shipped defaults: starting from TRL's recipe with the judge's
# step selection, each departure of ours turned on alone, on the tune half only.
#   bench/ablation.sh [SEEDS]     (results: bench/results/tasks_ablation_*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${1:-2}"
PY="${PY:-.venv/bin/python}"
run() {
    local tag="$1"; shift
    "$PY" -m bench.tasks --split tune --seeds "$SEEDS" --recipe trl --tag "ablation_$tag" "$@" | tail -1
}
run final --arms trl ours --set train.selection=final
run judge --arms ours --set train.selection=judge
run other_prompt --arms ours --set train.selection=judge train.mismatch=other_prompt
run bucketed --arms ours --set train.selection=judge train.mismatch=other_prompt train.batching=bucketed
run serving_tokens --arms ours --set train.selection=judge train.completion_tokens=serving
run cosine --arms ours --set train.selection=judge train.lr_schedule=cosine train.warmup_ratio=0.1
run sft --arms ours --set train.selection=judge train.sft_weight=1.0
run early_stopping --arms ours --set train.selection=judge train.early_stopping_patience=3
"$PY" -m bench.tasks --split tune --seeds "$SEEDS" --arms ours --tag ablation_shipped | tail -1
