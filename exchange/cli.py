"""`convert IN OUT`: move a model's weights between Keras and PyTorch files, by file extension.

    .keras        a Keras 3 model file (read and written with Keras, safe mode)
    .safetensors  the common exchange file (PyTorch layout + architecture metadata)
    .pt           a plain PyTorch state_dict (read with torch.load(weights_only=True))

Every conversion goes through the neutral form (architecture + tensors in file layout), so any
input kind can be written as any output kind. A `.pt` state_dict carries no architecture: give it
with `--activations tanh,tanh,softmax` (sizes come from the tensors) or `--arch FILE`.

Exit codes: 0 done, 1 `--verify` found outputs that differ beyond `--tolerance`, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from exchange import fileformat
from exchange.architecture import Architecture, DenseLayer
from exchange.errors import ExchangeError, ExchangeFileError

KINDS = (".keras", ".safetensors", ".pt")
VERIFY_BATCH = 1000           # rows of the fixed random batch when MNIST is not available
DEFAULT_TOLERANCE = 1e-5      # float32 matmul rounding between TensorFlow and PyTorch is ~1e-7


def file_kind(path: Path) -> str:
    if path.suffix not in KINDS:
        raise ExchangeFileError(f"{path}: unsupported file kind {path.suffix or '(no extension)'!r}; "
                                f"expected one of {', '.join(KINDS)}")
    return path.suffix


def read_weights(path: Path, architecture_hint: Architecture | None = None,
                 activations: list[str] | None = None) -> tuple[Architecture, dict[str, np.ndarray], str]:
    """(architecture, file-layout tensors, source framework) from any supported file."""
    kind = file_kind(path)
    if not path.is_file():
        raise ExchangeFileError(f"{path}: no such file")
    if kind == ".safetensors":
        exchange_file = fileformat.load(path)
        return exchange_file.architecture, exchange_file.tensors, exchange_file.source_framework
    if kind == ".keras":
        from exchange import keras_adapter

        model = keras_adapter.load_keras_file(path)
        return keras_adapter.architecture_of(model), keras_adapter.get_tensors(model), "keras"
    from exchange import torch_adapter

    tensors = torch_adapter.load_state_dict_file(path)
    architecture = architecture_hint or architecture_from_state_dict(path, tensors, activations)
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


def write_weights(path: Path, architecture: Architecture, tensors: dict[str, np.ndarray],
                  source_framework: str) -> None:
    """Write any supported kind atomically; tensors are checked against the architecture first."""
    kind = file_kind(path)
    fileformat.check_tensors(architecture, tensors)
    if kind == ".safetensors":
        fileformat.save(path, architecture, tensors, source_framework)
    elif kind == ".keras":
        from exchange import keras_adapter
        from frameworks.keras_mlp import build_keras_model

        model = build_keras_model(architecture)
        keras_adapter.set_tensors(model, tensors)
        keras_adapter.save_keras_file(model, path)
    else:
        from exchange import torch_adapter

        torch_adapter.save_state_dict_file(tensors, path)


def check_written(path: Path, architecture: Architecture, tensors: dict[str, np.ndarray]) -> None:
    """Read the output back and require every tensor to be bit-identical to what was meant."""
    _, written, _ = read_weights(path, architecture_hint=architecture)
    differing = sorted(key for key in tensors if not np.array_equal(tensors[key], written.get(key)))
    if differing or set(written) != set(tensors):
        raise ExchangeError(f"{path}: read-back check failed for {', '.join(differing) or 'key set'}")


def verify(in_path: Path, out_path: Path, architecture: Architecture, tensors: dict[str, np.ndarray],
           data_dir: Path | None) -> dict:
    """Run Keras and PyTorch on the same inputs; Keras from the `.keras` side when there is one,
    PyTorch from the `.pt` side when there is one, otherwise built from the tensors."""
    from exchange import keras_adapter, torch_adapter
    from frameworks import keras_mlp, torch_mlp

    paths = {in_path.suffix: in_path, out_path.suffix: out_path}
    if ".keras" in paths:
        keras_model, keras_from = keras_adapter.load_keras_file(paths[".keras"]), str(paths[".keras"])
    else:
        keras_model, keras_from = keras_mlp.build_keras_model(architecture), "the tensors"
        keras_adapter.set_tensors(keras_model, tensors)
    torch_model = torch_mlp.TorchMLP(architecture)
    torch_tensors = torch_adapter.load_state_dict_file(paths[".pt"]) if ".pt" in paths else tensors
    torch_adapter.set_tensors(torch_model, torch_tensors)
    torch_from = str(paths[".pt"]) if ".pt" in paths else "the tensors"

    inputs, inputs_name = verification_inputs(architecture, data_dir)
    keras_probs, torch_probs = keras_mlp.predict(keras_model, inputs), torch_mlp.predict(torch_model, inputs)
    return {"keras_from": keras_from, "torch_from": torch_from, "inputs": inputs_name,
            "max_abs_diff": float(np.max(np.abs(keras_probs - torch_probs))),
            "argmax_agreement": float((keras_probs.argmax(-1) == torch_probs.argmax(-1)).mean())}


def verification_inputs(architecture: Architecture, data_dir: Path | None) -> tuple[np.ndarray, str]:
    """The MNIST test set when it fits the model and can be found, else a fixed random batch."""
    if architecture.input_dim == 784:
        from frameworks.mnist import DataError, load_folder

        folder = data_dir or (Path(os.environ["MNIST_DIR"]) if os.environ.get("MNIST_DIR") else None)
        if folder is None and Path("data").is_dir():
            folder = Path("data")
        if folder is not None:
            try:
                x_test = load_folder(folder).x_test
                return x_test, f"{len(x_test):,} MNIST test images"
            except DataError:
                pass
    batch = np.random.default_rng(0).random((VERIFY_BATCH, architecture.input_dim), dtype=np.float32)
    return batch, f"a fixed random batch of {VERIFY_BATCH:,} inputs"


def convert(in_path: Path, out_path: Path, activations: list[str] | None = None,
            arch_path: Path | None = None) -> tuple[Architecture, dict[str, np.ndarray]]:
    """Read `in_path`, write `out_path`, read it back and check it."""
    file_kind(out_path)
    if in_path.resolve() == out_path.resolve():
        raise ExchangeFileError(f"{out_path}: output would overwrite the input")
    architecture_hint = load_architecture(arch_path) if arch_path else None
    architecture, tensors, source = read_weights(in_path, architecture_hint, activations)
    write_weights(out_path, architecture, tensors, source)
    check_written(out_path, architecture, tensors)
    return architecture, tensors


def load_architecture(path: Path) -> Architecture:
    """An architecture from a JSON file or from an exchange `.safetensors` file's metadata."""
    if not path.is_file():
        raise ExchangeFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return fileformat.architecture_from_metadata(path, fileformat.read_metadata(path))
    try:
        return Architecture.from_json(path.read_text())
    except (ExchangeError, UnicodeDecodeError) as err:
        raise ExchangeFileError(f"{path}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert", description=__doc__.split("\n\n")[0],
                                     epilog="kinds: .keras, .safetensors, .pt")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--activations", help="for a .pt input: comma-separated, one per layer")
    parser.add_argument("--arch", type=Path, help="for a .pt input: architecture JSON or an exchange "
                        ".safetensors file whose architecture to use")
    parser.add_argument("--verify", action="store_true",
                        help="run Keras and PyTorch on the same inputs and compare outputs")
    parser.add_argument("--data", type=Path, help="MNIST folder for --verify (default: $MNIST_DIR)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="--verify fails above this max abs difference (default: %(default)g)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    activations = args.activations.split(",") if args.activations else None
    try:
        architecture, tensors = convert(args.input, args.output, activations, args.arch)
        print(f"wrote {args.output}: {len(tensors)} tensors, "
              f"{architecture.parameter_count():,} parameters")
        if args.verify:
            result = verify(args.input, args.output, architecture, tensors, args.data)
            print(f"verify: Keras ({result['keras_from']}) vs PyTorch ({result['torch_from']}) on "
                  f"{result['inputs']}: max abs diff {result['max_abs_diff']:.3e}, "
                  f"argmax agreement {result['argmax_agreement']:.2%}")
            if not result["max_abs_diff"] <= args.tolerance:
                print(f"error: outputs differ by more than {args.tolerance:g}", file=sys.stderr)
                return 1
    except ExchangeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
