#!/usr/bin/env python3
"""Merges the Google Benchmark JSON files of an A/B run (two binaries run
alternately, A B A B ..., by bench/run.sh) into one file that report.py,
check_results.py and compare.py read like any other: every benchmark of a file
given as LABEL=FILE is renamed LABEL/<name>, one repetition per file.

Usage: python3 bench/merge_ab.py OUT.json LABEL=FILE [LABEL=FILE ...]

The context is the first file's, with jobengine_ab_files (how many files were
merged) added and, per label, the context entries that differ from the first
file's (e.g. jobengine_metrics) as <label>:<key>.
"""

import json
import sys


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out_path = argv[1]
    merged = {"context": None, "benchmarks": []}
    rounds = {}
    for arg in argv[2:]:
        label, sep, path = arg.partition("=")
        if not sep or not label or not path:
            print(f"merge_ab.py: expected LABEL=FILE, got '{arg}'", file=sys.stderr)
            return 2
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        context = data.get("context", {})
        if merged["context"] is None:
            merged["context"] = dict(context)
        for key, value in context.items():
            if merged["context"].get(key) != value and key not in ("date", "load_avg"):
                merged["context"][f"{label}:{key}"] = value
        merged["context"].setdefault(f"{label}:jobengine_metrics",
                                     context.get("jobengine_metrics", "?"))
        index = rounds.get(label, 0)
        rounds[label] = index + 1
        for entry in data.get("benchmarks", []):
            entry = dict(entry)
            for key in ("name", "run_name"):
                if key in entry:
                    entry[key] = f"{label}/{entry[key]}"
            entry["repetition_index"] = index
            merged["benchmarks"].append(entry)
    merged["context"]["jobengine_ab_files"] = str(len(argv) - 2)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
