"""Inputs of every dtype Keras takes that torch has, against real Keras and real PyTorch.

Floating-point inputs of another dtype than the layer's are autocast, as Keras does; integer
inputs feed the layers that read integers (Embedding token ids, masks) and the layers Keras
computes in float (Dense, recurrent, normalization, Rescaling, image augmentations), which cast
them, bools included.
numpy has no bfloat16: `ml_dtypes.bfloat16`, which TensorFlow itself uses, stands in.
"""

import keras
import layer_suite
import ml_dtypes
import numpy as np
import pytest
from kerasmodels import randomize

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import ExchangeError
from exchange.graph import INPUT_DTYPES, INTEGER_DTYPES

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
    assert set(INPUT_DTYPES) == {
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "bool",
    }


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
    mask_values[:, 0] = 1  # every row keeps a step
    assert compare(model, [generator.standard_normal((4, 6, 3)).astype(np.float32), mask_values]) <= TOLERANCE


def test_integer_and_bool_inputs_into_layers_that_compute_in_float(tmp_path):
    """uint8 pixels into an augmentation and Rescaling, int32 steps into a Bidirectional LSTM,
    bools into a Dense, int64 into Normalization, int8 into BatchNormalization, int16 into an
    EinsumDense: Keras computes each in float32 (`predict` gives float32), and so does every
    conversion: .safetensors -> torch, -> .keras, and the generated code."""
    keras.utils.set_random_seed(6)
    specs = {
        "pixels": ((5, 4, 3), "uint8"),
        "steps": ((3, 2), "int32"),
        "flags": ((6,), "bool"),
        "counts": ((5,), "int64"),
        "levels": ((5,), "int8"),
        "codes": ((3, 4), "int16"),
    }
    inputs = {name: keras.Input(shape, dtype=dtype, name=name) for name, (shape, dtype) in specs.items()}
    image = L.Rescaling(1 / 255, offset=-0.5, name="scale")(L.RandomContrast(0.3, name="contrast")(inputs["pixels"]))
    outputs = [
        L.Conv2D(2, 3, name="conv")(image),
        L.Bidirectional(L.LSTM(3), name="bidirectional")(inputs["steps"]),
        L.Dense(4, name="dense")(inputs["flags"]),
        L.Normalization(mean=2.0, variance=3.0, name="normalization")(inputs["counts"]),
        L.BatchNormalization(name="batch_norm")(inputs["levels"]),
        L.EinsumDense("abc,cd->abd", (3, 2), bias_axes="d", name="einsum")(inputs["codes"]),
    ]
    model = randomize(keras.Model(list(inputs.values()), outputs), seed=2)
    keras_path = tmp_path / "ints.keras"
    model.save(keras_path)
    generator = np.random.default_rng(3)
    values = [
        generator.integers(0, 2 if dtype == "bool" else 120, (4,) + shape).astype(dtype)
        for shape, dtype in specs.values()
    ]
    reference = [np.asarray(output) for output in model.predict(values, verbose=0)]
    assert all(output.dtype == np.float32 for output in reference)
    result = layer_suite.CaseResult("ints", "dtypes", "Model", "pass")
    layer_suite.conversions(keras_path, values, reference, result)
    assert set(result.diffs) == {
        ".keras -> .safetensors -> torch",
        ".safetensors -> .keras",
        "file -> Keras -> file bit-identical",
        ".keras -> model.py",
    }
    assert max(result.diffs.values()) <= layer_suite.tolerance(reference), result.diffs  # 1e-5, relative above 1


def test_integer_input_into_a_layer_that_keeps_integers_is_refused_in_one_line(tmp_path):
    """UpSampling1D repeats int16 values as int16 under Keras's float32 symbolic dtype: Keras's
    layers that move values about treat integers each their own way, so the exchange refuses."""
    inputs = keras.Input((4, 2), dtype="int16", name="counts")
    path = tmp_path / "ints.keras"
    keras.Model(inputs, L.UpSampling1D(2, name="upsample")(inputs)).save(path)
    with pytest.raises(
        ExchangeError,
        match=r"layer 'upsample' \(upsampling1d\) reads the integer input 'counts' "
        r"\(int16\)",
    ) as err:
        cli.convert(path, tmp_path / "ints.safetensors")
    assert "\n" not in str(err.value)
