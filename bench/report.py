#!/usr/bin/env python3
"""Turns a results directory of bench/run.sh into report.md and PNG plots.

Usage: python3 bench/report.py DIR

Reads DIR/*.json (Google Benchmark output) and DIR/machine.txt; writes
DIR/report.md, DIR/*.dat (plot data) and, when gnuplot is installed,
DIR/*.png. Every figure is the median over repetitions; every ratio is a
ratio of medians from the same JSON file, never across runs: medians
measured in the same process, except the metrics on/off ratios, whose two
sides are two binaries run alternately in separate processes (run.sh's
run_ab). Nothing is hard-coded but the targets.

Exit status: 0 when the report was written (missed targets included: a timing
never fails this script), 2 when DIR holds no readable results.
"""

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys

TIME_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def short_name(run_name):
    run_name = re.sub(r"/iterations:\d+", "", run_name)
    for suffix in ("/real_time", "/manual_time"):
        if run_name.endswith(suffix):
            run_name = run_name[: -len(suffix)]
    return run_name


class Results:
    """Per JSON file: {benchmark: {metric: [value per repetition]}}, plus the
    context and the benchmarks that failed."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        # Valid JSON of another shape (a list, a stray file) is as unreadable to
        # the callers as a parse error: a ValueError, which they skip with a note.
        if not isinstance(data, dict):
            raise ValueError(f"top level is a JSON {type(data).__name__}, not an object")
        benchmarks = data.get("benchmarks", [])
        if not isinstance(benchmarks, list) or not all(isinstance(e, dict) for e in benchmarks):
            raise ValueError("'benchmarks' is not a list of objects")
        context = data.get("context", {})
        self.path = path
        self.context = context if isinstance(context, dict) else {}
        self.samples = {}
        self.errors = {}
        aggregates = {}
        for entry in benchmarks:
            name = short_name(entry.get("run_name", entry.get("name", "?")))
            if entry.get("error_occurred"):
                self.errors[name] = entry.get("error_message", "")
                continue
            values = {}
            for key, value in entry.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[key] = float(value)
            if "real_time" in entry:
                unit = TIME_UNIT_SECONDS.get(entry.get("time_unit", "ns"), 1e-9)
                values["seconds"] = float(entry["real_time"]) * unit
            if entry.get("run_type", "iteration") == "iteration":
                bucket = self.samples.setdefault(name, {})
                for key, value in values.items():
                    bucket.setdefault(key, []).append(value)
            elif entry.get("aggregate_name") == "median":
                aggregates[name] = values
        for name, values in aggregates.items():
            if name not in self.samples:
                self.samples[name] = {k: [v] for k, v in values.items()}

    def median(self, name, metric):
        values = self.samples.get(name, {}).get(metric)
        return statistics.median(values) if values else None

    def reps(self, name, metric):
        return len(self.samples.get(name, {}).get(metric, []))

    def names(self):
        return list(self.samples)


def load_all(directory):
    results = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith(".json"):
            try:
                results[file[:-5]] = Results(os.path.join(directory, file))
            except (OSError, ValueError) as err:
                print(f"report.py: skipping {file}: {err}", file=sys.stderr)
    return results


def read_machine(directory):
    machine = {}
    try:
        with open(os.path.join(directory, "machine.txt"), encoding="utf-8") as f:
            for line in f:
                key, _, value = line.rstrip("\n").partition("=")
                if key:
                    machine[key] = value
    except OSError:
        pass
    return machine


def fmt(value, digits=2, scale=1.0):
    if value is None:
        return "n/a"
    value *= scale
    if value != 0 and abs(value) < 10 ** (-digits):
        return f"{value:.2g}"
    return f"{value:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


class Report:
    def __init__(self):
        self.lines = []

    def add(self, text=""):
        self.lines.append(text)

    def table(self, header, rows, align=None):
        self.add("| " + " | ".join(header) + " |")
        align = align or (["---"] + ["---:"] * (len(header) - 1))
        self.add("|" + "|".join(align) + "|")
        for row in rows:
            self.add("| " + " | ".join(str(c) for c in row) + " |")
        self.add()


# ---- targets ------------------------------------------------------------------------------

# (label, file, numerator, denominator, metric, op, goal)
RATIO_TARGETS = [
    ("engine submit / bare-queue ceiling (1 submitter + 1 worker, empty jobs)", "throughput",
     "BM_Engine_Submit/spin", "BM_BareQueue", "items_per_second", ">=", 0.5),
    ("engine submit / mutex pool", "throughput",
     "BM_Engine_Submit/spin", "BM_MutexPool", "items_per_second", ">=", 5.0),
    ("engine submit / boost::asio::thread_pool", "throughput",
     "BM_Engine_Submit/spin", "BM_Asio", "items_per_second", ">=", 3.0),
    ("engine submit / oneTBB task_arena + task_group", "throughput",
     "BM_Engine_Submit/spin", "BM_Tbb", "items_per_second", ">=", 2.0),
    ("engine submit_batch(64) / bare queue enqueue_bulk(64)", "throughput",
     "BM_Engine_SubmitBatch/spin", "BM_BareQueue_Bulk", "items_per_second", ">=", 0.5),
    ("spin wake-up p50 / bare queue's", "wakeup",
     "BM_WakeLatency_Engine/spin/5", "BM_WakeLatency_BareQueue/5", "p50_ns", "<=", 1.5),
    ("spin wake-up p99 / bare queue's", "wakeup",
     "BM_WakeLatency_Engine/spin/5", "BM_WakeLatency_BareQueue/5", "p99_ns", "<=", 2.0),
    ("throughput with shm snapshots every 10 ms (100k pending) / without", "snapshot",
     "BM_SubmitWithShmSnapshots", "BM_SubmitWithoutSnapshots", "items_per_second", ">=", 0.9),
    ("p99.9 submit latency with shm snapshots / without", "snapshot",
     "BM_SubmitWithShmSnapshots", "BM_SubmitWithoutSnapshots", "p999_ns", "<=", 1.2),
    ("1M-job disk snapshot bandwidth / plain write+fsync of the same bytes", "snapshot",
     "BM_SnapshotToDisk_1M", "BM_PlainWriteFsync_1M", "bytes_per_second", ">=", 0.5),
    ("recovery of 1M jobs / plain read of the file (warm cache, time)", "snapshot",
     "BM_Recover_1M/warm", "BM_PlainRead_1M/warm", "seconds", "<=", 2.0),
    # Issue #4. {delayed} is the run's jobengine_delayed_jobs (20,000 in quick mode).
    ("engine submit with {delayed} delayed jobs pending / none pending (same table size)",
     "delayed", "BM_DelayedPending/delayed", "BM_DelayedPending/none", "items_per_second",
     ">=", 0.8),
    ("engine submit with metrics / metrics compiled out (JOBENGINE_METRICS=0)", "metrics",
     "metrics_on/BM_Engine_Submit/spin", "metrics_off/BM_Engine_Submit/spin",
     "items_per_second", ">=", 0.95),
    ("engine submit_batch(64) with metrics / metrics compiled out", "metrics",
     "metrics_on/BM_Engine_SubmitBatch/spin", "metrics_off/BM_Engine_SubmitBatch/spin",
     "items_per_second", ">=", 0.95),
    ("worker draining queued jobs with metrics / metrics compiled out", "metrics",
     "metrics_on/BM_Engine_Drain/spin", "metrics_off/BM_Engine_Drain/spin",
     "items_per_second", ">=", 0.95),
]

MEMORY_GOAL = 64.0
MEMORY_PAYLOADS = (16, 64, 192, 256, 1024)

# Files whose ratios divide medians of two processes (two binaries run
# alternately, merged by merge_ab.py), not of one: labelled as such.
AB_FILES = {"metrics": "alternated processes of two binaries"}


def fmt_metric(value, metric):
    """A median in the unit its metric reads best in."""
    if value is None:
        return "n/a"
    if metric == "items_per_second":
        return f"{value / 1e6:.2f} Mjobs/s"
    if metric == "bytes_per_second":
        return f"{value / 1e6:,.0f} MB/s"
    if metric == "seconds":
        return f"{value * 1e3:,.1f} ms"
    if metric.endswith("_ns"):
        return f"{value:,.0f} ns"
    return f"{value:g}"


def verdict(value, op, goal):
    if value is None:
        return "n/a"
    met = value >= goal if op == ">=" else value <= goal
    return "PASS" if met else "**MISS**"


def section_targets(rep, res):
    rep.add("## Targets")
    rep.add()
    rep.add("Ratios of medians from the same JSON file, measured in the same process, except "
            "the rows marked (alternated processes of two binaries): the metrics on/off medians "
            "come from the library with and without metrics, which cannot share a process, "
            "run one after the other, one repetition per process. "
            "Goals from issues #4 and #6 and from `targets.md`, the project's targets "
            "document (kept outside this repository); every goal is restated in the "
            "'goal' column below.")
    rep.add()
    rows = []
    summary = {"PASS": 0, "**MISS**": 0, "n/a": 0}
    for label, file, num, den, metric, op, goal in RATIO_TARGETS:
        r = res.get(file)
        a = r.median(num, metric) if r else None
        b = r.median(den, metric) if r else None
        value = ratio(a, b)
        v = verdict(value, op, goal)
        summary[v] += 1
        delayed = r.context.get("jobengine_delayed_jobs", "") if r else ""
        label = label.format(delayed=f"{int(delayed):,}" if delayed.isdigit() else "?")
        if file in AB_FILES:
            label += f" ({AB_FILES[file]})"
        rows.append([label, fmt(value, 2), f"{op} {goal:g}", v,
                     f"{fmt_metric(a, metric)} vs {fmt_metric(b, metric)}"])
    # The worst case over every payload size, or none: the worst of the sizes
    # that happen to have a figure could PASS on the one that failed.
    mem = res.get("memory")
    overheads = {p: mem.median(f"Memory/engine/payload:{p}", "overhead_per_job") if mem else None
                 for p in MEMORY_PAYLOADS}
    missing = [p for p, o in overheads.items() if o is None]
    worst = None if missing else max(overheads.values())
    v = verdict(worst, "<=", MEMORY_GOAL)
    summary[v] += 1
    if not mem:
        note = "(no memory.json)"
    elif missing:
        known = [o for o in overheads.values() if o is not None]
        note = (f"no engine figure for payload {', '.join(map(str, missing))} B"
                + (f" (worst of the others: {fmt(max(known), 0)})" if known else ""))
    else:
        note = "(table below)"
    rows.append(["memory overhead per pending job beyond its payload, bytes (worst payload size)",
                 fmt(worst, 0), f"<= {MEMORY_GOAL:g}", v, note])
    rep.table(["target", "measured", "goal", "result", "medians compared"], rows,
              ["---", "---:", "---", "---", "---"])
    rep.add(f"{summary['PASS']} pass, {summary['**MISS**']} miss, {summary['n/a']} not measured.")
    rep.add()


# ---- sections -----------------------------------------------------------------------------

THROUGHPUT_ROWS = [
    ("BM_Engine_Submit/spin", "jobengine submit(), kSpin"),
    ("BM_Engine_Submit/spin_then_block", "jobengine submit(), kSpinThenBlock"),
    ("BM_Engine_SubmitBatch/spin", "jobengine submit_batch(64), kSpin"),
    ("BM_Engine_SubmitBatch/spin_then_block", "jobengine submit_batch(64), kSpinThenBlock"),
    ("BM_BareQueue", "bare moodycamel queue (ceiling)"),
    ("BM_BareQueue_Bulk", "bare queue, enqueue_bulk(64)"),
    ("BM_BareQueue_Bounded", "bare queue bounded to the engine's capacity"),
    ("BM_MutexPool", "mutex + condvar + deque<std::function>"),
    ("BM_Asio", "boost::asio::thread_pool, post()"),
    ("BM_Tbb", "oneTBB task_arena + task_group"),
]


def section_throughput(rep, res):
    r = res.get("throughput")
    if not r:
        return
    jobs = r.context.get("jobengine_jobs_per_iteration", "?")
    rep.add("## Throughput: 1 submitter + 1 worker, empty jobs, 16-byte payload")
    rep.add()
    rep.add(f"Submit-to-completion rate, {jobs} jobs per iteration, submitter and worker pinned "
            f"to CPUs {r.context.get('jobengine_submitter_cpu', '?')} and "
            f"{r.context.get('jobengine_worker_cpu', '?')}; median (min-max) of "
            f"{r.reps('BM_BareQueue', 'items_per_second')} repetitions. The last columns are "
            "jobengine's submit() (kSpin) and submit_batch() rates divided by the row's.")
    rep.add()
    eng = r.median("BM_Engine_Submit/spin", "items_per_second")
    batch = r.median("BM_Engine_SubmitBatch/spin", "items_per_second")
    rows = []
    for name, label in THROUGHPUT_ROWS:
        values = r.samples.get(name, {}).get("items_per_second")
        if not values:
            continue
        med = statistics.median(values)
        rows.append([label, fmt(med / 1e6), f"{min(values) / 1e6:.2f}-{max(values) / 1e6:.2f}",
                     fmt(ratio(eng, med)), fmt(ratio(batch, med))])
    rep.table(["system", "Mjobs/s", "range", "submit ÷ row", "batch ÷ row"], rows)


SWEEP_SYSTEMS = ["engine_submit", "engine_batch", "bare", "bare_bulk", "mutex", "asio", "tbb"]
SWEEP_RE = re.compile(r"^Sweep/([a-z_]+)/(\d+)B/s(\d+)/w(\d+)$")


def sweep_data(r):
    """{payload: {(s, w): {system: Mjobs/s}}} and the grid order."""
    data = {}
    order = []
    for name in r.names():
        m = SWEEP_RE.match(name)
        if not m:
            continue
        system, payload, s, w = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        value = r.median(name, "items_per_second")
        data.setdefault(payload, {}).setdefault((s, w), {})[system] = value
        if (s, w) not in order:
            order.append((s, w))
    # The row S = 1, then the column W = 1, then the diagonal.
    order.sort(key=lambda sw: (0 if sw[0] == 1 else 1 if sw[1] == 1 else 2, sw[0], sw[1]))
    return data, order


def section_sweep(rep, res, machine):
    r = res.get("sweep")
    if not r:
        return
    data, order = sweep_data(r)
    if not data:
        return
    rep.add("## Throughput sweep: submitters x workers x payload")
    rep.add()
    rep.add(f"Mjobs/s, median of {max((r.reps(n, 'items_per_second') for n in r.names()), default=0)}"
            f" repetitions; S submitters x W workers on {machine.get('cpus_allowed', '?')} allowed "
            "CPUs (threads pinned round-robin, submitters first; S + W above the CPU count is "
            "oversubscribed, marked *). The engine runs its default kSpinThenBlock here. The last "
            "columns divide jobengine submit() by each baseline.")
    rep.add()
    cpus = int(machine.get("cpus_allowed", "0") or 0)
    for payload in sorted(data):
        rep.add(f"### {payload}-byte payload")
        rep.add()
        rows = []
        for sw in order:
            cell = data[payload].get(sw)
            if not cell:
                continue
            s, w = sw
            label = f"{s}x{w}" + (" *" if cpus and s + w > cpus else "")
            eng = cell.get("engine_submit")
            rows.append([label] + [fmt(cell.get(sys_) and cell[sys_] / 1e6) for sys_ in SWEEP_SYSTEMS]
                        + [fmt(ratio(eng, cell.get(b))) for b in ("bare", "mutex", "asio", "tbb")])
        rep.table(["S x W"] + SWEEP_SYSTEMS + ["÷bare", "÷mutex", "÷asio", "÷tbb"], rows)


def section_wakeup(rep, res):
    r = res.get("wakeup")
    if not r:
        return
    names = sorted(n for n in r.names() if n.startswith("BM_WakeLatency"))
    if not names:
        return
    rep.add("## Wake-up latency: submit to handler start, idle worker")
    rep.add()
    rep.add("Nanoseconds, medians over repetitions of each percentile. The last number of the "
            "name is the gap between samples in us (5: a spinning worker; 500: a "
            "kSpinThenBlock worker asleep on its semaphore).")
    rep.add()
    bare = "BM_WakeLatency_BareQueue/5"
    rows = []
    for n in names:
        rows.append([n.replace("BM_WakeLatency_", ""),
                     fmt(r.median(n, "p50_ns"), 0), fmt(r.median(n, "p99_ns"), 0),
                     fmt(r.median(n, "p999_ns"), 0), fmt(r.median(n, "max_ns"), 0),
                     fmt(r.median(n, "samples"), 0),
                     fmt(ratio(r.median(n, "p50_ns"), r.median(bare, "p50_ns"))),
                     fmt(ratio(r.median(n, "p99_ns"), r.median(bare, "p99_ns")))])
    rep.table(["strategy/gap", "p50", "p99", "p99.9", "max", "samples", "p50 ÷ bare",
               "p99 ÷ bare"], rows)


OPEN_SYSTEMS = ["engine_spin", "engine_block", "bare", "mutex", "asio", "tbb"]
OPEN_RE = re.compile(r"^OpenLoop/([a-z_]+)/load:(\d+)$")


def open_data(r):
    data = {}
    for name in r.names():
        m = OPEN_RE.match(name)
        if m:
            data.setdefault(m.group(1), {})[int(m.group(2))] = name
    return data


def section_open_loop(rep, res):
    r = res.get("openloop")
    if not r:
        return
    data = open_data(r)
    if not data:
        return
    rep.add("## End-to-end latency under steady load (open loop)")
    rep.add()
    rep.add("One submitter, one worker. Jobs are submitted on a fixed schedule at a fraction of "
            "the system's own peak, measured on the same pool just before; latency runs from the "
            "scheduled submit time to the handler's start, so queueing shows and a stalled "
            "submitter is not forgiven. Microseconds, medians over repetitions.")
    rep.add()
    rows = []
    for system in OPEN_SYSTEMS:
        for load in sorted(data.get(system, {})):
            n = data[system][load]
            rows.append([system, f"{load}%", fmt(r.median(n, "peak_Mjobs_s")),
                         fmt(r.median(n, "offered_Mjobs_s")),
                         fmt(r.median(n, "p50_ns"), 2, 1e-3), fmt(r.median(n, "p99_ns"), 2, 1e-3),
                         fmt(r.median(n, "p999_ns"), 2, 1e-3), fmt(r.median(n, "max_ns"), 2, 1e-3),
                         fmt(r.median(n, "samples"), 0)])
    rep.table(["system", "load", "peak Mjobs/s", "offered Mjobs/s", "p50 us", "p99 us",
               "p99.9 us", "max us", "samples"], rows, ["---", "---"] + ["---:"] * 7)
    rows = []
    for load in (10, 50, 90):
        eng = data.get("engine_spin", {}).get(load)
        if not eng:
            continue
        row = [f"{load}%"]
        for base in ("bare", "mutex", "asio", "tbb"):
            b = data.get(base, {}).get(load)
            for metric in ("p50_ns", "p99_ns"):
                row.append(fmt(ratio(r.median(eng, metric), r.median(b, metric) if b else None)))
        rows.append(row)
    if rows:
        rep.add("jobengine (kSpin) latency divided by each baseline's at the same load fraction "
                "(below 1: the engine is faster):")
        rep.add()
        rep.table(["load", "p50 ÷ bare", "p99 ÷ bare", "p50 ÷ mutex", "p99 ÷ mutex", "p50 ÷ asio",
                   "p99 ÷ asio", "p50 ÷ tbb", "p99 ÷ tbb"], rows)


SNAPSHOT_ROWS = [
    ("BM_SubmitWithShmSnapshots", "submits, shm snapshots every 10 ms"),
    ("BM_SubmitWithoutSnapshots", "submits, no snapshots"),
    ("BM_SnapshotToDisk_1M", "snapshot_now() to disk"),
    ("BM_PlainWriteFsync_1M", "plain write + fsync, same bytes"),
    ("BM_Encode_1M", "encoder alone, in memory"),
    ("BM_Recover_1M/warm", "recovery (open + start), warm cache"),
    ("BM_PlainRead_1M/warm", "plain read of the file, warm"),
    ("BM_Recover_1M/cold", "recovery, file dropped from cache"),
    ("BM_PlainRead_1M/cold", "plain read, cold"),
    ("BM_OpenEmpty_1M", "open + start over an empty directory"),
    ("BM_Decode_1M", "decoder alone, in memory"),
    ("BM_Verify_1M", "recovery's verify alone, in memory"),
]


def section_snapshot(rep, res):
    r = res.get("snapshot")
    if not r:
        return
    rep.add("## Snapshots under load, disk snapshot and recovery")
    rep.add()
    rep.add(f"{r.context.get('jobengine_shm_pending', '?')} jobs pending in the submit rows; "
            f"{r.context.get('jobengine_snapshot_jobs', '?')} jobs (64-byte payloads) in the disk "
            "and recovery rows (their names keep `1M`). Medians over repetitions.")
    rep.add()
    rows = []
    for name, label in SNAPSHOT_ROWS:
        if name not in r.samples:
            continue
        rows.append([f"{label} (`{name}`)", fmt(r.median(name, "seconds"), 1, 1e3),
                     fmt(r.median(name, "items_per_second"), 2, 1e-6),
                     fmt(r.median(name, "bytes_per_second"), 0, 1e-6),
                     fmt(r.median(name, "p50_ns"), 0), fmt(r.median(name, "p99_ns"), 0),
                     fmt(r.median(name, "p999_ns"), 0)])
    rep.table(["benchmark", "ms/iteration", "Mjobs/s", "MB/s", "submit p50 ns", "p99 ns",
               "p99.9 ns"], rows)
    idle = []
    idle_names = [n for n in r.names() if n.startswith("BM_IdleEngine/table:")]
    for name in sorted(idle_names, key=lambda n: int(re.sub(r"\D", "", n.split(":", 1)[1]) or 0)):
        idle.append([name.split("/", 1)[1].replace("table:", ""), fmt(r.median(name, "cpu_pct"), 2),
                     fmt(r.median(name, "snapshots_per_s"), 1),
                     fmt(r.median(name, "unchanged_per_s"), 1)])
    if idle:
        rep.add()
        rep.add("An idle engine (default options, both stores on; `BM_IdleEngine`): the CPU of "
                "the whole process while it has nothing to do, and its periodic snapshots "
                "written and skipped (nothing had changed) per second.")
        rep.add()
        rep.table(["table slots", "CPU, % of one core", "snapshots written/s",
                   "skipped (unchanged)/s"], idle)


PENDING_RE = re.compile(r"^(SnapshotCost/shm|SnapshotCost/disk|RecoverVsPending|PlainReadVsPending)"
                        r"/pending:(\d+)$")


def pending_data(r):
    data = {}
    for name in r.names():
        m = PENDING_RE.match(name)
        if m:
            data.setdefault(int(m.group(2)), {})[m.group(1)] = name
    return data


def section_pending(rep, res):
    r = res.get("pending")
    if not r:
        return
    data = pending_data(r)
    if not data:
        return
    rep.add("## Snapshot cost and recovery time against pending jobs")
    rep.add()
    rep.add("Jobs with 64-byte payloads parked in one engine. shm: the periodic shared-memory "
            "snapshot's own duration (cut + encode + publish); disk: snapshot_now() wall time "
            "(write, fsync, rename, fsync dir). Recovery: open() + start() restoring every job, "
            "beside a plain read() of the same file. Milliseconds, medians.")
    rep.add()
    rows = []
    for pending in sorted(data):
        d = data[pending]

        def med(key, metric):
            return r.median(d[key], metric) if key in d else None

        rec = med("RecoverVsPending", "seconds")
        read = med("PlainReadVsPending", "seconds")
        rows.append([f"{pending:,}", fmt(med("SnapshotCost/shm", "seconds"), 2, 1e3),
                     fmt(med("SnapshotCost/disk", "seconds"), 2, 1e3),
                     fmt(med("SnapshotCost/disk", "bytes"), 2, 1e-6),
                     fmt(med("SnapshotCost/disk", "bytes_per_job"), 1),
                     fmt(rec, 2, 1e3), fmt(read, 2, 1e3), fmt(ratio(rec, read), 1)])
    rep.table(["pending", "shm snapshot ms", "disk snapshot ms", "MB per snapshot", "bytes/job",
               "recovery ms", "plain read ms", "recovery ÷ read"], rows)
    sparse = "SnapshotCost/shm/pending:1000/table:1048576"
    burst = sparse + "/after_burst"
    if sparse in r.samples:
        rep.add()
        line = (f"The 1,000-job shared-memory snapshot in a 1,048,576-slot table (`{sparse}`): "
                f"{fmt(r.median(sparse, 'seconds'), 2, 1e3)} ms")
        if burst in r.samples:
            line += (f"; in the same table after a burst of ~1M jobs went through it and drained "
                     f"(`{burst}`): {fmt(r.median(burst, 'seconds'), 2, 1e3)} ms")
        rep.add(line + " (a cut reads only the regions of the table with slots in use).")
        rep.add()


DELAYED_ROWS = [
    ("BM_DelayedPending/none", "none pending, table of {cap} slots"),
    ("BM_DelayedPending/delayed", "{delayed} delayed jobs pending, table of {cap} slots"),
    ("BM_DelayedPending/none_small_table", "none pending, table of {small} slots "
                                           "(BM_Engine_Submit/spin's)"),
]


def section_delayed(rep, res):
    r = res.get("delayed")
    if not r:
        return
    ctx = r.context
    delayed = int(ctx.get("jobengine_delayed_jobs", "0") or 0)
    small = int(ctx.get("jobengine_capacity", "0") or 0)
    names = {"cap": f"{delayed + small:,}", "delayed": f"{delayed:,}", "small": f"{small:,}"}
    rep.add("## Job semantics: delayed jobs pending, submitting them, cancel()")
    rep.add()
    rep.add(f"Submit-to-completion rate of BM_Engine_Submit/spin's loop (1 submitter + 1 worker, "
            f"{ctx.get('jobengine_jobs_per_iteration', '?')} empty jobs per iteration) with "
            f"{delayed:,} jobs submitted with `delay` = 1 h before the timed loop (in the job "
            "table and the scheduler's heap throughout) against none, in the same process, "
            "repetitions interleaved; the third row is the suite's usual table size. Median "
            f"(min-max) of {r.reps('BM_DelayedPending/delayed', 'items_per_second')} repetitions.")
    rep.add()
    none = r.median("BM_DelayedPending/none", "items_per_second")
    rows = []
    for name, label in DELAYED_ROWS:
        values = r.samples.get(name, {}).get("items_per_second")
        if not values:
            continue
        med = statistics.median(values)
        rows.append([label.format(**names), fmt(med / 1e6),
                     f"{min(values) / 1e6:.2f}-{max(values) / 1e6:.2f}", fmt(ratio(med, none))])
    rep.table(["run", "Mjobs/s", "range", "÷ none pending"], rows)
    sub_rate = r.median("BM_SubmitDelayed", "items_per_second")
    sub_time = r.median("BM_SubmitDelayed", "seconds")
    rep.add(f"Submitting the {delayed:,} delayed jobs (`BM_SubmitDelayed`, one pinned thread, "
            f"empty table): {fmt(sub_time, 1, 1e3)} ms, {fmt(sub_rate, 2, 1e-6)} Mjobs/s "
            f"(median of {r.reps('BM_SubmitDelayed', 'seconds')}).")
    rep.add()
    rep.add("`cancel()` finds a job through a hint table naming the slot of each id's latest "
            "stamp, and scans the job table only when later jobs took the id's entry over. hit: "
            "a delayed job picked at random; hit_keyed: the same with every parked job holding "
            "a unique key (the key is released too: one lookup by id, not a scan of the keys); "
            "done: a job that already ran (not found at once); "
            "miss: an id never issued, so the whole table is scanned (the worst case). The "
            "table holds capacity - 4,096 delayed jobs. Microseconds per call, medians over "
            "repetitions of the mean of each run's calls.")
    rep.add()
    rows = []
    cancel_re = re.compile(r"^BM_Cancel/(hit|hit_keyed|done|miss)/capacity:(\d+)$")
    found = sorted((int(m.group(2)), m.group(1), n) for n in r.names()
                   for m in [cancel_re.match(n)] if m)
    combined = False  # results from before the hit counters were split
    for capacity, kind, name in found:
        sec = r.median(name, "seconds")
        samples = r.samples.get(name, {})
        not_found = samples.get("hit_kNotFound")
        requested = samples.get("hit_kCancelRequested")
        old = samples.get("hit_not_found")
        if not_found is None and requested is None and old:
            # One figure for both answers: shown in the kNotFound column, marked.
            combined = True
            nf_cell = f"{sum(old):g} (both answers, old `hit_not_found`)"
            cr_cell = "(counted with kNotFound)"
        else:
            nf_cell = f"{sum(not_found):g}" if not_found else "-"
            cr_cell = f"{sum(requested):g}" if requested else "-"
        rows.append([kind, f"{capacity:,}", fmt(sec, 1, 1e6),
                     fmt(sec / capacity if sec is not None and kind == "miss" else None, 2, 1e9),
                     r.reps(name, "seconds"), nf_cell, cr_cell])
    rep.table(["cancel()", "capacity (slots)", "us per call", "ns per slot scanned", "reps",
               "hits answered kNotFound", "hits answered kCancelRequested"], rows)
    rep.add("Hits that did not answer kCancelled are counted (summed over repetitions) rather "
            "than failing the run. kNotFound for a hit is an engine bug: the job was pending, "
            "so cancel() should have found it. kCancelRequested for a hit is expected 0 too "
            "(the jobs are delayed an hour: none runs); before cancel() read the slot's "
            "ended_by_cancel mark it came up when the scheduler's purge for an earlier cancel "
            "retired the job between cancel()'s CAS and its state read (engine.cc I8).")
    if combined:
        rep.add()
        rep.add("These results predate the split: their one counter (`hit_not_found`) is "
                "kNotFound and kCancelRequested together, so it does not tell a bug from the "
                "race.")
    rep.add()


def section_metrics(rep, res):
    r = res.get("metrics")
    if not r:
        return
    rep.add("## Metrics on the hot path: library built with and without them")
    rep.add()
    rep.add("The same benchmark source linked against the library (`jobengine_bench`) and "
            "against the same sources built with `-DJOBENGINE_METRICS=0` (`jobengine_bench_"
            "nometrics`: no queue-wait / run-time histograms). The binaries ran alternately, "
            f"{r.context.get('jobengine_ab_files', '?')} "
            "runs in all, one repetition each; medians (min-max) over those runs. Library "
            f"variants as reported by the binaries: on = "
            f"{r.context.get('metrics_on:jobengine_metrics', '?')}, off = "
            f"{r.context.get('metrics_off:jobengine_metrics', '?')}.")
    rep.add()
    rows = []
    for bench, label in (("BM_Engine_Submit/spin", "submit(), kSpin"),
                         ("BM_Engine_SubmitBatch/spin", "submit_batch(64), kSpin"),
                         ("BM_Engine_Drain/spin", "worker drain (queued jobs), kSpin")):
        on = r.samples.get(f"metrics_on/{bench}", {}).get("items_per_second")
        off = r.samples.get(f"metrics_off/{bench}", {}).get("items_per_second")
        if not on or not off:
            continue
        q = ratio(statistics.median(on), statistics.median(off))
        rows.append([label, fmt(statistics.median(on) / 1e6),
                     f"{min(on) / 1e6:.2f}-{max(on) / 1e6:.2f}", fmt(statistics.median(off) / 1e6),
                     f"{min(off) / 1e6:.2f}-{max(off) / 1e6:.2f}", fmt(q, 3),
                     fmt(None if q is None else (1 - q) * 100, 1)])
    rep.table(["benchmark", "with metrics Mjobs/s", "range", "without Mjobs/s", "range",
               "with ÷ without", "cost %"], rows)


def section_memory(rep, res):
    r = res.get("memory")
    if not r:
        return
    rep.add("## Memory per pending job")
    rep.add()
    rep.add(f"{r.context.get('jobengine_memory_jobs', '?')} jobs pending (the engine's table "
            "exactly full), bytes per job (heap delta from mallinfo2; the engine maps its job "
            "table itself and oneTBB has its own allocator, both invisible to it, so their "
            "figures are RSS deltas, oneTBB's in a fresh child process), and the "
            "engine's overhead beyond the payload (÷: engine divided by each baseline). The engine reserves its table at "
            "open(): `reserved/slot` is paid per slot of capacity whether used or not. Payloads "
            "above 192 bytes (kInlinePayloadBytes) go to the heap.")
    rep.add()
    rows = []
    bases = ("bare", "mutex", "asio", "tbb")
    for p in MEMORY_PAYLOADS:
        eng = r.median(f"Memory/engine/payload:{p}", "bytes_per_job")
        if eng is None:
            continue
        base = {b: r.median(f"Memory/{b}/payload:{p}", "bytes_per_job") for b in bases}
        rows.append([p, fmt(eng, 0), fmt(r.median(f"Memory/engine/payload:{p}", "overhead_per_job"), 0),
                     fmt(r.median(f"Memory/engine/payload:{p}", "reserved_per_slot"), 0)]
                    + [fmt(base[b], 0) for b in bases] + [fmt(ratio(eng, base[b])) for b in bases])
    rep.table(["payload B", "engine B/job", "engine overhead B", "engine reserved/slot",
               "bare B/job", "mutex B/job", "asio B/job", "tbb B/job", "÷bare", "÷mutex",
               "÷asio", "÷tbb"], rows)


def virtualization(machine):
    """run.sh records the VM and the container layer apart (systemd-detect-virt
    --vm, --container); older machine.txt files have one line, the innermost
    layer only (e.g. docker on a KVM guest)."""
    vm, container = machine.get("virtualization_vm"), machine.get("virtualization_container")
    if vm is None and container is None:
        return machine.get("virtualization", "?")
    return f"VM: {vm or '?'}, container: {container or '?'}"


def section_machine(rep, machine, res):
    rep.add("## Machine")
    rep.add()
    ctx = next(iter(res.values())).context if res else {}
    caches = ", ".join(f"L{c.get('level')} {c.get('type', '')[:1].lower()} {c.get('size', 0) // 1024} KiB"
                       for c in ctx.get("caches", []))
    rows = [
        ["CPU", machine.get("cpu_model", "?")],
        ["CPUs", f"{machine.get('cpus_allowed', '?')} allowed ({machine.get('cpus_allowed_list', '?')})"
                 f" of {machine.get('cpus_online', '?')} online; "
                 f"{ctx.get('mhz_per_cpu', '?')} MHz; {virtualization(machine)}"],
        ["caches", caches or "?"],
        ["memory", machine.get("memory", "?")],
        ["kernel / OS", f"{machine.get('kernel', '?')} ({machine.get('arch', '?')}), {machine.get('os', '?')}"],
        ["compiler", machine.get("compiler", "?")],
        ["build", f"{machine.get('build_type', '?')}, flags `{machine.get('cxx_flags', '').strip()}`"],
        ["Google Benchmark", f"library built as {ctx.get('library_build_type', '?')}; "
                             f"CPU scaling {'on' if ctx.get('cpu_scaling_enabled') else 'off or unknown'}"],
        ["load average", f"before {machine.get('load_before', '?')}, after {machine.get('load_after', '?')}"],
        ["commit", machine.get("git_commit", "?")],
        ["date", machine.get("date", "?")],
        ["run", f"`{machine.get('command', '?')}` ({machine.get('mode', '?')} mode, "
                f"{machine.get('suite_seconds', '?')} s)"],
    ]
    rep.table(["", ""], rows, ["---", "---"])


# ---- plots ----------------------------------------------------------------------------------

def write_dat(path, header, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write("# " + " ".join(header) + "\n")
        for row in rows:
            f.write(" ".join("?" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
                             for v in row) + "\n")


def plots(directory, res, machine):
    """Writes .dat files and a gnuplot script; runs gnuplot when installed.
    Returns the PNG names made."""
    label = f"{machine.get('cpu_model', '?')}, {machine.get('cpus_allowed', '?')} CPUs"
    label = label.replace('"', "'")
    script = ['set terminal pngcairo size 1200,900 font ",10" noenhanced', 'set datafile missing "?"',
              "set grid", "set key outside right top"]
    pngs = []

    r = res.get("sweep")
    if r:
        data, order = sweep_data(r)
        if data:
            payloads = sorted(data)
            for payload in payloads:
                rows = []
                for i, sw in enumerate(order):
                    cell = data[payload].get(sw, {})
                    rows.append([i, f"{sw[0]}x{sw[1]}"] +
                                [cell.get(s) / 1e6 if cell.get(s) else None for s in SWEEP_SYSTEMS])
                write_dat(os.path.join(directory, f"sweep_{payload}B.dat"),
                          ["i", "SxW"] + SWEEP_SYSTEMS, rows)
            script += ['set output "throughput_vs_threads.png"',
                       f'set multiplot layout {len(payloads)},1 title "Throughput against '
                       f'submitters x workers ({label})"',
                       'set ylabel "Mjobs/s"', "set logscale y", 'set xlabel "submitters x workers"']
            for payload in payloads:
                plot = ", ".join(
                    f'"sweep_{payload}B.dat" using 1:{3 + k}:xtic(2) with linespoints title "{s}"'
                    for k, s in enumerate(SWEEP_SYSTEMS))
                script += [f'set title "{payload}-byte payload"', f"plot {plot}"]
            script += ["unset multiplot", "unset logscale y"]
            pngs.append("throughput_vs_threads.png")

    r = res.get("openloop")
    if r:
        data = open_data(r)
        if data:
            loads = sorted({load for d in data.values() for load in d})
            cols = []
            for s in OPEN_SYSTEMS:
                cols += [f"{s}_p50", f"{s}_p99", f"{s}_p999"]
            rows = []
            for load in loads:
                row = [load]
                for s in OPEN_SYSTEMS:
                    n = data.get(s, {}).get(load)
                    for metric in ("p50_ns", "p99_ns", "p999_ns"):
                        v = r.median(n, metric) if n else None
                        row.append(v / 1e3 if v else None)
                rows.append(row)
            write_dat(os.path.join(directory, "openloop.dat"), ["load"] + cols, rows)
            script += ['set output "latency_vs_load.png"',
                       f'set multiplot layout 3,1 title "Open-loop latency against load ({label})"',
                       'set xlabel "load, % of the system\'s own peak"', 'set ylabel "us"',
                       "set logscale y", "set xrange [0:100]"]
            for k, (metric, title) in enumerate((("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"))):
                plot = ", ".join(
                    f'"openloop.dat" using 1:{2 + 3 * j + k} with linespoints title "{s}"'
                    for j, s in enumerate(OPEN_SYSTEMS))
                script += [f'set title "{title}"', f"plot {plot}"]
            script += ["unset multiplot", "unset logscale y", "set autoscale x"]
            pngs.append("latency_vs_load.png")

    r = res.get("pending")
    if r:
        data = pending_data(r)
        if data:
            rows = []
            for pending in sorted(data):
                d = data[pending]
                row = [pending]
                for key in ("SnapshotCost/shm", "SnapshotCost/disk", "RecoverVsPending",
                            "PlainReadVsPending"):
                    v = r.median(d[key], "seconds") if key in d else None
                    row.append(v * 1e3 if v else None)
                rows.append(row)
            write_dat(os.path.join(directory, "pending.dat"),
                      ["pending", "shm_ms", "disk_ms", "recover_ms", "read_ms"], rows)
            script += ['set output "snapshot_vs_pending.png"', "set size 1,1",
                       f'set title "Snapshot and recovery time against pending jobs ({label})"',
                       'set xlabel "pending jobs (64-byte payloads)"', 'set ylabel "ms"',
                       "set logscale xy", "set xrange [500:2000000]",
                       'plot "pending.dat" using 1:2 with linespoints title "shm snapshot", '
                       '"pending.dat" using 1:3 with linespoints title "disk snapshot", '
                       '"pending.dat" using 1:4 with linespoints title "recovery", '
                       '"pending.dat" using 1:5 with linespoints title "plain read of the file"',
                       "unset logscale xy", "set autoscale x"]
            pngs.append("snapshot_vs_pending.png")

    r = res.get("memory")
    if r:
        rows = []
        for p in MEMORY_PAYLOADS:
            rows.append([p] + [r.median(f"Memory/{s}/payload:{p}", "bytes_per_job")
                               for s in ("engine", "bare", "mutex", "asio", "tbb")] + [float(p)])
        if any(row[1] is not None for row in rows):
            write_dat(os.path.join(directory, "memory.dat"),
                      ["payload", "engine", "bare", "mutex", "asio", "tbb", "payload_itself"], rows)
            script += ['set output "memory_vs_payload.png"',
                       f'set title "Memory per pending job against payload size ({label})"',
                       'set xlabel "payload bytes"', 'set ylabel "bytes per pending job"',
                       "set logscale xy", "set xrange [10:2000]",
                       'plot "memory.dat" using 1:2 with linespoints title "jobengine", '
                       '"memory.dat" using 1:3 with linespoints title "bare moodycamel queue", '
                       '"memory.dat" using 1:4 with linespoints title "deque<std::function>", '
                       '"memory.dat" using 1:5 with linespoints title "asio thread_pool", '
                       '"memory.dat" using 1:6 with linespoints title "oneTBB arena", '
                       '"memory.dat" using 1:7 with lines dashtype 2 title "the payload itself"',
                       "unset logscale xy"]
            pngs.append("memory_vs_payload.png")

    if not pngs:
        return []
    with open(os.path.join(directory, "plots.gp"), "w", encoding="utf-8") as f:
        f.write("\n".join(script) + "\n")
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("report.py: gnuplot not found; plots.gp and *.dat written, no PNGs", file=sys.stderr)
        return []
    proc = subprocess.run([gnuplot, "plots.gp"], cwd=directory, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        print(f"report.py: gnuplot failed:\n{proc.stderr}", file=sys.stderr)
        return []
    return [p for p in pngs if os.path.exists(os.path.join(directory, p))]


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    directory = argv[1]
    res = load_all(directory)
    if not res:
        print(f"report.py: no results (*.json) in {directory}", file=sys.stderr)
        return 2
    machine = read_machine(directory)
    rep = Report()
    rep.add("# jobengine benchmark report")
    rep.add()
    rep.add(f"`{machine.get('command', 'bench/run.sh')}` on {machine.get('cpu_model', '?')} "
            f"({machine.get('cpus_allowed', '?')} CPUs), {machine.get('date', '?')}. "
            "Every ratio divides medians measured in the same process (but the metrics on/off "
            "ones: two binaries run alternately); absolute figures move with the machine's load "
            "(see the load average below), ratios much less.")
    rep.add()
    try:
        load = float(machine.get("load_before", "").split()[0])
        cpus = int(machine.get("cpus_allowed", "0"))
    except (ValueError, IndexError):
        load, cpus = 0.0, 0
    if cpus and load >= 0.5 * cpus:
        rep.add(f"**Warning: the machine was busy** (load average {load:g} on {cpus} CPUs when the "
                "run began): other processes took CPU time from the pinned threads, so latency "
                "tails and the open-loop figures show their time slices (milliseconds) more than "
                "the systems under test, and throughput ratios are noisier. Re-run on an idle "
                "machine for figures to quote.")
        rep.add()
    section_machine(rep, machine, res)
    section_targets(rep, res)
    section_throughput(rep, res)
    section_sweep(rep, res, machine)
    section_wakeup(rep, res)
    section_open_loop(rep, res)
    section_snapshot(rep, res)
    section_pending(rep, res)
    section_memory(rep, res)
    section_delayed(rep, res)
    section_metrics(rep, res)
    errors = [(f, n, e) for f, r in res.items() for n, e in r.errors.items()]
    if errors:
        rep.add("## Benchmarks that failed")
        rep.add()
        rep.table(["file", "benchmark", "error"], [[f, n, e] for f, n, e in errors],
                  ["---", "---", "---"])
    pngs = plots(directory, res, machine)
    rep.add("## Plots")
    rep.add()
    if pngs:
        for p in pngs:
            rep.add(f"![{p}]({p})")
            rep.add()
    else:
        rep.add("(none: gnuplot missing or failed; the data is in *.dat)")
        rep.add()
    rep.add("## Files")
    rep.add()
    rep.add("Google Benchmark JSON: " + ", ".join(f"`{f}.json`" for f in res) +
            ". Console logs: `*.log`. Compare two result sets with "
            "`python3 bench/compare.py BEFORE_DIR AFTER_DIR`.")
    with open(os.path.join(directory, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(rep.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
