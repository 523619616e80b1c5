#!/usr/bin/env bash
# The README's test command (and what .ci/run runs): set up, then build and
# run the whole test suite in release, then under ASan+UBSan and TSan.
# Usage: tools/test.sh [preset...]     default: release asan tsan
# Environment: JOBENGINE_STRESS_SEED / JOBENGINE_STRESS_ROUNDS replay or size
# the randomized stress test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(release asan tsan)
jobs=$(nproc)
user_rounds=${JOBENGINE_STRESS_ROUNDS:-}

for preset in "${presets[@]}"; do
  echo "=== $preset: configure + build"
  start=$(date +%s)
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
  echo "=== $preset: test"
  # Sanitizer runs do fewer stress rounds (they are 5-15x slower) unless the
  # caller chose a number.
  rounds=${user_rounds}
  if [ -z "$rounds" ] && [ "$preset" != release ]; then rounds=4; fi
  JOBENGINE_STRESS_ROUNDS=$rounds ctest --preset "$preset" -j "$jobs"
  echo "=== $preset: passed in $(( $(date +%s) - start )) s"
done
echo "all presets passed: ${presets[*]}"
