"""Reading Keras 3 and Keras 2 files directly, and converting them with no framework importable.

The Keras 2 files in tests/fixtures/keras2/ were written by real Keras 2 (tf-keras 2.21.0);
regenerate them with:
    pip install tf-keras==2.21.0
    TF_USE_LEGACY_KERAS=1 python scripts/make_keras2_fixtures.py
expected_outputs.npz holds what Keras 2 computed on np.random.default_rng(0).random((64, input_dim)).
"""

import json
import re

import keras
import numpy as np
import pytest
from no_frameworks import convert_without_frameworks
from support import ROOT

from exchange import fileformat, keras_files, torch_adapter
from exchange.errors import ExchangeError
from frameworks import keras_mlp, torch_mlp

FIXTURES = ROOT / "tests/fixtures/keras2"
OUTPUT_TOLERANCE = 1e-6  # float32 rounding between TensorFlow and PyTorch, as elsewhere


def fixed_batch(input_shape, rows=64):
    """The batch make_keras2_fixtures.py fed to Keras 2."""
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    return np.random.default_rng(0).random((rows,) + shape, dtype=np.float32)


def keras3_model_with_pass_through_layers():
    """A Keras 3 Sequential with Dropout, Activation and a flat Flatten between Dense layers."""
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Flatten(),
            keras.layers.Dense(50, activation="tanh", name="a"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(50, name="b"),
            keras.layers.Activation("relu"),
            keras.layers.Dense(10, activation="softmax", name="c"),
        ]
    )
    generator = np.random.default_rng(7)
    model.set_weights([generator.normal(0, 0.2, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def keras3_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras3")
    model = keras3_model_with_pass_through_layers()
    model.save(folder / "model.keras")
    model.save_weights(folder / "model.weights.h5")
    return folder, model


def test_no_framework_converts_keras3_and_keras2_files(keras3_files, mnist, tmp_path):
    folder, model = keras3_files
    for source in (folder / "model.keras", FIXTURES / "seed_mlp.h5"):
        out = tmp_path / f"{source.stem}.safetensors"
        result = convert_without_frameworks(source, out, "--verify")
        assert result.returncode == 0, result.stderr
        assert "frameworks imported: none" in result.stdout
        assert "numpy reference" in result.stdout and "Keras not installed" in result.stdout
        assert "PyTorch not installed" in result.stdout
    torch_model = torch_adapter.model_from_file(tmp_path / "model.safetensors")
    keras_probs = keras_mlp.predict(model, mnist.x_test)
    torch_probs = torch_mlp.predict(torch_model, mnist.x_test)
    assert np.max(np.abs(keras_probs - torch_probs)) <= OUTPUT_TOLERANCE
    np.testing.assert_array_equal(keras_probs.argmax(-1), torch_probs.argmax(-1))

    keras2_outputs = np.load(FIXTURES / "expected_outputs.npz")["seed_mlp_outputs"]
    torch_model = torch_adapter.model_from_file(tmp_path / "seed_mlp.safetensors")
    assert np.max(np.abs(torch_mlp.predict(torch_model, fixed_batch(784)) - keras2_outputs)) <= OUTPUT_TOLERANCE


def test_keras3_pass_through_layers_become_nodes(keras3_files):
    folder, model = keras3_files
    with keras_files.open_keras_file(folder / "model.keras") as weights:
        graph = weights.architecture
        tensors = fileformat.materialize(weights.tensors)
    assert [node.kind for node in graph.nodes] == ["flatten", "dense", "dropout", "dense", "activation", "dense"]
    assert graph.parameter_count() == 42_310
    keras_weights = model.get_weights()
    np.testing.assert_array_equal(tensors["b.weight"], keras_weights[2].T)
    np.testing.assert_array_equal(tensors["c.bias"], keras_weights[5])


def test_keras3_weights_h5_with_architecture_alongside(keras3_files, tmp_path):
    folder, model = keras3_files
    with (
        keras_files.open_keras_file(folder / "model.weights.h5", folder / "model.keras") as from_h5,
        keras_files.open_keras_file(folder / "model.keras") as from_keras,
    ):
        for key in from_keras.tensors:
            np.testing.assert_array_equal(from_h5.tensors[key].load(), from_keras.tensors[key].load())
    config_json = tmp_path / "config.json"
    config_json.write_text(model.to_json())
    with keras_files.open_keras_file(folder / "model.weights.h5", config_json) as from_config:
        assert from_config.architecture.parameter_count() == 42_310


def test_keras3_functional_chain(tmp_path):
    inputs = keras.Input((12,), name="features")
    hidden = keras.layers.Dense(6, activation="sigmoid", name="first")(inputs)
    hidden = keras.layers.Dropout(0.1)(hidden)
    outputs = keras.layers.Dense(3, use_bias=False, name="second")(hidden)
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "chain.keras")
    with keras_files.open_keras_file(tmp_path / "chain.keras") as weights:
        torch_model = torch_adapter.model_from_tensors(weights.architecture, weights.tensors)
    batch = fixed_batch(12)
    assert np.max(np.abs(keras_mlp.predict(model, batch) - torch_mlp.predict(torch_model, batch))) <= OUTPUT_TOLERANCE


@pytest.mark.parametrize(
    "name, arch",
    [
        ("seed_mlp", None),
        ("seed_mlp_weights", "seed_mlp_config.json"),
        ("functional_chain", None),
        ("functional_chain_weights", "functional_chain.h5"),
        ("cnn", None),
    ],
)
def test_keras2_files_match_keras2_outputs(name, arch):
    with keras_files.open_keras_file(FIXTURES / f"{name}.h5", FIXTURES / arch if arch else None) as weights:
        graph = weights.architecture
        torch_model = torch_adapter.model_from_tensors(graph, weights.tensors)
    model_name = name.removesuffix("_weights")
    expected = np.load(FIXTURES / "expected_outputs.npz")[f"{model_name}_outputs"]
    outputs = torch_adapter.predict(torch_model, [fixed_batch(graph.inputs[0].shape, rows=len(expected))])[0]
    assert np.max(np.abs(outputs - expected)) <= OUTPUT_TOLERANCE


def test_keras2_batchnorm_and_branching_files_convert():
    """Layers and graphs that version 1 refused: a BatchNormalization, two branches and an Add."""
    with keras_files.open_keras_file(FIXTURES / "unsupported_batchnorm.h5") as weights:
        assert [node.kind for node in weights.architecture.nodes] == ["dense", "batch_norm", "dense"]
        assert weights.tensors["batch_norm.num_batches_tracked"].dtype == np.int64
    with keras_files.open_keras_file(FIXTURES / "branching.h5") as weights:
        assert weights.architecture.node("add").inputs == ("left", "right")


@pytest.fixture(scope="module")
def unsupported_keras_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("unsupported") / "custom.keras"
    keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.Lambda(lambda x: x * 2.0, name="custom"),
            keras.layers.SimpleRNN(4, name="rnn"),
            keras.layers.Dense(2, name="out"),
        ]
    ).save(path)
    return path


@pytest.mark.parametrize(
    "source, extra, message",
    [
        (None, [], r"unsupported layer 'custom' \(Lambda\)"),
        ("seed_mlp_weights.h5", [], "a weights-only file; give the architecture"),
        (
            "seed_mlp_weights.h5",
            ["--arch", FIXTURES / "functional_chain_config.json"],
            "config and weights do not match",
        ),
        (
            "functional_chain_weights.h5",
            ["--arch", FIXTURES / "seed_mlp.h5"],
            r"layer 'dense_1' \(Dense\) variable 'kernel': expected shape \(784, 50\), found \(20, 16\)",
        ),
        (
            "functional_chain_weights.h5",
            ["--arch", FIXTURES / "seed_mlp.h5", "--by-name"],
            r"layer 'dense_1' \(Dense\) stores variables \[\], expected \['kernel', 'bias'\]",
        ),
        (
            "functional_chain_weights.h5",
            ["--arch", FIXTURES / "cnn.h5"],
            r"holds weights for 3 layers, the architecture has \d+ layers with weights \(Keras 2 loads them by order; "
            r"with --by-name by layer name\)",
        ),
        ("expected_outputs.npz", [], r"not a file this tool reads \(neither its content nor its extension '.npz'"),
    ],
)
def test_bad_keras_inputs_one_line_exit_2_nothing_written(tmp_path, unsupported_keras_file, source, extra, message):
    out = tmp_path / "out.safetensors"
    result = convert_without_frameworks(FIXTURES / source if source else unsupported_keras_file, out, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), lines
    assert list(tmp_path.iterdir()) == []


def test_hdf5_without_weights_and_mismatched_shapes(tmp_path, keras3_files):
    import h5py

    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as h5:
        h5.attrs["note"] = "no weights here"
    with pytest.raises(ExchangeError, match="HDF5 file without Keras weights"):
        keras_files.open_keras_file(empty)
    not_hdf5 = tmp_path / "text.h5"
    not_hdf5.write_text("plain text")
    with pytest.raises(ExchangeError, match="text.h5: not an HDF5 file"):
        keras_files.open_keras_file(not_hdf5)
    # Same layer count and names, other sizes: the shape check names the tensor before any read.
    folder, _ = keras3_files
    other = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(64, activation="tanh", name="a"),
            keras.layers.Dense(50, name="b"),
            keras.layers.Dense(10, name="c"),
        ]
    )
    (tmp_path / "other.json").write_text(other.to_json())
    with pytest.raises(
        ExchangeError,
        match=r"config and weights do not match: .*layer 'a' \(Dense\) variable "
        r"'kernel': expected shape \(784, 64\), found \(784, 50\)",
    ):
        keras_files.open_keras_file(folder / "model.weights.h5", tmp_path / "other.json")


def test_hdf5_without_weights_through_the_cli(tmp_path_factory):
    import h5py

    source = tmp_path_factory.mktemp("input") / "notes.h5"
    with h5py.File(source, "w") as h5:
        h5.create_dataset("values", data=np.arange(3))
    out_dir = tmp_path_factory.mktemp("output")
    result = convert_without_frameworks(source, out_dir / "out.safetensors")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {source}: HDF5 file without Keras weights (no model_weights, layers or layer_names; a subclassed "
        "model's .weights.h5 needs --arch and --custom-objects FILE)"
    ]
    assert list(out_dir.iterdir()) == []


def test_first_tensor_given_by_keyword_is_read_as_positional(tmp_path):
    """`layer(inputs=x)` (how Keras's own layer tests call layers) is the same call as `layer(x)`."""
    inputs = keras.Input((4, 6, 3), name="image")
    upsampled = keras.layers.UpSampling2D(2, name="up")(inputs=inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs=upsampled))
    path = tmp_path / "keyword.keras"
    model.save(path)
    weights = keras_files.open_keras_file(path)
    assert [node.inputs for node in weights.architecture.nodes] == [("image",), ("up",)]
    values = np.random.default_rng(0).random((2, 4, 6, 3)).astype(np.float32)
    torch_model = torch_adapter.model_from_tensors(weights.architecture, weights.tensors)
    expected = model.predict(values, verbose=0)
    assert np.max(np.abs(torch_adapter.predict(torch_model, [values])[0] - expected)) <= 1e-5


def test_keras2_weights_under_tf1_era_name_scopes(tmp_path):
    """tf-keras in graph mode (Keras on TensorFlow 1), a model built twice in one graph: its
    weights sit under scopes made unique, `model_weights/conv2d_1/conv2d_1_1/kernel:0`. Keras loads
    them by order; so does the reader (it found none before: "stores variables []")."""
    expected = np.load(FIXTURES / "tf1_names_expected.npz")
    with keras_files.open_keras_file(FIXTURES / "tf1_names.h5") as stored:
        assert list(stored.tensors) == [
            "conv2d_1.weight",
            "conv2d_1.bias",
            "batch_normalization_1.weight",
            "batch_normalization_1.bias",
            "batch_normalization_1.running_mean",
            "batch_normalization_1.running_var",
            "batch_normalization_1.num_batches_tracked",
            "dense_1.weight",
            "dense_1.bias",
        ]
        model = torch_adapter.model_from_tensors(stored.architecture, stored.tensors)
    (found,) = torch_adapter.predict(model, [expected["inputs"]])
    assert np.max(np.abs(found - expected["outputs"])) <= 1e-6  # float32 rounding of a small CNN


def test_keras2_weights_only_file_matched_by_order(tmp_path):
    """Keras 2's `load_weights` matches a weights-only file's layers to the model's by order: the
    seed MLP's weights (dense_1, dense_2, dense_3) into the same architecture with other layer
    names convert and compute tf-keras's outputs; `--by-name` refuses them."""
    config = json.loads((FIXTURES / "seed_mlp_config.json").read_text())
    for layer in config["config"]["layers"]:
        if layer["config"]["name"].startswith("dense_"):
            layer["config"]["name"] = "renamed_" + layer["config"]["name"]
    (tmp_path / "renamed.json").write_text(json.dumps(config))
    with keras_files.open_keras_file(FIXTURES / "seed_mlp_weights.h5", tmp_path / "renamed.json") as stored:
        model = torch_adapter.model_from_tensors(stored.architecture, stored.tensors)
        assert [node.name for node in stored.architecture.nodes if node.kind == "dense"] == [
            "renamed_dense_1",
            "renamed_dense_2",
            "renamed_dense_3",
        ]
    expected = np.load(FIXTURES / "expected_outputs.npz")["seed_mlp_outputs"]
    inputs = np.random.default_rng(0).random((len(expected), 784), dtype=np.float32)
    (found,) = torch_adapter.predict(model, [inputs])
    assert np.max(np.abs(found - expected)) <= 1e-6
    with pytest.raises(ExchangeError, match=r"layer 'renamed_dense_1' \(Dense\) stores variables \[\]"):
        keras_files.open_keras_file(FIXTURES / "seed_mlp_weights.h5", tmp_path / "renamed.json", by_name=True)
