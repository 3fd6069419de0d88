"""Keras <-> file <-> PyTorch with real frameworks, compared on the 10,000 MNIST test images."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as safetensors_torch_load_file
from support import random_file_tensors

from exchange import fileformat, keras_adapter, torch_adapter
from exchange.errors import ArchitectureMismatchError, TensorMismatchError, UnsupportedLayerError
from exchange.graph import dense_chain
from frameworks import keras_mlp, torch_mlp
from frameworks.recipe import SEED_ARCHITECTURE

# TensorFlow and PyTorch sum float32 products in different orders; on probabilities in [0, 1]
# that rounding stays near 1e-7, so 1e-6 leaves room without hiding a wrong layout.
OUTPUT_TOLERANCE = 1e-6
# A transposed 50x50 layer changes outputs by O(0.1); anything above this is caught.
WRONG_LAYOUT_MIN_DIFF = 1e-3


def keras_model_with_random_weights(architecture, seed=1):
    model = keras_mlp.build_keras_model(architecture)
    keras_adapter.set_tensors(model, random_file_tensors(architecture, seed))
    return model


def test_parameter_counts_in_each_framework():
    keras_model = keras_mlp.build_keras_model(SEED_ARCHITECTURE)
    torch_model = torch_mlp.TorchMLP(SEED_ARCHITECTURE)
    assert keras_model.count_params() == 42_310
    assert sum(p.numel() for p in torch_model.parameters()) == 42_310
    assert [sum(w.size for w in layer.get_weights()) for layer in keras_model.layers if layer.weights] == [
        784 * 50 + 50,
        50 * 50 + 50,
        50 * 10 + 10,
    ]
    assert [sum(p.numel() for p in layer.parameters()) for layer in torch_model.linears] == [
        784 * 50 + 50,
        50 * 50 + 50,
        50 * 10 + 10,
    ]
    assert sum(p.numel() for p in torch_adapter.build_module(SEED_ARCHITECTURE).parameters()) == 42_310
    assert keras_adapter.architecture_of(keras_model) == SEED_ARCHITECTURE


def test_keras_to_file_to_torch(architecture, mnist, tmp_path):
    keras_model = keras_model_with_random_weights(architecture)
    path = tmp_path / "from_keras.safetensors"
    keras_adapter.save_file(keras_model, path)
    torch_model = torch_adapter.model_from_file(path)
    keras_probs = keras_mlp.predict(keras_model, mnist.x_test)
    torch_probs = torch_mlp.predict(torch_model, mnist.x_test)
    assert keras_probs.shape == (10_000, 10)
    assert np.max(np.abs(keras_probs - torch_probs)) <= OUTPUT_TOLERANCE
    np.testing.assert_array_equal(keras_probs.argmax(-1), torch_probs.argmax(-1))


def test_torch_to_file_to_keras(architecture, mnist, tmp_path):
    torch.manual_seed(3)
    torch_model = torch_mlp.TorchMLP(architecture)
    path = tmp_path / "from_torch.safetensors"
    torch_adapter.save_file(torch_model, path)
    assert fileformat.load(path).source_framework == "torch"
    keras_model = keras_adapter.model_from_file(path)
    keras_probs = keras_mlp.predict(keras_model, mnist.x_test)
    torch_probs = torch_mlp.predict(torch_model, mnist.x_test)
    assert np.max(np.abs(keras_probs - torch_probs)) <= OUTPUT_TOLERANCE
    np.testing.assert_array_equal(keras_probs.argmax(-1), torch_probs.argmax(-1))


def test_keras_to_file_to_keras_is_bit_identical(architecture, mnist, tmp_path):
    keras_model = keras_model_with_random_weights(architecture)
    path = tmp_path / "round_trip.safetensors"
    keras_adapter.save_file(keras_model, path)
    restored = keras_mlp.build_keras_model(architecture)
    keras_adapter.load_file(restored, path)
    for original, loaded in zip(keras_model.weights, restored.weights):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy())
    np.testing.assert_array_equal(
        keras_mlp.predict(keras_model, mnist.x_test), keras_mlp.predict(restored, mnist.x_test)
    )


def test_plain_safetensors_load_state_dict_strict(architecture, tmp_path):
    """The file works in PyTorch without this package: load_file + load_state_dict(strict=True)."""
    keras_model = keras_model_with_random_weights(architecture)
    path = tmp_path / "plain.safetensors"
    keras_adapter.save_file(keras_model, path)
    state_dict = safetensors_torch_load_file(str(path))
    torch_model = torch_mlp.TorchMLP(architecture)
    torch_model.load_state_dict(state_dict, strict=True)
    inputs = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    assert (
        np.max(np.abs(keras_mlp.predict(keras_model, inputs) - torch_mlp.predict(torch_model, inputs)))
        <= OUTPUT_TOLERANCE
    )


def test_wrong_transposition_is_caught_by_outputs(mnist, tmp_path):
    """The 50x50 layer is square: transposing it passes every shape check, so only comparing
    outputs can catch it. This test proves the comparison above would."""
    keras_model = keras_model_with_random_weights(SEED_ARCHITECTURE)
    path = tmp_path / "model.safetensors"
    keras_adapter.save_file(keras_model, path)
    state_dict = safetensors_torch_load_file(str(path))
    state_dict["dense_1.weight"] = state_dict["dense_1.weight"].t().contiguous()
    wrong = torch_mlp.TorchMLP(SEED_ARCHITECTURE)
    wrong.load_state_dict(state_dict, strict=True)  # shapes alone do not notice
    difference = np.max(np.abs(keras_mlp.predict(keras_model, mnist.x_test) - torch_mlp.predict(wrong, mnist.x_test)))
    assert difference > WRONG_LAYOUT_MIN_DIFF


def test_wrong_shape_into_keras_names_the_tensor():
    tensors = random_file_tensors(SEED_ARCHITECTURE)
    tensors["dense_2.weight"] = np.zeros((50, 10), np.float32)
    model = keras_mlp.build_keras_model(SEED_ARCHITECTURE)
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(
        TensorMismatchError, match=r"dense_2.weight: expected float32 \(10, 50\), found float32 \(50, 10\)"
    ):
        keras_adapter.set_tensors(model, tensors)
    for old, variable in zip(before, model.weights):
        np.testing.assert_array_equal(old, variable.numpy())  # nothing was half-assigned


def test_architecture_mismatch_on_load(tmp_path):
    path = tmp_path / "seed.safetensors"
    torch_adapter.save_file(torch_mlp.TorchMLP(SEED_ARCHITECTURE), path)
    other = torch_mlp.TorchMLP(dense_chain("mlp", 784, [(50, "tanh"), (50, "relu"), (10, "softmax")]))
    with pytest.raises(ArchitectureMismatchError, match="layer 'dense_1' differs"):
        torch_adapter.load_file(other, path)


def test_unsupported_keras_layer_is_named():
    import keras

    model = keras.Sequential(
        [
            keras.Input((7, 784)),
            keras.layers.Dense(50, activation="tanh"),
            keras.layers.Lambda(lambda x: x * 2.0, name="rnn"),
            keras.layers.Dense(10),
        ]
    )
    with pytest.raises(UnsupportedLayerError, match=r"unsupported layer 'rnn' \(Lambda\)"):
        keras_adapter.architecture_of(model)
    odd = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="log_sigmoid", name="g")])
    with pytest.raises(
        UnsupportedLayerError, match=r"layer 'g' \(Dense\): unsupported option activation='log_sigmoid'"
    ):
        keras_adapter.architecture_of(odd)


def test_live_model_and_its_saved_file_give_the_same_graph_and_tensors(tmp_path):
    """One parser: Dropout in a live model is read exactly as in its .keras file."""
    import keras

    from exchange import keras_files

    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(6, name="a"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(2, activation="softmax", name="b"),
        ],
        name="drop",
    )
    model.save(tmp_path / "drop.keras")
    with keras_files.open_keras_file(tmp_path / "drop.keras") as from_file:
        assert from_file.architecture == keras_adapter.architecture_of(model)
        live = keras_adapter.get_tensors(model)
        for key, tensor in fileformat.materialize(from_file.tensors).items():
            np.testing.assert_array_equal(live[key], tensor)
