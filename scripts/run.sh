#!/usr/bin/env bash
# Set up (scripts/setup.sh, skipped steps when done) and run sam2-stream with the given
# arguments, e.g.: bash scripts/run.sh serve --config samples/server.toml
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
exec .venv/bin/sam2-stream "$@"
