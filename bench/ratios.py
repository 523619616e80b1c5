#!/usr/bin/env python3
"""Median throughput and target ratios from jobengine_bench JSON output.

Reads one or more Google Benchmark JSON files (--benchmark_out=FILE or
--benchmark_format=json on stdout; '-' or no argument reads stdin), ideally
run with --benchmark_repetitions=5, and prints markdown tables:

  1. median Mjobs/s per benchmark (with min, max and repetition count),
  2. the target ratios: engine / bare queue, engine / mutex pool,
     submit_batch / bare bulk.

When the input holds jobengine_snapshot_bench results or wake-up latency
results (BM_WakeLatency_*), it prints their tables too (and, for input with
no throughput benchmark, only those):

  3. median time, rate and submit latency per snapshot benchmark,
  4. the snapshot target ratios: throughput and p99.9 submit latency with
     shared-memory snapshots / without, 1M-job disk snapshot / plain
     write+fsync bandwidth, recovery / plain read time (warm and cold),
  5. wake-up latency percentiles per benchmark and the spin wake-up target
     ratios to the bare queue (p50, p99).

Ratios are taken within one file (one process), because the benchmark
machines' speed drifts between processes; with several files the table gives
the median of the per-file ratios and their range.

Usage:
  JOBENGINE_BENCH_JOBS=1000000 build/release/bench/jobengine_bench \\
      --benchmark_repetitions=5 --benchmark_out=bench.json
  build/release/bench/jobengine_snapshot_bench --benchmark_repetitions=3 \\
      --benchmark_enable_random_interleaving=true --benchmark_out=snap.json
  python3 bench/ratios.py bench.json [snap.json more.json ...]

Exit status: 0 when every target ratio was computed and met, 1 when one was
missed, 2 when the input lacks a benchmark a target needs or cannot be read.
"""

import json
import re
import statistics
import sys

# (label, numerator benchmark, denominator benchmark, target: ratio >= this).
# Names are run names without the "/real_time" suffix.
TARGETS = [
    ("engine / bare queue", "BM_Engine_Submit/spin", "BM_BareQueue", 0.5),
    ("engine / mutex pool", "BM_Engine_Submit/spin", "BM_MutexPool", 5.0),
    ("engine / asio thread_pool", "BM_Engine_Submit/spin", "BM_Asio", 3.0),
    ("engine / oneTBB arena", "BM_Engine_Submit/spin", "BM_Tbb", 2.0),
    ("submit_batch / bare bulk", "BM_Engine_SubmitBatch/spin", "BM_BareQueue_Bulk", 0.5),
]

# The same ratios for the spin-then-block engine: shown, not judged (the
# targets are stated for a spinning worker).
INFO = [
    ("engine (spin-then-block) / bare queue", "BM_Engine_Submit/spin_then_block",
     "BM_BareQueue"),
    ("engine (spin-then-block) / mutex pool", "BM_Engine_Submit/spin_then_block",
     "BM_MutexPool"),
    ("submit_batch (spin-then-block) / bare bulk",
     "BM_Engine_SubmitBatch/spin_then_block", "BM_BareQueue_Bulk"),
    ("engine / bare queue bounded to capacity", "BM_Engine_Submit/spin",
     "BM_BareQueue_Bounded"),
    ("bare queue bounded / unbounded", "BM_BareQueue_Bounded", "BM_BareQueue"),
]

# Table order; benchmarks not listed follow in name order.
ORDER = [
    "BM_Engine_Submit/spin",
    "BM_Engine_Submit/spin_then_block",
    "BM_Engine_SubmitBatch/spin",
    "BM_Engine_SubmitBatch/spin_then_block",
    "BM_BareQueue",
    "BM_BareQueue_Bulk",
    "BM_BareQueue_Bounded",
    "BM_MutexPool",
    "BM_Asio",
    "BM_Tbb",
]


# jobengine_snapshot_bench: (label, numerator, denominator, metric, op,
# target). Metrics are per-repetition values (medians of them are compared);
# "seconds" is the real time per iteration. op ">=": the ratio must reach the
# target; "<=": it must not exceed it.
SNAPSHOT_TARGETS = [
    ("shm snapshots every 10 ms, 100k pending: throughput with / without",
     "BM_SubmitWithShmSnapshots", "BM_SubmitWithoutSnapshots", "items_per_second", ">=", 0.9),
    ("shm snapshots every 10 ms, 100k pending: p99.9 submit latency with / without",
     "BM_SubmitWithShmSnapshots", "BM_SubmitWithoutSnapshots", "p999_ns", "<=", 1.2),
    ("1M-job snapshot to disk / plain write+fsync (bandwidth)",
     "BM_SnapshotToDisk_1M", "BM_PlainWriteFsync_1M", "bytes_per_second", ">=", 0.5),
    ("recovery of 1M jobs / plain read of the file (time, warm)",
     "BM_Recover_1M/warm", "BM_PlainRead_1M/warm", "seconds", "<=", 2.0),
    ("recovery of 1M jobs / plain read of the file (time, cold)",
     "BM_Recover_1M/cold", "BM_PlainRead_1M/cold", "seconds", "<=", 2.0),
]

# Shown, not judged.
SNAPSHOT_INFO = [
    ("shm snapshots: p50 submit latency with / without",
     "BM_SubmitWithShmSnapshots", "BM_SubmitWithoutSnapshots", "p50_ns"),
    ("shm snapshots: p99 submit latency with / without",
     "BM_SubmitWithShmSnapshots", "BM_SubmitWithoutSnapshots", "p99_ns"),
    ("empty open+start of a 1M-slot engine / plain read (time, warm)",
     "BM_OpenEmpty_1M", "BM_PlainRead_1M/warm", "seconds"),
    ("decode of the 1M-job image in memory / plain read (time, warm)",
     "BM_Decode_1M", "BM_PlainRead_1M/warm", "seconds"),
    ("verify (recovery's decoder) of the same image / plain read (time, warm)",
     "BM_Verify_1M", "BM_PlainRead_1M/warm", "seconds"),
    ("encode of the 1M-job image in memory / plain write+fsync (time)",
     "BM_Encode_1M", "BM_PlainWriteFsync_1M", "seconds"),
]

SNAPSHOT_ORDER = [
    "BM_SubmitWithShmSnapshots",
    "BM_SubmitWithoutSnapshots",
    "BM_SnapshotToDisk_1M",
    "BM_PlainWriteFsync_1M",
    "BM_Encode_1M",
    "BM_Recover_1M/warm",
    "BM_PlainRead_1M/warm",
    "BM_Recover_1M/cold",
    "BM_PlainRead_1M/cold",
    "BM_OpenEmpty_1M",
    "BM_Decode_1M",
    "BM_Verify_1M",
]

# Values kept per repetition for the snapshot tables.
SNAPSHOT_METRICS = ("seconds", "items_per_second", "bytes_per_second", "p50_ns", "p99_ns",
                    "p999_ns", "snap_ms", "took_ms", "open_ms", "start_ms")

TIME_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def short_name(run_name):
    # Fixed iteration counts show up in the name ("/iterations:5"): drop them,
    # so that names stay stable if the counts change.
    run_name = re.sub(r"/iterations:\d+", "", run_name)
    for suffix in ("/real_time", "/manual_time"):
        if run_name.endswith(suffix):
            return run_name[: -len(suffix)]
    return run_name


def read_json(path):
    if path == "-":
        data = json.load(sys.stdin)
    else:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    if not isinstance(data, dict):  # valid JSON, but no Google Benchmark output
        raise ValueError(f"{path}: top level is a JSON {type(data).__name__}, not an object")
    return data


def load(path, data):
    """Returns {benchmark: [items_per_second, ...]} for one JSON file."""
    samples = {}
    medians = {}  # from aggregates, used when raw repetitions are absent
    for entry in data.get("benchmarks", []):
        if entry.get("error_occurred"):
            name = short_name(entry.get("run_name", entry.get("name", "?")))
            print(f"warning: {path}: {name} failed: {entry.get('error_message', '')}",
                  file=sys.stderr)
            continue
        rate = entry.get("items_per_second")
        if rate is None:
            continue
        name = short_name(entry.get("run_name", entry["name"]))
        if entry.get("run_type", "iteration") == "iteration":
            samples.setdefault(name, []).append(float(rate))
        elif entry.get("aggregate_name") == "median":
            medians[name] = float(rate)
    for name, rate in medians.items():
        samples.setdefault(name, [rate])
    return samples


def load_metrics(data):
    """Returns {benchmark: {metric: [value per repetition, ...]}} for the
    snapshot benchmarks of one JSON file (errors were reported by load())."""
    samples = {}
    medians = {}  # from aggregates, used when raw repetitions are absent
    for entry in data.get("benchmarks", []):
        if entry.get("error_occurred"):
            continue
        name = short_name(entry.get("run_name", entry.get("name", "?")))
        if name not in SNAPSHOT_ORDER:
            continue
        values = {}
        for metric in SNAPSHOT_METRICS:
            if metric == "seconds":
                if "real_time" in entry:
                    unit = TIME_UNIT_SECONDS.get(entry.get("time_unit", "ns"), 1e-9)
                    values[metric] = float(entry["real_time"]) * unit
            elif metric in entry:
                values[metric] = float(entry[metric])
        if entry.get("run_type", "iteration") == "iteration":
            for metric, value in values.items():
                samples.setdefault(name, {}).setdefault(metric, []).append(value)
        elif entry.get("aggregate_name") == "median":
            medians[name] = values
    for name, values in medians.items():
        if name not in samples:
            samples[name] = {metric: [value] for metric, value in values.items()}
    return samples


def fmt_rate(rate):
    return f"{rate / 1e6:.2f}"


def ratio_row(label, num, den, per_file, target=None):
    ratios = []
    for samples in per_file:
        if num in samples and den in samples:
            ratios.append(statistics.median(samples[num]) / statistics.median(samples[den]))
    if not ratios:
        return f"| {label} | n/a ({num} or {den} missing) | | |", None
    mid = statistics.median(ratios)
    spread = "-" if len(ratios) == 1 else f"{min(ratios):.3f}-{max(ratios):.3f} ({len(ratios)} runs)"
    if target is None:
        return f"| {label} | {mid:.3f} | {spread} | (info) |", None
    verdict = "met" if mid >= target else "MISSED"
    return f"| {label} | {mid:.3f} | {spread} | >= {target:g}: {verdict} |", mid >= target


def snapshot_ratio_row(label, num, den, metric, per_file, op=None, target=None):
    """Like ratio_row, for a metric of the snapshot benchmarks."""
    ratios = []
    for samples in per_file:
        a = samples.get(num, {}).get(metric)
        b = samples.get(den, {}).get(metric)
        if a and b and statistics.median(b) != 0:
            ratios.append(statistics.median(a) / statistics.median(b))
    if not ratios:
        return f"| {label} | n/a ({num} or {den} missing) | | |", None
    mid = statistics.median(ratios)
    spread = "-" if len(ratios) == 1 else f"{min(ratios):.3f}-{max(ratios):.3f} ({len(ratios)} runs)"
    if target is None:
        return f"| {label} | {mid:.3f} | {spread} | (info) |", None
    met = mid >= target if op == ">=" else mid <= target
    verdict = "met" if met else "MISSED"
    return f"| {label} | {mid:.3f} | {spread} | {op} {target:g}: {verdict} |", met


def fmt_metric(values, scale, digits):
    if not values:
        return ""
    return f"{statistics.median(values) * scale:.{digits}f}"


def print_snapshot_tables(per_file_metrics):
    """Prints tables 3 and 4; returns the exit status they call for."""
    pooled = {}
    for samples in per_file_metrics:
        for name, metrics in samples.items():
            for metric, values in metrics.items():
                pooled.setdefault(name, {}).setdefault(metric, []).extend(values)
    print("| snapshot benchmark | median ms | Mjobs/s | MB/s | p50 ns | p99 ns | p99.9 ns "
          "| reps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in SNAPSHOT_ORDER:
        if name not in pooled:
            continue
        m = pooled[name]
        reps = len(m.get("seconds", []))
        print(f"| {name} | {fmt_metric(m.get('seconds'), 1e3, 1)} "
              f"| {fmt_metric(m.get('items_per_second'), 1e-6, 2)} "
              f"| {fmt_metric(m.get('bytes_per_second'), 1e-6, 0)} "
              f"| {fmt_metric(m.get('p50_ns'), 1, 0)} | {fmt_metric(m.get('p99_ns'), 1, 0)} "
              f"| {fmt_metric(m.get('p999_ns'), 1, 0)} | {reps} |")
    print()
    print("| snapshot ratio (medians, same process) | value | range | target |")
    print("|---|---:|---|---|")
    status = 0
    for label, num, den, metric, op, target in SNAPSHOT_TARGETS:
        row, met = snapshot_ratio_row(label, num, den, metric, per_file_metrics, op, target)
        print(row)
        if met is None:
            status = 2
        elif not met and status == 0:
            status = 1
    for label, num, den, metric in SNAPSHOT_INFO:
        row, _ = snapshot_ratio_row(label, num, den, metric, per_file_metrics)
        print(row)
    return status


LATENCY_PREFIX = "BM_WakeLatency_"
LATENCY_TARGETS = [
    # label, engine benchmark, bare benchmark, metric, target (engine <= target * bare)
    ("spin wake-up p50, engine / bare queue", "BM_WakeLatency_Engine/spin/5",
     "BM_WakeLatency_BareQueue/5", "p50_ns", 1.5),
    ("spin wake-up p99, engine / bare queue", "BM_WakeLatency_Engine/spin/5",
     "BM_WakeLatency_BareQueue/5", "p99_ns", 2.0),
]


def latency_medians(datas):
    """{wake-up latency benchmark: {metric: median over files and repetitions}};
    empty when the input has none. Pooled for the percentile table only: the
    ratios are taken per file (latency_ratio_row)."""
    found = {}
    for data in datas:
        for entry in data.get("benchmarks", []):
            name = short_name(entry.get("run_name", entry.get("name", "?")))
            if not name.startswith(LATENCY_PREFIX) or entry.get("error_occurred"):
                continue
            if entry.get("run_type", "iteration") != "iteration":
                continue
            for metric in ("p50_ns", "p99_ns", "p999_ns", "max_ns"):
                if metric in entry:
                    found.setdefault(name, {}).setdefault(metric, []).append(float(entry[metric]))
    return {n: {m: statistics.median(v) for m, v in ms.items()} for n, ms in found.items()}


def latency_ratio_row(label, num, den, metric, datas, target):
    """Like snapshot_ratio_row (op "<="): the ratio of medians within each file,
    then the median of those, never a ratio of medians pooled across files."""
    ratios = []
    for data in datas:
        med = latency_medians([data])
        a = med.get(num, {}).get(metric)
        b = med.get(den, {}).get(metric)
        if a is not None and b:
            ratios.append(a / b)
    if not ratios:
        return f"| {label} | n/a ({num} or {den} missing) | | |", None
    mid = statistics.median(ratios)
    spread = "-" if len(ratios) == 1 else f"{min(ratios):.2f}-{max(ratios):.2f} ({len(ratios)} runs)"
    met = mid <= target
    return f"| {label} | {mid:.2f} | {spread} | <= {target}: {'met' if met else 'MISSED'} |", met


def print_latency_tables(datas, first=False):
    """Wake-up latency (latency_bench.cc): percentiles per benchmark, medians
    over files, and the spin-strategy ratios to the bare queue (per file, then
    the median of them). Prints nothing when the input has none. Returns 0, or
    1 when a target is missed. `first`: no other table precedes these (no
    blank line before them)."""
    med = latency_medians(datas)
    if not med:
        return 0
    if not first:
        print()
    print("| wake-up latency | p50 ns | p99 ns | p99.9 ns | max ns |")
    print("|---|---:|---:|---:|---:|")
    for name in sorted(med):
        m = med[name]
        print(f"| {name} | {m.get('p50_ns', 0):.0f} | {m.get('p99_ns', 0):.0f} "
              f"| {m.get('p999_ns', 0):.0f} | {m.get('max_ns', 0):.0f} |")
    print()
    print("| latency ratio (medians, same process) | value | range | target |")
    print("|---|---:|---|---|")
    status = 0
    for label, num, den, metric, target in LATENCY_TARGETS:
        row, met = latency_ratio_row(label, num, den, metric, datas, target)
        print(row)
        status = status if met is None or met else 1
    return status


def main(argv):
    paths = argv[1:] or ["-"]
    try:
        datas = [read_json(p) for p in paths]
        per_file = [load(p, d) for p, d in zip(paths, datas)]
        per_file_metrics = [load_metrics(d) for d in datas]
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    has_snapshot = any(per_file_metrics)
    pooled = {}
    for samples in per_file:
        for name, rates in samples.items():
            if has_snapshot and name in SNAPSHOT_ORDER:
                continue  # in the snapshot tables
            pooled.setdefault(name, []).extend(rates)
    if not pooled:
        # No throughput benchmark (a snapshot or wakeup file alone): the tables
        # the input has, not the throughput targets it cannot be judged by.
        # Failing only when there is nothing at all to print.
        has_latency = bool(latency_medians(datas))
        if not has_snapshot and not has_latency:
            print("error: no benchmark with items_per_second, snapshot metrics or wake-up "
                  "latency percentiles in the input", file=sys.stderr)
            return 2
        status = print_snapshot_tables(per_file_metrics) if has_snapshot else 0
        return max(status, print_latency_tables(datas, first=not has_snapshot))
    rank = {name: i for i, name in enumerate(ORDER)}
    order = sorted(pooled, key=lambda name: (rank.get(name, len(ORDER)), name))

    print("| benchmark | median Mjobs/s | min | max | reps |")
    print("|---|---:|---:|---:|---:|")
    for name in order:
        rates = pooled[name]
        print(f"| {name} | {fmt_rate(statistics.median(rates))} | {fmt_rate(min(rates))} "
              f"| {fmt_rate(max(rates))} | {len(rates)} |")

    print()
    print("| ratio (medians, same process) | value | range | target |")
    print("|---|---:|---|---|")
    status = 0
    for label, num, den, target in TARGETS:
        row, met = ratio_row(label, num, den, per_file, target)
        print(row)
        if met is None:
            status = 2
        elif not met and status == 0:
            status = 1
    for label, num, den in INFO:
        row, _ = ratio_row(label, num, den, per_file)
        print(row)
    if has_snapshot:
        print()
        snapshot_status = print_snapshot_tables(per_file_metrics)
        status = max(status, snapshot_status)  # 2 (missing) > 1 (missed) > 0
    status = max(status, print_latency_tables(datas))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
