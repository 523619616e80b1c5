#!/usr/bin/env python3
"""Compares two benchmark result sets (before / after), benchmark by benchmark.

Usage:
  python3 bench/compare.py BEFORE AFTER [--filter REGEX] [--threshold PCT]

BEFORE and AFTER are results directories of bench/run.sh (every *.json in
them) or single Google Benchmark JSON files. For each benchmark present in
both, the median over repetitions of its headline metric is compared:
items_per_second (higher is better) when it has one, else the latency
percentiles p50/p99/p99.9 (lower is better), else bytes per job (memory),
else the real time per iteration (lower is better). Changes beyond
--threshold percent (default 10) are flagged: "better" or "WORSE".

Absolute figures of two runs move with the machine's load; the ratios in
each run's report.md are steadier. Compare runs made on the same machine,
and look at the ratio tables of both reports before trusting a small change.

Google Benchmark's own tools/compare.py (with its U test) also reads these
JSON files; Debian does not ship it (libbenchmark-dev has only its doc), so it
needs a checkout of google/benchmark and scipy:
  compare.py benchmarks BEFORE/throughput.json AFTER/throughput.json

Exit status 0; 2 when an input cannot be read.
"""

import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import Results  # noqa: E402  (same directory)

# (metric, higher is better, unit scale, unit label)
METRICS = [
    ("items_per_second", True, 1e-6, "Mjobs/s"),
    ("p50_ns", False, 1e-3, "p50 us"),
    ("p99_ns", False, 1e-3, "p99 us"),
    ("p999_ns", False, 1e-3, "p99.9 us"),
    ("bytes_per_job", False, 1.0, "B/job"),
    ("seconds", False, 1e3, "ms"),
]


def load(path):
    """{(file, benchmark): Results} for a directory or a JSON file."""
    files = []
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".json")]
    else:
        files = [path]
    out = {}
    for f in files:
        r = Results(f)
        for name in r.names():
            out[(os.path.basename(f)[:-5], name)] = r
    return out


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    opts = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    pattern = re.compile(opts.get("filter", "."))
    threshold = float(opts.get("threshold", "10"))
    try:
        before, after = load(args[0]), load(args[1])
    except (OSError, ValueError) as err:
        print(f"compare.py: {err}", file=sys.stderr)
        return 2
    print(f"| benchmark | metric | before | after | change | |")
    print("|---|---|---:|---:|---:|---|")
    better = worse = 0
    for key in sorted(set(before) & set(after)):
        file, name = key
        if not pattern.search(name):
            continue
        rb, ra = before[key], after[key]
        shown = False
        for metric, higher, scale, label in METRICS:
            b, a = rb.median(name, metric), ra.median(name, metric)
            if b is None or a is None or b == 0:
                continue
            if metric == "seconds" and shown:
                continue
            change = (a - b) / b * 100
            flag = ""
            if abs(change) >= threshold:
                good = (change > 0) == higher
                flag = "better" if good else "**WORSE**"
                better += good
                worse += not good
            print(f"| {name} | {label} | {b * scale:,.3f} | {a * scale:,.3f} | {change:+.1f}% | {flag} |")
            shown = True
            if metric in ("items_per_second", "bytes_per_job"):
                break
    only = sorted(set(before) ^ set(after))
    if only:
        print(f"\n{len(only)} benchmarks are in only one of the two sets.")
    print(f"\n{better} better, {worse} worse by {threshold:g}% or more (medians).")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
