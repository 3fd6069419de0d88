"""keras.layers.RNN around cells and stacks of cells, Bidirectional with return_state or a
go_backwards layer, and ConvLSTM, both ways with real Keras (TensorFlow backend) and real PyTorch,
and through a saved `.keras` file into generated code.

Sizes are non-square (input width != units, odd and even sequence lengths), every variable seeded.
"""

import importlib.util

import keras
import numpy as np
import pytest
from kerasmodels import check_both_directions, max_difference, padded_batch, randomize, same_tensors_but_summed

from exchange import cli, keras_adapter
from exchange.errors import UnsupportedLayerError
from exchange.graph import Graph
from exchange.kinds.axis_order import to_keras_order, to_torch_order

L = keras.layers
LAYER_TOLERANCE = 1e-5
SERIES = (11, 4)  # odd length
EVEN_SERIES = (8, 5)  # even length


def series(*layers, shape=SERIES):
    return keras.Sequential([keras.Input(shape)] + list(layers))


def tokens(*layers, length=9):
    return keras.Sequential([keras.Input((length,), dtype="int32"), L.Embedding(10, 4, mask_zero=True)] + list(layers))


def stacked_states(go_backwards=False, unroll=False):
    """A stack of three different cells returning its sequence and every cell's states."""
    inputs = keras.Input(SERIES, name="series")
    cells = [L.LSTMCell(3), L.GRUCell(5, reset_after=False), L.SimpleRNNCell(2, activation="relu")]
    outputs = L.RNN(
        cells, return_sequences=True, return_state=True, go_backwards=go_backwards, unroll=unroll, name="stack"
    )(inputs)
    return keras.Model(inputs, keras.tree.flatten(outputs))


def stacked_initial_state(masked=False):
    """An encoder's states (one GRU cell, one LSTM cell) start a stacked decoder."""
    source = keras.Input((9,), dtype="int32", name="source")
    target = keras.Input((7, 3), name="target")
    encoded = L.Embedding(10, 4, mask_zero=masked, name="embed")(source)
    _, gru_h, (lstm_h, lstm_c) = L.RNN([L.GRUCell(6), L.LSTMCell(5)], return_state=True, name="encoder")(encoded)
    decoded = L.RNN([L.GRUCell(6), L.LSTMCell(5)], return_sequences=True, name="decoder")(
        target, initial_state=[gru_h, [lstm_h, lstm_c]]
    )
    return keras.Model([source, target], L.Dense(2, name="project")(decoded))


def single_cell_initial_state():
    inputs = keras.Input(SERIES, name="series")
    start = keras.Input((3,), name="start")
    return keras.Model(
        [inputs, start], L.RNN(L.SimpleRNNCell(3), go_backwards=True, name="rnn")(inputs, initial_state=start)
    )


RNN_CASES = {
    "rnn_lstm_cell": lambda: series(L.RNN(L.LSTMCell(5), return_sequences=True), L.RNN(L.LSTMCell(3))),
    "rnn_gru_cell_reset_before": lambda: series(L.RNN(L.GRUCell(6, reset_after=False), go_backwards=True)),
    "rnn_gru_cell_activations": lambda: series(
        L.RNN(
            L.GRUCell(4, activation="relu", recurrent_activation="hard_sigmoid", use_bias=False), return_sequences=True
        ),
        shape=EVEN_SERIES,
    ),
    "rnn_simple_cell": lambda: series(
        L.RNN(L.SimpleRNNCell(6, activation="sigmoid"), return_sequences=True, unroll=True), shape=EVEN_SERIES
    ),
    "rnn_lstm_cell_state": lambda: _model_of(L.RNN(L.LSTMCell(3, activation="relu"), return_state=True)),
    "rnn_one_cell_list": lambda: _model_of(L.RNN([L.GRUCell(3)], return_state=True, go_backwards=True)),
    "rnn_stacked_states": stacked_states,
    "rnn_stacked_backwards_unrolled": lambda: stacked_states(go_backwards=True, unroll=True),
    "rnn_stacked_same_cells": lambda: series(L.RNN([L.LSTMCell(6), L.LSTMCell(6), L.LSTMCell(4)])),
    "rnn_masked_stack": lambda: tokens(
        L.RNN([L.LSTMCell(5), L.SimpleRNNCell(3)], return_sequences=True, zero_output_for_mask=True),
        L.RNN([L.GRUCell(4), L.GRUCell(2)]),
    ),
    "rnn_masked_stack_backwards_state": lambda: _model_of(
        L.RNN([L.GRUCell(4), L.LSTMCell(3)], go_backwards=True, return_state=True), masked=True
    ),
    "rnn_stacked_initial_state": stacked_initial_state,
    "rnn_stacked_initial_state_masked": lambda: stacked_initial_state(masked=True),
    "rnn_single_cell_initial_state": single_cell_initial_state,
}


def _model_of(layer, masked=False):
    if masked:
        inputs = keras.Input((9,), dtype="int32", name="ids")
        x = L.Embedding(10, 4, mask_zero=True, name="embed")(inputs)
    else:
        inputs = x = keras.Input(SERIES, name="series")
    return keras.Model(inputs, keras.tree.flatten(layer(x)))


def check_recurrent_both_directions(keras_model) -> tuple[float, float]:
    """Keras -> torch and torch -> Keras (weights back bit for bit); the two max differences."""
    graph = keras_adapter.architecture_of(keras_model)
    assert Graph.from_json(graph.to_json()) == graph
    checked = check_both_directions(
        keras_model,
        padded_batch(keras_model),
        graph=graph,
        tolerance=LAYER_TOLERANCE,
        same_weights=same_tensors_but_summed,
    )
    return checked.to_torch, checked.to_keras


def check_generated_code(keras_model, tmp_path, name="model"):
    """Saved as `.keras`, converted to Python: the generated module matches Keras."""
    keras_path = tmp_path / f"{name}.keras"
    keras_model.save(keras_path)
    graph = cli.convert(keras_path, tmp_path / f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"generated_{name}", tmp_path / f"{name}.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    import torch

    from exchange.torch_adapter import class_name

    module = getattr(generated, class_name(graph.name))()
    module.load_state_dict(generated.load(str(tmp_path / f"{name}.safetensors")), strict=True)
    inputs = padded_batch(keras_model)
    with torch.no_grad():
        outputs = module.eval()(*[torch.from_numpy(array).permute(to_torch_order(array.ndim - 1)) for array in inputs])
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    outputs = [output.permute(to_keras_order(output.ndim - 1)).numpy() for output in outputs]
    difference = max_difference(outputs, keras_adapter.predict(keras_model, inputs))
    assert difference <= LAYER_TOLERANCE
    return difference


@pytest.mark.parametrize("case", sorted(RNN_CASES))
def test_rnn_both_directions(case):
    keras.utils.set_random_seed(11)
    print(case, check_recurrent_both_directions(randomize(RNN_CASES[case](), seed=3)))


@pytest.mark.parametrize("case", ["rnn_stacked_states", "rnn_masked_stack", "rnn_stacked_initial_state_masked"])
def test_rnn_generated_code(case, tmp_path):
    keras.utils.set_random_seed(12)
    print(case, check_generated_code(randomize(RNN_CASES[case](), seed=5), tmp_path))


def test_rnn_stacked_torch_modules_and_keras_groups(tmp_path):
    """A stack is one torch module per cell (`stack.cell0`, …); a .keras file keeps each cell in
    `cell/cells/<class>_<count>` and is read from there."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input(SERIES)
    outputs = L.RNN([L.LSTMCell(3), L.LSTMCell(4), L.GRUCell(2)], name="stack")(inputs)
    model = randomize(keras.Model(inputs, outputs), seed=1)
    graph = keras_adapter.architecture_of(model)
    modules = sorted({key.rsplit(".", 1)[0] for key in graph.tensor_specs})
    assert modules == ["stack.cell0", "stack.cell1", "stack.cell2"]
    from exchange.kinds import kind_of

    assert kind_of("rnn").keras3_subgroups(graph.node("stack").config) == (
        "cell/cells/lstm_cell",
        "cell/cells/lstm_cell_1",
        "cell/cells/gru_cell",
    )
    model.save(tmp_path / "stack.keras")
    cli.convert(tmp_path / "stack.keras", tmp_path / "stack.safetensors")
    from exchange import fileformat

    stored = fileformat.load(tmp_path / "stack.safetensors").tensors
    expected = keras_adapter.get_tensors(model)
    assert sorted(stored) == sorted(expected)
    for key, tensor in expected.items():
        np.testing.assert_array_equal(np.asarray(stored[key]), tensor, err_msg=key)


def test_nested_model_outputs_are_read_flat():
    """`keras.Model(x, rnn(x))` with a stack returning states nests them per cell."""
    inputs = keras.Input(SERIES)
    model = keras.Model(inputs, L.RNN([L.LSTMCell(3), L.GRUCell(2)], return_state=True, name="stack")(inputs))
    graph = keras_adapter.architecture_of(model)
    assert [graph.shapes[name] for name in graph.outputs] == [(2,), (3,), (3,), (2,)]


@pytest.mark.parametrize(
    "make_layer, message",
    [
        (
            lambda: L.RNN(L.LSTMCell(3), stateful=True),
            r"'bad' \(RNN\): unsupported option stateful=True \(its states carry over between batches",
        ),
        (lambda: L.LSTM(3, stateful=True), r"'bad' \(LSTM\): unsupported option stateful=True"),
        (
            lambda: L.RNN(L.LSTMCell(3, activation="log_sigmoid")),
            r"'bad/lstm_cell\w*' \(LSTMCell\): unsupported option activation='log_sigmoid'",
        ),
    ],
)
def test_rnn_refusals_are_named(make_layer, message):
    layer = make_layer()
    layer.name = "bad"
    model = keras.Sequential([keras.Input((7, 6), batch_size=2), layer])
    with pytest.raises(UnsupportedLayerError, match=message):
        keras_adapter.architecture_of(model)


def test_rnn_of_another_cell_is_refused():
    from exchange.keras_config import parse_model_config

    model = keras.Sequential([keras.Input((7, 6)), L.RNN([L.LSTMCell(3), L.GRUCell(2)], name="bad")])
    config = {"class_name": "Sequential", "config": model.get_config()}
    config["config"]["layers"][1]["config"]["cell"]["config"]["cells"][1]["class_name"] = "PeepholeLSTMCell"
    with pytest.raises(
        UnsupportedLayerError,
        match=r"'bad' \(RNN\): unsupported option cell='PeepholeLSTMCell' "
        r"\(an LSTMCell, GRUCell, SimpleRNNCell or a StackedRNNCells",
    ):
        parse_model_config(config, "model")


# ---------------------------------------------------------------------------------------------
# Bidirectional with return_state, and around a layer with go_backwards=True


def bidirectional_states(layer, merge_mode="concat", masked=False, after=None):
    """The Bidirectional's outputs: merged output(s), then the forward states, then the backward ones."""
    if masked:
        inputs = keras.Input((9,), dtype="int32", name="ids")
        x = L.Embedding(10, 4, mask_zero=True, name="embed")(inputs)
    else:
        inputs = x = keras.Input(SERIES, name="series")
    outputs = L.Bidirectional(layer, merge_mode=merge_mode, name="bi")(x)
    if after is not None:  # the merged sequence keeps the mask; the states carry none
        outputs = [after(outputs[0])] + list(outputs[1:])
    return keras.Model(inputs, outputs)


def bidirectional_reversed(return_sequences=True, merge_mode="concat", masked=False):
    """The forward layer goes backwards; the backward one (go_backwards=False) is flipped into its order."""
    forward = L.LSTM(4, go_backwards=True, return_sequences=return_sequences, name="fwd")
    backward = L.LSTM(4, return_sequences=return_sequences, activation="relu", name="bwd")
    layer = L.Bidirectional(forward, backward_layer=backward, merge_mode=merge_mode, name="bi")
    if masked:
        return tokens(layer, *([L.GRU(3)] if return_sequences else []))
    return series(layer)


def bidirectional_encoder_decoder(cell=L.LSTM, masked=False, explicit_mask=False):
    """The encoder's four (or two) states start the decoder: Keras gives the first half to its
    forward layer. With initial states Keras 3 passes the Embedding's mask only as `mask=`."""
    source = keras.Input((9,), dtype="int32", name="source")
    encoded = L.Embedding(10, 4, mask_zero=masked, name="embed")(source)
    _, *states = L.Bidirectional(cell(5, return_state=True), name="encoder")(encoded)
    mask = {"mask": keras.ops.not_equal(source, 0)} if explicit_mask else {}
    decoded = L.Bidirectional(
        cell(5, return_sequences=True, go_backwards=True),
        backward_layer=cell(5, return_sequences=True),
        merge_mode="sum",
        name="decoder",
    )(encoded, initial_state=states, **mask)
    return keras.Model(source, L.Dense(3, name="project")(decoded))


BIDIRECTIONAL_CASES = {
    "bidirectional_initial_state_lstm": bidirectional_encoder_decoder,
    "bidirectional_initial_state_gru_masked_implicit": lambda: bidirectional_encoder_decoder(L.GRU, masked=True),
    "bidirectional_initial_state_lstm_masked_explicit": lambda: bidirectional_encoder_decoder(
        masked=True, explicit_mask=True
    ),
    "bidirectional_lstm_states": lambda: bidirectional_states(L.LSTM(4, return_sequences=True, return_state=True)),
    "bidirectional_gru_states_none_masked": lambda: bidirectional_states(
        L.GRU(3, return_sequences=True, return_state=True, reset_after=False), merge_mode=None, masked=True
    ),
    "bidirectional_rnn_last_states_sum": lambda: bidirectional_states(
        L.SimpleRNN(5, return_state=True), merge_mode="sum"
    ),
    "bidirectional_lstm_states_masked_into_lstm": lambda: bidirectional_states(
        L.LSTM(3, return_sequences=True, return_state=True), masked=True, after=L.LSTM(2, name="after")
    ),
    "bidirectional_forward_backwards": bidirectional_reversed,
    "bidirectional_forward_backwards_last_mul": lambda: bidirectional_reversed(False, "mul"),
    "bidirectional_forward_backwards_masked": lambda: bidirectional_reversed(masked=True),
    "bidirectional_forward_backwards_none": lambda: bidirectional_reversed(merge_mode=None),
}


@pytest.mark.parametrize("case", sorted(BIDIRECTIONAL_CASES))
def test_bidirectional_both_directions(case):
    keras.utils.set_random_seed(11)
    print(case, check_recurrent_both_directions(randomize(BIDIRECTIONAL_CASES[case](), seed=3)))


@pytest.mark.parametrize(
    "case",
    [
        "bidirectional_gru_states_none_masked",
        "bidirectional_forward_backwards",
        "bidirectional_initial_state_lstm_masked_explicit",
    ],
)
def test_bidirectional_generated_code(case, tmp_path):
    keras.utils.set_random_seed(12)
    print(case, check_generated_code(randomize(BIDIRECTIONAL_CASES[case](), seed=5), tmp_path))


def test_bidirectional_states_have_no_mask():
    """Keras puts the input's mask on the merged sequence, none on the states."""
    graph = keras_adapter.architecture_of(BIDIRECTIONAL_CASES["bidirectional_gru_states_none_masked"]())
    assert [graph.masks[name] for name in graph.outputs] == ["ids", "ids", None, None]


def _bidirectional_config(go_backwards: bool):
    """A Bidirectional's config without backward_layer (as Keras 2 wrote them) around a forward
    layer of that go_backwards."""
    model = series(L.Bidirectional(L.LSTM(3, return_sequences=True), name="bi"))
    config = {"class_name": "Sequential", "config": model.get_config()}
    layer_config = config["config"]["layers"][1]["config"]
    del layer_config["backward_layer"]
    layer_config["layer"]["config"]["go_backwards"] = go_backwards
    return config


def test_bidirectional_without_backward_layer_keras2_negates_go_backwards():
    """Keras 2 made the backward layer with the forward's go_backwards negated; Keras 3 with True."""
    from exchange.keras_config import parse_model_config

    graph = parse_model_config(_bidirectional_config(True), "model", keras2=True).graph
    config = graph.node("bi").config
    assert (config.forward.go_backwards, config.backward.go_backwards) == (True, False)
    graph = parse_model_config(_bidirectional_config(False), "model").graph
    assert graph.node("bi").config.backward.go_backwards
    with pytest.raises(
        UnsupportedLayerError,
        match=r"'bi' \(Bidirectional\): unsupported option "
        r"layer='go_backwards=True' \(the backward layer's must differ",
    ):
        parse_model_config(_bidirectional_config(True), "model")


# ---------------------------------------------------------------------------------------------
# ConvLSTM1D, ConvLSTM2D, ConvLSTM3D


FRAMES = (5, 9, 8, 3)  # odd time, odd height, even width, channels unlike any filter count


def frames(*layers, shape=FRAMES):
    return keras.Sequential([keras.Input(shape)] + list(layers))


def conv_lstm_states():
    """return_state into a second ConvLSTM2D as its initial state."""
    inputs = keras.Input(FRAMES, name="frames")
    sequence, h, c = L.ConvLSTM2D(4, (3, 2), padding="same", return_sequences=True, return_state=True, name="encoder")(
        inputs
    )
    decoded = L.ConvLSTM2D(4, (2, 3), padding="same", go_backwards=True, name="decoder")(sequence, initial_state=[h, c])
    return keras.Model(inputs, [decoded, h, c])


CONV_LSTM_CASES = {
    "conv_lstm2d_same": lambda: frames(L.ConvLSTM2D(4, (3, 2), padding="same", return_sequences=True)),
    "conv_lstm2d_valid_strides": lambda: frames(
        L.ConvLSTM2D(5, (3, 3), strides=(2, 1), activation="relu", recurrent_activation="hard_sigmoid")
    ),
    "conv_lstm2d_same_stride2_even_kernel": lambda: frames(
        L.ConvLSTM2D(3, (2, 4), strides=2, padding="same", use_bias=False, return_sequences=True, go_backwards=True)
    ),
    "conv_lstm2d_dilated": lambda: frames(L.ConvLSTM2D(2, 3, dilation_rate=(2, 1), padding="same")),
    "conv_lstm2d_states": conv_lstm_states,
    "conv_lstm1d": lambda: frames(
        L.ConvLSTM1D(4, 3, padding="same", return_sequences=True), L.ConvLSTM1D(3, 2, strides=2), shape=(6, 11, 3)
    ),
    "conv_lstm3d": lambda: frames(
        L.ConvLSTM3D(3, (2, 3, 2), padding="same", return_sequences=True), shape=(4, 5, 6, 3, 2)
    ),
}


@pytest.mark.parametrize("case", sorted(CONV_LSTM_CASES))
def test_conv_lstm_both_directions(case):
    keras.utils.set_random_seed(11)
    print(case, check_recurrent_both_directions(randomize(CONV_LSTM_CASES[case](), seed=3)))


@pytest.mark.parametrize("case", ["conv_lstm2d_states", "conv_lstm2d_same_stride2_even_kernel", "conv_lstm1d"])
def test_conv_lstm_generated_code(case, tmp_path):
    keras.utils.set_random_seed(12)
    print(case, check_generated_code(randomize(CONV_LSTM_CASES[case](), seed=5), tmp_path))


@pytest.mark.parametrize(
    "make_layer, message",
    [
        (lambda: L.ConvLSTM2D(2, 3, stateful=True), r"'bad' \(ConvLSTM2D\): unsupported option stateful=True"),
        (
            lambda: L.ConvLSTM2D(2, 3, data_format="channels_first"),
            r"'bad' \(ConvLSTM2D\): unsupported option data_format='channels_first'",
        ),
        (lambda: L.ConvLSTM2D(2, 3, activation="log_sigmoid"), r"'bad' \(ConvLSTM2D\): unsupported option activation"),
    ],
)
def test_conv_lstm_refusals_are_named(make_layer, message):
    layer = make_layer()
    layer.name = "bad"
    model = keras.Sequential([keras.Input((5, 9, 8, 3), batch_size=2), layer])
    with pytest.raises(UnsupportedLayerError, match=message):
        keras_adapter.architecture_of(model)


def test_conv_lstm_masked_input_is_refused():
    ids = keras.Input((6,), dtype="int32")
    x = L.Embedding(10, 12, mask_zero=True)(ids)
    x = L.TimeDistributed(L.Reshape((2, 2, 3)))(x)
    model = keras.Model(ids, L.ConvLSTM2D(2, 1, name="bad")(x))
    with pytest.raises(UnsupportedLayerError, match=r"'bad' \(ConvLSTM2D\): a masked input is not supported"):
        keras_adapter.architecture_of(model)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda config: config["cells"][0].update(cell="dense"),
            r"layer 'stack' \(rnn_cell\): RNN cell 'dense' is not one of 'lstm', 'gru', 'simple_rnn'",
        ),
        (
            lambda config: config["cells"][0].update(cell="simple_rnn"),
            r"layer 'stack' \(rnn_cell\): a SimpleRNNCell has no recurrent_activation",
        ),
        (lambda config: config.update(stacked=False), r"an RNN of several cells holds them in a StackedRNNCells"),
        (lambda config: config.update(cells=[config["cells"][0]] * 65), r"an RNN has 1 to 64 cells, found 65"),
        (lambda config: config.update(cells=[]), r"an RNN has 1 to 64 cells, found 0"),
        (lambda config: config["cells"][1].update(units=0), r"recurrent units must be an integer from 1"),
    ],
)
def test_rnn_config_from_an_exchange_file_is_checked(change, message):
    from exchange.errors import ExchangeError

    inputs = keras.Input(SERIES)
    model = keras.Model(inputs, L.RNN([L.LSTMCell(3, recurrent_activation="relu"), L.GRUCell(2)], name="stack")(inputs))
    document = keras_adapter.architecture_of(model).to_json()
    import json

    values = json.loads(document)
    node = next(node for node in values["nodes"] if node["name"] == "stack")
    change(node["config"])
    with pytest.raises(ExchangeError, match=message):
        Graph.from_json(json.dumps(values))
