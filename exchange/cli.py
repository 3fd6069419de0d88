"""`convert IN OUT`: move a model's weights between Keras and PyTorch files. The input's kind is
decided by its content (`exchange.filekinds`), the output's by its extension:

    .keras         Keras 3 model file            read directly (no Keras); written with Keras
    .h5 / .hdf5    Keras 3 .weights.h5, Keras 2 full-model or weights-only .h5; read directly
    .safetensors   the common exchange file      numpy + safetensors only
    .pt / .pth     a plain PyTorch state_dict    torch, read with torch.load(weights_only=True)
    .py            PyTorch source code           written only: a module class + OUT.safetensors beside it

Every conversion goes through the neutral form (architecture + tensors in file layout), so any
input kind can be written as any output kind. Weights-only files carry no architecture: give it
with `--arch` (a .keras, a Keras 2 .h5, a Keras config or exchange architecture .json, or an
exchange .safetensors), or for a `.pt`, `--activations tanh,tanh,softmax` (sizes from the tensors).

Exit codes: 0 done, 1 `--verify` found outputs that differ beyond `--tolerance`, 2 bad input,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). A failed or interrupted run writes nothing.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exchange import fileformat, filekinds, keras_config, keras_files, savedmodel, subclassed, untrusted, weight_layout
from exchange.errors import ExchangeError, ExchangeFileError, first_line
from exchange.graph import Graph, dense_chain
from exchange.kinds import load_kinds_file
from exchange.runner import OneLineArgumentParser, run_command
from exchange.verify import (
    FLOAT32_ATOL,
    FLOAT32_RTOL,
    VERIFY_SECONDS,
    InputsFile,
    check_integer_inputs,
    describe,
    failure,
    parse_input_shape,
    read_inputs_file,
    verify,
    write_report,
)

DEFAULT_TOLERANCE = FLOAT32_ATOL  # --verify's float32 atol; see exchange/verify.py for both comparisons
# TensorFlow's C++ logging above this level is silenced: 3 keeps only fatal messages. (Its
# start-up lines ignore it; `native_stderr_silenced` keeps those off the terminal.)
TF_LOG_LEVEL = "3"


@dataclass(frozen=True)
class OpenedInput:
    """An input as read once: its graph, file-layout tensors (lazy for Keras files, read as they
    are written), the framework it came from, its kind, and what its reader learnt of it, handed
    down so that nothing opens the file again to ask (`keras_files.KerasWeights`): whether Keras 3
    opens it itself, the Keras 2 file holding its config, whether it holds training state (None:
    not known from what was read), whether it was traced from the user's subclassed model."""

    graph: Graph
    tensors: dict
    source_framework: str
    kind: filekinds.FileKind
    keras3_loadable: bool = False
    keras2_config: Path | None = None
    holds_training: bool | None = None
    traced: bool = False


def open_weights(
    path: Path,
    stack: ExitStack,
    arch: Path | Graph | None = None,
    activations: list[str] | None = None,
    by_name: bool = False,
    kind: filekinds.FileKind | None = None,
) -> OpenedInput:
    """Any input kind, read once (`kind`, when the caller has decided it). Keras files give lazy
    tensors, read when written; `stack` keeps their file open until then. `arch` (a path or a
    graph) gives the architecture of a weights-only input."""
    kind = kind or filekinds.weights_kind(path)
    if kind is filekinds.SAFETENSORS:
        from exchange.training_state import OPTIMIZER_METADATA

        exchange_file = fileformat.load(path)
        return OpenedInput(
            exchange_file.architecture,
            exchange_file.tensors,
            exchange_file.source_framework,
            kind,
            holds_training=OPTIMIZER_METADATA in exchange_file.metadata,
        )
    if kind in (filekinds.KERAS, filekinds.HDF5) and subclassed.model_class(path, arch, kind):  # the user's code
        graph, tensors = subclassed.open_subclassed(path, arch, kind)
        return OpenedInput(graph, tensors, "keras", kind, traced=True)
    if kind in (filekinds.KERAS, filekinds.HDF5):
        keras_weights = stack.enter_context(
            keras_files.open_keras_file(path, arch if isinstance(arch, Path) else None, by_name, kind)
        )
        return OpenedInput(
            keras_weights.architecture,
            keras_weights.tensors,
            "keras",
            kind,
            keras_weights.keras3_loadable,
            keras_weights.keras2_config,
            keras_weights.compiled,
        )
    if kind is filekinds.SAVED_MODEL:  # a Keras 2 SavedModel folder (`model.save("dir")`)
        keras_weights = stack.enter_context(savedmodel.open_saved_model(path))
        return OpenedInput(keras_weights.architecture, keras_weights.tensors, "keras", kind, holds_training=False)
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
    return OpenedInput(graph, tensors, "torch", kind, holds_training=False)


def architecture_from_state_dict(path: Path, tensors: dict[str, np.ndarray], activations: list[str] | None) -> Graph:
    """A Dense stack from `dense_{i}.weight` (or version-1 `layers.{i}.weight`) shapes;
    activations must be given, never guessed."""
    if not activations:
        raise ExchangeFileError(
            f"{path}: a .pt state_dict carries no architecture; pass "
            "--activations (e.g. tanh,tanh,softmax) or --arch FILE"
        )
    found = [tensors.get(f"dense_{index}.weight") for index in range(len(activations))]
    weights = [weight for weight in found if weight is not None and weight.ndim == 2]
    if len(weights) != len(activations):
        raise ExchangeFileError(
            f"{path}: expected 2-D tensors layers.0.weight … "
            f"layers.{len(activations) - 1}.weight (or dense_0.weight …) for "
            f"{len(activations)} activations"
        )
    layers = [
        (int(weight.shape[0]), activation, f"dense_{index}.bias" in tensors)
        for index, (weight, activation) in enumerate(zip(weights, activations))
    ]
    try:
        return dense_chain("model", int(weights[0].shape[1]), layers)
    except ExchangeError as err:
        raise ExchangeFileError(f"{path}: {err}") from None


def load_architecture(path: Path) -> Graph:
    """A graph from an exchange .safetensors, a .keras, a Keras 2 .h5, or a JSON file holding an
    exchange architecture (version 2 or 1) or a Keras model config."""
    kind = filekinds.input_kind(path)
    if kind is filekinds.SAVED_MODEL:  # a Keras 2 SavedModel folder: its keras_metadata.pb
        return keras_config.parse_model_config(savedmodel.read_config(path), str(path), keras2=True).graph
    if kind is filekinds.SAFETENSORS:
        return fileformat.architecture_from_metadata(path, fileformat.read_metadata(path))
    if kind in (filekinds.KERAS, filekinds.HDF5, filekinds.JSON) and subclassed.model_class(path, path, kind):
        return subclassed.architecture(path)
    if kind in (filekinds.KERAS, filekinds.HDF5):
        return keras_config.parse_model_config(
            keras_files.read_keras_config(path, kind), str(path), keras2=keras_files.written_by_keras2(path, kind)
        ).graph
    if kind is not filekinds.JSON:
        raise ExchangeFileError(f"{path}: {kind.description}, which holds no architecture")
    size = untrusted.regular_file(path)
    if size > untrusted.MAX_JSON_BYTES:
        raise ExchangeFileError(
            f"{path}: {size:,} bytes, more than the {untrusted.MAX_JSON_BYTES:,} an architecture may have"
        )
    text = path.read_bytes()
    description = untrusted.load_json(text, str(path), "architecture")
    if isinstance(description, dict) and "class_name" in description:
        return keras_config.parse_model_config(description, str(path), keras2=keras_files.written_by_keras2(path)).graph
    if not isinstance(description, dict):
        raise ExchangeFileError(f"{path}: not an architecture (expected a JSON object)")
    version = "1" if "input_dim" in description else fileformat.FORMAT_VERSION  # a bare JSON says by its fields
    return fileformat.architecture_from_description(path, description, version)


def write_weights(
    output: fileformat.PendingOutput, graph: Graph, tensors: dict, source_framework: str, training=None
) -> None:
    """Write any output kind into `output`; tensors are checked against the architecture first.
    The exchange writes .safetensors and .pt bytes itself (`output.open()`); Keras needs a path.
    `training` (`exchange.training_state.TrainingState`) goes into a .safetensors or .keras."""
    kind = filekinds.output_kind(output.target)
    if kind is filekinds.SAFETENSORS:  # the writer checks the tensors itself
        with output.open() as stream:
            fileformat.write(stream, graph, tensors, source_framework, training and training.file_parts())
        return
    fileformat.check_tensors(graph, tensors)
    if kind is filekinds.KERAS:
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
    if filekinds.output_kind(path) is filekinds.SAFETENSORS:
        fileformat.check_header(path, graph)
    else:
        with ExitStack() as stack:
            written_graph = open_weights(path, stack, arch=graph, kind=filekinds.output_kind(path)).graph
        if written_graph.differences(graph):
            raise ExchangeError(
                f"{path}: read-back architecture differs: " + "; ".join(written_graph.differences(graph))
            )


class VerificationFailed(ExchangeError):
    """`--verify` found outputs that differ beyond the tolerance (exit 1, nothing replaced)."""

    exit_code = 1


def convert(
    in_path: Path,
    out_path: Path,
    activations: list[str] | None = None,
    arch_path: Path | None = None,
    check=None,
    notes: list | None = None,
    by_name: bool = False,
    optimizer_state: bool = False,
    in_kind: filekinds.FileKind | None = None,
) -> Graph:
    """Read `in_path`, write `out_path` atomically after reading its header back. A `.py`
    output is PyTorch source code plus its weights beside it (`model.py`, `model.safetensors`).

    `check(opened, written, code_weights)`, when given, runs on the temporary files before they
    replace anything; raising leaves every existing output as it was. `notes`, when given,
    receives what the user should know about a successful conversion (tensors folded together).
    With `optimizer_state`, a compiled `.keras`'s (or Keras 2 `.h5`'s) training state goes into an
    exchange file (an exchange file's into an exchange file or a `.keras`, always; any of them into
    generated code, always, with its training functions): `exchange.training_state`.
    `in_kind`, when the caller has decided it, is not decided again.

    The input is opened once here (its kind decided once, by its content); what that reading
    gives (`OpenedInput`) goes to the writer, the training state and `check`. A training state
    that is carried is read from the input by `training_state.for_conversion` (the optimizer's
    variables, which the weights reader leaves alone). The read-back check opens the temporary
    output, and `--verify`'s child opens the Keras reference through Keras and the output as
    written (exchange/verify.py): re-reading is what those checks are for."""
    out_kind = filekinds.output_kind(out_path)
    weights_path = code_weights_path(out_path) if out_kind is filekinds.CODE else out_path
    for path in (out_path, weights_path):
        if in_path.resolve() == path.resolve():
            raise ExchangeFileError(f"{path}: output would overwrite the input")
    with ExitStack() as stack:
        opened = open_weights(
            in_path, stack, arch_path, activations, by_name, in_kind or filekinds.weights_kind(in_path)
        )
        graph, tensors, source, in_kind = opened.graph, opened.tensors, opened.source_framework, opened.kind
        try:  # before anything is built
            check_integer_inputs(graph)  # Keras's layers differ on integers
            if out_kind is filekinds.KERAS:
                graph.check_keras_names()
                keras_config.check_depth(graph)
        except ExchangeError as err:
            raise ExchangeFileError(f"{in_path}: {err}") from None
        folded = weight_layout.folded_tensors(graph, tensors) if out_kind is filekinds.KERAS else []
        if folded and notes is not None:
            notes.append(
                f"{', '.join(folded)} added into the bias before them: Keras has one bias where torch "
                "has two (same outputs; converting back gives zeros there)"
            )
        from exchange import training_state

        training = training_state.for_conversion(
            in_path, in_kind, out_kind, graph, notes, optimizer_state, opened.holds_training, opened.traced
        )
        # The read-back check runs on the temporary file, so a failed check leaves any
        # existing output untouched.
        with fileformat.atomic_file(weights_path) as output:
            with _writing(weights_path, in_path):
                write_weights(output, graph, tensors, source, training)
            temporary = output.path
            check_written(temporary, graph)
            if out_kind is filekinds.CODE:
                codegen = _framework_module("exchange.codegen", "writing PyTorch code", "torch")
                with fileformat.atomic_output(out_path) as code_temporary:
                    codegen.write_module(graph, code_temporary, weights_path.name, in_path.name, training)
                    if check is not None:
                        check(opened, code_temporary, temporary)
            elif check is not None:
                check(opened, temporary, None)
    return graph


@contextmanager
def _writing(path: Path, source: Path):
    """A writer's failure (a full disk: OSError from numpy or Keras, RuntimeError from torch.save)
    as one error naming the output, not its temporary; a writer's refusal of a layer (Keras 3 has
    no Keras 2 hard_sigmoid) named after the input."""
    try:
        yield
    except ExchangeError as err:
        if str(source) not in str(err):
            err.args = (f"{source}: {err}",) + err.args[1:]
        raise
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
        raise ExchangeError(
            f"{purpose} needs {extra}, which is not installed ({err}); pip install 'keras-torch-exchange[{extra}]'"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="keras-torch-convert",
        description=__doc__.split("\n\n")[0],
        epilog="input kinds, told apart by content: .keras, .h5/.hdf5, "
        ".safetensors, .pt/.pth, a Keras 2 SavedModel folder; output "
        "kinds, by extension: .keras, .safetensors, .pt/.pth, .py (PyTorch "
        "source code, with its weights in a .safetensors beside it)",
    )
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--arch",
        type=Path,
        help="architecture for a weights-only input: a .keras, a "
        "Keras 2 .h5, a Keras config or exchange architecture .json, or a .safetensors",
    )
    parser.add_argument("--activations", help="for a .pt input: comma-separated, one per layer")
    parser.add_argument(
        "--by-name",
        action="store_true",
        help="match a Keras 2 weights-only .h5 to --arch's layers by name (default: by "
        "order, as Keras 2's load_weights)",
    )
    parser.add_argument(
        "--verify", action="store_true", help="run Keras and PyTorch (or numpy where one is missing) on the same inputs"
    )
    parser.add_argument(
        "--verify-inputs",
        type=Path,
        metavar="FILE.npz",
        help="--verify runs the models on these arrays (numpy .npz keyed by the model's input names, or one "
        "array for a one-input model; each of its input's dtype and shape) instead of a fixed random batch",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="--verify's float32 comparison allows this absolute difference plus --rtol "
        "times the output scale (default: %(default)g); the float64 one has its own",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=FLOAT32_RTOL,
        help="--verify's float32 tolerance relative to the output scale (default: %(default)g)",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="[NAME=]D1,D2,...",
        help="an input's shape without the batch axis (repeatable): NAME=D1,D2,... gives "
        "--verify the length of an input's unknown axes; D1,D2,...[:DTYPE] (e.g. 28,28,1 "
        "or 12:int32), one per input in order, a subclassed model's inputs when its build "
        "config has none",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FILE.json",
        help="--verify writes its result there as JSON (both comparisons, per-layer maxima)",
    )
    parser.add_argument(
        "--verify-timeout",
        type=float,
        default=VERIFY_SECONDS,
        metavar="SECONDS",
        help="--verify stops the frameworks after this long (default: %(default)g)",
    )
    parser.add_argument(
        "--optimizer-state",
        action="store_true",
        help="carry a compiled .keras's (or Keras 2 .h5's) optimizer state (slots, step, config) into the "
        ".safetensors, under optimizer/... keys: read it with exchange.fileformat.load or "
        "torch_adapter.model_from_file, not a plain load_state_dict (see "
        "docs/continuing-training.md); a .py output always carries it, for its train_step",
    )
    parser.add_argument(
        "--kinds",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a Python file of yours that registers layer kinds for your own Keras layer "
        "classes (repeatable; see docs/adding-a-layer-kind.md)",
    )
    parser.add_argument(
        "--custom-objects",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="the Python file defining a subclassed model's classes: Keras opens the model "
        "with it and its call is traced (repeatable; see docs/converting.md)",
    )
    args = parser.parse_args(argv)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = TF_LOG_LEVEL  # before anything imports TensorFlow
    activations = args.activations.split(",") if args.activations else None
    for option, value in (("--tolerance", args.tolerance), ("--rtol", args.rtol)):
        if not (np.isfinite(value) and value >= 0):
            print(f"error: {option} must be a finite non-negative number, got {value}", file=sys.stderr)
            return 2
    try:
        input_shapes = dict(parse_input_shape(text) for text in args.input_shape if "=" in text)
    except ExchangeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.verify_inputs is not None and not args.verify:
        print("error: --verify-inputs gives --verify its inputs: pass --verify too", file=sys.stderr)
        return 2
    if not (np.isfinite(args.verify_timeout) and args.verify_timeout > 0):
        print(f"error: --verify-timeout must be a finite positive number, got {args.verify_timeout}", file=sys.stderr)
        return 2

    def check(opened: OpenedInput, written: Path, code_weights: Path | None) -> None:
        """--verify on the temporary output, before it replaces anything."""

        def shown(text: str) -> str:  # the user's output names, not the temporaries'
            text = text.replace(str(written), str(args.output))
            return (
                text if code_weights is None else text.replace(str(code_weights), str(code_weights_path(args.output)))
            )

        try:
            result = verify(
                args.input,
                written,
                opened.graph,
                given,
                args.tolerance,
                args.arch,
                code_weights,
                args.verify_timeout,
                args.by_name,
                args.rtol,
                input_shapes,
                args.report is not None,
                opened=opened,
            )
        except ExchangeError as err:
            err.args = (shown(str(err)),)
            raise
        print(f"verify: {shown(describe(result))}")
        for note in result.notes:
            print(f"verify note: {shown(note)}")
        if args.report is not None:
            write_report(args.report, result, shown)
        if not result.passed:
            raise VerificationFailed(f"{args.input}: {failure(result)}; {args.output} was not written")

    subclassed.use_custom_objects(args.custom_objects, [text for text in args.input_shape if "=" not in text])
    given: InputsFile | None = None

    def command() -> None:
        nonlocal given
        if args.verify_inputs is not None:  # read and checked before anything is converted
            given = read_inputs_file(args.verify_inputs)
        for kinds_file in args.kinds:
            load_kinds_file(kinds_file)
        notes: list[str] = []
        graph = convert(
            args.input,
            args.output,
            activations,
            args.arch,
            check if args.verify else None,
            notes,
            args.by_name,
            args.optimizer_state,
        )
        for note in notes:
            print(f"note: {note}")
        torch_count, keras_count = graph.parameter_count(), graph.keras_parameter_count()
        print(
            f"wrote {args.output}: {len(graph.tensor_specs)} tensors, {torch_count:,} parameters"
            + (f" ({keras_count:,} in Keras)" if keras_count != torch_count else "")
        )

    return run_command(command, f"{args.output} was not written")
