"""Keras's own layer-test configurations through every conversion (issue 14).

The cases are harvested from the installed Keras's `keras/src/layers/**/*_test.py` by
`scripts/harvest_layer_tests.py` into `tests/fixtures/keras_layer_cases.json`; `tests/layer_suite.py`
runs one (see its docstring for the outcomes). The default run takes a fixed subset, a few cases
of every group; `-m slow` runs all of them and prints the coverage. Either way no case may be
`wrong`, `crash` or `timeout`, and every refusal is one line that names the layer.
`python scripts/layer_coverage.py` prints the full table and every refusal.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import zlib
from collections import Counter, defaultdict

import layer_suite
import pytest
from support import ROOT

CASES = layer_suite.load_cases()
PER_GROUP = 2  # default run: this many cases of each group, ~25 in all
SMALL_INPUT = 4096  # ... each with at most this many input values per sample (fast)


def input_size(case: dict) -> int:
    return sum(
        math.prod(layer_suite.UNKNOWN_SIZE if axis is None else axis for axis in shape[1:])
        for shape in case["input_shapes"]
    )


def default_subset() -> list[dict]:
    """PER_GROUP cases of every group with small inputs, of different layer classes where the
    group has them, in a fixed pseudo-random order (by a hash of the id, so the choice does not
    change when cases are added to other tests)."""
    ordered = [
        case
        for case in sorted(CASES, key=lambda case: zlib.crc32(case["id"].encode()))
        if input_size(case) <= SMALL_INPUT
    ]
    by_group = defaultdict(list)
    for distinct in (True, False):
        for case in ordered:
            chosen = by_group[case["group"]]
            if (
                len(chosen) < PER_GROUP
                and case not in chosen
                and not (distinct and case["class_name"] in {other["class_name"] for other in chosen})
            ):
                chosen.append(case)
    return [case for group in sorted(by_group) for case in by_group[group]]


def problem(result: layer_suite.CaseResult) -> str | None:
    """What is wrong with a result, or None: a bug (`wrong`, `crash`, `timeout`) or a refusal
    that is not one line naming the layer."""
    if result.outcome in ("wrong", "crash", "timeout"):
        return f"{result.id} [{result.class_name}]: {result.outcome} at {result.stage}: {result.detail}"
    if result.outcome == "refused":
        message = result.detail
        if not message.strip() or len(message.splitlines()) != 1:
            return f"{result.id}: refusal is not one line: {message!r}"
        if result.layer_name not in message and result.class_name not in message:
            return (
                f"{result.id}: refusal does not name the layer {result.layer_name!r} ({result.class_name}): {message}"
            )
    return None


def coverage_lines(results: list) -> list[str]:
    by_group = defaultdict(Counter)
    for result in results:
        by_group[result.group][result.outcome] += 1
        by_group["TOTAL"][result.outcome] += 1
    lines = []
    for group, counts in sorted(by_group.items()):
        saveable = sum(counts.values()) - counts["keras_cannot"]
        lines.append(
            f"{group}: {counts['pass']}/{saveable} pass "
            f"({100 * counts['pass'] / max(saveable, 1):.1f}%), {counts['refused']} refused, "
            f"{counts['keras_cannot']} Keras cannot save"
        )
    return lines


@pytest.mark.parametrize("case", default_subset(), ids=lambda case: case["id"])
def test_keras_layer_case(case, tmp_path):
    result = layer_suite.run_case_cleanly(case, tmp_path / "case")
    print(f"{result.id}: {result.outcome} {result.detail} {result.diffs}")
    assert problem(result) is None, problem(result)


def test_default_subset_covers_every_group():
    subset = default_subset()
    assert {case["group"] for case in subset} == {case["group"] for case in CASES}
    assert len(subset) == PER_GROUP * len({case["group"] for case in CASES})


@pytest.mark.slow
def test_every_keras_layer_case(tmp_path):
    results = list(layer_suite.run_cases(CASES, tmp_path / "work", tmp_path / "worker.log"))
    print("\n".join(coverage_lines(results)))
    problems = [found for found in map(problem, results) if found is not None]
    assert not problems, f"{len(problems)} cases:\n" + "\n".join(problems)


def test_harvested_cases_are_what_the_harvest_writes_now(tmp_path, monkeypatch):
    """The data file is the harvest of the installed Keras: after a Keras upgrade or a harvest
    change, regenerate it with `python scripts/harvest_layer_tests.py`."""
    spec = importlib.util.spec_from_file_location("harvest_layer_tests", ROOT / "scripts/harvest_layer_tests.py")
    harvest = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, harvest)  # its dataclasses look their module up
    spec.loader.exec_module(harvest)
    fresh = tmp_path / "cases.json"
    harvest.write(harvest.harvest(), fresh)
    assert fresh.read_text() == layer_suite.CASES_PATH.read_text(), (
        "tests/fixtures/keras_layer_cases.json is stale: run python scripts/harvest_layer_tests.py"
    )


# The harness itself: it must see a wrong output, a crash and a bad refusal.

DENSE = next(
    case
    for case in CASES
    if case["class_name"] == "Dense"
    and case["input_style"] == "args"
    and len(case["input_shapes"]) == 1
    and not case["call_kwargs"]
)


def test_the_suite_sees_a_wrong_output(tmp_path, monkeypatch):
    from exchange import torch_adapter

    predict = torch_adapter.predict
    monkeypatch.setattr(torch_adapter, "predict", lambda model, inputs: [o + 1e-3 for o in predict(model, inputs)])
    result = layer_suite.run_case_cleanly(DENSE, tmp_path / "case")
    assert result.outcome == "wrong" and ".keras -> .safetensors -> torch" in result.detail
    assert problem(result) is not None


def test_the_suite_sees_a_crash_and_a_refusal(tmp_path, monkeypatch):
    from exchange import cli
    from exchange.errors import UnsupportedLayerError

    def broken(*args, **kwargs):
        raise KeyError("kernel")

    monkeypatch.setattr(cli, "convert", broken)
    result = layer_suite.run_case_cleanly(DENSE, tmp_path / "crash")
    assert result.outcome == "crash" and result.detail.startswith("KeyError") and problem(result) is not None

    def refusing(*args, **kwargs):
        raise UnsupportedLayerError("two\nlines")

    monkeypatch.setattr(cli, "convert", refusing)
    result = layer_suite.run_case_cleanly(DENSE, tmp_path / "refused")
    assert result.outcome == "refused" and "does not name the layer" in problem(result)
