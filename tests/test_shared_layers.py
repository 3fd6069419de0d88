"""Shared layers: a layer (or a nested model) called more than once is one set of weights and
several graph nodes, against real Keras (3 and, through a tf-keras fixture, 2) and real PyTorch.

The file holds the weights once, under the layer's name; the torch module calls the same
submodule at each call site (so fine-tuning keeps the calls tied); Keras gets one layer back,
called at each site; generated code reads `self.conv_exon(a)`, `self.conv_exon(b)`.
"""

import json
from pathlib import Path

import keras
import layer_suite
import numpy as np
import pytest
import torch
from kerasmodels import randomize

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.graph import Graph

L = keras.layers
KERAS2 = Path(__file__).parent / "fixtures" / "keras2"
# Keras 2 (tf-keras 2.21) against the torch module: float32 rounding of a small net.
KERAS2_TOLERANCE = 1e-5


def siamese_encoder() -> keras.Model:
    """A nested encoder (Conv2D with stride 2, BatchNormalization, Flatten, Dense) called on two
    images of one size, then merged: the Flatten's channels-first order is absorbed by the Dense's
    weights at both calls."""
    image = keras.Input((6, 5, 3), name="image")
    x = L.Conv2D(4, 3, strides=2, padding="same", name="enc_conv")(image)
    x = L.BatchNormalization(name="enc_bn")(x)
    x = L.Dense(7, activation="tanh", name="enc_dense")(L.Flatten(name="enc_flat")(x))
    encoder = keras.Model(image, x, name="encoder")
    left, right = keras.Input((6, 5, 3), name="left"), keras.Input((6, 5, 3), name="right")
    difference = L.Subtract(name="difference")([encoder(left), encoder(right)])
    return keras.Model([left, right], L.Dense(2, activation="softmax", name="head")(difference), name="siamese")


def shared_sequence_layers() -> keras.Model:
    """One Conv1D called four times (on two inputs of different lengths, and on a layer listed
    after it in the config), one LSTM with return_state called twice."""
    exon, intron = keras.Input((9, 4), name="exon"), keras.Input((7, 4), name="intron")
    conv = L.Conv1D(5, 3, padding="same", name="conv_exon")
    lstm = L.LSTM(3, return_state=True, name="lstm")
    pooled = L.GlobalAveragePooling1D(name="mean")(conv(exon))
    back = L.Conv1D(4, 1, name="back")(conv(intron))
    sequence, state_h, _ = lstm(conv(back))
    again, _, state_c = lstm(conv(exon))
    return keras.Model(
        [exon, intron],
        L.Concatenate(name="joined")([pooled, sequence, state_h, again, state_c]),
        name="shared_sequences",
    )


MODELS = {"siamese_encoder": siamese_encoder, "shared_sequence_layers": shared_sequence_layers}


def inputs_for(model: keras.Model, rows: int = 5, seed: int = 0) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    return [generator.standard_normal((rows,) + tuple(tensor.shape[1:])).astype(np.float32) for tensor in model.inputs]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("suffix", [".keras", pytest.param(".h5", marks=pytest.mark.slow)])
def test_shared_layers_in_every_direction(name, suffix, tmp_path):
    """.keras (and Keras 3's legacy .h5) -> .safetensors -> torch, -> .keras, file -> Keras -> file
    bit-identical, and generated code, all within 1e-5 of Keras."""
    keras.utils.set_random_seed(7)
    model = randomize(MODELS[name](), seed=11)
    keras_path = tmp_path / f"model{suffix}"
    model.save(keras_path)
    values = inputs_for(model)
    reference = keras_adapter.predict(model, values)
    result = layer_suite.CaseResult(name, "shared", "Model", "pass")
    layer_suite.conversions(keras_path, values, reference, result)
    assert len(result.diffs) == 4 and max(result.diffs.values()) <= layer_suite.tolerance(reference), result.diffs


def test_weights_are_stored_once_and_counted_once():
    keras.utils.set_random_seed(7)
    model = randomize(shared_sequence_layers(), seed=11)
    graph = keras_adapter.architecture_of(model)
    assert [node.name for node in graph.nodes if node.shares == "conv_exon"] == [
        "conv_exon:call1",
        "conv_exon:call2",
        "conv_exon:call3",
    ]
    assert [node.name for node in graph.nodes if node.shares == "lstm"] == ["lstm:call1"]
    tensors = keras_adapter.get_tensors(model)
    assert sorted(key for key in tensors if key.startswith("conv_exon")) == ["conv_exon.bias", "conv_exon.weight"]
    assert not any(":" in key or "call" in key for key in tensors)
    # Keras counts each weight once; torch adds the LSTM's zero bias_hh (4 gates x 3 units).
    assert graph.keras_parameter_count() == model.count_params()
    assert graph.parameter_count() == model.count_params() + 12


def test_generated_code_calls_one_module_at_each_site(tmp_path, capsys):
    """`convert model.keras model.py`: the parameters counted once (and Keras's count beside
    torch's), one module per shared layer, called at each site (`--verify` of a `.py` output and
    a fresh process: tests/test_custom_kinds.py)."""
    keras.utils.set_random_seed(7)
    model = randomize(shared_sequence_layers(), seed=11)
    model.save(tmp_path / "model.keras")
    assert cli.main([str(tmp_path / "model.keras"), str(tmp_path / "model.py")]) == 0
    assert f"{model.count_params() + 12:,} parameters ({model.count_params():,} in Keras)" in capsys.readouterr().out
    code = (tmp_path / "model.py").read_text()
    assert code.count("self.conv_exon = nn.Conv1d(") == 1 and code.count("self.lstm = nn.LSTM(") == 1
    assert "self.conv_exon(exon)" in code and "self.conv_exon(intron)" in code and code.count("self.lstm(") == 2


def test_fine_tuning_in_torch_keeps_the_calls_tied(tmp_path):
    """A training step on the torch module updates the one shared set of weights (both calls'
    gradients summed, as Keras sums them); the result goes back to Keras and computes the same."""
    keras.utils.set_random_seed(7)
    model = randomize(siamese_encoder(), seed=11)
    graph = keras_adapter.architecture_of(model)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
    assert len(list(torch_model.parameters())) == len(list(torch_model.named_parameters())) == 8
    values = inputs_for(model)
    torch_model.train()
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.5)
    before = torch_model.enc_dense.weight.detach().clone()
    torch_model(*torch_adapter.torch_inputs(graph, values))[:, 0].sum().backward()
    optimizer.step()
    assert not torch.equal(before, torch_model.enc_dense.weight)
    torch_adapter.save_file(torch_model.eval(), tmp_path / "tuned.safetensors")
    tuned = keras_adapter.model_from_file(tmp_path / "tuned.safetensors")
    assert (
        np.max(np.abs(keras_adapter.predict(tuned, values)[0] - torch_adapter.predict(torch_model, values)[0])) <= 1e-6
    )


def test_keras2_file_with_a_shared_layer_and_a_shared_nested_model(tmp_path):
    """tf-keras numbers a nested model's calls from 1 (its own build is node 0, left out of the
    config); Keras 3.15 itself cannot open this file (it reports a loop), the exchange can."""
    expected = np.load(KERAS2 / "expected_outputs.npz")
    graph = cli.convert(KERAS2 / "shared.h5", tmp_path / "shared.safetensors")
    assert {node.name: node.shares for node in graph.nodes if node.shares} == {
        "conv_exon:call1": "conv_exon",
        "enc_hidden:call1": "enc_hidden",
        "enc_out:call1": "enc_out",
    }
    torch_model = torch_adapter.model_from_file(tmp_path / "shared.safetensors")
    (found,) = torch_adapter.predict(torch_model, [expected["shared_inputs_exon"], expected["shared_inputs_intron"]])
    assert np.max(np.abs(found - expected["shared_outputs"])) <= KERAS2_TOLERANCE


def test_a_shared_dense_reading_a_flatten_and_a_vector_is_refused():
    """Its weights would need the Flatten's channels-first row order at one call only."""
    image, vector = keras.Input((2, 3, 4), name="image"), keras.Input((24,), name="vector")
    dense = L.Dense(3, name="shared_dense")
    model = keras.Model([image, vector], L.Add(name="sum")([dense(L.Flatten(name="flat")(image)), dense(vector)]))
    with pytest.raises(
        UnsupportedLayerError,
        match=r"layer 'shared_dense:call1': shared layer 'shared_dense' reads "
        r"a Flatten of an image at call 'shared_dense' only",
    ) as err:
        keras_adapter.architecture_of(model)
    assert "\n" not in str(err.value)


def _graph_with_shares(**changes) -> dict:
    description = {
        "name": "m",
        "inputs": [{"name": "x", "shape": [3], "dtype": "float32"}],
        "nodes": [
            {
                "name": "d",
                "kind": "dense",
                "inputs": ["x"],
                "dtype": "float32",
                "config": {"units": 3, "activation": "tanh", "use_bias": True},
            },
            {
                "name": "d:call1",
                "kind": "dense",
                "inputs": ["d"],
                "dtype": "float32",
                "config": {"units": 3, "activation": "tanh", "use_bias": True},
                "shares": "d",
            },
        ],
        "outputs": ["d:call1"],
    }
    description["nodes"][1].update(changes)
    return description


def test_an_exchange_file_states_sharing_and_is_checked():
    graph = Graph.from_dict(_graph_with_shares())
    assert Graph.from_json(graph.to_json()) == graph and list(graph.tensor_specs) == ["d.weight", "d.bias"]
    assert json.loads(graph.to_json())["nodes"][0].keys() == {"name", "kind", "inputs", "dtype", "config"}
    for changes, message in (
        ({"shares": "x"}, r"layer 'd:call1' shares 'x', which is not an earlier layer of its own"),
        ({"shares": "nowhere"}, r"shares 'nowhere', which is not an earlier layer"),
        ({"name": "other", "outputs": None}, r"call 2 of shared layer 'd' must be named 'd:call1'"),
        ({"config": {"units": 3, "activation": "relu", "use_bias": True}}, r"differs from it in kind, config"),
        ({"shares": ["d"]}, r"malformed architecture"),
    ):
        description = _graph_with_shares(**{key: value for key, value in changes.items() if key != "outputs"})
        if "name" in changes:
            description["outputs"] = [changes["name"]]
        with pytest.raises(ExchangeError, match=message):
            Graph.from_dict(description)


def test_outputs_of_a_shared_nested_model_and_sequential(tmp_path):
    """Keras 3 numbers a nested functional model's calls from 1 in `output_layers` (its node 0
    is its own build) and from 0 where layers read them; a Sequential's and a layer's from 0."""

    def functional(name):
        inputs = keras.Input((4,))
        return keras.Model(inputs, L.Dense(3, name=f"{name}_dense")(inputs), name=name)

    first, second = keras.Input((4,), name="first"), keras.Input((4,), name="second")
    encoder = functional("encoder")
    stack = keras.Sequential([keras.Input((4,)), L.Dense(3, name="stack_dense")], name="stack")
    dense = L.Dense(4, name="dense")
    encoded = [encoder(first), encoder(second)]
    outputs = encoded + [stack(first), stack(second), dense(first), dense(second), L.Add(name="add")(encoded)]
    keras.utils.set_random_seed(2)
    model = randomize(keras.Model([first, second], outputs), seed=4)
    model.save(tmp_path / "model.keras")
    values = inputs_for(model)
    reference = keras_adapter.predict(model, values)
    result = layer_suite.CaseResult("outputs", "shared", "Model", "pass")
    layer_suite.conversions(tmp_path / "model.keras", values, reference, result)
    assert len(result.diffs) == 4 and max(result.diffs.values()) <= layer_suite.tolerance(reference), result.diffs
