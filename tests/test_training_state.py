"""Training state through the exchange (`exchange.training_state`): a Keras run's optimizer slots,
step count, loss and regularizers to an exchange file and a torch optimizer, and back to a
`.keras` that Keras resumes from."""

import json

import numpy as np
import pytest
import safetensors.numpy
import torch

from exchange import fileformat, keras_adapter, keras_files, torch_adapter, training_state
from exchange.errors import ExchangeError

keras = pytest.importorskip("keras")

# Keras continuing from its own file and from the round trip take the same float32 steps.
RESUME_TOLERANCE = 1e-6


def _batches(count, seed=0, shape=(6, 5, 2), classes=4, batch=8):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(batch, *shape)).astype(np.float32),
            np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch)],
        )
        for _ in range(count)
    ]


def _cnn(optimizer, seed=3):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 5, 2))
    x = keras.layers.Conv2D(3, 3, kernel_regularizer=keras.regularizers.L2(1e-2), name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(4, bias_regularizer=keras.regularizers.L1L2(1e-3, 1e-3), name="head")(x)
    model = keras.Model(inputs, outputs, name="cnn")
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CNN trained 3 steps with Adam under a schedule, saved as .keras."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 4, 0.8)
    model = _cnn(keras.optimizers.Adam(schedule, beta_1=0.8, epsilon=1e-4))
    for x, y in _batches(3):
        model.train_on_batch(x, y)
    path = tmp_path_factory.mktemp("state") / "cnn.keras"
    model.save(path)
    with keras_files.open_keras_file(path) as weights:
        graph, tensors = weights.architecture, fileformat.materialize(weights.tensors)
    state = training_state.read_keras_training(path, graph, training_state.parameter_keys_of(graph))
    return model, path, graph, tensors, state


def test_keras_file_slots_go_through_their_variables_ports(trained):
    """Each slot is in its parameter's torch layout: set the Keras variables to the slot's values
    and the exchange's own weight conversion gives the same torch tensors."""
    model, _, graph, _, state = trained
    assert state.iteration == 3 and state.optimizer.class_name == "Adam"
    assert state.optimizer.options["learning_rate"]["class_name"] == "ExponentialDecay"
    assert state.regularizers == {"conv.weight": {"l2": 0.01}, "head.bias": {"l1": 0.001, "l2": 0.001}}
    assert state.loss["class_name"] == "CategoricalCrossentropy"
    optimizer = model.optimizer
    lists = {"momentum": optimizer._momentums, "velocity": optimizer._velocities}  # Keras's own, by variable
    for slot in ("momentum", "velocity"):
        copy = keras.models.clone_model(model)
        for original, variable in zip(model.trainable_variables, copy.trainable_variables):
            variable.assign(lists[slot][optimizer._get_variable_index(original)])
        expected = keras_adapter.get_tensors(copy)
        assert sorted(state.slots) == sorted(
            ["conv.weight", "conv.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"]
        )
        for key, slots in state.slots.items():
            np.testing.assert_array_equal(slots[slot], expected[key])
    # The Dense after Flatten reorders its kernel's rows: its moments are reordered with them.
    head_kernel = model.get_layer("head").kernel
    assert not np.array_equal(
        state.slots["head.weight"]["momentum"], lists["momentum"][optimizer._get_variable_index(head_kernel)].numpy().T
    )


def test_exchange_file_carries_the_state_beside_the_model(trained, tmp_path):
    _, _, graph, tensors, state = trained
    path = tmp_path / "cnn.safetensors"
    fileformat.save(path, graph, tensors, "keras", training=state.file_parts())
    loaded = fileformat.load(path)
    assert sorted(loaded.tensors) == sorted(tensors)
    assert "optimizer/head.weight/momentum" in loaded.training_tensors
    fileformat.check_header(path, graph)
    module = torch_adapter.model_from_file(path)  # the model loads as before
    raw = safetensors.numpy.load_file(str(path))
    module.load_state_dict(
        {key: torch.from_numpy(value) for key, value in raw.items() if not key.startswith(fileformat.TRAINING_PREFIX)},
        strict=True,
    )
    again = training_state.read_exchange_training(loaded, training_state.parameter_keys_of(graph))
    assert again.optimizer == state.optimizer and again.iteration == state.iteration
    assert again.loss == state.loss and again.regularizers == state.regularizers
    for key, slots in state.slots.items():
        for slot, value in slots.items():
            np.testing.assert_array_equal(again.slots[key][slot], value)
    metadata = json.loads(fileformat.read_metadata(path)["optimizer"])
    assert metadata["iteration"] == 3


def test_torch_state_back_to_keras_resumes_as_keras(trained, tmp_path):
    """The state written back into a `.keras` (through the torch optimizer's state dict) makes
    Keras continue exactly as the original model continues."""
    model, _, graph, tensors, state = trained
    module = torch_adapter.model_from_tensors(graph, tensors)
    optimizer = training_state.torch_optimizer(module, state)
    back = training_state.state_of_torch_optimizer(module, optimizer, state)
    resumed = training_state.keras_model_with_training(graph, torch_adapter.get_tensors(module), back)
    path = tmp_path / "resumed.keras"
    keras_adapter.save_keras_file(resumed, path)
    reloaded = keras.saving.load_model(path, compile=True, safe_mode=True)
    assert int(reloaded.optimizer.iterations.numpy()) == 3
    for x, y in _batches(4, seed=9):
        model.train_on_batch(x, y)
        reloaded.train_on_batch(x, y)
    for original, restored in zip(model.weights, reloaded.weights):
        np.testing.assert_allclose(restored.numpy(), original.numpy(), rtol=0, atol=RESUME_TOLERANCE)
    for original, restored in zip(model.optimizer.variables, reloaded.optimizer.variables):
        np.testing.assert_allclose(restored.numpy(), original.numpy(), rtol=0, atol=RESUME_TOLERANCE)


def test_nadam_state_goes_through_both_ways(tmp_path):
    """Nadam's `u_product` (a scalar variable after the slots) is carried exactly through the
    exchange file; torch continues 10 steps as Keras does, and the `.keras` written from torch's
    state loads into Keras as Keras's own run's state (whose update rule then continues it)."""
    from exchange import optimizers

    keras.utils.set_random_seed(4)
    inputs = keras.Input((6, 5, 2))
    x = keras.layers.Conv2D(3, 3, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-2), name="conv")(
        inputs
    )
    outputs = keras.layers.Dense(4, name="head")(keras.layers.Flatten(name="flat")(x))
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Nadam(0.01, beta_1=0.85, epsilon=1e-4),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    for x, y in _batches(3):
        model.train_on_batch(x, y)
    path = tmp_path / "nadam.keras"
    model.save(path)
    with keras_files.open_keras_file(path) as weights:
        graph, tensors = weights.architecture, fileformat.materialize(weights.tensors)
    keys = training_state.parameter_keys_of(graph)
    state = training_state.read_keras_training(path, graph, keys)
    assert state.scalars == {"u_product": float(model.optimizer.variables[-1].numpy())}
    exchange_path = tmp_path / "nadam.safetensors"
    fileformat.save(exchange_path, graph, tensors, "keras", training=state.file_parts())
    state = training_state.read_exchange_training(fileformat.load(exchange_path), keys)
    assert state.scalars == {"u_product": float(model.optimizer.variables[-1].numpy())}

    module = torch_adapter.model_from_tensors(graph, tensors)
    optimizer = training_state.torch_optimizer(module, state)
    loss_fn = training_state.make_loss(state.loss)
    for x, y in _batches(10, seed=5):
        model.train_on_batch(x, y)
        optimizer.zero_grad()
        (inputs,) = torch_adapter.torch_inputs(graph, [x])
        loss = loss_fn(module(inputs), torch.from_numpy(y)) + optimizers.regularization_penalty(
            module, state.regularizers
        )
        loss.backward()
        optimizer.step()
    torch_tensors = {key: value.detach().numpy() for key, value in module.state_dict().items()}
    for key, value in keras_adapter.get_tensors(model).items():
        np.testing.assert_allclose(torch_tensors[key], value, rtol=0, atol=RESUME_TOLERANCE, err_msg=key)
    assert float(optimizer.scalars["u_product"]) == pytest.approx(float(model.optimizer.variables[-1]), rel=1e-6)

    back = training_state.state_of_torch_optimizer(module, optimizer, state)
    resumed = training_state.keras_model_with_training(graph, torch_adapter.get_tensors(module), back)
    keras_adapter.save_keras_file(resumed, tmp_path / "back.keras")
    reloaded = keras.saving.load_model(tmp_path / "back.keras", compile=True, safe_mode=True)
    assert float(reloaded.optimizer.variables[-1].numpy()) == back.scalars["u_product"]
    # Keras loaded the torch run's state: that of Keras's own run, step count, slots and u_product.
    for original, restored in zip(model.optimizer.variables, reloaded.optimizer.variables, strict=True):
        np.testing.assert_allclose(restored.numpy(), original.numpy(), rtol=1e-6, atol=RESUME_TOLERANCE)


def _saved(tmp_path, model):
    """Saved with the optimizer built (its variables stored), without the cost of a training step."""
    model.optimizer.build(model.trainable_variables)
    path = tmp_path / "m.keras"
    model.save(path)
    return path


def _read(path):
    with keras_files.open_keras_file(path) as weights:
        graph = weights.architecture
    return training_state.read_keras_training(path, graph, training_state.parameter_keys_of(graph))


@pytest.mark.parametrize(
    "optimizer, message",
    [
        (
            lambda: keras.optimizers.Adam(clipnorm=1.0),
            "optimizer Adam clipnorm=1.0: gradient clipping is not reproduced",
        ),
        (lambda: keras.optimizers.Adam(amsgrad=True), "optimizer Adam amsgrad=True: AMSGrad is not reproduced"),
        (lambda: keras.optimizers.SGD(use_ema=True), "optimizer SGD use_ema=True: an exponential moving average"),
        (lambda: keras.optimizers.Lion(), "optimizer 'Lion' is not supported for training state"),
    ],
    ids=["clipnorm", "amsgrad", "ema", "lion"],
)
def test_unreproduced_optimizers_are_refused_in_one_line(tmp_path, optimizer, message):
    path = _saved(tmp_path, _cnn(optimizer()))
    with pytest.raises(ExchangeError, match=message) as error:
        _read(path)
    assert "\n" not in str(error.value)


def test_a_frozen_layer_is_refused(tmp_path):
    model = _cnn(keras.optimizers.SGD(momentum=0.9))
    model.get_layer("conv").trainable = False
    model.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss="mse")
    path = _saved(tmp_path, model)
    with pytest.raises(
        ExchangeError, match="optimizer SGD stores 6 variables; the model's 6 trainable variables need 8 .frozen layers"
    ):
        _read(path)


def test_an_lstm_trains_its_first_bias_only(tmp_path):
    """Keras's one LSTM bias is torch's bias_ih + bias_hh: bias_ih carries the slots and trains,
    bias_hh (zeros) stays out of the optimizer, so the sum moves as Keras's bias."""
    inputs = keras.Input((5, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.LSTM(4, name="lstm")(inputs)))
    model.compile(optimizer="rmsprop", loss="mse")
    state = _read(_saved(tmp_path, model))
    assert sorted(key for key in state.slots if key.startswith("lstm")) == [
        "lstm.bias_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l0",
    ]
    with keras_files.open_keras_file(tmp_path / "m.keras") as weights:
        graph, tensors = weights.architecture, fileformat.materialize(weights.tensors)
    module = torch_adapter.model_from_tensors(graph, tensors)
    optimizer = training_state.torch_optimizer(module, state)
    trained = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    assert id(dict(module.named_parameters())["lstm.bias_hh_l0"]) not in trained


def test_an_uncompiled_file_has_no_state(tmp_path):
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "m.keras")
    assert _read(tmp_path / "m.keras") is None


def test_convert_carries_the_state_both_ways(trained, tmp_path):
    """`convert model.keras model.safetensors` keeps the optimizer state; converting that back to
    `.keras` gives a file Keras resumes from as from the original."""
    from exchange import cli

    model, path, _, _, state = trained
    exchange_path, keras_path = tmp_path / "cnn.safetensors", tmp_path / "back.keras"
    notes = []
    cli.convert(path, exchange_path, notes=notes, optimizer_state=True)
    cli.convert(exchange_path, keras_path, notes=notes)
    assert notes == []
    assert "optimizer/conv.weight/velocity" in fileformat.load(exchange_path).training_tensors
    original = keras.saving.load_model(path, compile=True, safe_mode=True)
    back = keras.saving.load_model(keras_path, compile=True, safe_mode=True)
    assert int(back.optimizer.iterations.numpy()) == state.iteration
    assert back.get_layer("conv").kernel_regularizer.get_config()["l2"] == pytest.approx(0.01)
    for original_variable, variable in zip(original.optimizer.variables, back.optimizer.variables):
        np.testing.assert_array_equal(variable.numpy(), original_variable.numpy())
    cli.convert(path, tmp_path / "weights.safetensors", notes=notes)  # by default exactly the state_dict
    assert fileformat.load(tmp_path / "weights.safetensors").training_tensors == {}
    assert notes == [
        "optimizer state left out: pass --optimizer-state to carry it into the .safetensors (which "
        "then holds optimizer/... keys beside the state_dict's)"
    ]
    cli.convert(path, tmp_path / "code.py")  # generated code: its load() leaves the slots out
    assert "optimizer/conv.weight/velocity" in fileformat.load(tmp_path / "code.safetensors").training_tensors
    assert "def make_optimizer(model, path='code.safetensors'):" in (tmp_path / "code.py").read_text()


def test_convert_leaves_out_a_state_it_cannot_carry_with_a_note(tmp_path):
    from exchange import cli

    path = _saved(tmp_path, _cnn(keras.optimizers.Adam(clipvalue=0.5)))
    notes = []
    cli.convert(path, tmp_path / "m.safetensors", notes=notes, optimizer_state=True)
    assert notes == [
        f"optimizer state left out: {path}: optimizer Adam clipvalue=0.5: gradient clipping is not reproduced in torch"
    ]
    assert fileformat.load(tmp_path / "m.safetensors").training_tensors == {}


def _exchange_with(tmp_path, optimizer_json, slot_tensors, training_json=None):
    """A small exchange file with a hand-written (possibly hostile) training part."""
    from exchange.graph import dense_chain

    graph = dense_chain("tiny", 3, [(2, "linear")])
    tensors = {"dense_0.weight": np.ones((2, 3), np.float32), "dense_0.bias": np.zeros(2, np.float32)}
    metadata = {
        "optimizer": json.dumps(optimizer_json),
        "training": json.dumps(training_json or {"loss": "mse", "regularizers": {}}),
    }
    path = tmp_path / "tiny.safetensors"
    fileformat.save(path, graph, tensors, "torch", training=(metadata, slot_tensors))
    loaded = fileformat.load(path)
    return training_state.read_exchange_training(loaded, training_state.parameter_keys_of(graph))


SGD = {"class_name": "SGD", "config": {"learning_rate": 0.1, "momentum": 0.9, "nesterov": False}, "iteration": 4}
SLOTS = {
    "optimizer/dense_0.weight/momentum": np.ones((2, 3), np.float32),
    "optimizer/dense_0.bias/momentum": np.ones(2, np.float32),
}

NADAM = {
    "class_name": "Nadam",
    "config": {"learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
    "iteration": 4,
}
NADAM_SLOTS = {
    f"optimizer/dense_0.{name}/{slot}": np.ones(shape, np.float32)
    for name, shape in (("weight", (2, 3)), ("bias", (2,)))
    for slot in ("momentum", "velocity")
}


def test_exchange_file_state_is_read_back(tmp_path):
    state = _exchange_with(tmp_path, SGD, SLOTS)
    assert state.iteration == 4 and state.optimizer.options["momentum"] == 0.9
    assert sorted(state.slots) == ["dense_0.bias", "dense_0.weight"]


@pytest.mark.parametrize(
    "optimizer_json, slots, training_json, message",
    [
        (
            {**SGD, "config": {**SGD["config"], "momentum": "lots"}},
            SLOTS,
            None,
            "optimizer SGD momentum must be a number, found lots",
        ),
        ({**SGD, "config": {**SGD["config"], "exec": 1}}, SLOTS, None, "optimizer SGD option 'exec' is not supported"),
        ({**SGD, "iteration": -1}, SLOTS, None, "optimizer iteration must be a step count"),
        ({**SGD, "scalars": {"u_product": 0.5}}, SLOTS, None, r"optimizer SGD scalars must be exactly \[\]"),
        ({**SGD, "lookups": ["x"]}, SLOTS, None, "optimizer lookups must be 'summed' if given, found"),
        (NADAM, NADAM_SLOTS, None, r"optimizer Nadam scalars must be exactly \['u_product'\], found \{\}"),
        (
            {**NADAM, "scalars": {"u_product": "1"}},
            NADAM_SLOTS,
            None,
            "optimizer Nadam u_product must be a number, found 1",
        ),
        (
            SGD,
            {**SLOTS, "optimizer/dense_0.weight/momentum": np.ones((3, 2), np.float32)},
            None,
            r"optimizer tensor optimizer/dense_0.weight/momentum has shape \(3, 2\), its parameter \(2, 3\)",
        ),
        (
            SGD,
            {**SLOTS, "optimizer/dense_0.weight/velocity": np.ones((2, 3), np.float32)},
            None,
            "unexpected optimizer tensor 'optimizer/dense_0.weight/velocity'",
        ),
        (SGD, {"optimizer/dense_0.weight/momentum": np.ones((2, 3), np.float32)}, None, "optimizer slots are missing"),
        (
            SGD,
            SLOTS,
            {"loss": "mse", "regularizers": {"dense_0.weight": {"l3": 1.0}}},
            "unexpected regularizer for 'dense_0.weight'",
        ),
    ],
    ids=[
        "bad-number",
        "unknown-option",
        "negative-iteration",
        "scalar-not-sgds",
        "bad-lookups",
        "nadam-without-u-product",
        "u-product-not-a-number",
        "slot-shape",
        "unknown-slot",
        "missing-slot",
        "bad-regularizer",
    ],
)
def test_hostile_exchange_training_state_is_refused_in_one_line(
    tmp_path, optimizer_json, slots, training_json, message
):
    with pytest.raises(ExchangeError, match=message) as error:
        _exchange_with(tmp_path, optimizer_json, slots, training_json)
    assert "\n" not in str(error.value)


def test_outputs_without_training_state_say_so(trained, tmp_path):
    from exchange import cli

    _, path, _, _, _ = trained
    notes = []
    cli.convert(path, tmp_path / "m.pt", notes=notes)
    assert notes == ["optimizer state left out: a .pt output does not carry it (convert to .safetensors)"]


def test_an_activity_regularizer_is_refused(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activity_regularizer="l2", name="d")(inputs))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ExchangeError, match="layer 'd' activity_regularizer is not supported for training"):
        _read(_saved(tmp_path, model))


def test_a_reversible_embedding_under_adam_is_refused(tmp_path):
    """Its torch module gathers with a dense gradient; Keras's Adam squares each lookup's row."""
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.ReversibleEmbedding(7, 3, name="tokens")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(
        ExchangeError,
        match="layer 'tokens' .reversible_embedding, LoRA or reversible. is not supported for training with Adam",
    ):
        _read(_saved(tmp_path, model))


def test_parameter_keys_without_torch_are_torchs():
    """`parameter_keys_of` tells parameters from buffers by the ports (`buffer=True`), without
    torch: the same keys as torch's module on every case of test_layer_kinds, the recurrent kinds
    and a SpectralNormalization (its `vector_u` a buffer)."""
    import test_layer_kinds

    inputs = keras.Input((5, 3))
    x = keras.layers.LSTM(4, return_sequences=True)(inputs)
    x = keras.layers.GRU(4, return_sequences=True)(x)
    x = keras.layers.Bidirectional(keras.layers.SimpleRNN(3))(x)
    y = keras.layers.Conv1DTranspose(2, 3)(keras.layers.SimpleRNN(3, return_sequences=True)(inputs))
    z = keras.layers.SpectralNormalization(keras.layers.Dense(2))(inputs)
    models = [keras.Model(inputs, [x, y, z])] + [make() for make in test_layer_kinds.CASES.values()]
    covered = set()
    for model in models:
        graph = keras_adapter.architecture_of(model)
        torchs = {name for name, _ in torch_adapter.build_module(graph).named_parameters()}
        assert training_state.parameter_keys_of(graph) == torchs
        covered |= {node.kind for node in graph.layers}
    assert {"batch_norm", "normalization", "spectral_normalization", "lstm", "bidirectional"} <= covered
