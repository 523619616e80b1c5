#!/usr/bin/env bash
# The demo scenario (tools/demo.md), end to end: jobengine-demo runs under load
# and crashes on a poison job (SIGKILL); jobsnap shows what its snapshots hold;
# the service restarts until the poison job is quarantined; the operator drops
# it; and the script checks, from the snapshot and the demo's journals, that
# every job the snapshot held came back and ran. Exit 0 when every claim held.
#
# Usage: tools/demo.sh [--work DIR] [--shm NAME] [--bin DIR] [--check]
#   --work DIR   scratch directory, emptied first (default build/release/demo-scenario);
#                relative to the current directory. An existing directory that is
#                not empty is emptied only if this script made it (it holds the
#                marker file .jobengine-demo-work); otherwise the script refuses.
#   --shm NAME   shared-memory segment (default jobengine-demo-scenario-<uid>)
#   --bin DIR    where jobengine-demo and jobsnap are (default build/release/tools)
#   --check      check the options (the work directory) only, and exit
# tools/run.sh builds the binaries and runs this (after a --check, before it builds).
set -euo pipefail
exec 9>&2  # the traps' stderr: one may run while fd 2 is /dev/null (run_child)
exec 8>&1  # the script's stdout, for a time-out's FAILED line from inside a pipe (bounded)
root="$(cd "$(dirname "$0")/.." && pwd)"
default_work="$root/build/release/demo-scenario"
work="$default_work"
shm="jobengine-demo-scenario-$(id -u)"
bin="$root/build/release/tools"
check_only=0
usage() { echo "usage: tools/demo.sh [--work DIR] [--shm NAME] [--bin DIR] [--check]" >&2; exit 64; }
while [ $# -gt 0 ]; do
  case "$1" in
    --work|--shm|--bin) [ $# -ge 2 ] && [ -n "$2" ] || usage ;;&
    --work) work="$2"; shift 2 ;;
    --shm) shm="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --check) check_only=1; shift ;;
    *) usage ;;
  esac
done
work="$(realpath -m -- "$work")"
default_work="$(realpath -m -- "$default_work")"
bin="$(realpath -m -- "$bin")"

# The work directory is deleted and made again: only one that this script made
# (it writes $marker into it), an empty one, one that does not exist yet, or
# the default one (inside the build tree).
marker=.jobengine-demo-work
refuse() {
  echo "demo.sh: refusing to use --work $work: $1; nothing was deleted." >&2
  echo "demo.sh: give a new or empty directory, or one an earlier run of this script made." >&2
  exit 1
}
case "$root/" in "${work%/}/"*) refuse "it holds the repository" ;; esac
if [ -e "$work" ] || [ -L "$work" ]; then
  [ -d "$work" ] || refuse "it exists and is not a directory"
  if [ "$work" != "$default_work" ] && [ ! -f "$work/$marker" ] &&
     [ -n "$(ls -A -- "$work")" ]; then
    refuse "it is not empty and has no $marker file (this script did not make it)"
  fi
fi
[ "$check_only" -eq 0 ] || exit 0

demo="$bin/jobengine-demo"
jobsnap="$bin/jobsnap"
for b in "$demo" "$jobsnap"; do
  [ -x "$b" ] || { echo "demo.sh: $b not built (tools/run.sh builds it)" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "demo.sh: needs python3 (tools/setup.sh)" >&2; exit 1; }
command -v timeout >/dev/null || { echo "demo.sh: needs timeout (GNU coreutils)" >&2; exit 1; }
max_recoveries=2
# Each jobengine-demo and jobsnap run gets at most this many seconds (the whole
# scenario takes about 5 s), then SIGTERM, and SIGKILL 5 s later: a hang ends
# as a FAILED step, not as a script that never returns.
limit=120

# jobengine-demo runs as a tracked child, under timeout(1) (which runs it in
# timeout's own process group and passes on the signals it gets): if this
# script ends early (Ctrl-C, SIGTERM, a timeout's signal, a failed step), the
# EXIT trap stops it with SIGTERM (it then writes a final snapshot), and with
# SIGKILL (the whole group: timeout and the demo) after 5 s.
child=""
stop_child() {
  [ -n "$child" ] || return 0
  kill -TERM "$child" 2>/dev/null || return 0
  local i
  for i in $(seq 50); do
    kill -0 "$child" 2>/dev/null || { child=""; return 0; }
    sleep 0.1
  done
  kill -KILL -- "-$child" 2>/dev/null || kill -KILL "$child" 2>/dev/null || true
  child=""
}
trap stop_child EXIT
trap 'stop_child; echo "demo.sh: interrupted" >&9; exit 130' INT
trap 'stop_child; echo "demo.sh: terminated" >&9; exit 143' TERM

step=0
header() {
  step=$((step + 1))
  printf '\n== %d. %s %s\n' "$step" "$1" "$(printf '=%.0s' $(seq 1 $((70 - ${#1}))))"
}
say() { printf '%s\n' "$*" | fold -s -w 100 | sed 's/ *$//'; }
echo_cmd() { printf '$ %s\n' "$(printf '%q ' "$@" | sed "s|$bin/||g; s| $||")"; }
show() {  # prints the command as an operator would type it, then runs it (bounded)
  echo_cmd "$@"
  bounded "$@"
}
# Whether a command that ended with status $1 after $2 seconds ran out of its
# $limit seconds: timeout(1) exits 124 then, or 137 when its SIGKILL (5 s
# after its SIGTERM) ended the command -- which reads like the demo's own
# SIGKILL crash, hence the clock.
timed_out() { [ "$1" -eq 124 ] || { [ "$1" -ne 0 ] && [ "$2" -ge "$limit" ]; }; }
timeout_failed() {
  printf '\nFAILED: %s ran past its %d s limit and was stopped\n' \
    "$(printf '%q ' "$@" | sed "s|$bin/||g; s| $||")" "$limit" >&8
  exit 1
}
# Runs "$@" (jobsnap) under the time limit: its status, or FAILED and exit 1
# when it ran out of time (in a pipe: that side of it exits, pipefail does the rest).
bounded() {
  local rc=0 t0=$SECONDS
  timeout -k 5 "$limit" "$@" 8>&- 9>&- || rc=$?
  ! timed_out "$rc" $((SECONDS - t0)) || timeout_failed "$@"
  return "$rc"
}
# Runs "$@" as the tracked child (stop_child), under the time limit, and
# returns its status (128 + N when signal N killed it: timeout(1) dies of the
# signal that killed the command), without the shell's "Killed" notice: the
# command keeps our stderr, the shell's notice goes nowhere. FAILED and exit 1
# when it ran out of time.
run_child() {
  local rc=0 t0=$SECONDS
  timeout -k 5 "$limit" "$@" 8>&- 9>&- &
  child=$!
  wait "$child" 2>/dev/null || rc=$?
  child=""
  ! timed_out "$rc" $((SECONDS - t0)) || timeout_failed "$@"
  return "$rc"
}
# show, for jobengine-demo (whose death by a signal may be expected).
show_child() {
  echo_cmd "$@"
  run_child "$@"
}
fail() { printf '\nFAILED: %s\n' "$*"; exit 1; }

header "A fresh start"
rm -rf "$work"
mkdir -p "$work"
: >"$work/$marker"
cd "$work"  # the commands below then read as an operator would type them
dir=snapshots
rm -f "/dev/shm/$shm"
say "In $work: no snapshots, no segment /dev/shm/$shm."
say "The service is jobengine-demo: thumbnails (CPU work), emails (1 ms each, about 10% fail" \
    "once and are retried with backoff), ledger postings (deduplicated by unique key) and" \
    "delayed reminders. It snapshots its pending jobs to shared memory '$shm' every 10 ms and to" \
    "$dir/ every 150 ms. One thumbnail job carries a malformed image that crashes the process."

header "The service runs under load, then crashes"
rc=0
show_child "$demo" --dir "$dir" --shm "$shm" --jobs 6000 --rate 3000 --poison \
  --max-recoveries "$max_recoveries" --status-interval 250 \
  --journal journal-1.log --report report-1.json || rc=$?
[ "$rc" -eq 137 ] || fail "the demo should have died by SIGKILL (exit 137), it exited $rc"
poison=$(awk '$1 == "X" { print $2; exit }' "$work/journal-1.log")
[ -n "$poison" ] || fail "no poison job in journal-1.log"
say "The process is gone (exit 137: SIGKILL) while job $poison was running. Jobs in its queues," \
    "delayed reminders and emails waiting to retry were only in memory -- and in its snapshots."

header "The operator looks at what the snapshots hold"
show "$jobsnap" list "$dir" --shm "$shm"
say "'=>' marks the image the next start will load: the shared-memory one, newer than any on disk."
echo
show "$jobsnap" inspect "$dir" --shm "$shm"
bounded "$jobsnap" list "$dir" --shm "$shm" --json >"$work/list-before-restart.json"
bounded "$jobsnap" dump "$dir" --shm "$shm" >"$work/held.jsonl"
held_gen=$(python3 -c '
import json, sys
print(next(g["generation"] for g in json.load(open(sys.argv[1])) if g["loaded_next"]))' \
  "$work/list-before-restart.json")
held_jobs=$(wc -l <"$work/held.jsonl")
say "Generation $held_gen holds $held_jobs jobs, job $poison among them as running-at-cut: it will" \
    "run again, and crash the service again. (The whole list: jobsnap dump, saved in held.jsonl.)"

header "The service restarts, and crashes again on the same job"
run=1
while :; do
  run=$((run + 1))
  [ "$run" -le $((max_recoveries + 3)) ] || fail "the poison job was not quarantined after $((run - 2)) restarts"
  rc=0
  show_child "$demo" --dir "$dir" --shm "$shm" --resume-only --max-recoveries "$max_recoveries" \
    --status-interval 250 --journal "journal-$run.log" --report "report-$run.json" || rc=$?
  if [ "$rc" -eq 0 ]; then break; fi
  [ "$rc" -eq 137 ] || fail "restart $((run - 1)) exited $rc"
  say "Crashed again. What the next start will see of job $poison:"
  echo_cmd "$jobsnap" dump "$dir" --shm "$shm" --id "$poison"
  bounded "$jobsnap" dump "$dir" --shm "$shm" --id "$poison" |
    python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); print("  job %d: state %s, recoveries %d, attempts %d" % (j["id"], j["state"], j["recoveries"], j["attempts"]))'
  echo
done
say "Restart $((run - 1)): job $poison had been running at $((max_recoveries + 1)) crashes, more than" \
    "max_recoveries ($max_recoveries), so the engine quarantined it as a poison job instead of running" \
    "it, and the service drained everything else and stopped cleanly."

header "The poison job, quarantined"
show "$jobsnap" inspect "$dir" --shm "$shm"
bounded "$jobsnap" dump "$dir" --shm "$shm" >"$work/quarantined.jsonl"

header "The operator drops it"
show "$jobsnap" drop "$dir" "$poison" --shm "$shm"
echo
rc=0
show_child "$demo" --dir "$dir" --shm "$shm" --resume-only --max-recoveries "$max_recoveries" \
  --status-interval 0 --journal journal-final.log --report report-final.json || rc=$?
[ "$rc" -eq 0 ] || fail "the start after the drop exited $rc"
say "The service starts clean: nothing pending, no dead letters."

header "Check: every job the snapshot held came back and ran"
python3 - "$work" "$poison" "$held_gen" "$run" "$max_recoveries" <<'EOF' || exit 1
import json, sys
work, poison, held_gen, last_run, max_recoveries = (
    sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
def fail(msg):
    print("FAILED: " + msg)
    sys.exit(1)
def read(name):
    try:
        return open("%s/%s" % (work, name)).read()
    except OSError as e:
        fail("cannot read %s: %s" % (name, e.strerror))
def report(name):
    try:
        return json.loads(read(name))
    except ValueError:
        fail("%s is not JSON" % name)
def journal(name):
    return [l.split() for l in read(name).splitlines() if l.split()]
held = [json.loads(l) for l in read("held.jsonl").splitlines()]
held_ids = {j["id"] for j in held}
live = {j["id"] for j in held if j["state"] != "dead"}
if poison not in live:
    fail("the snapshot loaded at restart did not hold the poison job %d" % poison)
first = report("report-2.json")["recovery"]
if first["generation"] != held_gen:
    fail("jobsnap said generation %d would load, the restart loaded %d" % (held_gen, first["generation"]))
restored = first["pending"] + first["delayed"] + first["running_at_cut"] + first["poisoned"]
if restored != len(live):
    fail("the restart restored %d jobs, the snapshot held %d live ones" % (restored, len(live)))
# Each restart but the last crashed on the poison job (and only on it), without
# quarantining anything; the last quarantined it and never ran it. A job ran
# when a run of it ended done (R <id> <handler> <attempt> done); one that ended
# retry is still to run.
ran, crashes = set(), 1  # the first run's crash
for run in range(2, last_run + 1):
    rep = report("report-%d.json" % run)
    xs = []
    for f in journal("journal-%d.log" % run):
        if f[0] == "R" and f[4] == "done":
            ran.add(int(f[1]))
        elif f[0] == "X":
            xs.append(int(f[1]))
    if any(x != poison for x in xs):
        fail("restart %d crashed on job %s, not on the poison job %d" % (run - 1, xs, poison))
    if run < last_run:
        if len(xs) != 1:
            fail("restart %d died by SIGKILL, but its journal has %d poison runs" % (run - 1, len(xs)))
        if rep["recovery"]["poisoned"] != 0:
            fail("restart %d quarantined a job before max_recoveries" % (run - 1))
        crashes += 1
    elif xs:
        fail("the poison job ran again in restart %d, which quarantined it" % (run - 1))
if crashes != max_recoveries + 1:
    fail("the poison job crashed the service %d times, max_recoveries %d allows %d"
         % (crashes, max_recoveries, max_recoveries + 1))
if poison in ran:
    fail("the poison job %d returned from its handler" % poison)
missing = sorted(live - {poison} - ran)
if missing:
    fail("%d jobs held by generation %d never ran after the crash: %s" % (len(missing), held_gen, missing[:20]))
last = report("report-%d.json" % last_run)
if last["recovery"]["poisoned"] != 1:
    fail("restart %d did not quarantine the poison job" % (last_run - 1))
counts = last.get("counts")
if last.get("phase") != "finished" or counts is None:
    fail("restart %d did not finish" % (last_run - 1))
if counts["done"] != counts["recovered"] or counts["failed"] != 0 or counts["dead"] != 1:
    fail("restart %d recovered %d jobs, ran %d to done, %d failed, left %d dead letters (want all "
         "done, none failed, 1 dead letter)"
         % (last_run - 1, counts["recovered"], counts["done"], counts["failed"], counts["dead"]))
# What the snapshots held after the quarantine: the poison job alone, dead.
left = [json.loads(l) for l in read("quarantined.jsonl").splitlines()]
if [j["id"] for j in left] != [poison]:
    fail("after the quarantine the snapshot held jobs %s, not the poison job %d alone"
         % ([j["id"] for j in left][:20], poison))
q = left[0]
if q["state"] != "dead" or q["dead_reason"] != "poison" or q["recoveries"] != max_recoveries + 1:
    fail("the quarantined job %d is %s, reason %s, %d recoveries (want dead, poison, %d)"
         % (poison, q["state"], q["dead_reason"], q["recoveries"], max_recoveries + 1))
final = report("report-final.json")
if final["recovery"]["dead"] != 0 or final["recovery"]["poisoned"] != 0 or final["counts"]["dead"] != 0:
    fail("after jobsnap drop the service still has dead letters")
# What a process crash loses: jobs accepted after the cut of the snapshot that
# survived (README "What is lost"), at most the 10 ms shared-memory interval.
# One producer thread writes each S line after submit() returned, so the
# journal's S lines are in acceptance order: every job accepted before the
# last one the snapshot holds was accepted before its cut, and must be in it
# (dead ones too) or have finished before it. Only jobs after that one may be lost.
order, done_before = {}, set()  # order: job id -> its place among the S lines
for f in journal("journal-1.log"):
    if f[0] == "S":
        order.setdefault(int(f[1]), len(order))
    elif f[0] == "R" and f[4] == "done":
        done_before.add(int(f[1]))
submitted = set(order)
lost = submitted - done_before - held_ids
last_held = max((i for i in held_ids if i in order), key=order.get, default=None)
if last_held is None:
    fail("generation %d holds none of the jobs journal-1.log says were accepted" % held_gen)
early = sorted((i for i in lost if order[i] < order[last_held]), key=order.get)
if early:
    fail("%d jobs accepted before job %d, which generation %d holds, are neither in it nor "
         "finished: lost though accepted before its cut: %s"
         % (len(early), last_held, held_gen, early[:20]))
# A job that finished after the cut is in both: it ran, and the generation
# holds it (it runs again: at-least-once).
print("%d jobs were submitted before the crash; %d had finished; generation %d held %d "
      "(%d of them had finished after its cut: they run again)"
      % (len(submitted), len(submitted & done_before), held_gen, len(live),
         len(live & done_before)))
print("(%d accepted in the last moments, after job %d, the last one that snapshot's cut held, were "
      "lost: the at-risk window)" % (len(lost), last_held))
print("The restart that quarantined job %d ran all %d jobs it recovered to done, none failed."
      % (poison, counts["recovered"]))
print("OK: %d jobs held by generation %d all ran after the crash; poison job %d crashed the "
      "service %d times, was quarantined as poison and dropped" % (len(live) - 1, held_gen, poison, crashes))
EOF
