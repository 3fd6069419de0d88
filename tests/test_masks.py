"""Masks given as model inputs, positional (`layer(x, mask)`, as Keras's own layer tests call
them) or keyword (`mask=m`), in bool, int and float dtypes; and Flatten of a rank-1 input.

Each model is real Keras 3, saved as `.keras`, converted by the CLI to `.safetensors` and `.py`,
and back to `.keras`; every form must compute what Keras computes."""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest
from kerasmodels import max_difference, randomize

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import ExchangeError

L = keras.layers
# float32 arithmetic on a few dozen values: differences are rounding (1e-7), a dropped mask is 0.1+.
TOLERANCE = 1e-5
STEPS, FEATURES = 5, 3


def _masked(make_output, mask_dtype: str, mask_shape=(STEPS,)):
    def build():
        x = keras.Input((STEPS, FEATURES), name="x")
        mask = keras.Input(mask_shape, dtype=mask_dtype, name="m")
        return keras.Model([x, mask], make_output(x, mask))

    return build


CASES = {
    "gap_positional_bool": _masked(lambda x, m: L.GlobalAveragePooling1D(name="gap")(x, m), "bool"),
    "gap_keyword_float": _masked(lambda x, m: L.GlobalAveragePooling1D(name="gap")(x, mask=m), "float32"),
    "gap_positional_int": _masked(lambda x, m: L.GlobalAveragePooling1D(name="gap")(x, m), "int32"),
    "softmax_positional_bool": _masked(lambda x, m: L.Softmax(name="sm")(x, m), "bool", (STEPS, FEATURES)),
    "softmax_keyword_float": _masked(
        lambda x, m: L.Softmax(axis=1, name="sm")(x, mask=m), "float32", (STEPS, FEATURES)
    ),
    "softmax_positional_int": _masked(lambda x, m: L.Softmax(name="sm")(x, m), "int32", (STEPS, FEATURES)),
    "lstm_positional_bool": _masked(lambda x, m: L.LSTM(4, name="lstm")(x, None, m), "bool"),
    "gru_keyword_float": _masked(lambda x, m: L.GRU(4, return_sequences=True, name="gru")(x, mask=m), "float32"),
    "rnn_sequences_into_pooling": _masked(
        lambda x, m: L.GlobalAveragePooling1D(name="gap")(L.SimpleRNN(4, return_sequences=True, name="rnn")(x, mask=m)),
        "int32",
    ),
    "bidirectional_positional": _masked(lambda x, m: L.Bidirectional(L.LSTM(3), name="bi")(x, None, m), "bool"),
    "bidirectional_keyword_sequences": _masked(
        lambda x, m: L.Bidirectional(L.GRU(3, return_sequences=True), name="bi")(x, mask=m), "float32"
    ),
    "flatten_rank1": lambda: (lambda x: keras.Model(x, L.Dense(2, name="dense")(L.Flatten(name="flat")(x))))(
        keras.Input((), name="x")
    ),
}


def _inputs(model, rows: int = 6) -> list[np.ndarray]:
    """Random features; masks that drop some steps of every sample but not all. A float mask mixes
    0, 0.3 (kept by `!= 0`, dropped by Softmax's `> 0.5`) and values above 0.5."""
    generator = np.random.default_rng(0)
    arrays = []
    for tensor in model.inputs:
        shape, dtype = (rows,) + tuple(tensor.shape[1:]), str(tensor.dtype)
        if tensor.name != "m":
            arrays.append(generator.standard_normal(shape).astype(np.float32))
            continue
        pattern = np.array([0.0, 1.0, 0.3, 0.9, 2.0] if dtype.startswith("float") else [0, 1, 2, 0, 1])
        rolled = np.stack([np.roll(pattern, row) for row in range(rows)])  # (rows, STEPS)
        if len(shape) == 3:
            rolled = np.stack([np.roll(rolled, column, axis=1) for column in range(shape[2])], axis=-1)
        arrays.append(rolled.astype(dtype))
    return arrays


def _generated_outputs(code_path, graph, inputs):
    import torch

    from exchange.kinds.axis_order import to_keras_order

    spec = importlib.util.spec_from_file_location(f"generated_{code_path.stem}", code_path)
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = getattr(generated, torch_adapter.class_name(graph.name))()
    module.load_state_dict(generated.load(str(code_path.with_suffix(".safetensors"))), strict=True)
    with torch.no_grad():
        outputs = module.eval()(*torch_adapter.torch_inputs(graph, inputs))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [
        output.permute(to_keras_order(len(graph.shapes[name]))).numpy()
        if len(graph.shapes[name]) >= 2
        else output.numpy()
        for name, output in zip(graph.outputs, outputs)
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_masks_given_as_inputs_both_directions(case, tmp_path):
    keras.utils.set_random_seed(7)
    model = randomize(CASES[case](), seed=3)
    keras_path, weights, code = tmp_path / "model.keras", tmp_path / "model.safetensors", tmp_path / "model.py"
    model.save(keras_path)
    inputs = _inputs(model)
    expected = [np.asarray(output) for output in keras.tree.flatten(model.predict(inputs, verbose=0))]
    assert max(float(np.ptp(output)) for output in expected) > 1e-3, "outputs must vary"
    if "m" in [tensor.name for tensor in model.inputs]:  # the mask changes Keras's answer
        unmasked = [inputs[0], np.ones_like(inputs[1])]
        assert max_difference(expected, keras.tree.flatten(model.predict(unmasked, verbose=0))) > 0.01

    assert cli.main([str(keras_path), str(weights)]) == 0
    assert cli.main([str(keras_path), str(code)]) == 0
    torch_model = torch_adapter.model_from_file(weights)
    graph = torch_model.exchange_graph
    assert max_difference(expected, torch_adapter.predict(torch_model, inputs)) <= TOLERANCE
    assert max_difference(expected, _generated_outputs(code, graph, inputs)) <= TOLERANCE

    back = tmp_path / "back.keras"  # torch -> Keras: the rebuilt model takes the mask as Keras does
    assert cli.main([str(weights), str(back)]) == 0
    rebuilt = keras.saving.load_model(back)
    assert max_difference(expected, keras.tree.flatten(rebuilt.predict(inputs, verbose=0))) <= TOLERANCE


def test_flatten_of_a_rank1_input_is_n_by_1(tmp_path):
    keras.utils.set_random_seed(7)
    model = CASES["flatten_rank1"]()
    model.save(tmp_path / "flat.keras")
    assert cli.main([str(tmp_path / "flat.keras"), str(tmp_path / "flat.safetensors")]) == 0
    graph = torch_adapter.model_from_file(tmp_path / "flat.safetensors").exchange_graph
    assert graph.shapes["flat"] == (1,)


@pytest.mark.parametrize(
    "make_model, message",
    [
        (
            _masked(lambda x, m: L.MultiHeadAttention(2, 2, name="mha")(x, x, query_mask=m), "bool"),
            "layer 'mha' \\(MultiHeadAttention\\): tensor passed as keyword argument 'query_mask' is not supported",
        ),
        (
            _masked(lambda x, m: L.Softmax(name="sm")(x, m), "bool", (STEPS,)),
            "layer 'sm' \\(softmax\\): argument 'mask' of shape \\(batch, 5\\) for an input of shape \\(batch, 5, 3\\)",
        ),
    ],
)
def test_masks_that_cannot_be_read_are_refused_naming_the_layer(make_model, message, tmp_path):
    make_model().save(tmp_path / "model.keras")
    with pytest.raises(ExchangeError, match=message):
        cli.convert(tmp_path / "model.keras", tmp_path / "model.safetensors")


def test_bidirectional_initial_state_given_positionally(tmp_path):
    """`bi(x, [h, h, h, h])`: one tensor as all four states, read from a saved file."""
    x, h = keras.Input((STEPS, FEATURES), name="x"), keras.Input((3,), name="h")
    model = keras.Model([x, h], L.Bidirectional(L.LSTM(3), name="bi")(x, [h, h, h, h]))
    model.save(tmp_path / "model.keras")
    cli.convert(tmp_path / "model.keras", tmp_path / "model.safetensors")
    torch_model = torch_adapter.model_from_file(tmp_path / "model.safetensors")
    generator = np.random.default_rng(0)
    inputs = [
        generator.normal(size=(4, STEPS, FEATURES)).astype(np.float32),
        generator.normal(size=(4, 3)).astype(np.float32),
    ]
    assert max_difference(keras_adapter.predict(model, inputs), torch_adapter.predict(torch_model, inputs)) <= 1e-5
