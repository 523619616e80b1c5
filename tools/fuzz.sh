#!/usr/bin/env bash
# Long fuzzing campaign: builds the `fuzz` preset, then runs every libFuzzer
# target for SECONDS each (default 3600), one after the other, each with its
# growing corpus and its seeds (made from the golden snapshot images). Crashes
# land in build/fuzz/tests/fuzz/ as crash-<sha1>; each one found becomes a
# regression test (tests/HARDENING.md, "Fuzzing").
# Usage: tools/fuzz.sh [SECONDS] [FUZZER...]    e.g. tools/fuzz.sh 36000
#        JOBS=2 tools/fuzz.sh 3600     runs JOBS processes per fuzzer (-fork)
# Fuzzers: snapshot_decode_fuzzer shm_segment_fuzzer jobsnap_args_fuzzer
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3600}
shift || true
fuzzers=("$@")
[ ${#fuzzers[@]} -gt 0 ] || fuzzers=(snapshot_decode_fuzzer shm_segment_fuzzer jobsnap_args_fuzzer)
jobs=${JOBS:-1}

cmake --preset fuzz >/dev/null
cmake --build --preset fuzz
out=$PWD/build/fuzz/tests/fuzz
for f in "${fuzzers[@]}"; do
  case $f in
    snapshot_decode_fuzzer) dirs=("$out/corpus" tests/persistence/golden) ;;
    shm_segment_fuzzer) dirs=("$out/corpus-shm" "$out/shm-seeds") ;;
    jobsnap_args_fuzzer) dirs=("$out/corpus-jobsnap-args" tests/fuzz/jobsnap-args-seeds) ;;
    *) echo "fuzz.sh: unknown fuzzer $f" >&2; exit 2 ;;
  esac
  mkdir -p "${dirs[0]}"
  extra=()
  [ "$jobs" -le 1 ] || extra=(-fork="$jobs" -ignore_crashes=1)
  echo "=== $f: ${seconds} s, corpus ${dirs[0]} ($(ls "${dirs[0]}" | wc -l) inputs)"
  [ "$f" != jobsnap_args_fuzzer ] || extra+=(-close_fd_mask=1)  # the tool's own output
  "$out/$f" -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$out/" "${extra[@]}" "${dirs[@]}"
done
echo "fuzz.sh: done; crashes, if any: $(ls "$out"/crash-* 2>/dev/null | wc -l)"
