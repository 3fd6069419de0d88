"""`convert IN OUT`: move a model's weights between Keras and PyTorch files, by file extension.

    .keras         Keras 3 model file            read directly (no Keras); written with Keras
    .h5            Keras 3 .weights.h5, Keras 2 full-model or weights-only .h5; read directly
    .safetensors   the common exchange file      numpy + safetensors only
    .pt            a plain PyTorch state_dict    torch, read with torch.load(weights_only=True)

Every conversion goes through the neutral form (architecture + tensors in file layout), so any
input kind can be written as any output kind. Weights-only files carry no architecture: give it
with `--arch` (a .keras, a Keras 2 .h5, a Keras config or exchange architecture .json, or an
exchange .safetensors), or for a `.pt`, `--activations tanh,tanh,softmax` (sizes from the tensors).

Exit codes: 0 done, 1 `--verify` found outputs that differ beyond `--tolerance`, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from exchange import fileformat, keras_files, reference
from exchange.architecture import Architecture, DenseLayer
from exchange.errors import ExchangeError, ExchangeFileError

INPUT_KINDS = (".keras", ".h5", ".safetensors", ".pt")
OUTPUT_KINDS = (".keras", ".safetensors", ".pt")
KERAS_KINDS = (".keras", ".h5")
VERIFY_BATCH = 1000           # rows of the fixed random batch when MNIST is not available
DEFAULT_TOLERANCE = 1e-5      # float32 matmul rounding between TensorFlow and PyTorch is ~1e-7


def file_kind(path: Path, kinds: tuple[str, ...]) -> str:
    if path.suffix not in kinds:
        raise ExchangeFileError(f"{path}: unsupported file kind {path.suffix or '(no extension)'!r}; "
                                f"expected one of {', '.join(kinds)}")
    return path.suffix


def open_weights(path: Path, stack: ExitStack, arch_path: Path | None = None,
                 activations: list[str] | None = None) -> tuple[Architecture, dict, str]:
    """(architecture, file-layout tensors, source framework) from any input kind. Keras files
    give lazy tensors, read when written; `stack` keeps their file open until then."""
    kind = file_kind(path, INPUT_KINDS)
    if not path.is_file():
        raise ExchangeFileError(f"{path}: no such file")
    if kind == ".safetensors":
        exchange_file = fileformat.load(path)
        return exchange_file.architecture, exchange_file.tensors, exchange_file.source_framework
    if kind in KERAS_KINDS:
        keras_weights = stack.enter_context(keras_files.open_keras_file(path, arch_path))
        return keras_weights.architecture, keras_weights.tensors, "keras"
    torch_adapter = _framework_module("exchange.torch_adapter", "reading a .pt file", "torch")
    tensors = torch_adapter.load_state_dict_file(path)
    if arch_path is not None:
        architecture = load_architecture(arch_path)
    else:
        architecture = architecture_from_state_dict(path, tensors, activations)
    fileformat.check_tensors(architecture, tensors, where=str(path))
    return architecture, tensors, "torch"


def architecture_from_state_dict(path: Path, tensors: dict[str, np.ndarray],
                                 activations: list[str] | None) -> Architecture:
    """Sizes from `layers.{i}.weight` shapes; activations must be given, never guessed."""
    if not activations:
        raise ExchangeFileError(f"{path}: a .pt state_dict carries no architecture; pass "
                                "--activations (e.g. tanh,tanh,softmax) or --arch FILE")
    weights = [tensors.get(f"layers.{index}.weight") for index in range(len(activations))]
    if any(weight is None or weight.ndim != 2 for weight in weights):
        raise ExchangeFileError(f"{path}: expected 2-D tensors layers.0.weight … "
                                f"layers.{len(activations) - 1}.weight for {len(activations)} activations")
    layers = tuple(DenseLayer(int(weight.shape[0]), activation, f"layers.{index}.bias" in tensors)
                   for index, (weight, activation) in enumerate(zip(weights, activations)))
    return Architecture(int(weights[0].shape[1]), layers)


def load_architecture(path: Path) -> Architecture:
    """An architecture from an exchange .safetensors, a .keras, a Keras 2 .h5, or a JSON file
    holding either an exchange architecture or a Keras model config."""
    if not path.is_file():
        raise ExchangeFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return fileformat.architecture_from_metadata(path, fileformat.read_metadata(path))
    if path.suffix in KERAS_KINDS:
        return keras_files.describe_model_config(keras_files.read_keras_config(path), str(path)).architecture
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExchangeFileError(f"{path}: not a JSON architecture ({err})") from None
    if isinstance(description, dict) and "class_name" in description:
        return keras_files.describe_model_config(description, str(path)).architecture
    if not isinstance(description, dict):
        raise ExchangeFileError(f"{path}: not an architecture (expected a JSON object)")
    try:
        return Architecture.from_dict(description)
    except ExchangeError as err:
        raise ExchangeFileError(f"{path}: {err}") from None


def write_weights(path: Path, architecture: Architecture, tensors: dict, source_framework: str) -> None:
    """Write any output kind atomically; tensors are checked against the architecture first."""
    kind = file_kind(path, OUTPUT_KINDS)
    fileformat.check_tensors(architecture, tensors)
    if kind == ".safetensors":
        fileformat.save(path, architecture, tensors, source_framework)
    elif kind == ".keras":
        keras_adapter = _framework_module("exchange.keras_adapter", "writing a .keras file", "keras")
        from frameworks.keras_mlp import build_keras_model

        model = build_keras_model(architecture)
        keras_adapter.set_tensors(model, fileformat.materialize(tensors))
        keras_adapter.save_keras_file(model, path)
    else:
        torch_adapter = _framework_module("exchange.torch_adapter", "writing a .pt file", "torch")
        torch_adapter.save_state_dict_file(fileformat.materialize(tensors), path)


def check_written(path: Path, architecture: Architecture) -> None:
    """Read the output's header back: it must parse and hold exactly the expected tensors.
    (`--verify` compares the values too.)"""
    if path.suffix == ".safetensors":
        fileformat.check_header(path, architecture)
    else:
        with ExitStack() as stack:
            written_architecture, _, _ = open_weights(path, stack, activations=_activations(architecture))
        if written_architecture.differences(architecture):
            raise ExchangeError(f"{path}: read-back architecture differs")


def _activations(architecture: Architecture) -> list[str]:
    return [layer.activation for layer in architecture.layers]


def verify(in_path: Path, out_path: Path, architecture: Architecture, data_dir: Path | None,
           arch_path: Path | None = None) -> dict:
    """Run the two frameworks on the same inputs, each on the weights of its own file.

    Keras runs on the Keras file (IN or OUT) opened by Keras itself when it can, else on the
    tensors. PyTorch runs on the `.pt` or `.safetensors` side. A framework that is not installed is
    replaced by a numpy forward pass over the same file's tensors, and the result says so.
    """
    keras_path = next((p for p in (in_path, out_path) if p.suffix in KERAS_KINDS), None)
    torch_path = next((p for p in (out_path, in_path) if p.suffix in (".pt", ".safetensors")), None)
    inputs, inputs_name = verification_inputs(architecture, data_dir)
    read_tensors = lambda path: _file_tensors(path, architecture, arch_path if path == in_path else None)  # noqa: E731
    keras_side = _keras_outputs(keras_path or in_path, architecture, inputs, read_tensors)
    torch_side = _torch_outputs(torch_path or out_path, architecture, inputs, read_tensors)
    (keras_name, keras_probs), (torch_name, torch_probs) = keras_side, torch_side
    return {"compared": f"{keras_name} vs {torch_name}", "inputs": inputs_name,
            "max_abs_diff": float(np.max(np.abs(keras_probs - torch_probs))),
            "argmax_agreement": float((keras_probs.argmax(-1) == torch_probs.argmax(-1)).mean())}


def _file_tensors(path: Path, architecture: Architecture, arch_path: Path | None) -> dict[str, np.ndarray]:
    with ExitStack() as stack:
        _, tensors, _ = open_weights(path, stack, arch_path, activations=_activations(architecture))
        return fileformat.materialize(tensors)


def _keras_outputs(path: Path, architecture: Architecture, inputs: np.ndarray, read_tensors):
    try:
        from exchange import keras_adapter
        from frameworks import keras_mlp
    except ImportError:
        return (f"numpy reference on {path} (Keras not installed)",
                reference.forward(architecture, read_tensors(path), inputs))
    if path.suffix == ".keras" or (path.suffix == ".h5" and _is_full_keras2_model(path)):
        return f"Keras on {path}", keras_mlp.predict(keras_adapter.load_keras_file(path), inputs)
    model = keras_mlp.build_keras_model(architecture)
    keras_adapter.set_tensors(model, read_tensors(path))
    return f"Keras on the tensors of {path}", keras_mlp.predict(model, inputs)


def _torch_outputs(path: Path, architecture: Architecture, inputs: np.ndarray, read_tensors):
    tensors = read_tensors(path)
    try:
        from exchange import torch_adapter
        from frameworks import torch_mlp
    except ImportError:
        return f"numpy reference on {path} (PyTorch not installed)", reference.forward(architecture, tensors, inputs)
    model = torch_mlp.TorchMLP(architecture)
    torch_adapter.set_tensors(model, tensors)
    return f"PyTorch on {path}", torch_mlp.predict(model, inputs)


def _is_full_keras2_model(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as h5:
        return "model_config" in h5.attrs


def verification_inputs(architecture: Architecture, data_dir: Path | None) -> tuple[np.ndarray, str]:
    """The MNIST test set when it fits the model and can be found, else a fixed random batch."""
    if architecture.input_dim == 784:
        from frameworks.mnist import DataError, load_folder, local_data_folder

        folder = local_data_folder(data_dir)
        if folder is not None:
            try:
                x_test = load_folder(folder).x_test
                return x_test, f"{len(x_test):,} MNIST test images"
            except DataError:
                pass
    batch = np.random.default_rng(0).random((VERIFY_BATCH, architecture.input_dim), dtype=np.float32)
    return batch, f"a fixed random batch of {VERIFY_BATCH:,} inputs"


def convert(in_path: Path, out_path: Path, activations: list[str] | None = None,
            arch_path: Path | None = None) -> Architecture:
    """Read `in_path`, write `out_path` atomically after reading its header back."""
    file_kind(out_path, OUTPUT_KINDS)
    if in_path.resolve() == out_path.resolve():
        raise ExchangeFileError(f"{out_path}: output would overwrite the input")
    with ExitStack() as stack:
        architecture, tensors, source = open_weights(in_path, stack, arch_path, activations)
        # The read-back check runs on the temporary file, so a failed check leaves any
        # existing output untouched.
        with fileformat.atomic_output(out_path) as temporary:
            write_weights(temporary, architecture, tensors, source)
            check_written(temporary, architecture)
    return architecture


def _framework_module(module: str, purpose: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ExchangeError(f"{purpose} needs {extra}, which is not installed ({err}); "
                            f"pip install 'keras-torch-exchange[{extra}]'") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keras-torch-convert", description=__doc__.split("\n\n")[0],
                                     epilog="input kinds: .keras, .h5, .safetensors, .pt; "
                                            "output kinds: .keras, .safetensors, .pt")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--arch", type=Path, help="architecture for a weights-only input: a .keras, a "
                        "Keras 2 .h5, a Keras config or exchange architecture .json, or a .safetensors")
    parser.add_argument("--activations", help="for a .pt input: comma-separated, one per layer")
    parser.add_argument("--verify", action="store_true",
                        help="run Keras and PyTorch (or numpy where one is missing) on the same inputs")
    parser.add_argument("--data", type=Path, help="MNIST folder for --verify (default: $MNIST_DIR)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="--verify fails above this max abs difference (default: %(default)g)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    activations = args.activations.split(",") if args.activations else None
    try:
        architecture = convert(args.input, args.output, activations, args.arch)
        print(f"wrote {args.output}: {len(architecture.tensor_shapes())} tensors, "
              f"{architecture.parameter_count():,} parameters")
        if args.verify:
            result = verify(args.input, args.output, architecture, args.data, args.arch)
            print(f"verify: {result['compared']}, on {result['inputs']}: max abs diff "
                  f"{result['max_abs_diff']:.3e}, argmax agreement {result['argmax_agreement']:.2%}")
            if not result["max_abs_diff"] <= args.tolerance:
                print(f"error: outputs differ by more than {args.tolerance:g}", file=sys.stderr)
                return 1
    except ExchangeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk problem: full, read-only, vanished
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    return 0
