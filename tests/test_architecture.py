"""The framework-neutral architecture and the layout table: counts, JSON, rules (no framework)."""

import numpy as np
import pytest

from exchange import layout
from exchange.architecture import Architecture, DenseLayer, dense_stack
from exchange.errors import ExchangeError, UnsupportedLayerError
from frameworks.recipe import SEED_ARCHITECTURE, seed_initial_tensors


def test_seed_parameter_counts():
    assert SEED_ARCHITECTURE.layer_parameter_counts() == [784 * 50 + 50, 50 * 50 + 50, 50 * 10 + 10]
    assert SEED_ARCHITECTURE.parameter_count() == 42_310
    assert SEED_ARCHITECTURE.tensor_shapes() == {
        "layers.0.weight": (50, 784), "layers.0.bias": (50,),
        "layers.1.weight": (50, 50), "layers.1.bias": (50,),
        "layers.2.weight": (10, 50), "layers.2.bias": (10,)}


def test_json_round_trip_and_no_bias_layer():
    arch = dense_stack(20, [(7, "relu"), (3, "sigmoid")])
    arch = Architecture(arch.input_dim, arch.layers + (DenseLayer(2, "linear", use_bias=False),))
    assert Architecture.from_json(arch.to_json()) == arch
    assert "layers.2.bias" not in arch.tensor_shapes()
    assert arch.parameter_count() == 20 * 7 + 7 + 7 * 3 + 3 + 3 * 2


@pytest.mark.parametrize("text, message", [
    ('{"input_dim": 4, "layers": [{"kind": "conv2d", "units": 3}]}', "unsupported layer kind 'conv2d'"),
    ('{"input_dim": 4, "layers": [{"kind": "dense", "units": 3, "activation": "gelu"}]}',
     "unsupported activation 'gelu'"),
    ('{"input_dim": 4}', "malformed architecture"),
    ('not json', "not valid JSON"),
])
def test_bad_architecture_descriptions(text, message):
    with pytest.raises(ExchangeError, match=message):
        Architecture.from_json(text)


def test_dense_rule_transposes_and_inverts():
    kernel = np.arange(12, dtype=np.float32).reshape(3, 4)  # Keras (in=3, out=4)
    file_tensors = layout.keras_to_file(dense_stack(3, [(4, "linear")]),
                                        [{"kernel": kernel, "bias": np.zeros(4, np.float32)}])
    assert file_tensors["layers.0.weight"].shape == (4, 3)
    np.testing.assert_array_equal(file_tensors["layers.0.weight"], kernel.T)
    assert file_tensors["layers.0.weight"].flags.c_contiguous
    back = layout.file_to_keras(dense_stack(3, [(4, "linear")]), file_tensors)
    np.testing.assert_array_equal(back[0]["kernel"], kernel)
    assert kernel[0, 1] == 1.0  # the input was not modified


def test_unknown_layer_kind_has_no_rule():
    class Conv:
        kind = "conv2d"

    with pytest.raises(UnsupportedLayerError, match="no layout rule for layer kind 'conv2d'"):
        layout.rules_for(Conv())


def test_seed_initialisation_is_old_keras_normal():
    """np.random.seed(0), then N(0, 0.05) per kernel in Keras layout (in, out), biases zero."""
    tensors = seed_initial_tensors(SEED_ARCHITECTURE)
    np.random.seed(0)
    first_kernel = np.random.normal(0.0, 0.05, size=(784, 50)).astype(np.float32)
    second_kernel = np.random.normal(0.0, 0.05, size=(50, 50)).astype(np.float32)
    np.testing.assert_array_equal(tensors["layers.0.weight"], first_kernel.T)
    np.testing.assert_array_equal(tensors["layers.1.weight"], second_kernel.T)
    assert not tensors["layers.2.bias"].any()
    assert abs(float(tensors["layers.0.weight"].std()) - 0.05) < 0.001
