"""Convolutions and poolings over 1, 2 and 3 spatial axes, channels_last and channels_first, and
the refusal of quantized layers: each case in both directions, and through generated code.

Each case is a small real Keras model (TensorFlow backend) with seeded weights, on non-square
sizes with odd and even spatial sizes:
- Keras -> torch: the live model's tensors into the torch module; outputs compared.
- torch -> Keras: a random state_dict into the torch module and the Keras model built from the
  graph; outputs compared, and the Keras weights read back give the state_dict bit for bit.
- the model saved as `.keras`, converted to generated PyTorch code: the code runs and matches.
"""

import importlib.util

import keras
import numpy as np
import pytest

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import UnsupportedLayerError
from kerasmodels import batch, keras_vs_torch, max_difference, random_torch_state, randomize

L = keras.layers
LAYER_TOLERANCE = 1e-5


def single(shape, *layers):
    return keras.Sequential([keras.Input(shape)] + list(layers))


def relative_difference(first, second) -> float:
    """Max difference, relative to the output's scale where that is above 1."""
    scale = max(1.0, max(float(np.max(np.abs(output))) for output in second))
    return max_difference(first, second) / scale


CASES = {
}


def check_both_directions(keras_model):
    graph = keras_adapter.architecture_of(keras_model)
    inputs = batch(keras_model)
    keras_outputs = keras_adapter.predict(keras_model, inputs)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(keras_model))
    assert relative_difference(torch_adapter.predict(torch_model, inputs), keras_outputs) <= LAYER_TOLERANCE

    torch_state = random_torch_state(graph, seed=4)
    torch_model = torch_adapter.model_from_tensors(graph, torch_state)
    rebuilt = keras_adapter.model_from_tensors(graph, torch_state)
    torch_outputs = torch_adapter.predict(torch_model, inputs)
    assert relative_difference(keras_adapter.predict(rebuilt, inputs), torch_outputs) <= LAYER_TOLERANCE
    assert max(float(np.ptp(output)) for output in torch_outputs) > 1e-3, "outputs must vary"
    back = keras_adapter.get_tensors(rebuilt)
    assert sorted(back) == sorted(torch_state)
    for key, tensor in torch_state.items():
        np.testing.assert_array_equal(back[key], tensor, err_msg=key)
    return graph


def check_generated_code(keras_model, tmp_path):
    import torch

    keras_model.save(tmp_path / "m.keras")
    cli.convert(tmp_path / "m.keras", tmp_path / "m.py")
    spec = importlib.util.spec_from_file_location("generated_conv", tmp_path / "m.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    class_name = torch_adapter.class_name(keras_model.name)
    module = getattr(generated, class_name)()
    module.load_state_dict(generated.load(str(tmp_path / "m.safetensors")), strict=True)
    (inputs,) = batch(keras_model)
    torch_inputs = torch.from_numpy(inputs)
    if torch_inputs.ndim > 2:
        torch_inputs = torch_inputs.permute(0, torch_inputs.ndim - 1, *range(1, torch_inputs.ndim - 1))
    with torch.no_grad():
        output = module.eval()(torch_inputs)
    if output.ndim > 2:
        output = output.permute(0, *range(2, output.ndim), 1)
    assert relative_difference([output.numpy()], keras_adapter.predict(keras_model, [inputs])) <= LAYER_TOLERANCE


@pytest.mark.parametrize("case", sorted(CASES))
def test_kind_both_directions(case):
    keras.utils.set_random_seed(11)
    check_both_directions(randomize(CASES[case](), seed=3))


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_code(case, tmp_path):
    keras.utils.set_random_seed(12)
    check_generated_code(randomize(CASES[case](), seed=5), tmp_path)


# -- quantized layers ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_layer_is_refused_as_quantized(mode, tmp_path):
    model = keras.Sequential([keras.Input((8,)), L.Dense(4, name="dense"), L.Dense(3, name="head")])
    model.quantize(mode)
    model.save(tmp_path / "quantized.keras")
    with pytest.raises(UnsupportedLayerError, match=r"layer 'dense' \(Dense\): quantized dtype policy '"
                       + mode + r"[^']*' is not supported \(its weights are not floats\)") as caught:
        cli.convert(tmp_path / "quantized.keras", tmp_path / "quantized.safetensors")
    message = str(caught.value)
    assert "\n" not in message and "'head' (Dense): quantized dtype policy" in message


def test_quantized_policy_named_by_a_string_is_refused():
    model = keras.Sequential([keras.Input((8,)), L.Dense(4, name="dense", dtype="int8_from_float32")])
    with pytest.raises(UnsupportedLayerError, match=r"'dense' \(Dense\): quantized dtype policy 'int8"):
        keras_adapter.architecture_of(model)
    from exchange.keras_config import _dtype

    for policy in ("gptq/4/128_from_float32", "float8_from_bfloat16"):
        with pytest.raises(UnsupportedLayerError, match=f"'dense' \\(Dense\\): quantized dtype policy '{policy}'"):
            _dtype(policy, "dense", "Dense")
