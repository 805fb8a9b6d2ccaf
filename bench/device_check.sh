#!/usr/bin/env bash
# The GPU check of issue 12 (model families): one table, under 8 minutes on a CUDA machine.
#
#   bash bench/device_check.sh                 # on the GPU machine (defaults: --device cuda)
#   bash bench/device_check.sh --smoke         # on a CPU, small sizes, CUDA-only parts skipped (< 3 min)
#   bash bench/device_check.sh --json "$OUT/device_check.json"
#
# The device machine gets a copy of the working tree without .venv (and without
# internet), so a missing .venv is built first by scripts/setup.sh (which needs
# its package sources: a pip index or wheel cache that machine can reach).
# Everything else is bench/device_check.py; its arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    echo "device_check: no .venv here: running scripts/setup.sh first"
    bash scripts/setup.sh
fi
if ! .venv/bin/python -c "import transformers" 2>/dev/null; then
    echo "device_check: transformers is not installed in .venv: the EdgeTAM and SAM 3 tracker rows will say SKIPPED"
fi
exec .venv/bin/python bench/device_check.py "$@"
