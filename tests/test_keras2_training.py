"""Keras 2 `.h5` training state (`training_state.read_keras2_training`): the fixture
tests/fixtures/keras2/training_adam.h5 (scripts/make_keras2_fixtures.py --training: a text model
trained 3 steps by tf-keras 2.21 with Adam) continued 20 steps in torch as tf-keras continued it
(training_expected.npz); tf-keras is not needed here. Its hostile variants are refused in one line."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from exchange import fileformat, keras_files, optimizers, torch_adapter, training_state
from exchange.errors import ExchangeError

FIXTURES = Path(__file__).parent / "fixtures" / "keras2"
FIXTURE = FIXTURES / "training_adam.h5"
BATCH = 8
# Measured after 20 steps: weights 6.0e-8 apart, slots 1.5e-8 (float32 rounding); with Keras 3's
# rule for the Embedding (lookups squared one by one) instead, 1.2e-2.
TOLERANCE = 1e-5


def _open(path=FIXTURE):
    with keras_files.open_keras_file(path) as weights:
        graph, tensors = weights.architecture, fileformat.materialize(weights.tensors)
    return graph, tensors, training_state.read_keras2_training(path, graph, training_state.parameter_keys_of(graph))


def test_keras2_state_is_read():
    graph, _, state = _open()
    assert state.iteration == 3 and state.optimizer.class_name == "Adam"
    assert state.optimizer.options == {
        "learning_rate": pytest.approx(0.01),
        "beta_1": 0.8,
        "beta_2": 0.999,
        "epsilon": 1e-4,
        "weight_decay": None,
    }
    assert state.regularizers == {"hidden.weight": {"l2": pytest.approx(0.01)}}
    assert state.loss["class_name"] == "CategoricalCrossentropy"
    assert state.loss["config"]["reduction"] == "sum_over_batch_size" and "fn" not in state.loss["config"]
    assert sorted(state.slots) == ["hidden.bias", "hidden.weight", "logits.bias", "logits.weight", "tokens.weight"]


def _continue_in_torch(lookups_one_by_one=False):
    graph, tensors, state = _open()
    expected = np.load(FIXTURES / "training_expected.npz")
    module = torch_adapter.model_from_tensors(graph, tensors)
    optimizer = training_state.torch_optimizer(module, state)
    if lookups_one_by_one:
        optimizers.torch_sparse_lookups(module)
    loss_fn = training_state.make_loss(state.loss)
    for first in range(0, len(expected["x"]), BATCH):
        x, y = expected["x"][first : first + BATCH], expected["y"][first : first + BATCH]
        optimizer.zero_grad(set_to_none=True)
        (inputs,) = torch_adapter.torch_inputs(graph, [x])
        loss = loss_fn(module(inputs), torch.from_numpy(y)) + optimizers.regularization_penalty(
            module, state.regularizers
        )
        loss.backward()
        optimizer.step()
    return graph, state, module, optimizer, expected


def test_keras3_lookup_rule_drifts_from_keras2():
    _, _, module, _, expected = _continue_in_torch(lookups_one_by_one=True)
    difference = module.tokens.weight.detach().numpy() - expected["weight/tokens/embeddings:0"]
    assert np.max(np.abs(difference)) > 1e-3


def test_torch_continues_as_keras2_did():
    """20 steps of Keras's Adam in torch from the state tf-keras saved: every weight and slot
    where tf-keras's own 20 steps took them. tf-keras sums a token's Embedding lookups before its
    update (Keras 3 squares them one by one): the state says so, and torch's Embedding keeps its
    dense gradient."""
    graph, state, module, optimizer, expected = _continue_in_torch()
    assert state.summed_lookups and not module.tokens.sparse
    assert optimizer.iterations == int(expected["optimizer/iteration:0"]) == 23
    variables = training_state.trainable_variables(graph, training_state.parameter_keys_of(graph))
    keras_values = [
        {
            "value": expected[f"weight/{node.name}/{name}:0"],
            "momentum": expected[f"optimizer/Adam/m/{node.name}/{name}:0"],
            "velocity": expected[f"optimizer/Adam/v/{node.name}/{name}:0"],
        }
        for node, name, _, _ in variables
    ]
    in_torch = training_state.slots_to_torch(graph, variables, ("value", "momentum", "velocity"), keras_values)
    parameters = dict(module.named_parameters())
    for key, values in in_torch.items():
        np.testing.assert_allclose(parameters[key].detach().numpy(), values["value"], rtol=0, atol=TOLERANCE)
        for slot in ("momentum", "velocity"):
            np.testing.assert_allclose(
                optimizer.state[parameters[key]][slot].numpy(), values[slot], rtol=0, atol=TOLERANCE, err_msg=key
            )


def test_convert_carries_keras2_state(tmp_path):
    from exchange import cli

    notes = []
    cli.convert(FIXTURE, tmp_path / "m.safetensors", notes=notes, optimizer_state=True)
    assert notes == []
    loaded = fileformat.load(tmp_path / "m.safetensors")
    assert "optimizer/tokens.weight/velocity" in loaded.training_tensors
    assert json.loads(loaded.metadata["optimizer"])["iteration"] == 3
    state = training_state.read_exchange_training(loaded, training_state.parameter_keys_of(loaded.architecture))
    assert state.summed_lookups  # carried: torch continues as tf-keras would


def _edited(tmp_path, edit) -> Path:
    path = tmp_path / "hostile.h5"
    shutil.copy(FIXTURE, path)
    with h5py.File(path, "r+") as h5:
        edit(h5)
    return path


def _optimizer_config(change):
    def edit(h5):
        training = json.loads(h5.attrs["training_config"])
        change(training["optimizer_config"])
        h5.attrs["training_config"] = json.dumps(training)

    return edit


def _rename_slot(h5):
    group = h5["optimizer_weights"]
    names = [name.decode() if isinstance(name, bytes) else name for name in group.attrs["weight_names"]]
    names[1] = "Adam/m/../../secret:0"
    group.attrs["weight_names"] = np.array(names, dtype=object)


def _wrong_shape(h5):
    del h5["optimizer_weights/Adam/m/hidden/kernel:0"]
    h5["optimizer_weights/Adam/m/hidden/kernel:0"] = np.zeros((4, 15), np.float32)


def _float_iteration(h5):
    del h5["optimizer_weights/iteration:0"]
    h5["optimizer_weights/iteration:0"] = np.float32(3.0)


def _soft_link(h5):
    del h5["optimizer_weights/Adam/v/logits/bias:0"]
    h5["optimizer_weights/Adam/v/logits/bias:0"] = h5py.SoftLink("/model_weights/logits/logits/bias:0")


def _not_json(h5):
    h5.attrs["training_config"] = "{" * 10_000


def _one_slot_missing(h5):
    group = h5["optimizer_weights"]
    group.attrs["weight_names"] = group.attrs["weight_names"][:-1]


@pytest.mark.parametrize(
    "edit, message",
    [
        (_rename_slot, "unexpected optimizer weight 'Adam/m/../../secret:0'"),
        (_wrong_shape, r"optimizer weight 'Adam/m/hidden/kernel:0' has shape \(4, 15\), hidden/kernel \(15, 4\)"),
        (_float_iteration, "optimizer_weights/iteration:0 is not the iteration count"),
        (_soft_link, "is a SoftLink .* links are refused"),
        (_not_json, "training_config"),
        (_one_slot_missing, "optimizer_weights holds 10 variables; the model's 5 trainable variables need"),
        (
            _optimizer_config(lambda optimizer: optimizer["config"].update(is_legacy_optimizer=True)),
            "optimizer 'Adam' is a legacy Keras 2 optimizer",
        ),
        (
            _optimizer_config(lambda optimizer: optimizer.update(class_name="Nadam")),
            "optimizer Nadam: Keras 2's Nadam does not save its u_product",
        ),
        (
            _optimizer_config(lambda optimizer: optimizer["config"].update(clipnorm=1.0)),
            "optimizer Adam clipnorm=1.0: gradient clipping is not reproduced",
        ),
        (
            _optimizer_config(lambda optimizer: optimizer["config"].update(adaptive_epsilon=True)),
            "optimizer Adam option 'adaptive_epsilon' is not supported",
        ),
        (
            _optimizer_config(lambda optimizer: optimizer["config"].update(beta_1=[0.8])),
            r"optimizer Adam beta_1 must be a number, found \[0.8\]",
        ),
    ],
    ids=[
        "renamed-slot",
        "slot-shape",
        "float-iteration",
        "soft-link",
        "not-json",
        "slot-missing",
        "legacy",
        "nadam",
        "clipnorm",
        "adaptive-epsilon",
        "not-a-number",
    ],
)
def test_hostile_keras2_training_state_is_refused_in_one_line(tmp_path, edit, message):
    path = _edited(tmp_path, edit)
    with keras_files.open_keras_file(path) as weights:
        graph = weights.architecture
    with pytest.raises(ExchangeError, match=message) as error:
        training_state.read_keras2_training(path, graph, training_state.parameter_keys_of(graph))
    assert "\n" not in str(error.value)


def test_a_weights_only_or_uncompiled_h5_has_no_state():
    with keras_files.open_keras_file(FIXTURES / "seed_mlp.h5") as weights:
        graph = weights.architecture
    assert (
        training_state.read_keras2_training(FIXTURES / "seed_mlp.h5", graph, training_state.parameter_keys_of(graph))
        is None
    )
