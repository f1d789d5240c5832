#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one command on the first machine with a CUDA GPU;
# --cpu-dry-run runs the same path on a CPU. The last line of stdout is one JSON object.
#
#   bench/gpu_check.sh [--cpu-dry-run] [--wheels DIR] [--vllm-python PATH] ...
#
# The interpreter: $KTO_LOOP_PYTHON, else the first of .venv/bin/python and python3 whose
# torch sees a CUDA device (with --cpu-dry-run: whose torch imports). Nothing is
# installed from a package index.
set -euo pipefail
cd "$(dirname "$0")/.."

check='import torch; assert torch.cuda.is_available()'
for arg in "$@"; do
    if [ "$arg" = "--cpu-dry-run" ]; then check='import torch'; fi
done

python="${KTO_LOOP_PYTHON:-}"
if [ -z "$python" ]; then
    for candidate in .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$check" 2>/dev/null; then
            python="$candidate"
            break
        fi
    done
fi
if [ -z "$python" ]; then
    # None qualifies: the check still runs, and its JSON line says what is missing.
    python="$(command -v python3)"
fi
exec "$python" -m bench.gpu_check "$@"
