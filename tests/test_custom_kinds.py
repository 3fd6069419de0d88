"""Kinds of the user's own, for Keras layer classes of their own: registered from a Python file
(`convert.py --kinds FILE`) or by an installed package (entry point group
`keras_torch_exchange.kinds`), with the contract of the built-in kinds, against real Keras and
real PyTorch. The worked example is docs/examples/custom_kinds.py (its two layers:
a masked average over time, DeepMoji's attention-weighted average).
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import keras
import layer_suite
import numpy as np
import pytest
from kerasmodels import randomize

from exchange import keras_adapter, kinds
from exchange.errors import UnsupportedLayerError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "custom_kinds.py"
L = keras.layers


@pytest.fixture(scope="module")
def custom():
    """The example file, loaded as `--kinds` loads it (once per process)."""
    kinds.load_kinds_file(EXAMPLE)
    return sys.modules[
        next(name for name, module in sys.modules.items() if getattr(module, "__file__", None) == str(EXAMPLE))
    ]


def model_of_custom_layers(custom) -> keras.Model:
    """Zero-padded sequences (the padding at the end) -> Dense -> both custom layers -> Dense."""
    sequence = keras.Input((7, 4), name="sequence")
    hidden = L.Dense(5, activation="tanh", name="hidden")(sequence)
    pooled = L.Concatenate(name="joined")(
        [
            custom.MaskedAverage(name="masked_average")(sequence),
            custom.AttentionWeightedAverage(name="attention")(hidden),
        ]
    )
    return keras.Model(sequence, L.Dense(3, name="out")(pooled), name="custom_model")


def padded_sequences(rows: int = 6) -> np.ndarray:
    values = np.random.default_rng(0).standard_normal((rows, 7, 4)).astype(np.float32)
    for row in range(rows):
        values[row, 7 - row % 4 :] = 0  # the last row % 4 steps are padding
    return values


def test_custom_layers_in_every_direction(custom, tmp_path):
    """.keras -> .safetensors -> torch, -> .keras (the user's classes again, in safe mode),
    file -> Keras -> file bit-identical, and generated code: within 1e-5 of Keras."""
    keras.utils.set_random_seed(5)
    model = randomize(model_of_custom_layers(custom), seed=3)
    model.save(tmp_path / "model.keras")
    values = [padded_sequences()]
    reference = keras_adapter.predict(model, values)
    result = layer_suite.CaseResult("custom", "custom", "Model", "pass")
    layer_suite.conversions(tmp_path / "model.keras", values, reference, result)
    assert len(result.diffs) == 4 and max(result.diffs.values()) <= layer_suite.tolerance(reference), result.diffs


def test_convert_with_kinds_and_verify_from_the_command_line(custom, tmp_path):
    """`convert.py model.keras model.py --kinds FILE --verify` in a fresh process: the file
    registers the kinds (the --verify child loads it too) and Keras's classes, which safe mode
    needs to open the model."""
    keras.utils.set_random_seed(5)
    randomize(model_of_custom_layers(custom), seed=3).save(tmp_path / "model.keras")
    converted = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "convert.py"),
            str(tmp_path / "model.keras"),
            str(tmp_path / "model.py"),
            "--kinds",
            str(EXAMPLE),
            "--verify",
        ],
        capture_output=True,
        text=True,
    )
    assert converted.returncode == 0, converted.stderr
    assert "verify:" in converted.stdout and (tmp_path / "model.py").exists()


@keras.saving.register_keras_serializable(package="unknown_layers")
class Unknown(keras.layers.Layer):
    def call(self, inputs):
        return inputs


def test_a_custom_class_without_a_kind_is_refused_naming_it():
    sequence = keras.Input((7, 4), name="sequence")
    model = keras.Model(sequence, Unknown(name="mine")(L.Dense(2, name="dense")(sequence)))
    with pytest.raises(
        UnsupportedLayerError,
        match=r"unsupported layer 'mine' \(unknown_layers>Unknown\): a class "
        r"of your own: register a layer kind for it with --kinds FILE "
        r"\(see docs/adding-a-layer-kind.md\)",
    ) as err:
        keras_adapter.architecture_of(model)
    assert "\n" not in str(err.value)


def test_a_custom_class_with_a_builtin_name_is_not_read_as_the_builtin():
    """A registered `package>Dense` is the user's class, not keras.layers.Dense."""
    config = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "name": "x",
                    "module": "keras.layers",
                    "registered_name": None,
                    "config": {"batch_shape": [None, 3], "dtype": "float32", "name": "x"},
                    "inbound_nodes": [],
                },
                {
                    "class_name": "Dense",
                    "name": "mine",
                    "module": None,
                    "registered_name": "my_package>Dense",
                    "config": {"name": "mine", "units": 2},
                    "inbound_nodes": [
                        {
                            "args": [
                                {
                                    "class_name": "__keras_tensor__",
                                    "config": {"shape": [None, 3], "dtype": "float32", "keras_history": ["x", 0, 0]},
                                }
                            ],
                            "kwargs": {},
                        }
                    ],
                },
            ],
            "input_layers": [["x", 0, 0]],
            "output_layers": [["mine", 0, 0]],
        },
    }
    from exchange.keras_config import parse_model_config

    with pytest.raises(
        UnsupportedLayerError,
        match=r"unsupported layer 'mine' \(my_package>Dense\): a class of "
        r"your own",
    ):
        parse_model_config(config, "hand-written")


def test_installed_package_kinds_load_through_the_entry_point_group(custom, monkeypatch):
    """A package declaring `[project.entry-points."keras_torch_exchange.kinds"]` is imported on the
    first kind or class not found; one that fails to load is named in one line."""
    loaded = []

    class EntryPoint:
        name, value = "broken", "broken_package.kinds"

        def load(self):
            loaded.append(self.value)
            raise ImportError("No module named 'broken_package'")

    monkeypatch.setattr(kinds, "_installed_kinds_loaded", False)
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: [EntryPoint()] if group == kinds.ENTRY_POINT_GROUP else []
    )
    with pytest.raises(
        kinds.ExchangeError,
        match=r"installed layer kinds 'broken_package.kinds' \(entry point "
        r"'broken'\) failed to load \(ImportError",
    ):
        kinds.kind_for_keras_class("custom_layers>NotRegisteredAnywhere")
    assert loaded == ["broken_package.kinds"]
    assert kinds.kind_of("custom.masked_average").kind == "custom.masked_average"  # found without loading again


def test_kinds_file_errors_are_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('my mistake')\n")
    with pytest.raises(
        kinds.ExchangeError, match=r"broken.py: loading its layer kinds failed \(RuntimeError: my mistake\)"
    ):
        kinds.load_kinds_file(tmp_path / "broken.py")
    with pytest.raises(kinds.ExchangeError, match=r"--kinds takes a Python file"):
        kinds.load_kinds_file(tmp_path / "missing.py")
