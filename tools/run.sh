#!/usr/bin/env bash
# The README's main command: set up, build (release) and run the example
# program, a short workload that shows what ran and the engine's health.
# Usage: tools/run.sh [example options, e.g. --jobs 1000000 --idle spin]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --target jobengine-example
exec build/release/tools/jobengine-example "$@"
