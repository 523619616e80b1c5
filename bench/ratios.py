#!/usr/bin/env python3
"""Median throughput and target ratios from jobengine_bench JSON output.

Reads one or more Google Benchmark JSON files (--benchmark_out=FILE or
--benchmark_format=json on stdout; '-' or no argument reads stdin), ideally
run with --benchmark_repetitions=5, and prints markdown tables:

  1. median Mjobs/s per benchmark (with min, max and repetition count),
  2. the target ratios: engine / bare queue, engine / mutex pool,
     submit_batch / bare bulk.

Ratios are taken within one file (one process), because the benchmark
machines' speed drifts between processes; with several files the table gives
the median of the per-file ratios and their range.

Usage:
  JOBENGINE_BENCH_JOBS=1000000 build/release/bench/jobengine_bench \\
      --benchmark_repetitions=5 --benchmark_out=bench.json
  python3 bench/ratios.py bench.json [more.json ...]

Exit status: 0 when every target ratio was computed and met, 1 when one was
missed, 2 when the input lacks a benchmark a target needs or cannot be read.
"""

import json
import statistics
import sys

# (label, numerator benchmark, denominator benchmark, target: ratio >= this).
# Names are run names without the "/real_time" suffix.
TARGETS = [
    ("engine / bare queue", "BM_Engine_Submit/spin", "BM_BareQueue", 0.5),
    ("engine / mutex pool", "BM_Engine_Submit/spin", "BM_MutexPool", 5.0),
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
]


def short_name(run_name):
    for suffix in ("/real_time", "/manual_time"):
        if run_name.endswith(suffix):
            return run_name[: -len(suffix)]
    return run_name


def load(path):
    """Returns {benchmark: [items_per_second, ...]} for one JSON file."""
    if path == "-":
        data = json.load(sys.stdin)
    else:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
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


def main(argv):
    paths = argv[1:] or ["-"]
    try:
        per_file = [load(p) for p in paths]
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    pooled = {}
    for samples in per_file:
        for name, rates in samples.items():
            pooled.setdefault(name, []).extend(rates)
    rank = {name: i for i, name in enumerate(ORDER)}
    order = sorted(pooled, key=lambda name: (rank.get(name, len(ORDER)), name))
    if not pooled:
        print("error: no benchmark with items_per_second in the input", file=sys.stderr)
        return 2

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
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
