#!/usr/bin/env bash
# The ablation behind the shipped defaults, on the tune half only: from TRL's recipe
# (on a shuffled file: batches shuffled, each example paired with the one before it in
# its batch) with the judge choosing the step kept, each departure of ours turned on
# alone; then the shipped defaults.
#   bench/ablation.sh [SEEDS]     (results: bench/results/tasks_ablation_*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${1:-2}"
PY="${PY:-.venv/bin/python}"
BASE=(train.batching=shuffled train.mismatch=batch_shift train.selection=judge)
run() {
    local tag="$1"; shift
    "$PY" -m bench.tasks --split tune --seeds "$SEEDS" --recipe trl --arms ours \
        --tag "ablation_$tag" --set "${BASE[@]}" "$@" | tail -1
}
run judge
"$PY" -m bench.tasks --split tune --seeds "$SEEDS" --arms trl ours --tag ablation_shipped | tail -1
run other_prompt train.mismatch=other_prompt
run bucketed train.mismatch=other_prompt train.batching=bucketed
run sft train.sft_weight=1.0
run cosine train.lr_schedule=cosine train.warmup_ratio=0.1
run serving_tokens train.completion_tokens=serving
run early_stopping train.early_stopping_patience=3
run final train.selection=final
