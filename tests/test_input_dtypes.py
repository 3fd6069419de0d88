"""Inputs of every dtype Keras takes that torch has, against real Keras and real PyTorch.

Floating-point inputs of another dtype than the layer's are autocast, as Keras does; integer
inputs feed the layers that read integers (Embedding token ids, masks); bool inputs are masks.
numpy has no bfloat16: `ml_dtypes.bfloat16`, which TensorFlow itself uses, stands in.
"""

import keras
import ml_dtypes
import numpy as np
import pytest

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import ExchangeError
from exchange.graph import INPUT_DTYPES, INTEGER_DTYPES
from kerasmodels import randomize

L = keras.layers
# float32 rounding of a small Dense; float16 / bfloat16 inputs are exact in float32.
TOLERANCE = 1e-5
NUMPY_DTYPES = {"bfloat16": ml_dtypes.bfloat16}
FLOAT_DTYPES = [dtype for dtype in INPUT_DTYPES if dtype not in INTEGER_DTYPES + ("bool",)]


def compare(model, inputs):
    graph = keras_adapter.architecture_of(model)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
    expected = keras_adapter.predict(model, inputs)
    found = torch_adapter.predict(torch_model, inputs)
    return max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) for a, b in zip(expected, found))


def test_every_input_dtype_is_covered():
    assert set(INPUT_DTYPES) == {"float16", "bfloat16", "float32", "float64", "uint8", "int8", "int16", "int32",
                                 "int64", "bool"}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_float_input_is_autocast_to_the_layer_dtype(dtype):
    """A float32 Dense on a float16/bfloat16/float64 input: Keras casts the input to float32."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((7,), dtype=dtype, name="features")
    model = randomize(keras.Model(inputs, L.Dense(5, activation="tanh", name="dense")(inputs)), seed=1)
    values = np.random.default_rng(0).standard_normal((6, 7)).astype(NUMPY_DTYPES.get(dtype, dtype))
    assert compare(model, [values]) <= TOLERANCE


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_integer_token_ids_of_every_width(dtype):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((9,), dtype=dtype, name="tokens")
    x = L.Embedding(100, 4, name="embed")(inputs)
    model = keras.Model(inputs, L.GlobalAveragePooling1D(name="mean")(x))
    ids = np.random.default_rng(1).integers(0, 100, (5, 9)).astype(dtype)
    assert compare(model, [ids]) <= TOLERANCE


@pytest.mark.parametrize("dtype", ("bool", "uint8", "int16"))
def test_mask_input_of_bool_and_small_integers(dtype):
    """A mask given as a tensor keeps the steps where it is not 0, whatever its dtype."""
    keras.utils.set_random_seed(5)
    sequence = keras.Input((6, 3), name="sequence")
    mask = keras.Input((6,), dtype=dtype, name="mask")
    model = keras.Model([sequence, mask], L.GlobalAveragePooling1D(name="mean")(sequence, mask=mask))
    generator = np.random.default_rng(2)
    mask_values = (generator.random((4, 6)) < 0.6).astype(dtype)
    mask_values[:, 0] = 1   # every row keeps a step
    assert compare(model, [generator.standard_normal((4, 6, 3)).astype(np.float32), mask_values]) <= TOLERANCE


def test_integer_input_into_a_float_layer_is_refused_in_one_line(tmp_path):
    """Keras's layers treat integers each their own way; the exchange refuses rather than guess."""
    inputs = keras.Input((4,), dtype="int16", name="counts")
    path = tmp_path / "ints.keras"
    keras.Model(inputs, L.Dense(2, name="dense")(inputs)).save(path)
    with pytest.raises(ExchangeError, match=r"layer 'dense' \(dense\) reads the integer input 'counts' \(int16\)") as err:
        cli.convert(path, tmp_path / "ints.safetensors")
    assert "\n" not in str(err.value)
