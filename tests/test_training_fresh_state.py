"""A `.keras` compiled but saved before its first training step stores only the optimizer's step
count (and learning rate): Keras, resuming, builds its optimizer afresh (step 0, zero slots,
Adagrad's accumulators at `initial_accumulator_value`). The exchange reads such a file as that
fresh state: the generated code gets its training functions and continues as Keras does, and
`--optimizer-state` carries it. Any other mismatch of counts stays refused."""

import importlib.util

import numpy as np
import pytest
import torch

from exchange import cli, fileformat, keras_adapter, training_state
from exchange.errors import UnsupportedLayerError

keras = pytest.importorskip("keras")


def _model(optimizer, frozen: bool = False):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(6, activation="tanh", name="hidden", trainable=not frozen)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(hidden), name="fresh")
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _batches(count):
    rng = np.random.default_rng(2)
    return [
        (rng.normal(size=(8, 5)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")) for _ in range(count)
    ]


def _read(path):
    graph = cli.load_architecture(path)
    return graph, training_state.read_keras_training(path, graph, training_state.parameter_keys_of(graph))


def test_a_never_trained_file_continues_as_keras_resumes_it(tmp_path):
    path = tmp_path / "fresh.keras"
    keras_adapter.save_keras_file(_model(keras.optimizers.Adagrad(0.05, initial_accumulator_value=0.3)), path)
    graph, state = _read(path)
    assert state.iteration == 0 and set(state.slots) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    assert all(np.all(slots["accumulator"] == np.float32(0.3)) for slots in state.slots.values())
    assert state.slots["hidden.weight"]["accumulator"].shape == (6, 5)  # torch's layout

    notes = []
    cli.convert(path, tmp_path / "fresh.py", notes=notes)
    assert notes == []
    spec = importlib.util.spec_from_file_location("generated_fresh", tmp_path / "fresh.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = generated.Fresh()
    module.load_state_dict(generated.load(str(tmp_path / "fresh.safetensors")), strict=True)
    optimizer = generated.make_optimizer(module, str(tmp_path / "fresh.safetensors"))
    assert optimizer.iterations == 0
    resumed = keras.saving.load_model(path)  # Keras: "Skipping variable loading for optimizer"
    for x, y in _batches(4):
        keras_loss = float(np.asarray(resumed.train_on_batch(x, y)))
        torch_loss = float(generated.train_step(module, optimizer, torch.from_numpy(x), torch.from_numpy(y)))
        assert abs(keras_loss - torch_loss) < 1e-6
    keras_tensors = keras_adapter.get_tensors(resumed)
    assert (
        max(float(np.max(np.abs(value - module.state_dict()[key].numpy()))) for key, value in keras_tensors.items())
        < 1e-6
    )
    assert int(resumed.optimizer.iterations.numpy()) == optimizer.iterations == 4

    cli.convert(path, tmp_path / "fresh.safetensors", notes=notes, optimizer_state=True)
    assert notes == []
    exchange_file = fileformat.load(tmp_path / "fresh.safetensors")
    carried = training_state.read_exchange_training(exchange_file, training_state.parameter_keys_of(graph))
    assert carried.iteration == 0 and carried.optimizer == state.optimizer
    assert {key: slots["accumulator"].tolist() for key, slots in carried.slots.items()} == {
        key: slots["accumulator"].tolist() for key, slots in state.slots.items()
    }


def test_a_trained_optimizer_without_slots_keeps_its_step_count(tmp_path):
    """SGD without momentum has no slots: its two variables are the whole state, step count included."""
    model = _model(keras.optimizers.SGD(0.1))
    for x, y in _batches(3):
        model.train_on_batch(x, y)
    keras_adapter.save_keras_file(model, tmp_path / "sgd.keras")
    _, state = _read(tmp_path / "sgd.keras")
    assert state.iteration == 3 and state.slots == {}


def test_a_never_trained_file_with_a_frozen_layer_is_refused(tmp_path):
    """Its stored count says nothing of which variables Keras trains; a trained one's count
    mismatch is refused too (tests/test_training_state.py::test_a_frozen_layer_is_refused)."""
    keras_adapter.save_keras_file(_model("adam", frozen=True), tmp_path / "frozen.keras")
    with pytest.raises(
        UnsupportedLayerError,
        match="frozen.keras: layer 'hidden' is frozen .trainable=false.: not supported for training state$",
    ):
        _read(tmp_path / "frozen.keras")
