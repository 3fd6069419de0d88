#!/usr/bin/env python3
"""Measure every form of trained model file the converter reads (issue 15), against the Keras that
wrote it: each file goes through three routes and each route's outputs are compared with the
reference on the same inputs.

    torch       IN -> .safetensors -> exchange.torch_adapter.model_from_file (the fx module)
    code        IN -> .py + .safetensors -> the generated class, imported and loaded
    keras       IN -> .safetensors -> .keras -> Keras 3 (TensorFlow backend), safe mode

The reference is what the writing Keras computed: for the Keras 2 fixtures (written by tf-keras
2.21, see scripts/make_keras2_fixtures.py) the outputs stored beside them, for Keras 3 models the
model's own `predict`. Each line gives the largest absolute difference and the output scale.

    python scripts/shipped_forms.py [--markdown]

Needs Keras and torch; about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

KERAS2 = ROOT / "tests/fixtures/keras2"
CUSTOM_KINDS = ROOT / "docs/examples/custom_kinds.py"
SUBCLASSED_MODELS = ROOT / "tests/fixtures/subclassed_models.py"  # also registers a kind (--kinds)


@dataclass
class Form:
    """One kind of shipped file: how to get it, the inputs, and what its Keras computed."""

    name: str
    make: object  # (folder) -> (input path, arch path or None, inputs, reference outputs)
    kinds: list[Path] = field(default_factory=list)  # --kinds files it needs


def fixed_batch(shape: tuple, rows: int) -> np.ndarray:
    """The batch make_keras2_fixtures.py fed to Keras 2."""
    return np.random.default_rng(0).random((rows, *shape), dtype=np.float32)


def keras2_fixture(
    file: str,
    output_key: str,
    input_keys: tuple = (),
    rows: int = 16,
    arch: str | None = None,
    npz: str = "expected_outputs.npz",
    copy_as: str | None = None,
):
    """A fixture of tests/fixtures/keras2 and its stored outputs; its inputs stored beside them,
    or else the fixed batch of `rows` rows of the model's input shape."""

    def make(folder: Path):
        from exchange import cli

        stored = np.load(KERAS2 / npz)
        shape = cli.load_architecture(KERAS2 / (arch or file)).inputs[0].shape  # without the batch axis
        inputs = [stored[key] for key in input_keys] or [fixed_batch(shape, rows)]
        source = KERAS2 / file
        if copy_as:
            source = Path(shutil.copyfile(source, folder / copy_as))
        return source, (KERAS2 / arch if arch else None), inputs, [stored[output_key]]

    return make


def tfop_fixture(name: str):
    """A tf-keras model with TensorFlow ops; its inputs and outputs are `NAME_inputs_I`,
    `NAME_outputs_I` in tfop_expected.npz."""

    def make(folder: Path):
        stored = np.load(KERAS2 / "tfop_expected.npz")

        def numbered(what: str) -> list:
            keys = sorted(
                (key for key in stored if key.startswith(f"{name}_{what}_")), key=lambda key: int(key.rsplit("_", 1)[1])
            )
            return [stored[key] for key in keys]

        return KERAS2 / f"{name}.h5", None, numbered("inputs"), numbered("outputs")

    return make


def custom_layers_model(folder: Path):
    """Zero-padded sequences -> Dense -> the two custom layers of docs/examples/custom_kinds.py
    (a masked average, an attention-weighted average) -> Dense, saved as a `.keras`."""
    import keras

    from exchange.kinds import load_kinds_file

    load_kinds_file(CUSTOM_KINDS)  # as --kinds does; its Keras classes come with it
    custom = next(
        module for module in list(sys.modules.values()) if getattr(module, "__file__", None) == str(CUSTOM_KINDS)
    )
    sequence = keras.Input((7, 4), name="sequence")
    hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(sequence)
    pooled = keras.layers.Concatenate(name="joined")(
        [
            custom.MaskedAverage(name="masked_average")(sequence),
            custom.AttentionWeightedAverage(name="attention")(hidden),
        ]
    )
    model = keras.Model(sequence, keras.layers.Dense(3, name="out")(pooled), name="custom_model")
    for variable in model.weights:
        variable.assign(np.random.default_rng(len(variable.path)).normal(0, 0.5, variable.shape))
    values = np.random.default_rng(0).standard_normal((16, 7, 4)).astype(np.float32)
    for row in range(16):
        values[row, 7 - row % 4 :] = 0  # the last row % 4 steps are padding
    path = folder / "custom_layers.keras"
    model.save(path)
    return path, None, [values], [np.asarray(model.predict(values, verbose=0))]


FORMS = [
    Form(
        "Keras 2 `.h5`: a shared Conv1D and a shared nested Sequential (shared.h5)",
        keras2_fixture("shared.h5", "shared_outputs", ("shared_inputs_exon", "shared_inputs_intron")),
    ),
    Form(
        "Keras 2 `.h5` with TF1-era weight groups (tf1_names.h5)",
        keras2_fixture("tf1_names.h5", "outputs", ("inputs",), npz="tf1_names_expected.npz"),
    ),
    Form(
        "Keras 2 weights-only `.h5`, layers matched by order (functional_chain_weights.h5)",
        keras2_fixture("functional_chain_weights.h5", "functional_chain_outputs", rows=64, arch="functional_chain.h5"),
    ),
    Form(
        "Keras 2 CNN saved as `.hdf5` (cnn.h5 renamed)", keras2_fixture("cnn.h5", "cnn_outputs", copy_as="model.hdf5")
    ),
    Form(
        "Keras 2 CNN saved with no extension (cnn.h5 renamed)", keras2_fixture("cnn.h5", "cnn_outputs", copy_as="model")
    ),
    *(
        Form(
            f"Keras 2 SavedModel folder: {what} (saved_model/{name})",
            keras2_fixture(
                f"saved_model/{name}",
                f"{name}_outputs",
                (f"{name}_inputs",),
                npz="saved_model/saved_model_expected.npz",
            ),
        )
        for name, what in [
            ("cnn", "Conv2D, BatchNormalization, Dense"),
            ("rnn", "LSTM, GRU, Bidirectional LSTM"),
            ("nested", "a nested Sequential"),
        ]
    ),
    *(
        Form(f"Keras 2 `.h5`, TensorFlow ops (`TFOpLambda`): {what} ({name}.h5)", tfop_fixture(name))
        for name, what in [
            ("tfop_unet", "a U-Net glued with tf.concat, tf.reshape, …"),
            ("tfop_reduce", "reductions and slicing (`SlicingOpLambda`)"),
            ("tfop_every_op", "every op the converter reads"),
        ]
    ),
    Form(
        "Keras 3 subclassed model `.keras`, `--custom-objects` (SmallCNN: Conv2D, BatchNormalization, pooling, Dense)",
        lambda folder: subclassed_model(folder, "SmallCNN", (9, 8, 3), weights_only=False),
    ),
    Form(
        "Keras 3 subclassed model `.weights.h5` with `--arch` (SmallCNN)",
        lambda folder: subclassed_model(folder, "SmallCNN", (9, 8, 3), weights_only=True),
    ),
    Form(
        "Keras 3 subclassed model using `keras.ops` in `call` (TwoBranches)",
        lambda folder: subclassed_model(folder, "TwoBranches", (6,), weights_only=False),
    ),
    Form(
        "Keras 3 `.keras` with two custom layer classes (`--kinds docs/examples/custom_kinds.py`)",
        custom_layers_model,
        kinds=[CUSTOM_KINDS],
    ),
]


def subclassed_model(folder: Path, class_name: str, input_shape: tuple, weights_only: bool):
    """A subclassed model of tests/fixtures/subclassed_models.py, its weights seeded, saved as
    `.keras` (and `.weights.h5`), converted with `--custom-objects` (and `--arch` the `.keras`)."""
    import keras

    from exchange import subclassed
    from exchange.kinds import load_kinds_file

    load_kinds_file(SUBCLASSED_MODELS)
    subclassed.use_custom_objects([SUBCLASSED_MODELS])
    module = next(
        module for module in list(sys.modules.values()) if getattr(module, "__file__", None) == str(SUBCLASSED_MODELS)
    )
    keras.utils.set_random_seed(7)
    model = getattr(module, class_name)()
    inputs = np.random.default_rng(0).standard_normal((16, *input_shape)).astype(np.float32)
    model(inputs[:2])
    for variable in model.weights:  # BatchNorm's moving statistics too; variances positive
        values = np.random.default_rng(len(variable.path)).normal(0, 0.5, variable.shape)
        variable.assign(np.abs(values) + 0.5 if "variance" in variable.path else values)
    model.save(folder / "model.keras")
    model.save_weights(folder / "model.weights.h5")
    source, arch = (
        (folder / "model.weights.h5", folder / "model.keras") if weights_only else (folder / "model.keras", None)
    )
    return source, arch, [inputs], [np.asarray(model.predict(inputs, verbose=0))]


def generated_outputs(code: Path, graph, inputs: list) -> list[np.ndarray]:
    import torch

    from exchange import torch_adapter
    from exchange.kinds.axis_order import to_keras_order

    spec = importlib.util.spec_from_file_location(f"generated_{code.stem}", code)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, torch_adapter.class_name(graph.name))()
    model.load_state_dict(module.load(code.with_suffix(".safetensors")), strict=True)
    with torch.no_grad():
        outputs = model.eval()(*torch_adapter.torch_inputs(graph, inputs))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [
        output.permute(to_keras_order(len(graph.shapes[name]))).numpy() for name, output in zip(graph.outputs, outputs)
    ]


def measure(form: Form) -> dict[str, float]:
    from exchange import cli, keras_adapter, torch_adapter
    from exchange.kinds import load_kinds_file

    for kinds in form.kinds:
        load_kinds_file(kinds)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        source, arch, inputs, reference = form.make(folder)
        exchange_file, code, back = folder / "model.safetensors", folder / "code.py", folder / "back.keras"
        graph = cli.convert(source, exchange_file, arch_path=arch)
        cli.convert(source, code, arch_path=arch)
        cli.convert(exchange_file, back)
        routes = {
            "torch": torch_adapter.predict(torch_adapter.model_from_file(exchange_file), inputs),
            "code": generated_outputs(code, graph, inputs),
            "keras": keras_adapter.predict(keras_adapter.load_keras_file(back), inputs),
        }
    scale = max(float(np.max(np.abs(output))) for output in reference)
    result = {
        route: max(float(np.max(np.abs(np.float64(got) - want))) for got, want in zip(outputs, reference))
        for route, outputs in routes.items()
    }
    return {**result, "scale": scale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    rows = []
    for form in FORMS:
        print(f"measuring: {form.name}", file=sys.stderr)
        rows.append((form.name, measure(form)))
    if args.markdown:
        print("| form | → torch | → generated code | → `.keras` → Keras 3 | output scale |")
        print("|---|---|---|---|---|")
        for name, result in rows:
            print(
                f"| {name} | {result['torch']:.1e} | {result['code']:.1e} | {result['keras']:.1e} | "
                f"{result['scale']:.3g} |"
            )
    else:
        for name, result in rows:
            print(
                f"{name}\n    torch {result['torch']:.2e}   code {result['code']:.2e}   "
                f"keras {result['keras']:.2e}   (outputs up to {result['scale']:.3g})"
            )


if __name__ == "__main__":
    main()
