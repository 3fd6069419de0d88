"""`convert IN OUT`: move a model's weights between Keras and PyTorch files, by file extension.

    .keras         Keras 3 model file            read directly (no Keras); written with Keras
    .h5            Keras 3 .weights.h5, Keras 2 full-model or weights-only .h5; read directly
    .safetensors   the common exchange file      numpy + safetensors only
    .pt            a plain PyTorch state_dict    torch, read with torch.load(weights_only=True)
    .py            PyTorch source code           written only: a module class + OUT.safetensors beside it

Every conversion goes through the neutral form (architecture + tensors in file layout), so any
input kind can be written as any output kind. Weights-only files carry no architecture: give it
with `--arch` (a .keras, a Keras 2 .h5, a Keras config or exchange architecture .json, or an
exchange .safetensors), or for a `.pt`, `--activations tanh,tanh,softmax` (sizes from the tensors).

Exit codes: 0 done, 1 `--verify` found outputs that differ beyond `--tolerance`, 2 bad input,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). A failed or interrupted run writes nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from exchange import fileformat, keras_config, keras_files, layout, untrusted
from exchange.errors import ExchangeError, ExchangeFileError, first_line
from exchange.graph import Graph, dense_chain
from exchange.kinds import load_kinds_file
from exchange.verification import VERIFY_SECONDS, check_integer_inputs, verification_inputs, verify  # noqa: F401

INPUT_KINDS = (".keras", ".h5", ".safetensors", ".pt")
OUTPUT_KINDS = (".keras", ".safetensors", ".pt", ".py")
KERAS_KINDS = (".keras", ".h5")
DEFAULT_TOLERANCE = 1e-5      # float32 rounding between TensorFlow and PyTorch is ~1e-7 per layer
# TensorFlow's C++ logging above this level is silenced: 3 keeps only fatal messages. (Its
# start-up lines ignore it; `native_stderr_silenced` keeps those off the terminal.)
TF_LOG_LEVEL = "3"
INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}   # 128 + the signal, as shells report it


def file_kind(path: Path, kinds: tuple[str, ...]) -> str:
    if path.suffix not in kinds:
        raise ExchangeFileError(f"{path}: unsupported file kind {path.suffix or '(no extension)'!r}; "
                                f"expected one of {', '.join(kinds)}")
    return path.suffix


def open_weights(path: Path, stack: ExitStack, arch: Path | Graph | None = None,
                 activations: list[str] | None = None, by_name: bool = False) -> tuple[Graph, dict, str]:
    """(graph, file-layout tensors, source framework) from any input kind. Keras files give lazy
    tensors, read when written; `stack` keeps their file open until then. `arch` (a path or a
    graph) gives the architecture of a weights-only input."""
    kind = file_kind(path, INPUT_KINDS)
    untrusted.regular_file(path)
    if kind == ".safetensors":
        exchange_file = fileformat.load(path)
        return exchange_file.architecture, exchange_file.tensors, exchange_file.source_framework
    if kind in KERAS_KINDS:
        keras_weights = stack.enter_context(keras_files.open_keras_file(path, arch if isinstance(arch, Path) else None,
                                                                        by_name))
        return keras_weights.architecture, keras_weights.tensors, "keras"
    torch_adapter = _framework_module("exchange.torch_adapter", "reading a .pt file", "torch")
    untrusted.check_torch_archive(path)
    tensors = fileformat.upgrade_v1_keys(torch_adapter.load_state_dict_file(path))
    if isinstance(arch, Graph):
        graph = arch
    elif arch is not None:
        graph = load_architecture(arch)
    else:
        graph = architecture_from_state_dict(path, tensors, activations)
    fileformat.check_tensors(graph, tensors, where=str(path))
    return graph, tensors, "torch"


def architecture_from_state_dict(path: Path, tensors: dict[str, np.ndarray],
                                 activations: list[str] | None) -> Graph:
    """A Dense stack from `dense_{i}.weight` (or version-1 `layers.{i}.weight`) shapes;
    activations must be given, never guessed."""
    if not activations:
        raise ExchangeFileError(f"{path}: a .pt state_dict carries no architecture; pass "
                                "--activations (e.g. tanh,tanh,softmax) or --arch FILE")
    weights = [tensors.get(f"dense_{index}.weight") for index in range(len(activations))]
    if any(weight is None or weight.ndim != 2 for weight in weights):
        raise ExchangeFileError(f"{path}: expected 2-D tensors layers.0.weight … "
                                f"layers.{len(activations) - 1}.weight (or dense_0.weight …) for "
                                f"{len(activations)} activations")
    layers = [(int(weight.shape[0]), activation, f"dense_{index}.bias" in tensors)
              for index, (weight, activation) in enumerate(zip(weights, activations))]
    try:
        return dense_chain("model", int(weights[0].shape[1]), layers)
    except ExchangeError as err:
        raise ExchangeFileError(f"{path}: {err}") from None


def load_architecture(path: Path) -> Graph:
    """A graph from an exchange .safetensors, a .keras, a Keras 2 .h5, or a JSON file holding an
    exchange architecture (version 2 or 1) or a Keras model config."""
    size = untrusted.regular_file(path)
    if path.suffix == ".safetensors":
        return fileformat.architecture_from_metadata(path, fileformat.read_metadata(path))
    if path.suffix in KERAS_KINDS:
        return keras_files.describe_model_config(keras_files.read_keras_config(path), str(path),
                                                 keras2=keras_files.written_by_keras2(path)).graph
    if size > untrusted.MAX_JSON_BYTES:
        raise ExchangeFileError(f"{path}: {size:,} bytes, more than the {untrusted.MAX_JSON_BYTES:,} "
                                "an architecture may have")
    text = path.read_bytes()
    description = untrusted.load_json(text, str(path), "architecture")
    if isinstance(description, dict) and "class_name" in description:
        return keras_files.describe_model_config(description, str(path),
                                                 keras2=keras_files.written_by_keras2(path)).graph
    if not isinstance(description, dict):
        raise ExchangeFileError(f"{path}: not an architecture (expected a JSON object)")
    try:
        if "input_dim" in description:
            return fileformat.upgrade_v1_architecture(description)
        untrusted.check_layer_count(len(description.get("nodes") or ()))
        return Graph.from_dict(description)
    except ExchangeError as err:
        raise ExchangeFileError(f"{path}: {err}") from None


def write_weights(output: fileformat.PendingOutput, graph: Graph, tensors: dict, source_framework: str,
                  training=None) -> None:
    """Write any output kind into `output`; tensors are checked against the architecture first.
    The exchange writes .safetensors and .pt bytes itself (`output.open()`); Keras needs a path.
    `training` (`exchange.training_state.TrainingState`) goes into a .safetensors or .keras."""
    kind = file_kind(output.target, OUTPUT_KINDS)
    fileformat.check_tensors(graph, tensors)
    if kind == ".safetensors":
        with output.open() as stream:
            fileformat.write(stream, graph, tensors, source_framework, training and training.file_parts())
    elif kind == ".keras":
        keras_adapter = _framework_module("exchange.keras_adapter", "writing a .keras file", "keras")
        if training is not None:
            from exchange import training_state

            model = training_state.keras_model_with_training(graph, fileformat.materialize(tensors), training)
        else:
            model = keras_adapter.model_from_tensors(graph, tensors)
        with keras_adapter.recursion_room():
            model.save(output.path)
    else:
        torch_adapter = _framework_module("exchange.torch_adapter", "writing a .pt file", "torch")
        state = fileformat.materialize(tensors)
        with output.open() as stream:
            torch_adapter.write_state_dict_file(state, stream)


def check_written(path: Path, graph: Graph) -> None:
    """Read the output's header back: it must parse and hold exactly the expected tensors.
    (`--verify` compares the values too.)"""
    if path.suffix == ".safetensors":
        fileformat.check_header(path, graph)
    else:
        with ExitStack() as stack:
            written_graph, _, _ = open_weights(path, stack, arch=graph)
        if written_graph.differences(graph):
            raise ExchangeError(f"{path}: read-back architecture differs: "
                                + "; ".join(written_graph.differences(graph)))


class VerificationFailed(ExchangeError):
    """`--verify` found outputs that differ beyond the tolerance (exit 1, nothing replaced)."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit 2, like every other bad input
    (argparse prints the whole usage first)."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: unwinds like KeyboardInterrupt, so every temporary is removed."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def _raise_interrupted(signal_number: int, frame) -> None:
    raise Interrupted(signal_number)


@contextmanager
def native_stderr_silenced():
    """Point file descriptor 2 at /dev/null while the command runs, and give Python's sys.stderr a
    copy of the real one: TensorFlow and absl write start-up lines (oneDNN, CPU features, "All log
    messages before absl::InitializeLog()") from C++ straight to descriptor 2, whatever
    TF_CPP_MIN_LOG_LEVEL says, and would bury a one-line error. Only when sys.stderr is that
    descriptor (not under a test's capture)."""
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    if not real:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    sys.stderr = open(saved, "w", buffering=1, closefd=False, encoding=python_stderr.encoding,
                      errors="backslashreplace")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = python_stderr


@contextmanager
def one_line_errors():
    """What the entry points run under, so that an error is one line: TensorFlow's native
    logging off the terminal, and Python warnings (torch's, Keras's) ignored."""
    with native_stderr_silenced(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def interruptible():
    """SIGTERM and SIGINT raise `Interrupted` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _raise_interrupted) for number in INTERRUPT_EXIT_CODES}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def convert(in_path: Path, out_path: Path, activations: list[str] | None = None,
            arch_path: Path | None = None, check=None, notes: list | None = None, by_name: bool = False,
            weights_only: bool = False) -> Graph:
    """Read `in_path`, write `out_path` atomically after reading its header back. A `.py`
    output is PyTorch source code plus its weights beside it (`model.py`, `model.safetensors`).

    `check(graph, written, code_weights)`, when given, runs on the temporary files before they
    replace anything; raising leaves every existing output as it was. `notes`, when given,
    receives what the user should know about a successful conversion (tensors folded together).
    A compiled `.keras`'s training state goes into an exchange file and back (`training_state`)
    unless `weights_only`."""
    file_kind(out_path, OUTPUT_KINDS)
    weights_path = code_weights_path(out_path) if out_path.suffix == ".py" else out_path
    for path in (out_path, weights_path):
        if in_path.resolve() == path.resolve():
            raise ExchangeFileError(f"{path}: output would overwrite the input")
    with ExitStack() as stack:
        graph, tensors, source = open_weights(in_path, stack, arch_path, activations, by_name)
        try:   # before anything is built
            check_integer_inputs(graph)   # Keras's layers differ on integers
            if out_path.suffix == ".keras":
                graph.check_keras_names()
                keras_config.check_depth(graph)
        except ExchangeError as err:
            raise ExchangeFileError(f"{in_path}: {err}") from None
        folded = layout.folded_tensors(graph, tensors) if out_path.suffix == ".keras" else []
        if folded and notes is not None:
            notes.append(f"{', '.join(folded)} added into the bias before them: Keras has one bias where torch "
                         "has two (same outputs; converting back gives zeros there)")
        from exchange import training_state
        training = None if weights_only else training_state.for_conversion(in_path, out_path.suffix, graph, notes)
        # The read-back check runs on the temporary file, so a failed check leaves any
        # existing output untouched.
        with fileformat.atomic_file(weights_path) as output:
            with _writing(weights_path):
                write_weights(output, graph, tensors, source, training)
            temporary = output.path
            check_written(temporary, graph)
            if out_path.suffix == ".py":
                codegen = _framework_module("exchange.codegen", "writing PyTorch code", "torch")
                with fileformat.atomic_output(out_path) as code_temporary:
                    codegen.write_module(graph, code_temporary, weights_path.name, in_path.name)
                    if check is not None:
                        check(graph, code_temporary, temporary)
            elif check is not None:
                check(graph, temporary, None)
    return graph


@contextmanager
def _writing(path: Path):
    """A writer's failure (a full disk: OSError from numpy or Keras, RuntimeError from torch.save)
    as one error naming the output, not its temporary."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        raise ExchangeFileError(f"{path}: could not write ({reason})") from None


def code_weights_path(code_path: Path) -> Path:
    """Where generated code's weights go: `model.py` -> `model.safetensors`, beside it."""
    return code_path.with_suffix(".safetensors")


def _framework_module(module: str, purpose: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ExchangeError(f"{purpose} needs {extra}, which is not installed ({err}); "
                            f"pip install 'keras-torch-exchange[{extra}]'") from None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="keras-torch-convert", description=__doc__.split("\n\n")[0],
                                     epilog="input kinds: .keras, .h5, .safetensors, .pt; "
                                            "output kinds: .keras, .safetensors, .pt, .py (PyTorch source "
                                            "code, with its weights in a .safetensors beside it)")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--arch", type=Path, help="architecture for a weights-only input: a .keras, a "
                        "Keras 2 .h5, a Keras config or exchange architecture .json, or a .safetensors")
    parser.add_argument("--activations", help="for a .pt input: comma-separated, one per layer")
    parser.add_argument("--by-name", action="store_true",
                        help="match a Keras 2 weights-only .h5 to --arch's layers by name (default: by "
                             "order, as Keras 2's load_weights)")
    parser.add_argument("--verify", action="store_true",
                        help="run Keras and PyTorch (or numpy where one is missing) on the same inputs")
    parser.add_argument("--data", type=Path, help="MNIST folder for --verify (default: $MNIST_DIR)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="--verify fails above this max abs difference (default: %(default)g)")
    parser.add_argument("--verify-timeout", type=float, default=VERIFY_SECONDS, metavar="SECONDS",
                        help="--verify stops the frameworks after this long (default: %(default)g)")
    parser.add_argument("--weights-only", action="store_true",
                        help="leave a compiled .keras's optimizer state out of the .safetensors (which is "
                             "then exactly the module's state_dict)")
    parser.add_argument("--kinds", type=Path, action="append", default=[], metavar="FILE",
                        help="a Python file of yours that registers layer kinds for your own Keras layer "
                             "classes (repeatable; see docs/adding-a-layer-kind.md)")
    args = parser.parse_args(argv)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = TF_LOG_LEVEL   # before anything imports TensorFlow
    activations = args.activations.split(",") if args.activations else None
    if not (np.isfinite(args.tolerance) and args.tolerance >= 0):
        print(f"error: --tolerance must be a finite non-negative number, got {args.tolerance}", file=sys.stderr)
        return 2
    if not (np.isfinite(args.verify_timeout) and args.verify_timeout > 0):
        print(f"error: --verify-timeout must be a finite positive number, got {args.verify_timeout}", file=sys.stderr)
        return 2
    def check(graph: Graph, written: Path, code_weights: Path | None) -> None:
        """--verify on the temporary output, before it replaces anything."""
        def shown(text: str) -> str:   # the user's output names, not the temporaries'
            text = text.replace(str(written), str(args.output))
            return text if code_weights is None else text.replace(str(code_weights), str(code_weights_path(args.output)))

        try:
            result = verify(args.input, written, graph, args.data, args.tolerance, args.arch, code_weights,
                            args.verify_timeout, args.by_name)
        except ExchangeError as err:
            err.args = (shown(str(err)),)
            raise
        compared = shown(result["compared"])
        print(f"verify: {compared}, on {result['inputs']}: max abs diff "
              f"{result['max_abs_diff']:.3e} (outputs up to {result['output_scale']:.3g}), "
              f"argmax agreement {result['argmax_agreement']:.2%}")
        if not result["max_abs_diff"] <= args.tolerance:
            raise VerificationFailed(f"outputs differ by more than {args.tolerance:g}"
                                     + (f"; first divergent {result['first_divergence']}"
                                        if "first_divergence" in result else "")
                                     + f"; {args.output} was not written")

    with one_line_errors():
        for kinds_file in args.kinds:
            load_kinds_file(kinds_file)
        return _run(args, activations, check)


def _run(args, activations, check) -> int:
    try:
        with interruptible():
            notes: list[str] = []
            graph = convert(args.input, args.output, activations, args.arch, check if args.verify else None, notes,
                            args.by_name, args.weights_only)
        for note in notes:
            print(f"note: {note}")
        torch_count, keras_count = graph.parameter_count(), graph.keras_parameter_count()
        print(f"wrote {args.output}: {len(graph.tensor_specs)} tensors, {torch_count:,} parameters"
              + (f" ({keras_count:,} in Keras)" if keras_count != torch_count else ""))
    except (Interrupted, KeyboardInterrupt) as err:
        number = err.signal_number if isinstance(err, Interrupted) else signal.SIGINT
        print(f"error: interrupted by {signal.Signals(number).name}; {args.output} was not written",
              file=sys.stderr)
        return INTERRUPT_EXIT_CODES[number]
    except VerificationFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ExchangeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk problem: full, read-only, vanished
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    return 0
