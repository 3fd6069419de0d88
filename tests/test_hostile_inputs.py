"""Hostile and broken files: each is refused with exit 2 and one stderr line naming the file and
the problem, writes nothing, leaves an existing output byte-identical, stays within a memory bound,
and never reads data from outside the input or runs code from it.

The corpus (`tests/hostile.py`, one case per attack the issue lists plus others) and the seeded
mutation fuzzer run in a child process that measures each case's peak memory; signals, TensorFlow's
logging and a full disk need processes of their own.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hostile
import numpy as np
import pytest
from support import ROOT, random_file_tensors

# Peak RSS a case may add to the child process, which has already imported numpy, h5py, torch
# and the exchange (about 240 MiB). The worst case measures about 91 MiB (a 3.5 MB architecture
# of 25,000 layers parsed before its layer count is refused), every other under 1 MiB; the naive
# readers took from 177 MiB (a 20 MB header) to several GiB.
MEMORY_BOUND_MIB = 128
# Peak RSS of the largest child a case ran (the --verify child, which imports TensorFlow and torch:
# about 730 MiB): its address-space cap (verify.CHILD_ADDRESS_SPACE beyond its 1.6 GiB after
# imports) keeps it below this. The worst case measured, the masked LSTM of 2,000,000 steps, holds
# 1.5 GiB when its 12 s run out.
CHILD_MEMORY_BOUND_MIB = 6144
FUZZ_SEED = 20260611
FUZZ_DEFAULT_CASES = 300  # about 10 s in the default run
FUZZ_SLOW_CASES = 5000  # `pytest -m slow`: about 80 s
CHILD_TIMEOUT = 600


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    """The valid files the corpus and the fuzzer start from (Keras writes the .keras)."""
    from exchange import keras_adapter
    from frameworks import keras_mlp
    from frameworks.recipe import SEED_ARCHITECTURE

    folder = tmp_path_factory.mktemp("hostile")
    model = keras_mlp.build_keras_model(SEED_ARCHITECTURE)
    keras_adapter.set_tensors(model, random_file_tensors(SEED_ARCHITECTURE))
    model.save(folder / "seed.keras")
    hostile.write_base_files(folder / "base", folder / "seed.keras")
    return folder / "base"


def run_child(mode: str, base, work, *extra) -> dict:
    results = work.parent / f"{work.name}.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tests/hostile.py"), mode, str(base), str(work), str(results), *map(str, extra)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def corpus(base_files, tmp_path_factory):
    return run_child("cases", base_files, tmp_path_factory.mktemp("corpus") / "work")


def one_error_line(result: dict) -> str:
    assert result["traceback"] is None, result["traceback"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    return lines[0]


@pytest.mark.parametrize("name", [name for name, case in hostile.CASES.items() if not case.converts])
def test_hostile_input_is_refused_cleanly(corpus, name):
    case, result = hostile.CASES[name], corpus[name]
    line = one_error_line(result)
    assert result["rc"] == 2, line
    assert re.search(case.message, line) and case.names in line, line
    assert result["added"] == [], "nothing may be written beside the output"
    assert result["changed"] == [], "an existing output (and the input) must stay byte-identical"
    assert result["peak_mib"] < MEMORY_BOUND_MIB, f"peak {result['peak_mib']:.0f} MiB"
    assert result["children_peak_mib"] < CHILD_MEMORY_BOUND_MIB, f"child peak {result['children_peak_mib']:.0f} MiB"
    assert not result["secret_leaked"], "bytes of the outside file reached the case's folder"
    assert "pwned" not in result["outside"], "code from the input ran"


@pytest.mark.parametrize("name", [name for name, case in hostile.CASES.items() if case.converts])
def test_odd_but_valid_input_converts_within_the_bound(corpus, name):
    result = corpus[name]
    assert result["traceback"] is None, result["traceback"]
    assert result["rc"] == 0 and result["stderr"] == "", result["stderr"]
    assert result.get("import_error") is None, result["import_error"]
    assert result["peak_mib"] < MEMORY_BOUND_MIB, f"peak {result['peak_mib']:.0f} MiB"
    assert "pwned" not in result["outside"], "code from the input ran"


def check_fuzz(results: dict) -> None:
    failures = []
    for index, result in sorted(results.items()):
        label = f"case {index} ({result['label']})"
        if result["traceback"] is not None:
            failures.append(f"{label}: {result['traceback'].strip().splitlines()[-1]}")
        elif result["rc"] not in (0, 2):
            failures.append(f"{label}: exit {result['rc']}")
        elif result["rc"] == 2 and (
            len(result["stderr"].strip().splitlines()) != 1 or result["added"] or result["changed"]
        ):
            failures.append(
                f"{label}: {result['stderr'][:300]!r}, added {result['added']}, changed {result['changed']}"
            )
        elif result["peak_mib"] >= MEMORY_BOUND_MIB:
            failures.append(f"{label}: peak {result['peak_mib']:.0f} MiB")
        elif result.get("import_error"):
            failures.append(f"{label}: the generated code does not load: {result['import_error']}")
        elif result.get("code_ran"):
            failures.append(f"{label}: code from the file ran")
    assert not failures, f"{len(failures)} of {len(results)} fuzz cases failed:\n" + "\n".join(failures[:20])


def test_mutation_fuzzer(base_files, tmp_path):
    results = run_child("fuzz", base_files, tmp_path / "work", FUZZ_SEED, FUZZ_DEFAULT_CASES)
    check_fuzz(results)
    refused = sum(result["rc"] == 2 for result in results.values())
    assert 0 < refused < len(results), "mutations should produce both refused and convertible files"


@pytest.mark.slow
def test_mutation_fuzzer_thousands(base_files, tmp_path):
    check_fuzz(run_child("fuzz", base_files, tmp_path / "work", FUZZ_SEED + 1, FUZZ_SLOW_CASES))


# ---------------------------------------------------------------------------------------------
# What needs a process of its own

SLOW_WRITE = """
import os, sys, time
from pathlib import Path

def pause():
    Path(os.environ["SLOW_WRITE_MARKER"]).touch()
    time.sleep(30)   # the test signals the process while it waits here, mid-write

where = os.environ.get("SLOW_WRITE_AT", "copy_into")
if where == "copy_into":     # after the first tensor is copied into the output
    from exchange import tensors
    copy_into = tensors.LazyTensor.copy_into
    def slow_copy_into(self, out):
        copy_into(self, out)
        pause()
    tensors.LazyTensor.copy_into = slow_copy_into
elif where == "torch.save":  # after torch.save wrote the .pt's bytes, before they are complete
    import torch
    torch_save = torch.save
    def slow_torch_save(*args, **kwargs):
        torch_save(*args, **kwargs)
        pause()
    torch.save = slow_torch_save
elif where == "keras.save":  # after Keras wrote the .keras file into its temporary
    import keras
    keras_save = keras.Model.save
    def slow_keras_save(*args, **kwargs):
        keras_save(*args, **kwargs)
        pause()
    keras.Model.save = slow_keras_save
from exchange.cli import main
sys.exit(main(sys.argv[1:]))
"""


def slow_convert(source, out, marker, where: str = "copy_into") -> subprocess.Popen:
    """`convert SOURCE OUT` that pauses mid-write at `where`; returns once `marker` says it is there."""
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITE, str(source), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SLOW_WRITE_MARKER": str(marker), "SLOW_WRITE_AT": where},
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        process.kill()
        raise AssertionError(f"the write never paused: {process.communicate()[1][-2000:]}")
    return process


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_write_removes_the_temporary(base_files, tmp_path, signal_number, exit_code):
    folder = tmp_path / "output"
    folder.mkdir()
    out = folder / "out.safetensors"
    out.write_bytes(hostile.EXISTING)
    process = slow_convert(base_files / "seed.keras", out, tmp_path / "writing")
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code
    assert stderr.strip().splitlines() == [
        f"error: interrupted by {signal.Signals(signal_number).name}; {out} was not written"
    ]
    assert sorted(p.name for p in folder.iterdir()) == ["out.safetensors"]
    assert out.read_bytes() == hostile.EXISTING


def has_o_tmpfile(folder) -> bool:
    try:
        os.close(os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600))
        return True
    except (AttributeError, OSError):
        return False


def anonymous_files_in(pid: int, folder) -> list[str]:
    """The files without a name that process `pid` holds open in `folder` (O_TMPFILE ones)."""
    links = []
    for descriptor in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{descriptor}"))
        except OSError:
            pass
    return [link for link in links if link.startswith(f"{folder}/#") and link.endswith(" (deleted)")]


@pytest.mark.parametrize("output_name, where", [("out.safetensors", "copy_into"), ("out.pt", "torch.save")])
def test_sigkill_mid_write_leaves_nothing(base_files, tmp_path, output_name, where):
    """The bytes go to a file without a name (O_TMPFILE) until complete: SIGKILL leaves no entry."""
    if not has_o_tmpfile(tmp_path):
        pytest.skip("no O_TMPFILE on this filesystem: a SIGKILL leaves a private folder for the next run")
    folder = tmp_path / "output"
    folder.mkdir()
    out = folder / output_name
    out.write_bytes(hostile.EXISTING)
    process = slow_convert(base_files / "seed.keras", out, tmp_path / "writing", where)
    assert anonymous_files_in(process.pid, folder), "the output is not being written to an anonymous file"
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert sorted(p.name for p in folder.iterdir()) == [output_name]
    assert out.read_bytes() == hostile.EXISTING


HOLD_TEMPORARY = """
import sys, time
from exchange.fileformat import atomic_output
with atomic_output(sys.argv[1]) as temporary:
    print(temporary, flush=True)
    time.sleep(300)
"""


def test_next_run_removes_a_sigkilled_keras_temporary(base_files, tmp_path):
    """Keras needs a path, so its temporary is a private folder; a SIGKILL leaves it, and the next
    run for the same output removes it, but never a live process's, nor a folder of another name."""
    out = tmp_path / "out.keras"
    out.write_bytes(hostile.EXISTING)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    live = subprocess.Popen(
        [sys.executable, "-c", HOLD_TEMPORARY, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        live_temporary = Path(live.stdout.readline().strip()).parent
        assert live_temporary.is_dir()
        killed = slow_convert(
            base_files / "seed.safetensors", out, tmp_path.parent / f"{tmp_path.name}.writing", "keras.save"
        )
        killed.kill()
        killed.communicate(timeout=60)
        stale = [path for path in tmp_path.glob(".out.keras.*.tmp") if path != live_temporary]
        assert len(stale) == 1 and (stale[0] / "out.keras").is_file(), "the SIGKILLed run left its temporary"
        # Folders whose names only resemble a temporary of out.keras, with the dead owner's record.
        decoys = [
            tmp_path / name
            for name in (
                ".out.keras.tmp",
                ".out.keras.abc.tmp",
                ".out.keras.abcdefgh.tmp.x",
                "out.keras.abcdefgh.tmp",
                ".other.keras.abcdefgh.tmp",
            )
        ]
        for decoy in decoys:
            decoy.mkdir()
            shutil.copy(stale[0] / ".owner", decoy / ".owner")
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts/convert.py"), str(base_files / "seed.safetensors"), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert not stale[0].exists(), "the next run did not remove the stale temporary"
        assert live_temporary.is_dir(), "a live process's temporary was removed"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [live_temporary.name, "out.keras"] + [decoy.name for decoy in decoys]
        )
        assert out.read_bytes() != hostile.EXISTING
    finally:
        live.kill()
        live.communicate(timeout=60)


def _full_disk():
    """In the child: files may not grow past 64 KiB, and writing past it fails with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


@pytest.mark.parametrize("output_name", ["out.safetensors", "out.pt"])
def test_full_disk_is_one_line_and_keeps_the_output(base_files, tmp_path, output_name):
    out = tmp_path / output_name
    out.write_bytes(hostile.EXISTING)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert.py"), str(base_files / "seed.keras"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_full_disk,
    )
    assert result.returncode == 2
    assert re.fullmatch(rf"error: {re.escape(str(out))}: could not write \(.+\)", result.stderr.strip()), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [output_name]
    assert out.read_bytes() == hostile.EXISTING


def test_keras_path_error_is_one_line_without_tensorflow_logging(base_files, tmp_path):
    """TensorFlow writes start-up lines from C++ whatever TF_CPP_MIN_LOG_LEVEL says; none may show.
    (The .keras is written with Keras in this process; then --verify fails, its child aborting.)"""
    out = tmp_path / "out.keras"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert.py"), str(base_files / "seed.safetensors"), str(out), "--verify"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0", "EXCHANGE_VERIFY_TEST_FAULT": "abort"},
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(
        f"error: {base_files / 'seed.safetensors'}: --verify stopped: Keras or PyTorch crashed"
    )
    assert not out.exists()


def test_negated_tensor_views_convert(tmp_path):
    """A tensor saved as a lazy negation view (`x.conj().imag`) holds ordinary numbers."""
    import torch

    from exchange import fileformat
    from frameworks.recipe import SEED_ARCHITECTURE

    tensors = {key: torch.from_numpy(value) for key, value in random_file_tensors(SEED_ARCHITECTURE).items()}
    negated = torch.complex(torch.zeros(50, 784), -tensors["dense_0.weight"]).conj().imag
    assert negated.is_neg()
    path = tmp_path / "neg.pt"
    torch.save({**tensors, "dense_0.weight": negated}, path)
    from exchange import cli

    assert cli.main([str(path), str(tmp_path / "out.safetensors"), "--activations", "tanh,tanh,softmax"]) == 0
    np.testing.assert_array_equal(
        fileformat.load(tmp_path / "out.safetensors").tensors["dense_0.weight"], tensors["dense_0.weight"].numpy()
    )
