#!/usr/bin/env python3
"""Compares two benchmark result sets (before / after), benchmark by benchmark.

Usage:
  python3 bench/compare.py BEFORE AFTER [--filter REGEX] [--threshold PCT]

BEFORE and AFTER are results directories of bench/run.sh (every *.json in
them) or single Google Benchmark JSON files. Two directories pair benchmarks
by file and name (throughput.json's BM_Tbb with throughput.json's); two files
by name alone, whatever the files are called; a directory and a file pair the
file with the directory's file of the same name. For each benchmark present
in both, the median over repetitions of its headline metrics is compared:
items_per_second (higher is better) and, where it has them, its latency
percentiles p50/p99/p99.9 (lower is better; the snapshot benchmarks' submit
latency); else those percentiles alone; else bytes per job for Memory/*
(lower is better); else the real time per iteration (lower is better; so for
SnapshotCost/*, whose bytes_per_job counter is the image's size per job,
fixed by the format). Changes beyond --threshold percent (default 10) are
flagged: "better" or "WORSE".

Benchmarks that failed (error_occurred, with Google Benchmark's
error_message) in either set are listed apart, a benchmark that fails in
AFTER but did not in BEFORE as NEWLY FAILING, and so are the benchmarks found
in only one of the two sets, by name.

Absolute figures of two runs move with the machine's load; the ratios in
each run's report.md are steadier. Compare runs made on the same machine,
and look at the ratio tables of both reports before trusting a small change.

Google Benchmark's own tools/compare.py (with its U test) also reads these
JSON files; Debian does not ship it (libbenchmark-dev has only its doc), so it
needs a checkout of google/benchmark and scipy:
  compare.py benchmarks BEFORE/throughput.json AFTER/throughput.json

Options take their value either way: --filter REGEX or --filter=REGEX.

A JSON file of a directory that cannot be read or parsed (a run cut short),
or is not Google Benchmark output (its top level not an object), is skipped
with a note on stderr naming it, and the rest is compared.

Exit status 0, whatever the figures or failures (they are reported, as WORSE
changes are; nothing here judges a run); 2 for a bad command line, or when
BEFORE or AFTER cannot be read or holds no readable results.
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

# The benchmarks whose bytes_per_job is the figure (memory_bench.cc). The
# SnapshotCost/* counter of that name is image bytes per job, the same ~140
# every run: taken as headline, it hid the snapshot time.
BYTES_PER_JOB_PREFIX = "Memory/"


def load(path, by_name=False):
    """({key: Results}, {key: error message}) for a directory or a JSON file:
    the benchmarks with results and those that failed (error_occurred; a
    benchmark with some repetitions failed is in both). A key is (file stem,
    benchmark), or ("", benchmark) when by_name: two single files are named
    freely, so their stems cannot pair them. A file of a directory that
    cannot be read is skipped with a note on stderr (as report.py's load_all
    does): one truncated file should not hide the rest. Raises OSError for a
    path that cannot be listed or opened at all, and ValueError when it
    yields no readable results."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".json")]
    else:
        files = [path]
    out, errors = {}, {}
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
        stem = "" if by_name else os.path.basename(f)[:-5]
        for name in r.names():
            out[(stem, name)] = r
        for name, message in r.errors.items():
            errors[(stem, name)] = message
    if not readable:
        raise ValueError(f"{path}: no readable results (*.json)")
    return out, errors


def label(key):
    stem, name = key
    return f"{name} ({stem}.json)" if stem else name


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
    # A directory and a file: the file's stem names the directory's file it
    # pairs with (throughput.json with throughput.json), so keys keep stems.
    by_name = not os.path.isdir(args.before) and not os.path.isdir(args.after)
    try:
        before, failed_before = load(args.before, by_name)
        after, failed_after = load(args.after, by_name)
    except (OSError, ValueError) as err:
        print(f"compare.py: {err}", file=sys.stderr)
        return 2
    print(f"| benchmark | metric | before | after | change | |")
    print("|---|---|---:|---:|---:|---|")
    better = worse = compared = 0
    for key in sorted(set(before) & set(after)):
        file, name = key
        if not pattern.search(name):
            continue
        rb, ra = before[key], after[key]
        compared += 1
        shown = False
        for metric, higher, scale, unit in METRICS:
            if metric == "bytes_per_job" and not name.startswith(BYTES_PER_JOB_PREFIX):
                continue
            if metric == "seconds" and shown:
                continue
            b, a = rb.median(name, metric), ra.median(name, metric)
            if b is None or a is None or b == 0:
                continue
            change = (a - b) / b * 100
            flag = ""
            if abs(change) >= threshold:
                good = (change > 0) == higher
                flag = "better" if good else "**WORSE**"
                better += good
                worse += not good
            print(f"| {name} | {unit} | {b * scale:,.3f} | {a * scale:,.3f} | {change:+.1f}% | {flag} |")
            shown = True
            if metric == "bytes_per_job":
                break
    if not compared:
        print(f"| (no benchmark{' matching --filter' if pattern.pattern != '.' else ''} "
              "is in both sets) | | | | | |")

    # Failures and unpaired benchmarks, by name: a benchmark that errors has
    # no figures, so it would otherwise only shrink the table.
    def wanted(keys):
        return sorted(k for k in keys if pattern.search(k[1]))

    newly = wanted(set(failed_after) - set(failed_before))
    still = wanted(set(failed_after) & set(failed_before))
    fixed = wanted(set(failed_before) - set(failed_after))
    if newly or still or fixed:
        print("\nBenchmarks that failed (error_occurred):")
        for key in newly:
            was = "ran" if key in before else "absent"
            print(f"- **NEWLY FAILING** in AFTER ({was} in BEFORE): {label(key)}: "
                  f"{failed_after[key] or '(no error_message)'}")
        for key in still:
            print(f"- failing in both: {label(key)}: BEFORE {failed_before[key] or '?'!r}, "
                  f"AFTER {failed_after[key] or '?'!r}")
        for key in fixed:
            now = "runs" if key in after else "absent"
            print(f"- failed in BEFORE only ({now} in AFTER): {label(key)}: "
                  f"{failed_before[key] or '(no error_message)'}")
    present_before = set(before) | set(failed_before)
    present_after = set(after) | set(failed_after)
    for side, keys in (("BEFORE", present_before - present_after),
                       ("AFTER", present_after - present_before)):
        keys = wanted(keys)
        if keys:
            print(f"\nOnly in {side} ({len(keys)}): " + ", ".join(label(k) for k in keys))
    tail = f"; {len(newly)} NEWLY FAILING" if newly else ""
    print(f"\n{better} better, {worse} worse by {threshold:g}% or more (medians){tail}.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
