"""`convert IN OUT --verify`: run Keras and PyTorch on the same inputs, each on its own file.

The frameworks run in a child process (`python -m exchange.verification FOLDER`), a fresh
interpreter that reads the request from FOLDER (`request.json`, the inputs as `.npy` files) and
writes `result.json` there. TensorFlow and torch can crash (SIGSEGV, SIGABRT), exhaust memory or
loop on a hostile graph, and no exception handler catches or bounds that; the child runs under
an address-space cap (CHILD_ADDRESS_SPACE more than it holds after importing the frameworks, plus
WEIGHT_COPIES times the weights) and a wall-clock limit (VERIFY_SECONDS, `--verify-timeout`), so
a crash, an out-of-memory or a hang ends in one error line naming the input and exit 2. The
parent (`verify`) keeps no framework state: it draws the inputs, spawns the child, waits, reads
the result, and kills the child when it is interrupted.

Example:
    >>> result = verify(Path("model.keras"), Path("model.safetensors"), graph, None, 1e-5)
    >>> result["max_abs_diff"] <= 1e-5
    True
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from exchange import chunking, keras_config
from exchange.errors import ExchangeError, ExchangeFileError, first_line
from exchange.graph import INTEGER_DTYPES, Graph
from exchange.kinds import KIND_FILES, kind_of, load_kinds_file

VERIFY_BATCH = 1000           # rows of the fixed random batch when MNIST is not used
MNIST_ROWS = 10_000           # the MNIST test set
# Rows * the model's largest activation per sample (the product of its shape, over every input
# and layer output) stays under this: 64 MB per activation in float32, 128 MB in float64, and
# each framework holds a few at once. A model whose single sample exceeds it is refused.
VERIFY_ACTIVATION_ELEMENTS = 16_000_000
# The child's wall-clock limit, imports included (about 8 s on 2 cores): the CNN zoo verifies in
# under 30 s there; a graph that makes a framework loop (a pool of 10**9) is stopped here.
VERIFY_SECONDS = 600
# Address space the child may map beyond what it holds after importing TensorFlow and torch
# (1.6 GiB): thread stacks, the frameworks' workspaces and a few activations of the size above.
CHILD_ADDRESS_SPACE = 4 << 30
WEIGHT_COPIES = 4             # the file's memory map, a read copy, Keras's variables, torch's tensors
# Layer-by-layer comparison (after the outputs differ): on the rows whose outputs differ most,
# in chunks of layers holding at most this many values per framework.
DIVERGENCE_ROWS = 16
DIVERGENCE_ELEMENTS = 16_000_000
SIMULATE_FAULT = "EXCHANGE_VERIFY_TEST_FAULT"   # tests only: "abort" (a native crash) or "hang" in the child
REQUEST, RESULT = "request.json", "result.json"


# ---------------------------------------------------------------------------------------------
# Checks before anything is built


def check_integer_inputs(graph: Graph) -> None:
    """Integer inputs are token ids (read by an Embedding), attention masks (read by a
    MultiHeadAttention as its `attention_mask`), or values that a layer computes in its float dtype
    (Dense, LSTM, Rescaling: the kinds that `casts_integers`). Keras's other layers treat integer
    inputs each its own way (MaxPooling1D computes in int64 under a float32 symbolic dtype, Conv1D
    and Softmax raise), so the exchange refuses them rather than guess."""
    integer_inputs = {spec.name: spec.dtype for spec in graph.inputs if spec.dtype in INTEGER_DTYPES + ("bool",)}
    integer_inputs.update({node.name: kind_of(node.kind).integer_output(node.config) for node in graph.nodes
                           if kind_of(node.kind).integer_output(node.config)})   # a lookup's ids
    for node in graph.nodes:
        for position, name in enumerate(node.inputs):
            if name in integer_inputs and not kind_of(node.kind).reads_integers(node, position):
                raise ExchangeError(f"layer {node.name!r} ({node.kind}) reads the integer input {name!r} "
                                    f"({integer_inputs[name]}); only Embedding layers, lookups and encodings, attention "
                                    "or step masks, and layers that Keras computes in float (Dense, recurrent, "
                                    "normalization, Rescaling, image augmentations) take integers or bools")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # an import hook that blocks it says so by raising
        return False


def largest_activation(graph: Graph) -> tuple[int, str]:
    """The most values one sample makes anywhere in the model, and where (an input or a layer)."""
    return max(((math.prod(size or 0 for size in shape), name) for name, shape in graph.shapes.items()),
               key=lambda item: item[0])


def verification_inputs(graph: Graph, data_dir: Path | None) -> tuple[list[np.ndarray], str]:
    """The MNIST test set when the model takes one 784-wide input and MNIST can be found, else a
    fixed random batch in [0, 1) for each input; as many rows as VERIFY_ACTIVATION_ELEMENTS allows
    for the model's largest activation. A folder given with `--data` must hold readable MNIST."""
    shapes = [spec.shape for spec in graph.inputs]
    if any(size is None for shape in shapes for size in shape):
        raise ExchangeError(f"--verify needs fixed input shapes; the model takes {shapes}")
    largest, where = largest_activation(graph)
    fitting = VERIFY_ACTIVATION_ELEMENTS // max(largest, 1)
    if fitting < 1:
        raise ExchangeError(f"--verify refused: {where!r} makes {largest:,} values per sample, more than the "
                            f"{VERIFY_ACTIVATION_ELEMENTS:,} --verify holds at once")
    if shapes == [(784,)]:
        from exchange.mnist import DataError, load_folder, local_data_folder

        folder = local_data_folder(data_dir)
        if folder is not None:
            try:
                x_test = load_folder(folder).x_test[:fitting]
                return [x_test], f"{len(x_test):,} MNIST test images"
            except DataError as err:
                if data_dir is not None:   # asked for by --data: a broken folder is an error, not a fallback
                    raise ExchangeFileError(f"--data: {err}") from None
    rows = min(VERIFY_BATCH, fitting)
    generator = np.random.default_rng(0)
    # Token ids and integer masks from 0 (so masks mask something), bool masks about 30% False;
    # a float mask takes 0, 0.3 and 1 (Keras keeps `!= 0` steps, Softmax `> 0.5` positions).
    masks = {node.inputs[-1] for node in graph.nodes if getattr(node.config, "mask_input", False)}
    batch = [generator.integers(0, _token_ids(graph, spec.name), (rows,) + tuple(spec.shape)).astype(spec.dtype)
             if spec.dtype in INTEGER_DTYPES
             else generator.random((rows,) + tuple(spec.shape)) < 0.7 if spec.dtype == "bool"
             else generator.choice(np.array([0.0, 0.3, 1.0], spec.dtype), (rows,) + tuple(spec.shape))
             if spec.name in masks
             else generator.random((rows,) + tuple(spec.shape), dtype=np.float32).astype(spec.dtype)
             for spec in graph.inputs]
    # A Masking reading an input masks the steps equal to its mask_value: about 30% of them are.
    for tensor, value in graph.mask_sources.values():
        for array, spec in zip(batch, graph.inputs):
            if spec.name == tensor and len(spec.shape) == 2:
                array[generator.random((rows, spec.shape[0])) < 0.3] = value
    return batch, f"a fixed random batch of {rows:,} inputs"


def _token_ids(graph: Graph, input_name: str) -> int:
    """How many token ids an integer input may take: the smallest vocabulary reading it."""
    vocabularies = [node.config.input_dim for node in graph.consumers.get(input_name, [])
                    if isinstance(getattr(node.config, "input_dim", None), int)]
    return min(vocabularies, default=2)


def weight_bytes(graph: Graph) -> int:
    return sum(math.prod(shape) * np.dtype(dtype if dtype != "bfloat16" else "float16").itemsize
               for shape, dtype in graph.tensor_specs.values())


# ---------------------------------------------------------------------------------------------
# The parent: write the request, run the child, read its result


def verify(in_path: Path, out_path: Path, graph: Graph, data_dir: Path | None, tolerance: float,
           arch_path: Path | None = None, code_weights: Path | None = None,
           seconds: float = VERIFY_SECONDS, by_name: bool = False) -> dict:
    """Run the two frameworks on the same inputs, each on the weights of its own file, in a child
    process; the comparison's result (`compared`, `inputs`, `max_abs_diff`, `output_scale`,
    `argmax_agreement`, and `first_divergence` when the outputs differ beyond `tolerance`).

    Keras runs on the Keras file (IN or OUT) opened by Keras itself when it can, else on the
    tensors. PyTorch runs on the `.pt` or `.safetensors` side, or imports a `.py` output and loads
    `code_weights` (its weights file, when it is not beside it yet). A framework that is not
    installed is replaced by a numpy forward pass over the same file's tensors, and the result
    says so. When the outputs differ, the layers are compared one by one and the first one that
    diverges is named. A crash, an out-of-memory or a hang of the child is an ExchangeError
    naming `in_path`.
    """
    try:
        check_integer_inputs(graph)
        if _installed("keras"):
            keras_config.check_depth(graph)
        inputs, inputs_name = verification_inputs(graph, data_dir)
        chunking.chunk_rows(graph, inputs)   # refuses a model of which one row needs more than a chunk
    except ExchangeFileError:
        raise
    except ExchangeError as err:
        raise ExchangeFileError(f"{in_path}: {err}") from None
    folder = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=".verify.", suffix=".tmp"))
    try:
        names = []
        for index, array in enumerate(inputs):
            names.append(f"input_{index}.npy")
            np.save(folder / names[-1], array, allow_pickle=False)
        request = {"in": str(in_path), "out": str(out_path), "arch": None if arch_path is None else str(arch_path),
                   "code_weights": None if code_weights is None else str(code_weights),
                   "graph": graph.to_json(), "tolerance": tolerance, "inputs": names, "inputs_name": inputs_name,
                   "kinds": list(KIND_FILES), "by_name": by_name,
                   "address_space": CHILD_ADDRESS_SPACE + WEIGHT_COPIES * weight_bytes(graph)}
        (folder / REQUEST).write_text(json.dumps(request))
        status, peak_kib = _run_child(folder, in_path, seconds)
        answer = _read_result(folder / RESULT)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise ExchangeFileError(f"{in_path}: --verify stopped: Keras or PyTorch crashed running this model "
                                f"({name}; it may use {request['address_space'] / (1 << 30):.1f} GiB more than "
                                "the frameworks themselves)")
    if answer is None or os.WEXITSTATUS(status) != 0:
        raise ExchangeFileError(f"{in_path}: --verify stopped: its process exited with status "
                                f"{os.WEXITSTATUS(status)} without a result")
    if "error" in answer:
        raise ExchangeError(answer["error"])
    return {**answer["result"], "child_peak_mib": answer.get("peak_rss_mib", peak_kib / 1024),
            "child_imports_mib": answer.get("imports_rss_mib", 0.0)}


def _run_child(folder: Path, in_path: Path, seconds: float) -> tuple[int, int]:
    """Spawn `python -m exchange.verification FOLDER` and wait for it: (wait status, peak RSS in
    KiB). Past `seconds`, or when this process is interrupted (SIGTERM, SIGINT), it is killed."""
    package_root = str(Path(__file__).resolve().parent.parent)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_root] + [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry])}
    # A session of its own: a terminal's Ctrl-C reaches this process only, which stops the child.
    child = subprocess.Popen([sys.executable, "-m", "exchange.verification", str(folder)], env=environment,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + seconds
    pause = 0.001
    try:
        while True:
            finished, status, usage = os.wait4(child.pid, os.WNOHANG)
            if finished:
                child.returncode = status   # reaped here; Popen must not wait for it again
                return status, usage.ru_maxrss
            if time.monotonic() > deadline:
                raise ExchangeFileError(f"{in_path}: --verify stopped: Keras and PyTorch did not finish in "
                                        f"{seconds:g} s (see --verify-timeout)")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
    except BaseException:   # noqa: B036 (a timeout or an interrupt: the child goes too)
        os.kill(child.pid, signal.SIGKILL)
        os.wait4(child.pid, 0)
        child.returncode = -signal.SIGKILL
        raise


def _read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The child: frameworks


def child_main(folder: Path) -> None:
    """Read the request, import the frameworks, cap the address space, run, write the result.
    Never returns: exits 0 with a result (or a one-line error) in `result.json`."""
    _die_with_parent()
    fault = os.environ.get(SIMULATE_FAULT)
    if fault == "abort":
        os.abort()
    elif fault == "hang":
        time.sleep(3600)
    request = json.loads((folder / REQUEST).read_text())
    warnings.simplefilter("ignore")
    for module in ("exchange.keras_adapter", "exchange.torch_adapter"):
        try:
            __import__(module)
        except ImportError:
            pass   # replaced by the numpy reference
    imported, imported_rss = _status_kib("VmSize"), _status_kib("VmRSS")
    _cap_address_space(request["address_space"])
    try:
        for kinds_file in request["kinds"]:   # the user's own kinds, as the parent loaded them
            load_kinds_file(kinds_file)
        answer = {"result": _run(folder, request)}
    except ExchangeError as err:   # named after the input, unless it names a file itself
        message = str(err)
        answer = {"error": message if request["in"] in message or request["out"] in message
                  else f"{request['in']}: {message}"}
    except MemoryError:
        answer = {"error": f"{request['in']}: --verify stopped: running this model needs more memory than the "
                           f"{request['address_space'] / (1 << 30):.1f} GiB --verify allows"}
    except Exception as err:   # noqa: BLE001 (every framework error is one line in the parent)
        answer = {"error": f"{request['in']}: --verify could not run the model ({type(err).__name__}: "
                           f"{first_line(err)})"}
    answer["address_space_added_mib"] = (_status_kib("VmPeak") - imported) / 1024   # for measurements
    # Its own peak RSS: wait4's ru_maxrss starts at the parent's, which Linux carries across exec.
    answer["peak_rss_mib"], answer["imports_rss_mib"] = _status_kib("VmHWM") / 1024, imported_rss / 1024
    (folder / RESULT).write_text(json.dumps(answer))
    os._exit(0)   # not TensorFlow's slow teardown


def _die_with_parent() -> None:
    """SIGKILL this process when the parent dies (Linux), so that a killed `convert` leaves no
    framework running."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cap_address_space(allowance: int) -> None:
    size = _status_kib("VmSize") * 1024
    if not size:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + allowance if hard == resource.RLIM_INFINITY else min(size + allowance, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


@contextmanager
def _framework(what: str, in_path: str):
    """A framework's exception (anything but ours) as one line naming the input."""
    try:
        yield
    except (ExchangeError, MemoryError):
        raise
    except Exception as err:   # noqa: BLE001 (TensorFlow and torch raise many types)
        raise ExchangeError(f"{in_path}: --verify: {what} failed ({type(err).__name__}: {first_line(err)})") from None


def _run(folder: Path, request: dict) -> dict:
    from exchange import cli

    in_path, out_path = Path(request["in"]), Path(request["out"])
    arch_path = None if request["arch"] is None else Path(request["arch"])
    graph = Graph.from_json(request["graph"])
    inputs = [np.load(folder / name, allow_pickle=False) for name in request["inputs"]]
    tolerance = request["tolerance"]

    def read_tensors(path: Path) -> dict[str, np.ndarray]:
        with ExitStack() as stack:
            _, tensors, _ = cli.open_weights(path, stack, (arch_path if path == in_path else None) or graph,
                                             by_name=request["by_name"])
            from exchange import fileformat

            return fileformat.materialize(tensors)

    keras_path = next((p for p in (in_path, out_path) if p.suffix in cli.KERAS_KINDS), None)
    torch_path = next((p for p in (out_path, in_path) if p.suffix in (".pt", ".safetensors")), None)
    with _framework("Keras", str(in_path)):
        keras_name, keras_outputs, keras_model = _keras_outputs(keras_path or in_path, graph, inputs, read_tensors)
    with _framework("PyTorch", str(in_path)):
        if out_path.suffix == ".py":
            code_weights = Path(request["code_weights"]) if request["code_weights"] else cli.code_weights_path(out_path)
            torch_name, torch_outputs, torch_model = _generated_code_outputs(out_path, code_weights, graph, inputs)
        else:
            torch_name, torch_outputs, torch_model = _torch_outputs(torch_path or out_path, graph, inputs, read_tensors)
    differences = [np.abs(k.astype(np.float64) - t.astype(np.float64)) for k, t in zip(keras_outputs, torch_outputs)]
    max_abs_diff = max(float(np.max(d)) if d.size else 0.0 for d in differences)
    first, second = keras_outputs[0], torch_outputs[0]
    result = {"compared": f"{keras_name} vs {torch_name}", "inputs": request["inputs_name"],
              "max_abs_diff": max_abs_diff,
              "output_scale": max(float(np.max(np.abs(k))) if k.size else 0.0 for k in keras_outputs),
              "argmax_agreement": float((first.reshape(len(first), -1).argmax(-1)
                                         == second.reshape(len(second), -1).argmax(-1)).mean())}
    if not max_abs_diff <= tolerance and keras_model is not None and torch_model is not None:
        rows = _worst_rows(differences, min(DIVERGENCE_ROWS, chunking.chunk_rows(graph, inputs)))
        with _framework("the layer-by-layer comparison", str(in_path)):
            result["first_divergence"] = first_divergent_layer(graph, keras_model, torch_model, inputs,
                                                               tolerance, rows)
    return result


def _worst_rows(differences: list[np.ndarray], count: int = DIVERGENCE_ROWS) -> np.ndarray:
    """The `count` rows whose outputs differ most, in order."""
    per_row = np.max([d.reshape(len(d), -1).max(-1) if d.size else np.zeros(len(d)) for d in differences], axis=0)
    return np.sort(np.argsort(-per_row, kind="stable")[:count])


def first_divergent_layer(graph: Graph, keras_model, torch_model, inputs: list, tolerance: float,
                          rows: np.ndarray | None = None) -> str:
    """The first layer (in graph order) whose Keras and torch outputs differ beyond `tolerance`.

    Compared on `rows` of the inputs (default: all), in chunks of consecutive layers that hold
    at most DIVERGENCE_ELEMENTS values: each chunk runs both models once, recording only its
    layers, and the search stops at the first chunk with a divergent layer."""
    from exchange import keras_adapter, torch_adapter

    subset = inputs if rows is None else [array[rows] for array in inputs]
    count = len(subset[0])
    reordered = graph.torch_order_differs   # torch holds these flattened in (C, H, W) order
    comparable = [node for node in graph.nodes if node.name not in reordered]
    chunk, held = [], 0
    for index, node in enumerate(comparable):
        chunk.append(node)
        held += count * math.prod(size or 0 for size in graph.shapes[node.name])
        following = comparable[index + 1] if index + 1 < len(comparable) else None
        if following is not None and held + count * math.prod(
                size or 0 for size in graph.shapes[following.name]) <= DIVERGENCE_ELEMENTS:
            continue
        names = [item.name for item in chunk]
        keras_values = keras_adapter.intermediate_outputs(keras_model, graph, subset, names)
        torch_values = torch_adapter.intermediate_outputs(torch_model, subset, names)
        for item in chunk:
            if item.name in keras_values and item.name in torch_values:
                difference = float(np.max(np.abs(keras_values[item.name].astype(np.float64)
                                                 - torch_values[item.name].astype(np.float64)), initial=0.0))
                if not difference <= tolerance:
                    return f"layer {item.name!r} ({item.kind}): max abs diff {difference:.3e}"
        del keras_values, torch_values
        chunk, held = [], 0
    return "no single layer exceeds the tolerance"


def _keras_outputs(path: Path, graph: Graph, inputs: list, read_tensors):
    from exchange import reference

    try:
        from exchange import keras_adapter
    except ImportError:
        return (f"numpy reference on {path} (Keras not installed)",
                reference.forward(graph, read_tensors(path), inputs), None)
    note = ""
    if path.suffix == ".keras" or (path.suffix == ".h5" and _is_full_keras2_model(path)):
        try:
            model = keras_adapter.load_keras_file(path, graph)
            return f"Keras on {path}", chunking.predict_in_chunks(keras_adapter.predict, model, graph, inputs), model
        except ExchangeFileError as err:   # e.g. a Keras 2 file Keras 3 cannot deserialize
            note = f" (Keras 3 cannot open the file itself: {str(err).split(': ', 1)[-1]})"
    model = keras_adapter.model_from_tensors(graph, read_tensors(path))
    return (f"Keras on the tensors of {path}{note}",
            chunking.predict_in_chunks(keras_adapter.predict, model, graph, inputs), model)


def _torch_outputs(path: Path, graph: Graph, inputs: list, read_tensors):
    from exchange import reference

    tensors = read_tensors(path)
    try:
        from exchange import torch_adapter
    except ImportError:
        return f"numpy reference on {path} (PyTorch not installed)", reference.forward(graph, tensors, inputs), None
    model = torch_adapter.model_from_tensors(graph, tensors)
    return f"PyTorch on {path}", chunking.predict_in_chunks(torch_adapter.predict, model, graph, inputs), model


def _generated_code_outputs(code_path: Path, weights_path: Path, graph: Graph, inputs: list):
    """Import the generated module from its file, load its weights file, run it."""
    import importlib.util

    from exchange import torch_adapter
    from exchange.torch_adapter import class_name

    sys.dont_write_bytecode = True   # no __pycache__ left beside the user's output
    try:
        spec = importlib.util.spec_from_file_location(f"generated_{code_path.stem}", code_path)
        generated = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generated)
        model = getattr(generated, class_name(graph.name))()
        model.load_state_dict(generated.load(str(weights_path)), strict=True)
        model.exchange_graph = graph
        return (f"the generated PyTorch code {code_path}",
                chunking.predict_in_chunks(torch_adapter.predict, model, graph, inputs), None)
    except MemoryError:
        raise
    except Exception as err:   # anything the generated code raises is a bug of the generator
        raise ExchangeError(f"{code_path}: the generated code does not run ({type(err).__name__}: "
                            f"{first_line(err)}); please report it") from None


def _is_full_keras2_model(path: Path) -> bool:
    import h5py

    from exchange import keras_files

    with keras_files.hdf5_errors(str(path)), h5py.File(path, "r") as h5:
        return "model_config" in h5.attrs


if __name__ == "__main__":   # run as `python -m`: use the package's copy of this module, as cli does
    from exchange.verification import child_main as package_child_main

    package_child_main(Path(sys.argv[1]))
