#!/usr/bin/env bash
# The demo scenario (tools/demo.md), end to end: jobengine-demo runs under load
# and crashes on a poison job (SIGKILL); jobsnap shows what its snapshots hold;
# the service restarts until the poison job is quarantined; the operator drops
# it; and the script checks, from the snapshot and the demo's journals, that
# every job the snapshot held came back and ran. Exit 0 when every claim held.
#
# Usage: tools/demo.sh [--work DIR] [--shm NAME] [--bin DIR]
#   --work DIR   scratch directory, emptied first (default build/release/demo-scenario)
#   --shm NAME   shared-memory segment (default jobengine-demo-scenario-<uid>)
#   --bin DIR    where jobengine-demo and jobsnap are (default build/release/tools)
# tools/run.sh builds the binaries and runs this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$root/build/release/demo-scenario"
shm="jobengine-demo-scenario-$(id -u)"
bin="$root/build/release/tools"
while [ $# -gt 0 ]; do
  case "$1" in
    --work) work="$2"; shift 2 ;;
    --shm) shm="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    *) echo "usage: tools/demo.sh [--work DIR] [--shm NAME] [--bin DIR]" >&2; exit 64 ;;
  esac
done
demo="$bin/jobengine-demo"
jobsnap="$bin/jobsnap"
for b in "$demo" "$jobsnap"; do
  [ -x "$b" ] || { echo "demo.sh: $b not built (tools/run.sh builds it)" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "demo.sh: needs python3 (tools/setup.sh)" >&2; exit 1; }
max_recoveries=2
work="$(realpath -m "$work")"
bin="$(realpath -m "$bin")"
demo="$bin/jobengine-demo"
jobsnap="$bin/jobsnap"

step=0
header() {
  step=$((step + 1))
  printf '\n== %d. %s %s\n' "$step" "$1" "$(printf '=%.0s' $(seq 1 $((70 - ${#1}))))"
}
say() { printf '%s\n' "$*" | fold -s -w 100 | sed 's/ *$//'; }
echo_cmd() { printf '$ %s\n' "$(printf '%q ' "$@" | sed "s|$bin/||g; s| $||")"; }
show() {  # prints the command as an operator would type it, then runs it
  echo_cmd "$@"
  "$@"
}
# The same for a command whose death by a signal is expected, without the
# shell's "Killed" notice: the command keeps our stderr, the shell's own goes
# nowhere.
show_crashing() {
  echo_cmd "$@"
  { "$@" 2>&3 3>&-; } 3>&2 2>/dev/null
}
fail() { printf '\nFAILED: %s\n' "$*"; exit 1; }

header "A fresh start"
rm -rf "$work"
mkdir -p "$work"
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
show_crashing "$demo" --dir "$dir" --shm "$shm" --jobs 6000 --rate 3000 --poison \
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
"$jobsnap" list "$dir" --shm "$shm" --json >"$work/list-before-restart.json"
"$jobsnap" dump "$dir" --shm "$shm" >"$work/held.jsonl"
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
  show_crashing "$demo" --dir "$dir" --shm "$shm" --resume-only --max-recoveries "$max_recoveries" \
    --status-interval 250 --journal "journal-$run.log" --report "report-$run.json" || rc=$?
  if [ "$rc" -eq 0 ]; then break; fi
  [ "$rc" -eq 137 ] || fail "restart $((run - 1)) exited $rc"
  say "Crashed again. What the next start will see of job $poison:"
  echo_cmd "$jobsnap" dump "$dir" --shm "$shm" --id "$poison"
  "$jobsnap" dump "$dir" --shm "$shm" --id "$poison" |
    python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); print("  job %d: state %s, recoveries %d, attempts %d" % (j["id"], j["state"], j["recoveries"], j["attempts"]))'
  echo
done
say "Restart $((run - 1)): job $poison had been running at $((max_recoveries + 1)) crashes, more than" \
    "max_recoveries ($max_recoveries), so the engine quarantined it as a poison job instead of running" \
    "it, and the service drained everything else and stopped cleanly."

header "The poison job, quarantined"
show "$jobsnap" inspect "$dir" --shm "$shm"

header "The operator drops it"
show "$jobsnap" drop "$dir" "$poison" --shm "$shm"
echo
show "$demo" --dir "$dir" --shm "$shm" --resume-only --max-recoveries "$max_recoveries" \
  --status-interval 0 --journal journal-final.log --report report-final.json
say "The service starts clean: nothing pending, no dead letters."

header "Check: every job the snapshot held came back and ran"
python3 - "$work" "$poison" "$held_gen" "$run" <<'EOF' || exit 1
import glob, json, sys
work, poison, held_gen, last_run = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def fail(msg):
    print("FAILED: " + msg)
    sys.exit(1)
held = [json.loads(l) for l in open(work + "/held.jsonl")]
live = {j["id"] for j in held if j["state"] != "dead"}
if poison not in live:
    fail("the snapshot loaded at restart did not hold the poison job %d" % poison)
first = json.load(open(work + "/report-2.json"))["recovery"]
if first["generation"] != held_gen:
    fail("jobsnap said generation %d would load, the restart loaded %d" % (held_gen, first["generation"]))
restored = first["pending"] + first["delayed"] + first["running_at_cut"] + first["poisoned"]
if restored != len(live):
    fail("the restart restored %d jobs, the snapshot held %d live ones" % (restored, len(live)))
ran, crashes = set(), 0
for run in range(2, last_run + 1):
    for line in open("%s/journal-%d.log" % (work, run)):
        f = line.split()
        if f[0] == "R":
            ran.add(int(f[1]))
        elif f[0] == "X":
            crashes += 1
missing = sorted(live - {poison} - ran)
if missing:
    fail("%d jobs held by generation %d never ran after the crash: %s" % (len(missing), held_gen, missing[:20]))
last = json.load(open("%s/report-%d.json" % (work, last_run)))
if last["recovery"]["poisoned"] != 1:
    fail("restart %d did not quarantine the poison job" % (last_run - 1))
final = json.load(open(work + "/report-final.json"))
if final["recovery"]["dead"] != 0 or final["counts"]["dead"] != 0:
    fail("after jobsnap drop the service still has dead letters")
# What a process crash loses: jobs accepted after the cut of the snapshot that
# survived (README "What is lost"), at most the 10 ms shared-memory interval.
submitted, done_before = set(), set()
for line in open(work + "/journal-1.log"):
    f = line.split()
    if f[0] == "S":
        submitted.add(int(f[1]))
    elif f[0] == "R" and f[4] == "done":
        done_before.add(int(f[1]))
lost = submitted - done_before - live
print("%d jobs were submitted before the crash; %d had finished; generation %d held the other %d"
      % (len(submitted), len(submitted & done_before), held_gen, len(live)))
print("(%d accepted in the last moments, after that snapshot's cut, were lost: the at-risk window)"
      % len(lost))
print("OK: %d jobs held by generation %d all ran after the crash; poison job %d crashed the "
      "service %d times, was quarantined as poison and dropped" % (len(live) - 1, held_gen, poison, crashes + 1))
EOF
