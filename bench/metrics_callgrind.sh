#!/usr/bin/env bash
# Instructions per job with and without metrics, counted by callgrind: the
# cost of JOBENGINE_METRICS on the hot path as a figure that a busy or shared
# machine does not move (run.sh's metrics A/B measures the time, which it does).
#
#   bench/metrics_callgrind.sh [--build-dir DIR] [--jobs N]
#
# Runs BM_Engine_Submit/spin once (one iteration of N jobs, default 20000) in
# jobengine_bench and in jobengine_bench_nometrics under
# `valgrind --tool=callgrind`, collecting only inside Engine::submit() (the
# submitter's path) and the worker's run_batch() (dequeue to retire, handler
# included), and prints the instructions of each per job. Needs valgrind; takes
# about a minute. The two binaries must be built (cmake --build --preset
# release --target jobengine_bench jobengine_bench_nometrics).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="$root/build/release"
jobs=20000
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir="${2:?--build-dir needs a directory}"; shift ;;
    --jobs) jobs="${2:?--jobs needs a number}"; shift ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "metrics_callgrind.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
command -v valgrind >/dev/null || { echo "metrics_callgrind.sh: valgrind is not installed" >&2; exit 2; }
command -v callgrind_annotate >/dev/null ||
  { echo "metrics_callgrind.sh: callgrind_annotate is not installed" >&2; exit 2; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
submit_fn='jobengine::Engine::submit(unsigned int'
worker_fn='jobengine::Engine::Impl::run_batch('

printf '%-12s %18s %18s %18s\n' library submit_instr/job worker_instr/job total_instr/job
for variant in on off; do
  binary="$build_dir/bench/jobengine_bench"
  [ "$variant" = off ] && binary="$build_dir/bench/jobengine_bench_nometrics"
  # --fair-sched: the submitter and the spinning worker take turns (valgrind
  # runs one thread at a time). min_time is tiny so that the first run, of one
  # iteration, is the only one: exactly $jobs jobs.
  JOBENGINE_BENCH_JOBS="$jobs" valgrind --tool=callgrind --fair-sched=yes \
    --callgrind-out-file="$tmp/$variant.out" \
    "--toggle-collect=${submit_fn}*" "--toggle-collect=${worker_fn}*" \
    "$binary" --benchmark_filter='^BM_Engine_Submit/spin/' --benchmark_min_time=0.000001 \
    --benchmark_out="$tmp/$variant.json" --benchmark_out_format=json >"$tmp/$variant.log" 2>&1 ||
    { echo "metrics_callgrind.sh: $binary failed:" >&2; tail -n 20 "$tmp/$variant.log" >&2; exit 1; }
  python3 - "$tmp/$variant.json" "$jobs" <<'PY' || exit 1
import json, sys
iterations = [b["iterations"] for b in json.load(open(sys.argv[1]))["benchmarks"]]
if iterations != [1]:
    sys.exit(f"expected one run of one iteration, got {iterations}")
PY
  annotate="$(callgrind_annotate --inclusive=yes "$tmp/$variant.out" 2>/dev/null)"
  ir_of() {  # inclusive Ir of the first function whose name starts with $1
    grep -F ":$1" <<<"$annotate" | head -n1 | awk '{gsub(",", "", $1); print $1}'
  }
  submit_ir="$(ir_of "$submit_fn")"
  worker_ir="$(ir_of "$worker_fn")"
  awk -v v="metrics $variant" -v s="${submit_ir:-0}" -v w="${worker_ir:-0}" -v n="$jobs" \
    'BEGIN { printf "%-12s %18.1f %18.1f %18.1f\n", v, s / n, w / n, (s + w) / n }'
done
