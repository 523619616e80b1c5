#!/usr/bin/env bash
# The README's test command (and what .ci/run runs): set up, then build and
# run the whole test suite in release, then under ASan+UBSan and TSan, then
# cross-built for aarch64 and run under qemu-user (unit and stress tests),
# then a 20-second run of each libFuzzer target (JOBENGINE_FUZZ_SECONDS at configure).
# Usage: tools/test.sh [preset...]     default: release asan tsan aarch64 fuzz
# Environment: JOBENGINE_STRESS_SEED / _ROUNDS, JOBENGINE_CUT_SEED / _SNAPSHOTS
# and JOBENGINE_CRASH_SEED / _KILLS replay or size the randomized tests (an
# empty value means the default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(release asan tsan aarch64 fuzz)
jobs=$(nproc)
user_rounds=${JOBENGINE_STRESS_ROUNDS:-}
user_cuts=${JOBENGINE_CUT_SNAPSHOTS:-}
user_kills=${JOBENGINE_CRASH_KILLS:-}

for preset in "${presets[@]}"; do
  echo "=== $preset: configure + build"
  start=$(date +%s)
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
  echo "=== $preset: test"
  # Sanitizer and qemu-user (aarch64) runs do fewer stress rounds, snapshots
  # and kills (they are 5-15x slower) unless the caller chose a number;
  # release runs the full counts (stress 150 rounds, 1000 checked snapshots,
  # 200 kills).
  rounds=${user_rounds} cuts=${user_cuts} kills=${user_kills}
  if [ "$preset" != release ]; then
    rounds=${rounds:-20} cuts=${cuts:-200} kills=${kills:-50}
  fi
  JOBENGINE_STRESS_ROUNDS=$rounds JOBENGINE_CUT_SNAPSHOTS=$cuts JOBENGINE_CRASH_KILLS=$kills \
    ctest --preset "$preset" -j "$jobs"
  echo "=== $preset: passed in $(( $(date +%s) - start )) s"
done
echo "all presets passed: ${presets[*]}"
