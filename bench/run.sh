#!/usr/bin/env bash
# Builds the benchmarks (release preset; see --build-dir) and runs the suite, writing
# Google Benchmark JSON, report.md (machine, ratio tables, targets PASS/MISS)
# and PNG plots into one results directory. See bench/README.md.
#
#   bench/run.sh [--quick | --full] [--out DIR] [--no-build] [--build-dir DIR] [--check]
#                [--only NAME[,NAME...]]
#
#   --full        (default) every benchmark, repetitions; a few minutes on 2 cores
#   --quick       CI smoke: small sizes, one repetition; well under a minute
#   --out DIR     results directory (default build/bench-results/<UTC timestamp>-<mode>);
#                 when reused, the files an earlier run.sh wrote there are deleted
#                 first (report.py reads every *.json in it), and a directory
#                 holding other *.json files is refused
#   --no-build    use the binaries already in the build directory
#   --build-dir DIR  where the binaries are (default build/release, the preset's,
#                 which the build step configures); without --no-build, DIR must
#                 be a configured build tree and is built as it was configured
#                 (machine.txt records its build type and flags)
#   --check       after the report, check that every output exists and parses
#                 (bench/check_results.py); timings never fail it
#   --only NAMES  run only these parts (comma-separated: throughput, wakeup, sweep,
#                 openloop, delayed, metrics, snapshot, pending, memory); the
#                 report then has only their sections (do not combine with --check)
#
# Threads are pinned by the binaries themselves: the submitter to the first
# allowed CPU and the worker to the second for the 1x1 figures, round-robin
# over the allowed CPUs in the sweep. Restrict them with taskset if the
# machine has cores to keep free (the suite follows sched_getaffinity).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode=full
out=""
build=1
build_dir="$root/build/release"
check=0
only=""

usage() { sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) mode=quick ;;
    --full) mode=full ;;
    --out) out="${2:?--out needs a directory}"; shift ;;
    --out=*) out="${1#--out=}" ;;
    --no-build) build=0 ;;
    --build-dir) build_dir="${2:?--build-dir needs a directory}"; shift ;;
    --build-dir=*) build_dir="${1#--build-dir=}" ;;
    --check) check=1 ;;
    --only) only="${2:?--only needs names}"; shift ;;
    --only=*) only="${1#--only=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# The parts --only can name, in the order they run (each run/run_ab call below).
parts=(throughput wakeup sweep openloop delayed metrics snapshot pending memory)
if [ -n "$only" ]; then
  # A misspelt name would run nothing and leave report.py with no results.
  IFS=, read -r -a only_names <<< "$only"
  for name in "${only_names[@]}"; do
    if [[ " ${parts[*]} " != *" $name "* ]]; then
      echo "run.sh: --only: unknown part '$name'; the parts are: ${parts[*]}" >&2
      exit 2
    fi
  done
fi

# Build the directory whose binaries will run, never another one (building
# build/release and then timing --build-dir's stale binaries would go unseen).
# The release preset configures build/release only; any other build tree is
# built as it was configured (machine.txt reads its CMakeCache.txt), and must
# have been configured already: the script cannot guess its settings.
default_build_dir="$root/build/release"
if [ -d "$build_dir" ]; then
  build_dir="$(cd "$build_dir" && pwd)"
fi
if [ "$build" = 1 ] && [ "$build_dir" != "$default_build_dir" ] &&
  [ ! -f "$build_dir/CMakeCache.txt" ]; then
  echo "run.sh: --build-dir $build_dir is not a configured build tree (no CMakeCache.txt);" \
    "configure it first, pass --no-build to run binaries already there, or drop" \
    "--build-dir to build the release preset's build/release" >&2
  exit 2
fi

if [ -z "$out" ]; then
  out="$root/build/bench-results/$(date -u +%Y%m%dT%H%M%SZ)-$mode"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# A reused --out (the CI smoke reuses one): report.py reads every *.json in it,
# so an earlier run's parts would show in this run's report (stale results of
# parts --only left out, another mode's sizes). run.sh's own files go (below,
# once the binaries are there); a *.json it did not write stops it now.
foreign=()
for f in "$out"/*.json; do
  [ -e "$f" ] || continue
  [[ " ${parts[*]} " == *" $(basename "$f" .json) "* ]] || foreign+=("$f")
done
if [ ${#foreign[@]} -gt 0 ]; then
  echo "run.sh: --out $out holds JSON files run.sh did not write (${foreign[*]});" \
    "report.py would read them with this run's results: move them or pick another --out" >&2
  exit 2
fi

bench_targets=(jobengine_bench jobengine_bench_nometrics jobengine_snapshot_bench
  jobengine_memory_bench)
if [ "$build" = 1 ]; then
  if [ "$build_dir" = "$default_build_dir" ]; then
    echo "== building (cmake --preset release) =="
    (cd "$root" && cmake --preset release >/dev/null &&
      cmake --build --preset release --target "${bench_targets[@]}")
  else
    echo "== building $build_dir (as configured: CMAKE_BUILD_TYPE=$(sed -n \
      's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build_dir/CMakeCache.txt" | head -n1)) =="
    cmake --build "$build_dir" --target "${bench_targets[@]}"
  fi
fi
bin="$build_dir/bench"
for b in "${bench_targets[@]}"; do
  if [ ! -x "$bin/$b" ]; then
    echo "run.sh: $bin/$b is missing; build it (drop --no-build) or pass --build-dir" >&2
    exit 2
  fi
done

# ---- sizes per mode (each binary documents its variables) ----------------------
# Every size variable the binaries read is set in both modes, full mode to the
# binaries' defaults: one left over in the caller's environment (say
# JOBENGINE_BENCH_SNAPSHOT_JOBS=20000) would shrink the 1M targets unseen.
if [ "$mode" = quick ]; then
  export JOBENGINE_BENCH_JOBS=100000
  export JOBENGINE_BENCH_CAPACITY=65536
  export JOBENGINE_BENCH_SWEEP=quick
  export JOBENGINE_BENCH_SWEEP_JOBS=10000
  export JOBENGINE_BENCH_LATENCY_SAMPLES=2000
  export JOBENGINE_BENCH_OPEN_MS=20
  export JOBENGINE_BENCH_OPEN_MIN_SAMPLES=2000
  export JOBENGINE_BENCH_OPEN_PEAK_JOBS=20000
  export JOBENGINE_BENCH_SNAPSHOT_JOBS=20000
  export JOBENGINE_BENCH_SHM_PENDING=10000
  export JOBENGINE_BENCH_SUBMITS=100000
  export JOBENGINE_BENCH_PENDING_MAX=10000
  export JOBENGINE_BENCH_MEMORY_JOBS=10000
  export JOBENGINE_BENCH_DELAYED=20000
  export JOBENGINE_BENCH_DELAYED_ITERATIONS=1
  export JOBENGINE_BENCH_CANCELS=50
  ab_rounds=2
  reps_targets=1
  reps=1
  min_time=(--benchmark_min_time=0.05)
  sweep_min_time=()
else
  export JOBENGINE_BENCH_JOBS=1000000
  export JOBENGINE_BENCH_CAPACITY=65536
  export JOBENGINE_BENCH_SWEEP=full
  export JOBENGINE_BENCH_SWEEP_JOBS=100000
  export JOBENGINE_BENCH_LATENCY_SAMPLES=20000
  export JOBENGINE_BENCH_OPEN_MS=250
  export JOBENGINE_BENCH_OPEN_MIN_SAMPLES=20000
  export JOBENGINE_BENCH_OPEN_PEAK_JOBS=200000
  export JOBENGINE_BENCH_SNAPSHOT_JOBS=1000000
  export JOBENGINE_BENCH_SHM_PENDING=100000
  export JOBENGINE_BENCH_SUBMITS=1000000
  export JOBENGINE_BENCH_PENDING_MAX=1000000
  export JOBENGINE_BENCH_MEMORY_JOBS=100000
  export JOBENGINE_BENCH_DELAYED=1000000
  export JOBENGINE_BENCH_DELAYED_ITERATIONS=3
  export JOBENGINE_BENCH_CANCELS=200
  ab_rounds=7
  reps_targets=5
  reps=3
  min_time=()
  sweep_min_time=(--benchmark_min_time=0.1)
fi
export JOBENGINE_BENCH_DIR="${JOBENGINE_BENCH_DIR:-${TMPDIR:-/tmp}}"

# ---- the previous run's files ------------------------------------------------------
# Every name run.sh writes, whichever parts ran then or run now (see --out).
rm -f "$out"/{report.md,plots.gp,machine.txt,openloop.dat,pending.dat,memory.dat} \
  "$out"/sweep_*B.dat "$out"/{throughput_vs_threads,latency_vs_load,snapshot_vs_pending,memory_vs_payload}.png
for name in "${parts[@]}"; do
  rm -f "$out/$name.json" "$out/$name.log" "$out/$name-rounds"/{on,off}-*.json
  rmdir "$out/$name-rounds" 2>/dev/null || true
done

# ---- the machine ----------------------------------------------------------------
# systemd-detect-virt prints "none" and exits 1 when there is no such layer;
# "unknown" only when it cannot tell (not installed).
detect_virt() {
  local v
  v="$(systemd-detect-virt "$1" 2>/dev/null)" || true
  echo "${v:-unknown}"
}
cache="$build_dir/CMakeCache.txt"
cache_get() { sed -n "s/^$1:[A-Z]*=//p" "$cache" 2>/dev/null | head -n1; }
cxx="$(cache_get CMAKE_CXX_COMPILER)"
build_type="$(cache_get CMAKE_BUILD_TYPE)"
build_type_uc="$(echo "$build_type" | tr '[:lower:]' '[:upper:]')"
flags="$(cache_get CMAKE_CXX_FLAGS) $(cache_get "CMAKE_CXX_FLAGS_$build_type_uc")"
{
  echo "cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
  echo "cpus_online=$(getconf _NPROCESSORS_ONLN)"
  # The binaries pin by sched_getaffinity; nproc would honour OMP_NUM_THREADS.
  echo "cpus_allowed=$(python3 -c 'import os; print(len(os.sched_getaffinity(0)))')"
  echo "cpus_allowed_list=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)"
  echo "kernel=$(uname -r)"
  echo "arch=$(uname -m)"
  echo "os=$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}")"
  # Both layers: plain systemd-detect-virt names the innermost only (docker
  # on a KVM guest).
  echo "virtualization_vm=$(detect_virt --vm)"
  echo "virtualization_container=$(detect_virt --container)"
  echo "memory=$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "compiler=$("${cxx:-c++}" --version 2>/dev/null | head -n1)"
  echo "build_type=$build_type"
  echo "cxx_flags=$(echo "$flags" | xargs)"
  echo "git_commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode=$mode"
  echo "command=bench/run.sh --$mode${only:+ --only $only}"
  echo "load_before=$(cut -d' ' -f1-3 /proc/loadavg)"
} > "$out/machine.txt"

# ---- the runs -------------------------------------------------------------------
wanted() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }

run() {  # run <name> <binary> <repetitions> <filter> [extra flags]
  local name="$1" binary="$2" repetitions="$3" filter="$4"
  wanted "$name" || return 0
  shift 4
  local t0=$SECONDS
  printf '== %-10s %s --benchmark_filter=%q (%s repetitions) ... ' "$name" "$binary" "$filter" \
    "$repetitions"
  "$bin/$binary" --benchmark_filter="$filter" \
    --benchmark_repetitions="$repetitions" \
    --benchmark_enable_random_interleaving=true \
    "${min_time[@]}" "$@" \
    --benchmark_out="$out/$name.json" --benchmark_out_format=json \
    > "$out/$name.log" 2>&1 || { echo "FAILED (see $out/$name.log)"; tail -n 20 "$out/$name.log" >&2; exit 1; }
  echo "$((SECONDS - t0)) s"
}

# run_ab <name> <filter>: the cost of metrics on the hot path. jobengine_bench
# (library with metrics) and jobengine_bench_nometrics (JOBENGINE_METRICS=0, the
# same benchmark source) cannot share a process, so they run alternately, one
# repetition each, $ab_rounds times (on off on off ...: a slow phase of the
# machine hits both alike), and merge_ab.py merges the files into <name>.json
# as metrics_on/<benchmark> and metrics_off/<benchmark>.
run_ab() {
  local name="$1" filter="$2"
  wanted "$name" || return 0
  local t0=$SECONDS dir="$out/$name-rounds" files=()
  mkdir -p "$dir"
  : > "$out/$name.log"
  printf '== %-10s jobengine_bench vs jobengine_bench_nometrics --benchmark_filter=%q (%s rounds) ... ' \
    "$name" "$filter" "$ab_rounds"
  for ((i = 1; i <= ab_rounds; i++)); do
    for variant in on off; do
      local binary=jobengine_bench
      [ "$variant" = off ] && binary=jobengine_bench_nometrics
      "$bin/$binary" --benchmark_filter="$filter" --benchmark_repetitions=1 \
        "${min_time[@]}" \
        --benchmark_out="$dir/$variant-$i.json" --benchmark_out_format=json \
        >> "$out/$name.log" 2>&1 || { echo "FAILED (see $out/$name.log)"; tail -n 20 "$out/$name.log" >&2; exit 1; }
      files+=("metrics_$variant=$dir/$variant-$i.json")
    done
  done
  python3 "$root/bench/merge_ab.py" "$out/$name.json" "${files[@]}"
  echo "$((SECONDS - t0)) s"
}

start=$SECONDS
run throughput jobengine_bench "$reps_targets" '^BM_(Engine|Bare|Mutex|Asio|Tbb)'
run wakeup jobengine_bench "$reps" '^BM_WakeLatency'
run sweep jobengine_bench "$reps" '^Sweep/' "${sweep_min_time[@]}"
run openloop jobengine_bench "$reps" '^OpenLoop/'
run delayed jobengine_bench "$reps_targets" '^BM_(DelayedPending/|SubmitDelayed|Cancel/)'
run_ab metrics '^BM_Engine_(Submit|SubmitBatch|Drain)/spin(/|$)'
run snapshot jobengine_snapshot_bench "$reps" '^BM_'
run pending jobengine_snapshot_bench "$reps" '^(SnapshotCost|RecoverVsPending|PlainReadVsPending)/'
run memory jobengine_memory_bench 1 '.'
echo "load_after=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"
echo "suite_seconds=$((SECONDS - start))" >> "$out/machine.txt"

echo "== report"
python3 "$root/bench/report.py" "$out"
if [ "$check" = 1 ]; then
  python3 "$root/bench/check_results.py" "$out"
fi
echo
echo "results:  $out"
echo "report:   $out/report.md"
echo "plots:    $(cd "$out" && ls -1 ./*.png 2>/dev/null | tr '\n' ' ')"
echo "compare:  python3 bench/compare.py <before-dir> $out"
