"""Sequence layers both ways with real Keras (TensorFlow backend) and real PyTorch: recurrent
layers, Bidirectional, TimeDistributed, Embedding masks; each convention pitfall of the issue has
a test that fails when the convention is handled the naive way; the Keras 2 `.h5` LSTM and GRU
written by real tf-keras against the outputs Keras 2 itself computed.

Sizes are non-square: input width != units, odd sequence lengths.
"""

import keras
import numpy as np
import pytest
from kerasmodels import (
    check_both_directions,
    keras_vs_torch,
    lossy_keys,
    max_difference,
    padded_batch,
    random_torch_state,
    randomize,
    same_tensors_but_summed,
)
from support import ROOT

from exchange import cli, keras_adapter, keras_files, torch_adapter
from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.graph import Graph
from exchange.tensors import materialize

L = keras.layers
LAYER_TOLERANCE = 1e-5  # float32 rounding between TensorFlow and PyTorch, as for every kind
# A convention handled the naive way moves outputs by far more than rounding does.
NAIVE_MINIMUM = 1e-3
KERAS2_FIXTURES = ROOT / "tests/fixtures/keras2"
SERIES = (11, 4)  # odd length, 4 features: no unit count below equals either


def series(*layers):
    return keras.Sequential([keras.Input(SERIES)] + list(layers))


def tokens(*layers, length=9):
    return keras.Sequential([keras.Input((length,), dtype="int32"), L.Embedding(10, 4, mask_zero=True)] + list(layers))


def lstm_with_states():
    """return_state: the model outputs the sequence and both LSTM states."""
    inputs = keras.Input(SERIES, name="series")
    sequence, h, c = L.LSTM(5, return_sequences=True, return_state=True, name="lstm")(inputs)
    return keras.Model(inputs, [L.Dense(3, name="head")(sequence), h, c])


def gru_state_into_dense():
    inputs = keras.Input((9,), dtype="int32", name="ids")
    x = L.Embedding(10, 6, mask_zero=True, name="embed")(inputs)
    _, state = L.GRU(5, return_state=True, go_backwards=True, name="gru")(x)
    return keras.Model(inputs, L.Dense(2, name="head")(state))


def encoder_decoder(cell=L.LSTM, masked=False):
    """seq2seq: the encoder's states start the decoder (return_state into initial_state)."""
    source = keras.Input((9,), dtype="int32", name="source")
    target = keras.Input((7, 3), name="target")
    encoded = L.Embedding(10, 4, mask_zero=masked, name="embed")(source)
    _, *states = cell(6, return_state=True, name="encoder")(encoded)
    decoded = cell(6, return_sequences=True, go_backwards=cell is L.GRU, name="decoder")(target, initial_state=states)
    return keras.Model([source, target], L.Dense(5, name="project")(decoded))


def masked_state_with_zero_output():
    """The h state is the carried state, not the last output (zero where the last step is masked)."""
    ids = keras.Input((9,), dtype="int32", name="ids")
    x = L.Embedding(10, 4, mask_zero=True, name="embed")(ids)
    outputs = L.LSTM(3, return_state=True, zero_output_for_mask=True, name="lstm")(x)
    return keras.Model(ids, outputs)


def initial_state_and_mask(explicit: bool):
    """Keras 3 passes the Embedding's mask to a layer called with initial_state only as `mask=`."""
    ids = keras.Input((9,), dtype="int32", name="ids")
    start = keras.Input((3,), name="start")
    x = L.Embedding(10, 4, mask_zero=True, name="embed")(ids)
    mask = {"mask": keras.ops.not_equal(ids, 0)} if explicit else {}
    outputs = L.GRU(3, return_sequences=True, return_state=True, name="gru")(x, initial_state=[start], **mask)
    return keras.Model([ids, start], outputs)


def mask_into_nested_model():
    inner = keras.Sequential([keras.Input((9, 4)), L.LSTM(3, name="inner_lstm")], name="inner")
    ids = keras.Input((9,), dtype="int32", name="ids")
    return keras.Model(ids, inner(L.Embedding(10, 4, mask_zero=True, name="embed")(ids)))


def two_embeddings_of_the_same_ids():
    ids = keras.Input((9,), dtype="int32", name="ids")
    both = L.Add()([L.Embedding(10, 4, mask_zero=True)(ids), L.Embedding(10, 4, mask_zero=True)(ids)])
    return keras.Model(ids, L.LSTM(3)(both))


def bidirectional_backward_output_masked():
    ids = keras.Input((9,), dtype="int32", name="ids")
    x = L.Embedding(10, 4, mask_zero=True, name="embed")(ids)
    _, backward = L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode=None, name="bi")(x)
    return keras.Model(ids, L.LSTM(2, name="after")(backward))


def bidirectional_two_outputs():
    inputs = keras.Input(SERIES, name="series")
    forward, backward = L.Bidirectional(L.GRU(3, return_sequences=True), merge_mode=None, name="bi")(inputs)
    return keras.Model(inputs, L.Add(name="add")([forward, backward]))


CASES = {
    "lstm_stacked": lambda: series(L.LSTM(6, return_sequences=True), L.LSTM(5)),
    "lstm_no_bias_backwards": lambda: series(L.LSTM(3, use_bias=False, go_backwards=True, return_sequences=True)),
    "lstm_activations": lambda: series(L.LSTM(5, activation="relu", recurrent_activation="hard_sigmoid")),
    "gru_reset_after": lambda: series(L.GRU(6, return_sequences=True), L.GRU(3, go_backwards=True)),
    "gru_reset_before": lambda: series(L.GRU(6, reset_after=False, return_sequences=True), L.GRU(3, reset_after=False)),
    "gru_no_bias": lambda: series(L.GRU(5, use_bias=False, reset_after=False), L.Dense(2)),
    "simple_rnn": lambda: series(L.SimpleRNN(6, return_sequences=True), L.SimpleRNN(3, activation="relu")),
    "simple_rnn_sigmoid": lambda: series(L.SimpleRNN(5, activation="sigmoid", go_backwards=True)),
    "masked_lstm": lambda: tokens(L.LSTM(5, return_sequences=True), L.LSTM(3)),
    "masked_gru_backwards": lambda: tokens(
        L.GRU(5, go_backwards=True, return_sequences=True), L.GRU(3, reset_after=False)
    ),
    "masked_rnn_zero_output": lambda: tokens(L.SimpleRNN(5, return_sequences=True, zero_output_for_mask=True)),
    "masked_mean_through_dense": lambda: tokens(
        L.Dense(6, activation="tanh"), L.Dropout(0.1), L.GlobalAveragePooling1D()
    ),
    "masked_max_ignores_mask": lambda: tokens(L.Dense(6), L.GlobalMaxPooling1D()),  # Keras drops it here
    "conv_drops_mask": lambda: tokens(L.Conv1D(5, 3, padding="same"), L.LSTM(4)),
    "bidirectional_concat": lambda: series(L.Bidirectional(L.LSTM(4, return_sequences=True)), L.Dense(3)),
    "bidirectional_sum_mul_ave": lambda: series(
        L.Bidirectional(L.GRU(4, return_sequences=True), merge_mode="sum"),
        L.Bidirectional(L.SimpleRNN(4, return_sequences=True), merge_mode="mul"),
        L.Bidirectional(L.LSTM(3), merge_mode="ave"),
    ),
    "bidirectional_masked": lambda: tokens(
        L.Bidirectional(L.LSTM(4, return_sequences=True)), L.Bidirectional(L.GRU(3))
    ),
    "bidirectional_own_backward": lambda: series(
        L.Bidirectional(
            L.LSTM(4, return_sequences=True),
            backward_layer=L.LSTM(4, return_sequences=True, go_backwards=True, activation="relu"),
        )
    ),
    "bidirectional_none": bidirectional_two_outputs,
    "time_distributed_dense": lambda: series(L.TimeDistributed(L.Dense(7, activation="relu")), L.LSTM(3)),
    "time_distributed_conv": lambda: keras.Sequential(
        [
            keras.Input((5, 9, 8, 3)),
            L.TimeDistributed(L.Conv2D(4, (3, 2), strides=2, padding="same")),
            L.TimeDistributed(L.Flatten()),
            L.GRU(3),
        ]
    ),
    "lstm_return_state": lstm_with_states,
    "masked_gru_state": gru_state_into_dense,
    "sequence_merges": lambda: keras.Model(*_sequence_merges()),
    "encoder_decoder_lstm": encoder_decoder,
    "masked_state_zero_output": masked_state_with_zero_output,
    "initial_state_implicit_mask_unused": lambda: initial_state_and_mask(explicit=False),
    "initial_state_explicit_mask": lambda: initial_state_and_mask(explicit=True),
    "mask_into_nested_model": mask_into_nested_model,
    "two_embeddings_same_ids": two_embeddings_of_the_same_ids,
    "bidirectional_backward_output_masked": bidirectional_backward_output_masked,
    "float64_lstm_gru": lambda: keras.Sequential(
        [
            keras.Input(SERIES, dtype="float64"),
            L.LSTM(4, return_sequences=True, dtype="float64"),
            L.GRU(3, dtype="float64"),
        ]
    ),
    "encoder_decoder_gru_masked": lambda: encoder_decoder(L.GRU, masked=True),
    "encoder_decoder_rnn": lambda: encoder_decoder(L.SimpleRNN),
}


def _sequence_merges():
    inputs = keras.Input(SERIES)
    left = L.LSTM(6, return_sequences=True)(inputs)
    right = L.Conv1D(6, 3, padding="same")(inputs)
    merged = L.Concatenate()([L.Add()([left, right]), L.Multiply()([left, right])])
    return inputs, L.Permute((2, 1))(L.RepeatVector(3)(L.GRU(2)(merged)))


def summed_biases_add_up(graph, torch_state, back):
    """The weights read back bit for bit but those of `Summed` ports, whose sum survives."""
    same_tensors_but_summed(graph, torch_state, back)
    for key in (key for key in lossy_keys(graph) if key.endswith("bias_ih_l0")):  # LSTM/SimpleRNN
        twin = key.replace("bias_ih_l0", "bias_hh_l0")
        np.testing.assert_allclose(back[key], torch_state[key] + torch_state[twin], rtol=0, atol=1e-6)
        assert not back[twin].any()


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_kind_both_directions(case):
    keras.utils.set_random_seed(11)
    keras_model = randomize(CASES[case](), seed=3)
    graph = keras_adapter.architecture_of(keras_model)
    assert Graph.from_json(graph.to_json()) == graph
    check_both_directions(
        keras_model,
        padded_batch(keras_model),
        graph=graph,
        tolerance=LAYER_TOLERANCE,
        same_weights=summed_biases_add_up,
    )


def test_standard_torch_modules_where_they_compute_the_same():
    """nn.LSTM / nn.GRU / nn.RNN for the default forms; KerasRecurrent only where they cannot."""
    import torch

    expected = {
        "lstm_stacked": torch.nn.LSTM,
        "gru_reset_after": torch.nn.GRU,
        "simple_rnn": torch.nn.RNN,
        "gru_reset_before": "KerasRecurrent",
        "lstm_activations": "KerasRecurrent",
        "masked_lstm": "KerasRecurrent",
    }
    for case, module_type in expected.items():
        keras.utils.set_random_seed(1)
        graph = keras_adapter.architecture_of(CASES[case]())
        module = torch_adapter.build_module(graph)
        recurrent = [child for child in module.children() if not isinstance(child, torch.nn.Embedding)]
        for child in recurrent:
            assert (
                (type(child).__name__ == module_type)
                if isinstance(module_type, str)
                else isinstance(child, module_type)
            ), (case, child)


# -- each pitfall, handled the naive way, moves the outputs -------------------------------------


def _outputs_with(graph, tensors, inputs):
    """Outputs of the torch module built from `graph` with these file tensors."""
    return torch_adapter.predict(torch_adapter.model_from_tensors(graph, tensors), inputs)


def _case(name):
    keras.utils.set_random_seed(5)
    model = randomize(CASES[name](), seed=2)
    graph = keras_adapter.architecture_of(model)
    inputs = padded_batch(model)
    return model, graph, keras_adapter.get_tensors(model), inputs, keras_adapter.predict(model, inputs)


def test_gru_gates_not_reordered_is_wrong():
    model, graph, tensors, inputs, expected = _case("gru_reset_after")
    assert max_difference(expected, _outputs_with(graph, tensors, inputs)) <= LAYER_TOLERANCE
    naive = dict(tensors)
    grus = {graph.torch_names[node.name] for node in graph.nodes if node.kind == "gru"}
    for key in [key for key in tensors if key.split(".")[0] in grus]:
        blocks = np.split(tensors[key], 3, axis=0)  # undo the r, z swap: Keras's z, r, h order
        naive[key] = np.concatenate([blocks[1], blocks[0], blocks[2]], axis=0)
    assert max_difference(expected, _outputs_with(graph, naive, inputs)) > NAIVE_MINIMUM


def test_lstm_bias_in_both_torch_biases_is_wrong():
    model, graph, tensors, inputs, expected = _case("lstm_stacked")
    naive = dict(tensors)
    for key in [key for key in tensors if key.endswith("bias_hh_l0")]:
        assert not tensors[key].any(), "Keras's one bias goes to bias_ih_l0, zeros to bias_hh_l0"
        naive[key] = tensors[key.replace("bias_hh", "bias_ih")]  # Keras's bias copied into both
    assert max_difference(expected, _outputs_with(graph, naive, inputs)) > NAIVE_MINIMUM


def test_ignoring_the_mask_is_wrong():
    model, graph, tensors, inputs, expected = _case("masked_lstm")
    unmasked = Graph.from_dict(
        {
            **graph.to_dict(),
            "nodes": [
                {**node, "config": {**node["config"], "mask_zero": False}} if node["kind"] == "embedding" else node
                for node in graph.to_dict()["nodes"]
            ],
        }
    )
    assert unmasked.masks != graph.masks
    assert max_difference(expected, _outputs_with(unmasked, tensors, inputs)) > NAIVE_MINIMUM


def test_reset_after_false_as_nn_gru_is_wrong():
    """Keras's reset_after=False GRU in nn.GRU (its one bias as bias_ih, zeros as bias_hh)."""
    import torch

    model, graph, tensors, inputs, expected = _case("gru_reset_before")
    module = torch_adapter.model_from_tensors(graph, tensors)
    assert max_difference(expected, torch_adapter.predict(module, inputs)) <= LAYER_TOLERANCE
    for name in (graph.torch_names[node.name] for node in graph.nodes if node.kind == "gru"):
        helper = module.get_submodule(name)
        naive = torch.nn.GRU(helper.input_size, helper.hidden_size, batch_first=True)
        naive.load_state_dict({**helper.state_dict(), "bias_hh_l0": torch.zeros_like(helper.bias_ih_l0)})
        module.add_submodule(name, naive)
    assert max_difference(expected, torch_adapter.predict(module, inputs)) > NAIVE_MINIMUM


# -- Keras 2 files written by tf-keras 2.21 -------------------------------------------------


def keras2_inputs(name):
    """The batch scripts/make_keras2_fixtures.py fed Keras 2, and what Keras 2 computed."""
    stored = np.load(KERAS2_FIXTURES / "expected_outputs.npz")
    if name == "lstm":
        return [stored["lstm_ids"]], stored["lstm_outputs"]
    expected = stored[f"{name}_outputs"]
    shape = {"gru": (11, 4), "wrappers": (7, 5)}[name]
    return [np.random.default_rng(0).random((len(expected),) + shape, dtype=np.float32)], expected


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_keras2_recurrent_files_match_keras2(name, tmp_path):
    """Masked Embedding -> LSTM -> backwards LSTM with Keras 2's hard_sigmoid, and GRU with
    reset_after=False -> GRU with reset_after=True: `.h5` -> `.safetensors` -> torch against the
    outputs Keras 2 computed; `.pt` both ways."""
    inputs, expected = keras2_inputs(name)
    common = tmp_path / f"{name}.safetensors"
    graph = cli.convert(KERAS2_FIXTURES / f"{name}.h5", common)
    torch_outputs = torch_adapter.predict(torch_adapter.model_from_file(common), inputs)
    difference = max_difference([expected], torch_outputs)
    print(f"keras2 {name}: .h5 -> .safetensors -> torch vs Keras 2: {difference:.2e}")
    assert difference <= LAYER_TOLERANCE
    state = tmp_path / f"{name}.pt"
    cli.convert(KERAS2_FIXTURES / f"{name}.h5", state)
    again = tmp_path / f"{name}_from_pt.safetensors"
    cli.convert(state, again, arch_path=common)
    assert (
        max_difference([expected], torch_adapter.predict(torch_adapter.model_from_file(again), inputs))
        <= LAYER_TOLERANCE
    )
    kinds = {node.name: node.config for node in graph.nodes}
    if name == "lstm":
        assert kinds["lstm_b"].recurrent_activation == "hard_sigmoid_keras2" and kinds["lstm_b"].go_backwards
        assert graph.masks["lstm_a"] == "tokens"  # the mask is `tokens != 0`
    else:
        assert kinds["gru_a"].reset_after is False and kinds["gru_b"].reset_after is True


@pytest.mark.parametrize("name", ["gru", "wrappers"])
def test_keras2_files_to_keras3_and_back(name, tmp_path):
    """The Keras 2 GRUs, and TimeDistributed(Dense) -> Bidirectional(GRU) -> MultiHeadAttention
    (Keras 2's weight names for wrapped and attention layers), to Keras 3 and back."""
    inputs, expected = keras2_inputs(name)
    common = tmp_path / f"{name}.safetensors"
    cli.convert(KERAS2_FIXTURES / f"{name}.h5", common)
    difference = max_difference([expected], torch_adapter.predict(torch_adapter.model_from_file(common), inputs))
    print(f"keras2 {name}: .h5 -> .safetensors -> torch vs Keras 2: {difference:.2e}")
    assert difference <= LAYER_TOLERANCE
    rebuilt = tmp_path / f"{name}.keras"
    cli.convert(common, rebuilt)
    reopened = keras.saving.load_model(rebuilt, safe_mode=True)
    difference = max_difference([expected], keras_adapter.predict(reopened, inputs))
    print(f"keras2 {name}: .safetensors -> Keras 3 .keras vs Keras 2: {difference:.2e}")
    assert difference <= LAYER_TOLERANCE
    again = tmp_path / "again.safetensors"
    cli.convert(rebuilt, again)
    assert again.read_bytes() == common.read_bytes()


def test_keras2_hard_sigmoid_read_as_keras3_would_be_wrong(tmp_path):
    """The same weights with Keras 3's hard_sigmoid give other outputs: the file's Keras version
    decides, and Keras 3 has no layer for Keras 2's, so writing it as `.keras` is refused."""
    inputs, expected = keras2_inputs("lstm")
    with keras_files.open_keras_file(KERAS2_FIXTURES / "lstm.h5") as weights:
        graph, tensors = weights.architecture, {key: materialize(value) for key, value in weights.tensors.items()}
    keras3_meaning = Graph.from_dict(
        {
            **graph.to_dict(),
            "nodes": [
                {**node, "config": {**node["config"], "recurrent_activation": "hard_sigmoid"}}
                if node["name"] == "lstm_b"
                else node
                for node in graph.to_dict()["nodes"]
            ],
        }
    )
    assert max_difference([expected], _outputs_with(keras3_meaning, tensors, inputs)) > NAIVE_MINIMUM
    common = tmp_path / "lstm.safetensors"
    cli.convert(KERAS2_FIXTURES / "lstm.h5", common)
    refusal = "layer 'lstm_b': activation 'hard_sigmoid_keras2' has no Keras 3 equivalent"
    with pytest.raises(UnsupportedLayerError, match=refusal):
        cli.convert(common, tmp_path / "lstm.keras")
    assert not (tmp_path / "lstm.keras").exists()


# -- what is refused, and why -----------------------------------------------------------------


@pytest.mark.parametrize(
    "make_model, message",
    [
        (lambda: tokens(L.Softmax()), "'softmax.*' \\(Softmax\\) on a masked input"),
        (lambda: series(L.LSTM(3, activation="log_sigmoid")), "unsupported option activation='log_sigmoid'"),
    ],
)
def test_unsupported_sequence_layers_are_named(make_model, message):
    with pytest.raises(UnsupportedLayerError, match=message):
        keras_adapter.architecture_of(make_model())


@pytest.mark.parametrize(
    "make_mask",
    [
        lambda ids: keras.ops.not_equal(ids, 5),
        lambda ids: keras.ops.greater(ids, 3),
        lambda ids: keras.ops.logical_and(keras.ops.not_equal(ids, 0), keras.ops.less(ids, 5)),
    ],
)
def test_explicit_mask_other_than_the_embedding_is_refused(make_mask):
    """Keras 3 records the masks it passes as `mask=`; one that is not the Embedding's `ids != 0`
    would make the graph's derived mask wrong, so it is refused."""
    ids = keras.Input((9,), dtype="int32", name="ids")
    x = L.Embedding(10, 4, mask_zero=True, name="embed")(ids)
    model = keras.Model(ids, L.LSTM(3, name="lstm")(x, mask=make_mask(ids)))
    with pytest.raises(UnsupportedLayerError, match="'lstm' is given a mask \\(computed from ids\\) that is not"):
        keras_adapter.architecture_of(model)


def test_bidirectional_with_initial_state_keyword():
    """initial_state=[h_forward, h_backward]: Keras gives each layer its half."""
    keras.utils.set_random_seed(2)
    series_input, start, other = keras.Input(SERIES), keras.Input((3,)), keras.Input((3,))
    model = randomize(
        keras.Model(
            [series_input, start, other],
            L.Bidirectional(L.GRU(3), name="bi")(series_input, initial_state=[start, other]),
        ),
        seed=1,
    )
    graph = keras_adapter.architecture_of(model)
    assert keras_vs_torch(model, graph, keras_adapter.get_tensors(model), padded_batch(model)) <= LAYER_TOLERANCE


def test_output_node_of_a_single_output_layer_is_refused():
    keras.utils.set_random_seed(1)
    description = keras_adapter.architecture_of(CASES["lstm_return_state"]()).to_dict()
    bad = dict(
        description,
        nodes=description["nodes"] + [{"name": "bogus", "kind": "output", "inputs": ["head"], "config": {"index": 1}}],
    )
    with pytest.raises(ExchangeError, match="'bogus'.*reads output 1 of 'head'"):
        Graph.from_dict(bad).shapes


@pytest.mark.parametrize(
    "case",
    [
        "encoder_decoder_gru_masked",
        "encoder_decoder_lstm",
        "bidirectional_none",
        "time_distributed_conv",
        "lstm_return_state",
        "float64_lstm_gru",
    ],
)
def test_generated_code_of_sequence_models(case, tmp_path):
    """The generated source (states, masks, containers, several inputs and outputs) computes what
    Keras computes; tests/test_codegen.py runs the sequence zoo's files in a clean process."""
    import importlib.util

    import torch

    from exchange import codegen, fileformat

    keras.utils.set_random_seed(11)
    model = randomize(CASES[case](), seed=3)
    graph = keras_adapter.architecture_of(model)
    inputs = padded_batch(model)
    code_path = tmp_path / "generated.py"
    codegen.write_module(graph, code_path, "generated.safetensors", "model.keras")
    fileformat.save(tmp_path / "generated.safetensors", graph, keras_adapter.get_tensors(model), "keras")
    spec = importlib.util.spec_from_file_location("generated", code_path)
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = getattr(generated, torch_adapter.class_name(graph.name))()
    module.load_state_dict(generated.load(str(tmp_path / "generated.safetensors")), strict=True)
    with torch.no_grad():
        outputs = module.eval()(*torch_adapter.torch_inputs(graph, inputs))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    from exchange.kinds.axis_order import to_keras_order

    outputs = [
        output.permute(to_keras_order(len(graph.shapes[name]))).numpy() for name, output in zip(graph.outputs, outputs)
    ]
    assert max_difference(keras_adapter.predict(model, inputs), outputs) <= LAYER_TOLERANCE


def test_keras_layout_module_takes_the_int32_ids_keras_takes(tmp_path):
    """`model_from_file(..., keras_layout=True)` is a drop-in for the Keras model on token ids."""
    import torch

    keras.utils.set_random_seed(2)
    model = randomize(CASES["bidirectional_masked"](), seed=1)
    path = tmp_path / "model.safetensors"
    keras_adapter.save_file(model, path)
    module = torch_adapter.model_from_file(path, keras_layout=True)
    (ids,) = padded_batch(model)
    assert ids.dtype == np.int32
    with torch.no_grad():
        outputs = module(torch.from_numpy(ids)).numpy()
    assert max_difference([outputs], keras_adapter.predict(model, [ids])) <= LAYER_TOLERANCE


def test_keras3_legacy_h5_of_a_masked_model(tmp_path):
    """Keras 3's legacy `.h5` records operations (the mask's `ids != 0`) without their module."""
    keras.utils.set_random_seed(4)
    model = randomize(CASES["masked_lstm"](), seed=2)
    path = tmp_path / "masked.h5"
    model.save(path)
    common = tmp_path / "masked.safetensors"
    cli.convert(path, common)
    inputs = padded_batch(model)
    assert (
        max_difference(
            keras_adapter.predict(model, inputs), torch_adapter.predict(torch_adapter.model_from_file(common), inputs)
        )
        <= LAYER_TOLERANCE
    )


def test_torch_biases_summed_going_to_keras_are_named(tmp_path, capsys):
    """A trained torch LSTM has two biases; its `.keras` holds their sum (same outputs) and the
    CLI says which torch tensors were folded."""
    keras.utils.set_random_seed(3)
    graph = keras_adapter.architecture_of(CASES["lstm_stacked"]())
    state = random_torch_state(graph, seed=2)
    torch_path = tmp_path / "trained.safetensors"
    torch_adapter.save_file(torch_adapter.model_from_tensors(graph, state), torch_path)
    assert cli.main([str(torch_path), str(tmp_path / "trained.keras")]) == 0
    lines = capsys.readouterr().out.splitlines()
    folded = [f"{graph.torch_names[node.name]}.bias_hh_l0" for node in graph.nodes]
    assert (
        lines[0] == f"note: {', '.join(folded)} added into the bias before them: Keras has one bias where "
        "torch has two (same outputs; converting back gives zeros there)"
    )
    inputs = padded_batch(keras.saving.load_model(tmp_path / "trained.keras"))
    assert (
        max_difference(
            keras_adapter.predict(keras.saving.load_model(tmp_path / "trained.keras"), inputs),
            torch_adapter.predict(torch_adapter.model_from_file(torch_path), inputs),
        )
        <= LAYER_TOLERANCE
    )
