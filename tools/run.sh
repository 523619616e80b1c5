#!/usr/bin/env bash
# The README's main command: set up, build (release) jobengine-demo and jobsnap,
# and run the demo scenario end to end (tools/demo.md): the service crashes on a
# poison job, jobsnap shows its snapshots, it restarts until the poison job is
# quarantined, the operator drops it, and every job the snapshot held is
# checked to have run. Exit 0 when every claim held.
# Usage: tools/run.sh [tools/demo.sh options: --work DIR, --shm NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --target jobengine-demo jobsnap
exec bash tools/demo.sh "$@"
