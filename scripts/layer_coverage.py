"""How much of Keras's own layer-test configurations the exchange converts exactly (issue 14).

    python scripts/layer_coverage.py [--group G] [--class C] [-k SUBSTRING] [--out report.json]

Runs the harvested cases (tests/fixtures/keras_layer_cases.json, from scripts/harvest_layer_tests.py)
through tests/layer_suite.py, each in a worker process with a time box, and prints per group: the
cases Keras itself can save and reload, how many pass, are refused, wrong, crash or time out, and
coverage = passing / cases Keras can save; then the refusals grouped by message prefix, and every
wrong, crash and timeout case. Exit code 1 when any case is wrong, crashes or times out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import layer_suite  # noqa: E402

COUNTED = ("pass", "refused", "wrong", "crash", "timeout")


def message_prefix(message: str) -> str:
    """A refusal without its particulars (layer names, quoted values, numbers), to group by."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    text = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", text)
    return text[:110]


def table(results: list) -> list[str]:
    by_group = defaultdict(Counter)
    for result in results:
        by_group[result.group][result.outcome] += 1
    lines = [f"{'group':16s} {'cases':>5s} {'keras_cannot':>12s} {'saveable':>8s} "
             + " ".join(f"{name:>7s}" for name in COUNTED) + f" {'coverage':>8s}"]
    total = Counter()
    for group in sorted(by_group) + ["TOTAL"]:
        counts = total if group == "TOTAL" else by_group[group]
        if group != "TOTAL":
            total.update(counts)
        saveable = sum(counts[name] for name in COUNTED)
        coverage = f"{100 * counts['pass'] / saveable:7.1f}%" if saveable else "      -"
        lines.append(f"{group:16s} {sum(counts.values()):5d} {counts['keras_cannot']:12d} {saveable:8d} "
                     + " ".join(f"{counts[name]:7d}" for name in COUNTED) + f" {coverage:>8s}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, default=layer_suite.CASES_PATH)
    parser.add_argument("--group", action="append", help="only this group (repeatable)")
    parser.add_argument("--class", dest="classes", action="append", help="only this layer class (repeatable)")
    parser.add_argument("-k", dest="substring", help="only cases whose id contains this")
    parser.add_argument("--out", type=Path, help="write every result as JSON here")
    parser.add_argument("--timeout", type=float, default=layer_suite.CASE_SECONDS, help="seconds per case")
    args = parser.parse_args(argv)

    cases = [case for case in layer_suite.load_cases(args.cases)
             if (not args.group or case["group"] in args.group)
             and (not args.classes or case["class_name"] in args.classes)
             and (not args.substring or args.substring in case["id"])]
    print(f"{len(cases)} cases", flush=True)
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="layer_coverage_") as work:
        log = Path(work) / "worker.log"
        for number, result in enumerate(layer_suite.run_cases(cases, Path(work), log, args.timeout), 1):
            results.append(result)
            if result.outcome in ("wrong", "crash", "timeout") or number % 50 == 0:
                print(f"[{number}/{len(cases)} {time.monotonic() - started:.0f} s] {result.outcome}: {result.id} "
                      f"{result.detail[:200]}", flush=True)
    elapsed = time.monotonic() - started

    print(f"\n{len(results)} cases in {elapsed:.0f} s\n")
    print("\n".join(table(results)))
    refusals = Counter(message_prefix(result.detail) for result in results if result.outcome == "refused")
    print(f"\nrefusals by message ({sum(refusals.values())}):")
    for prefix, count in refusals.most_common():
        print(f"  {count:4d}  {prefix}")
    keras_cannot = Counter(message_prefix(result.detail) for result in results if result.outcome == "keras_cannot")
    print(f"\nKeras cannot ({sum(keras_cannot.values())}), by message:")
    for prefix, count in keras_cannot.most_common(15):
        print(f"  {count:4d}  {prefix}")
    bad = [result for result in results if result.outcome in ("wrong", "crash", "timeout")]
    print(f"\nwrong, crash, timeout ({len(bad)}):")
    for result in bad:
        print(f"  {result.outcome:7s} {result.id} [{result.class_name}] stage={result.stage}: {result.detail}")
    if args.out:
        args.out.write_text(json.dumps({"seconds": round(elapsed, 1), "results": [asdict(r) for r in results]},
                                       indent=1) + "\n")
        print(f"\nresults -> {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
