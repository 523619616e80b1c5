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

Options take their value either way: --filter REGEX or --filter=REGEX.

A JSON file that cannot be read or parsed (a run cut short) is skipped with a
note on stderr, and the rest is compared.

Exit status 0; 2 for a bad command line, or when BEFORE or AFTER cannot be
read or holds no readable results.
"""

import argparse
import math
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
    """{(file, benchmark): Results} for a directory or a JSON file. A file of a
    directory that cannot be read is skipped with a note on stderr (as
    report.py's load_all does): one truncated file should not hide the rest.
    Raises OSError for a path that cannot be listed or opened at all, and
    ValueError when it yields no readable results."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".json")]
    else:
        files = [path]
    out = {}
    readable = 0
    for f in files:
        try:
            r = Results(f)
        except (OSError, ValueError) as err:
            if not os.path.isdir(path):
                if isinstance(err, OSError):
                    raise  # its message names the file
                raise ValueError(f"{f}: {err}") from err
            print(f"compare.py: skipping {f}: {err}", file=sys.stderr)
            continue
        readable += 1
        for name in r.names():
            out[(os.path.basename(f)[:-5], name)] = r
    if not readable:
        raise ValueError(f"{path}: no readable results (*.json)")
    return out


def regex(text):
    try:
        return re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"bad regular expression {text!r}: {err}") from err


def percent(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a percentage (a number >= 0): {text!r}")
    return value


def parse_args(argv):
    # argparse takes "--opt X" and "--opt=X" alike and rejects unknown options
    # (exit 2): a misspelt option must not be ignored silently.
    parser = argparse.ArgumentParser(
        prog="compare.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", metavar="BEFORE", help="results directory or JSON file")
    parser.add_argument("after", metavar="AFTER", help="results directory or JSON file")
    parser.add_argument("--filter", metavar="REGEX", type=regex, default=re.compile("."),
                        help="compare only benchmarks whose name matches (re.search)")
    parser.add_argument("--threshold", metavar="PCT", type=percent, default=10.0,
                        help="flag changes of at least this many percent (default 10)")
    return parser.parse_args(argv[1:])


def main(argv):
    args = parse_args(argv)
    pattern, threshold = args.filter, args.threshold
    try:
        before, after = load(args.before), load(args.after)
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
