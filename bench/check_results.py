#!/usr/bin/env python3
"""Checks that a results directory of bench/run.sh is complete: every JSON
file parses and holds benchmarks, none of them failed, report.md has every
section, and the plots exist when gnuplot is installed. Timings are never
judged (a missed target is not a failure here), so this cannot flake on a
slow or busy machine.

Usage: python3 bench/check_results.py DIR      exit 0 when complete, 1 if not
"""

import json
import os
import shutil
import sys

JSON_FILES = {
    # file: name prefixes that must each appear in it
    "throughput": ["BM_Engine_Submit/", "BM_Engine_SubmitBatch/", "BM_BareQueue", "BM_MutexPool",
                   "BM_Asio", "BM_Tbb"],
    "wakeup": ["BM_WakeLatency_Engine/", "BM_WakeLatency_BareQueue/"],
    "sweep": ["Sweep/engine_submit/", "Sweep/engine_batch/", "Sweep/bare/", "Sweep/bare_bulk/",
              "Sweep/mutex/", "Sweep/asio/", "Sweep/tbb/"],
    "openloop": ["OpenLoop/engine_spin/", "OpenLoop/engine_block/", "OpenLoop/bare/",
                 "OpenLoop/mutex/", "OpenLoop/asio/", "OpenLoop/tbb/"],
    "snapshot": ["BM_SubmitWithShmSnapshots", "BM_SubmitWithoutSnapshots", "BM_SnapshotToDisk_1M",
                 "BM_Recover_1M/", "BM_IdleEngine/"],
    "pending": ["SnapshotCost/shm/", "SnapshotCost/disk/", "RecoverVsPending/",
                "PlainReadVsPending/"],
    "memory": ["Memory/engine/", "Memory/bare/", "Memory/mutex/", "Memory/asio/", "Memory/tbb/"],
    "delayed": ["BM_DelayedPending/none", "BM_DelayedPending/delayed", "BM_SubmitDelayed",
                "BM_Cancel/miss/", "BM_Cancel/hit/", "BM_Cancel/hit_keyed/", "BM_Cancel/done/"],
    "metrics": ["metrics_on/BM_Engine_Submit/spin", "metrics_off/BM_Engine_Submit/spin",
                "metrics_on/BM_Engine_SubmitBatch/spin", "metrics_off/BM_Engine_SubmitBatch/spin",
                "metrics_on/BM_Engine_Drain/spin", "metrics_off/BM_Engine_Drain/spin"],
}

# Context entries that must hold these values: the A/B file must compare the
# library with metrics against the one without (merge_ab.py records each side's).
CONTEXT = {
    "metrics": {"metrics_on:jobengine_metrics": "on", "metrics_off:jobengine_metrics": "off"},
}

SECTIONS = ["## Machine", "## Targets", "## Throughput: 1 submitter + 1 worker",
            "## Throughput sweep", "## Wake-up latency", "## End-to-end latency under steady load",
            "## Snapshots under load", "## Snapshot cost and recovery time against pending jobs",
            "## Memory per pending job",
            "## Job semantics: delayed jobs pending, submitting them, cancel()",
            "## Metrics on the hot path", "## Plots"]

PLOTS = ["throughput_vs_threads.png", "latency_vs_load.png", "snapshot_vs_pending.png",
         "memory_vs_payload.png"]


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    directory = argv[1]
    problems = []
    for name, prefixes in JSON_FILES.items():
        path = os.path.join(directory, name + ".json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            problems.append(f"{path}: {err}")
            continue
        # Valid JSON of another shape is a problem to report, not a traceback.
        benchmarks = data.get("benchmarks", []) if isinstance(data, dict) else None
        if not isinstance(benchmarks, list) or not all(isinstance(b, dict) for b in benchmarks):
            problems.append(f"{path}: not Google Benchmark output (an object with a list "
                            "of benchmark objects)")
            continue
        names = [b.get("run_name", b.get("name", "")) for b in benchmarks]
        for prefix in prefixes:
            if not any(n.startswith(prefix) for n in names):
                problems.append(f"{path}: no benchmark named {prefix}...")
        context = data.get("context", {})
        for key, want in CONTEXT.get(name, {}).items():
            if context.get(key) != want:
                problems.append(f"{path}: context {key} is {context.get(key)!r}, expected {want!r}")
        for b in benchmarks:
            if b.get("error_occurred"):
                problems.append(f"{path}: {b.get('name')} failed: {b.get('error_message')}")
    report = os.path.join(directory, "report.md")
    try:
        with open(report, encoding="utf-8") as f:
            text = f.read()
        for section in SECTIONS:
            if section not in text:
                problems.append(f"{report}: no section '{section}'")
        if "| target | measured | goal | result |" not in text:  # prefix of the header
            problems.append(f"{report}: no targets table")
    except OSError as err:
        problems.append(f"{report}: {err}")
    if shutil.which("gnuplot"):
        for plot in PLOTS:
            path = os.path.join(directory, plot)
            if not os.path.exists(path) or os.path.getsize(path) == 0:
                problems.append(f"{path}: missing or empty")
    machine = os.path.join(directory, "machine.txt")
    if not os.path.exists(machine):
        problems.append(f"{machine}: missing")
    for p in problems:
        print("check_results:", p, file=sys.stderr)
    if not problems:
        print(f"check_results: {directory} is complete")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
