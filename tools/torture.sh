#!/usr/bin/env bash
# Crash-torture campaign (not run by CI): SIGKILLs a child engine under load,
# again and again, for a chosen time, and recovers after each kill, checking
# every recovered snapshot against the log the child kept outside itself.
# Kills are mixed: at random instants, inside snapshot writes (cut, encode,
# shared-memory publish, temp file, fsync, rename, directory fsync) and
# during recovery (a second child killed while Engine::open/start restores);
# then `jobsnap restore` is SIGKILLed at random instants, each time checking
# that the directory loads either its old newest jobs or the chosen
# generation's, never a torn or mixed image, and that the restore can finish.
# At the end it prints the invariant counts: kills (inside a snapshot),
# recoveries killed (before start() returned), recoveries, jobs that came
# back, and the violations, which must all be 0: jobs lost, jobs duplicated
# from before the cut, jobs run twice, recoveries older than an acknowledged
# snapshot, torn or partial images loaded.
#
# Usage: tools/torture.sh [SECONDS] [PRESET]     default: 600 s, release
#   JOBENGINE_CRASH_SEED=N tools/torture.sh ...  replays a campaign's kills
#   PRESET asan / tsan runs it under a sanitizer (slower, fewer kills per s)
# Exit status: 0 when every invariant held.
#
# Adding a step: add a KillMode in tests/persistence/crash_test.cc and it
# joins the mix, or append a command to `steps` below.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
preset=${2:-release}

cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" --target crash_test jobsnap_test jobsnap
bin=build/$preset/tests/crash_test

# About 12 restore kills per second here; a tenth of the time goes to them.
restore_kills=$(( seconds * 12 / 10 + 1 ))
steps=(
  "JOBENGINE_CRASH_SECONDS=$(( seconds * 9 / 10 + 1 )) $bin --gtest_also_run_disabled_tests --gtest_filter=CrashTest.DISABLED_TortureCampaign"
  "JOBENGINE_RESTORE_KILLS=$restore_kills build/$preset/tests/jobsnap_test --gtest_filter='JobsnapRestoreTest.KilledAtAnyInstant*'"
)
start=$(date +%s)
status=0
for step in "${steps[@]}"; do
  echo "=== torture: $step"
  # The campaign forks and kills children: keep it off the terminal's stdin.
  env bash -c "$step" < /dev/null || status=$?
done
echo "=== torture: $(( $(date +%s) - start )) s, exit status $status"
exit "$status"
