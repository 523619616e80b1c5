#!/usr/bin/env bash
# The README's main command: set up, build (release) jobengine-demo and jobsnap,
# and run the demo scenario end to end (tools/demo.md): the service crashes on a
# poison job, jobsnap shows its snapshots, it restarts until the poison job is
# quarantined, the operator drops it, and every job the snapshot held is
# checked to have run. Exit 0 when every claim held.
# Usage: tools/run.sh [tools/demo.sh options: --work DIR, --shm NAME, --bin DIR]
# A relative DIR is relative to the current directory, as for any command.
set -euo pipefail
# Paths given on the command line, made absolute before the cd below.
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --work|--bin)
      [ $# -ge 2 ] && [ -n "$2" ] || { echo "usage: tools/run.sh [--work DIR] [--shm NAME] [--bin DIR]" >&2; exit 64; }
      args+=("$1" "$(realpath -m -- "$2")"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
cd "$(dirname "$0")/.."
bash tools/demo.sh --check "${args[@]}"  # a --work it would refuse: before installing and building
bash tools/setup.sh --release  # the release preset's packages only
cmake --preset release >/dev/null
cmake --build --preset release --target jobengine-demo jobsnap
exec bash tools/demo.sh "${args[@]}"
