"""Run one harvested Keras layer-test configuration through every conversion (issue 14).

A case (from `tests/fixtures/keras_layer_cases.json`, written by `scripts/harvest_layer_tests.py`) is
one built-in Keras layer with literal constructor kwargs, called on `keras.Input`s of literal
shapes. `run_case(case, work_dir)` builds that one-layer functional model with real Keras, gives
every float variable a seeded random value and saves it as `.keras`; then, with this project's own
code, converts it `.keras` -> `.safetensors` (run by `torch_adapter`), `.safetensors` -> `.keras`
(reopened by Keras in safe mode), that `.keras` -> `.safetensors` again (bit-identical to the
first) and `.keras` -> `model.py` (imported and run), and compares every output with Keras's.

Outcomes: `pass`; `refused` (the exchange raised an ExchangeError: its one-line message);
`wrong` (converted, but an output differs beyond the tolerance, or the round trip is not
bit-identical: which direction, by how much); `crash` (any other exception from the conversion
or from running its result); `timeout` (over CASE_SECONDS during the conversion); `keras_cannot`
(Keras itself cannot build, run, save, reload it, or its outputs change between runs or after
the reload: left out of the coverage denominator).

`run_cases` runs many cases in a worker process (restarted after a native crash, a hang or every
WORKER_CASES cases), so one segfault or runaway case cannot end a long run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for entry in (ROOT / "tests", ROOT):  # this checkout's packages first, whatever else is installed
    if str(entry) in sys.path:
        sys.path.remove(str(entry))
    sys.path.insert(0, str(entry))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CASES_PATH = ROOT / "tests/fixtures/keras_layer_cases.json"
BATCH = 3  # rows of every input: the harvested batch axis is dropped
UNKNOWN_SIZE = 4  # a `None` axis of a harvested input shape takes this size in the data
TOKEN_IDS = 7  # integer inputs are drawn in [0, 7), or below a smaller vocabulary of the layer
# Pass when max|a - b| <= RELATIVE_TOLERANCE * max(1, max|Keras output|): float32 rounding between
# TensorFlow and PyTorch is ~1e-7 per operation; one layer stays well inside 1e-5 of its scale.
RELATIVE_TOLERANCE = 1e-5
# A layer computing in half precision (dtype="float16", "mixed_bfloat16") rounds each operation
# to ~1e-3 (float16) or ~8e-3 (bfloat16) of its value: a few of those units, by output dtype.
HALF_PRECISION_TOLERANCE = {"float16": 4e-3, "bfloat16": 3e-2}
CASE_SECONDS = 60  # the time box of one case
WORKER_CASES = 100  # a worker process is replaced after this many cases (Keras keeps state)
POSITIVE_VARIABLES = ("gamma", "scale", "moving_variance", "variance")  # drawn in [0.5, 1.5)
WEIGHT_SCALE = 0.3  # every other float variable: normal(0, 0.3)
OUTCOMES = ("pass", "refused", "wrong", "crash", "timeout", "keras_cannot")
RESULT_PREFIX = "@@result "


@dataclass
class CaseResult:
    id: str
    group: str
    class_name: str
    outcome: str  # one of OUTCOMES
    detail: str = ""  # the refusal, the exception, or what differs
    stage: str = ""  # where it stopped: keras, to_safetensors, torch, to_keras, again, code
    layer_name: str = ""
    diffs: dict = field(default_factory=dict)  # direction -> max abs difference
    scale: float = 0.0  # max |Keras output|
    seconds: float = 0.0


class CaseTimeout(Exception):
    pass


class KerasCannot(Exception):
    """Keras itself cannot build, run, save or reload the case."""


def load_cases(path: Path = CASES_PATH) -> list[dict]:
    return json.loads(Path(path).read_text())["cases"]


@contextmanager
def time_limit(seconds: float):
    """SIGALRM raises CaseTimeout after `seconds` (main thread only; a no-op elsewhere)."""
    import threading

    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise CaseTimeout(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:500]


# ---------------------------------------------------------------------------------------------
# Keras: the model, its weights, its inputs


def make_value(value):
    """A harvested kwarg value; `{"__layer__": X, "init_kwargs": {...}}` is a constructed layer."""
    if isinstance(value, dict) and "__layer__" in value:
        return layer_class(value["__layer__"])(**make_value(value["init_kwargs"]))
    if isinstance(value, dict):
        return {key: make_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [make_value(item) for item in value]
    return value


def layer_class(name: str):
    import keras

    found = getattr(keras.layers, name, None) or next(  # exported under another name: GroupQueryAttention
        (item for item in vars(keras.layers).values() if getattr(item, "__name__", None) == name), None
    )
    if found is None:
        raise KerasCannot(f"keras.layers has no {name}")
    return found


def build_model(case: dict):
    """The functional model `keras.Input`s -> one layer -> its outputs (flattened)."""
    import keras

    tensors = [
        keras.Input(tuple(shape[1:]), dtype=dtype, name=f"input_{index}")
        for index, (shape, dtype) in enumerate(zip(case["input_shapes"], case["input_dtypes"]))
    ]
    layer = layer_class(case["class_name"])(**make_value(case["init_kwargs"]))
    positional = [tensor for name, tensor in zip(case["input_names"], tensors) if name is None]
    named = {name: tensor for name, tensor in zip(case["input_names"], tensors) if name is not None}
    call_kwargs = make_value(case["call_kwargs"])
    if case["input_style"] == "list":
        outputs = layer(positional, **named, **call_kwargs)
    else:
        outputs = layer(*positional, **named, **call_kwargs)
    outputs = keras.tree.flatten(outputs)
    return keras.Model(tensors, outputs if len(outputs) > 1 else outputs[0], name="case"), layer


def randomize(model, generator: np.random.Generator) -> None:
    """Every float variable seeded: scales and variances in [0.5, 1.5), the rest normal(0, 0.3)."""
    for variable in model.variables:
        if "float" not in str(variable.dtype):
            continue
        shape = tuple(variable.shape)
        if variable.name in POSITIVE_VARIABLES:
            value = generator.uniform(0.5, 1.5, shape)
        else:
            value = generator.normal(0.0, WEIGHT_SCALE, shape)
        variable.assign(value.astype(str(variable.dtype)))
    for layer in model.layers:
        if callable(getattr(layer, "finalize_state", None)):
            layer.finalize_state()


def vocabulary(case: dict) -> int:
    """Integer inputs stay below every vocabulary size the layer names."""
    sizes = [
        value
        for key, value in case["init_kwargs"].items()
        if key in ("input_dim", "num_tokens", "max_tokens", "num_bins") and isinstance(value, int) and value > 0
    ]
    return min([TOKEN_IDS] + sizes)


def make_inputs(case: dict, generator: np.random.Generator) -> list[np.ndarray]:
    arrays = []
    for shape, dtype in zip(case["input_shapes"], case["input_dtypes"]):
        size = (BATCH,) + tuple(UNKNOWN_SIZE if axis is None else axis for axis in shape[1:])
        if dtype == "bool":
            arrays.append(generator.random(size) < 0.7)
        elif dtype == "string":  # Keras's predict takes strings as a tf.Tensor, not a numpy array
            import tensorflow as tf

            arrays.append(tf.constant(generator.choice(np.array(["a", "b", "c", "dog", "cat"]), size)))
        elif "int" in dtype:
            arrays.append(generator.integers(0, vocabulary(case), size).astype(dtype))
        else:
            arrays.append(generator.standard_normal(size).astype(dtype))
    return arrays


def max_difference(reference: list, other: list) -> float:
    """Max |a - b| over all outputs (NaN where both are NaN counts as equal); inf when the
    outputs differ in number, shape or (for strings) value."""
    if len(reference) != len(other):
        return float("inf")
    worst = 0.0
    for a, b in zip(reference, other):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return float("inf")
        if a.dtype.kind in "OUS" or b.dtype.kind in "OUS":
            if not np.array_equal(a, b):
                return float("inf")
            continue
        a, b = a.astype(np.float64), b.astype(np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        difference = np.where(both_nan, 0.0, np.abs(a - b))
        if difference.size:
            worst = max(worst, float(np.nan_to_num(difference, nan=np.inf).max()))
    return worst


def scale_of(outputs: list) -> float:
    values = [np.abs(np.asarray(o, dtype=np.float64)) for o in outputs if np.asarray(o).dtype.kind in "fiub"]
    finite = [v[np.isfinite(v)] for v in values]
    return max([float(v.max()) for v in finite if v.size] + [0.0])


def tolerance(reference: list) -> float:
    """The largest difference that passes: relative to max(1, max |Keras output|)."""
    relative = max(
        [HALF_PRECISION_TOLERANCE.get(np.asarray(output).dtype.name, RELATIVE_TOLERANCE) for output in reference]
        + [RELATIVE_TOLERANCE]
    )
    return relative * max(1.0, scale_of(reference))


def keras_stage(case: dict, work_dir: Path, seed: int):
    """The saved `.keras`, its inputs and Keras's outputs; KerasCannot if Keras cannot."""
    import keras

    from exchange import keras_adapter

    keras.utils.set_random_seed(seed % 2**31)
    generator = np.random.default_rng(seed)
    try:
        model, layer = build_model(case)
        randomize(model, generator)
        inputs = make_inputs(case, generator)
        reference = keras_adapter.predict(model, inputs)
        if max_difference(reference, keras_adapter.predict(model, inputs)) != 0:
            raise KerasCannot("its outputs change from one run to the next")
        keras_path = work_dir / "model.keras"
        model.save(keras_path)
        reloaded = keras.saving.load_model(keras_path, safe_mode=True)
        reloaded_outputs = keras_adapter.predict(reloaded, inputs)
    except (KerasCannot, CaseTimeout):
        raise
    except Exception as err:
        raise KerasCannot(f"{type(err).__name__}: {one_line(err)}") from err
    if max_difference(reference, reloaded_outputs) > tolerance(reference):
        raise KerasCannot("Keras's reloaded model computes different outputs")
    return keras_path, layer.name, inputs, reference


# ---------------------------------------------------------------------------------------------
# The conversions


def run_generated_code(code_path: Path, graph, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Import the generated `model.py` from its path, load its weights, run it on Keras-layout inputs."""
    import torch

    from exchange import torch_adapter
    from exchange.kinds.axis_order import to_keras_order

    spec = importlib.util.spec_from_file_location(f"generated_{abs(hash(code_path))}", code_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, torch_adapter.class_name(graph.name))()
    model.load_state_dict(module.load(str(code_path.with_suffix(".safetensors"))), strict=True)
    model.eval()
    with torch.no_grad():
        outputs = model(*torch_adapter.torch_inputs(graph, inputs))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [
        output.permute(to_keras_order(len(graph.shapes[name]))).numpy() for name, output in zip(graph.outputs, outputs)
    ]


def conversions(keras_path: Path, inputs: list, reference: list, result: CaseResult) -> None:
    """Every direction; fills `result.diffs` and sets `result.stage` as it goes."""
    import keras

    from exchange import cli, keras_adapter, torch_adapter

    work_dir = keras_path.parent
    result.stage = "to_safetensors"
    common = work_dir / "model.safetensors"
    cli.convert(keras_path, common)
    result.stage = "torch"
    result.diffs[".keras -> .safetensors -> torch"] = max_difference(
        reference, torch_adapter.predict(torch_adapter.model_from_file(common), inputs)
    )
    result.stage = "to_keras"
    rebuilt = work_dir / "rebuilt.keras"
    cli.convert(common, rebuilt)
    reopened = keras.saving.load_model(rebuilt, safe_mode=True)
    result.diffs[".safetensors -> .keras"] = max_difference(reference, keras_adapter.predict(reopened, inputs))
    result.stage = "again"
    again = work_dir / "again.safetensors"
    cli.convert(rebuilt, again)
    identical = again.read_bytes() == common.read_bytes()
    result.diffs["file -> Keras -> file bit-identical"] = 0.0 if identical else float("inf")
    result.stage = "code"
    code_path = work_dir / "code" / "model.py"
    code_path.parent.mkdir(exist_ok=True)
    graph = cli.convert(keras_path, code_path)
    result.diffs[".keras -> model.py"] = max_difference(reference, run_generated_code(code_path, graph, inputs))
    result.stage = ""


def run_case(case: dict, work_dir, timeout: float | None = CASE_SECONDS) -> CaseResult:
    """One case through Keras and every conversion; see the module docstring for the outcomes."""
    from exchange.errors import ExchangeError

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    result = CaseResult(case["id"], case["group"], case["class_name"], "pass", stage="keras")
    started = time.monotonic()
    seed = zlib.crc32(case["id"].encode())
    limit = float("inf")
    try:
        with time_limit(timeout):
            try:
                keras_path, result.layer_name, inputs, reference = keras_stage(case, work_dir, seed)
            except CaseTimeout as err:
                raise KerasCannot(f"Keras alone ran {err}") from None
            result.scale = scale_of(reference)
            limit = tolerance(reference)
            conversions(keras_path, inputs, reference, result)
    except KerasCannot as err:
        result.outcome, result.detail = "keras_cannot", one_line(err)
    except ExchangeError as err:
        result.outcome, result.detail = "refused", str(err)
    except CaseTimeout as err:
        result.outcome, result.detail = "timeout", f"conversion ran {err}"
    except Exception as err:  # noqa: BLE001 -- anything else from our code is a crash
        frames = traceback.extract_tb(err.__traceback__)
        where = next(
            (
                f"{Path(frame.filename).name}:{frame.lineno}"
                for frame in reversed(frames)
                if "/exchange/" in frame.filename
            ),
            "",
        )
        result.outcome = "crash"
        result.detail = f"{type(err).__name__}: {one_line(err)}" + (f" [at {where}]" if where else "")
    over = {direction: diff for direction, diff in result.diffs.items() if not diff <= limit}
    if over:  # a direction that ran computed something else: wrong, whatever happened after it
        later = f"; then {result.outcome} at {result.stage}: {result.detail}" if result.outcome != "pass" else ""
        result.outcome = "wrong"
        result.detail = (
            "; ".join(f"{direction}: max abs diff {diff:.3g}" for direction, diff in over.items())
            + f" (tolerance {limit:.3g})"
            + later
        )
    result.detail = result.detail.replace(f"{work_dir}{os.sep}", "")  # `model.keras: …`, not the temporary path
    result.seconds = round(time.monotonic() - started, 2)
    return result


def run_case_cleanly(case: dict, work_dir, timeout: float | None = CASE_SECONDS) -> CaseResult:
    """`run_case`, then Keras's global state cleared and the case's files removed."""
    import shutil

    import keras

    try:
        return run_case(case, work_dir, timeout)
    finally:
        keras.backend.clear_session()
        shutil.rmtree(work_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Many cases, in a worker process


def _worker(work_root: str) -> None:
    """Reads cases (one JSON per line) from stdin; writes a result line for each to stdout."""
    import warnings

    warnings.simplefilter("ignore")
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed stays out of the result stream
    for number, line in enumerate(sys.stdin):
        case = json.loads(line)
        result = run_case_cleanly(case, Path(work_root) / f"case_{os.getpid()}_{number}")
        out.write(RESULT_PREFIX + json.dumps(asdict(result)) + "\n")
        out.flush()


class Worker:
    def __init__(self, work_root: Path, log):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(work_root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
        )
        self.done = 0

    def run(self, case: dict, timeout: float) -> CaseResult:
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.close()
                    return CaseResult(
                        case["id"],
                        case["group"],
                        case["class_name"],
                        "timeout",
                        f"no answer in {timeout:g} s (worker killed)",
                    )
                line = self.process.stdout.readline()
                if not line:  # the worker died: a native crash
                    code = self.process.wait()
                    return CaseResult(
                        case["id"], case["group"], case["class_name"], "crash", f"worker process died (exit {code})"
                    )
                if line.startswith(RESULT_PREFIX):
                    self.done += 1
                    return CaseResult(**json.loads(line[len(RESULT_PREFIX) :]))

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def run_cases(cases: list[dict], work_root: Path, log_path: Path, timeout: float = CASE_SECONDS):
    """Yields a CaseResult per case, each run in a worker process (a fresh one after a native
    crash or a hang, and every WORKER_CASES cases). A case gets `timeout` s (its own time box)
    plus time for the worker's start."""
    work_root.mkdir(parents=True, exist_ok=True)
    worker = None
    with open(log_path, "a") as log:
        try:
            for case in cases:
                if worker is None or not worker.alive() or worker.done >= WORKER_CASES:
                    if worker is not None:
                        worker.close()
                    worker = Worker(work_root, log)
                yield worker.run(case, timeout + 60)
        finally:
            if worker is not None:
                worker.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
