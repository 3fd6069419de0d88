"""A softmax or sigmoid output's cross-entropy, which Keras 3.15 (TensorFlow backend) takes from
the logits (`training_state.logits_activation`): the generated code's `loss_fn` takes
`model.pre_activation`, the fx module's user gets the same from `training_state.torch_loss`. A
confident model (large weights: probabilities below 1e-7) continues its Keras run in lockstep;
the clipped loss of the probabilities drifts away."""

import importlib.util

import numpy as np
import pytest
import torch
from generated_code import check_generated_file

from exchange import cli, codegen, keras_adapter, optimizers, torch_adapter, training_state
from exchange.errors import UnsupportedLayerError

keras = pytest.importorskip("keras")

# Measured over 6 steps after 3 in Keras (Adam, lr 0.002): softmax + categorical cross-entropy,
# losses 1.0e-7 apart (relative), weights 6.5e-8 (relative above 1; they reach 60); sigmoid +
# binary cross-entropy, 1.2e-7 and 8.3e-7; the fx module the same. Clipping the probabilities
# instead: losses 0.84 and 0.74 apart, weights 3.2e-3 and 4.4e-3.
TOLERANCE = 1e-5
KERAS_STEPS, STEPS = 3, 6


def _import(path):
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _confident_model(activation: str, loss: str):
    """Dense(tanh) -> Dense(activation) with weights ×20: many probabilities below 1e-7."""
    rng = np.random.default_rng(3)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(6, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(4, activation=activation, name="out")(hidden)
    model = keras.Model(inputs, outputs, name="confident")
    for variable in model.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32") * 20)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.002), loss=loss)
    return model


def _batches(count: int, seed: int, loss: str):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        x = rng.normal(size=(8, 5)).astype("float32")
        if loss == "binary_crossentropy":
            y = (rng.random((8, 4)) > 0.5).astype("float32")
        else:
            y = np.eye(4, dtype="float32")[rng.integers(0, 4, 8)]
        batches.append((x, y))
    return batches


def _lockstep(activation: str, loss: str, tmp_path) -> dict:
    """Keras trains KERAS_STEPS and saves; the generated code, the fx module (`torch_loss`) and the
    same code with the clipped loss go on beside Keras for STEPS."""
    model = _confident_model(activation, loss)
    for x, y in _batches(KERAS_STEPS, 0, loss):
        model.train_on_batch(x, y)
    keras_path, code_path = tmp_path / "confident.keras", tmp_path / "confident.py"
    keras_adapter.save_keras_file(model, keras_path)
    notes = []
    graph = cli.convert(keras_path, code_path, notes=notes)
    assert notes == []
    check_generated_file(code_path)
    generated = _import(code_path)
    weights = str(code_path.with_suffix(".safetensors"))
    modules, optimizers_ = [], []
    for _ in range(2):  # the generated loss, and the clipped loss of the probabilities
        module = generated.Confident()
        module.load_state_dict(generated.load(weights), strict=True)
        modules.append(module)
        optimizers_.append(generated.make_optimizer(module, weights))
    state = training_state.read_keras_training(keras_path, graph, training_state.parameter_keys_of(graph))
    fx_module = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
    fx_optimizer = training_state.torch_optimizer(fx_module, state)
    forward, fx_loss = training_state.torch_loss(fx_module, state)
    clipped = optimizers.LOSSES[loss]
    batches = _batches(STEPS, 1, loss)
    confident = bool((fx_module(torch.from_numpy(batches[0][0])) < 1e-7).any())
    differences = {"loss": [], "clipped_loss": [], "fx_loss": []}
    for x, y in batches:
        inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
        model.reset_metrics()
        keras_loss = float(np.asarray(model.train_on_batch(x, y)))
        scale = max(1.0, abs(keras_loss))
        generated_loss = float(generated.train_step(modules[0], optimizers_[0], inputs, targets))
        differences["loss"].append(abs(keras_loss - generated_loss) / scale)
        module, optimizer = modules[1], optimizers_[1]
        module.train()
        optimizer.zero_grad()
        naive = clipped(module(inputs), targets).mean()
        naive.backward()
        optimizer.step()
        differences["clipped_loss"].append(abs(keras_loss - float(naive.detach())) / scale)
        fx_optimizer.zero_grad()
        fx = fx_loss(forward(inputs), targets)
        fx.backward()
        fx_optimizer.step()
        differences["fx_loss"].append(abs(keras_loss - float(fx.detach())) / scale)
    keras_tensors = keras_adapter.get_tensors(model)

    def weight_difference(module):  # relative above 1 (the weights reach 60)
        return max(
            float(np.max(np.abs(value - module.state_dict()[key].numpy()) / np.maximum(1.0, np.abs(value))))
            for key, value in keras_tensors.items()
        )

    return {
        "confident": confident,
        "source": code_path.read_text(),
        "loss": max(differences["loss"]),
        "weights": weight_difference(modules[0]),
        "fx_loss": max(differences["fx_loss"]),
        "fx_weights": weight_difference(fx_module),
        "clipped_loss": max(differences["clipped_loss"]),
        "clipped_weights": weight_difference(modules[1]),
        "iterations": (int(model.optimizer.iterations.numpy()), optimizers_[0].iterations, fx_optimizer.iterations),
    }


@pytest.mark.parametrize(
    "activation, loss",
    [("softmax", "categorical_crossentropy"), ("sigmoid", "binary_crossentropy")],
    ids=["softmax", "sigmoid"],
)
def test_a_confident_model_continues_from_its_logits(activation, loss, tmp_path):
    result = _lockstep(activation, loss, tmp_path)
    assert result["confident"]  # some probabilities below Keras's clip, 1e-7
    assert f"return torch.{activation}(self.pre_activation(" in result["source"]
    assert "loss = loss_fn(model.pre_activation(x), y)" in result["source"]
    assert result["iterations"] == (KERAS_STEPS + STEPS,) * 3
    assert result["loss"] < TOLERANCE and result["weights"] < TOLERANCE
    assert result["fx_loss"] < TOLERANCE and result["fx_weights"] < TOLERANCE
    assert result["clipped_loss"] > 1e-2 and result["clipped_weights"] > 1e-3


def _graph(outputs_of, shape=(3,)):
    inputs = keras.Input(shape)
    return keras_adapter.architecture_of(keras.Model(inputs, outputs_of(inputs)))


LAYERS = keras.layers


@pytest.mark.parametrize(
    "outputs_of, loss, expected",
    [
        (lambda x: LAYERS.Dense(4, activation="softmax")(x), "categorical_crossentropy", "softmax"),
        (lambda x: LAYERS.Dense(4, activation="softmax")(x), "binary_crossentropy", "softmax"),
        (lambda x: LAYERS.Dense(4, activation="sigmoid")(x), "sparse_categorical_crossentropy", "sigmoid"),
        (lambda x: LAYERS.Dense(4, activation="sigmoid")(x), "mse", None),
        (lambda x: LAYERS.Activation("softmax")(LAYERS.Dense(4)(x)), "categorical_crossentropy", "softmax"),
        (lambda x: LAYERS.Softmax()(LAYERS.Dense(4)(x)), "categorical_crossentropy", "softmax"),
        (lambda x: keras.ops.sigmoid(LAYERS.Dense(4)(x)), "binary_crossentropy", "sigmoid"),
        (
            lambda x: LAYERS.Identity()(LAYERS.Dropout(0.0)(LAYERS.Dense(4, activation="sigmoid")(x))),
            "binary_crossentropy",
            "sigmoid",
        ),
        (
            lambda x: LAYERS.Activation("linear")(LAYERS.Dense(4, activation="softmax")(x)),
            "categorical_crossentropy",
            "softmax",
        ),
        (lambda x: LAYERS.Dropout(0.5)(LAYERS.Dense(4, activation="softmax")(x)), "categorical_crossentropy", None),
        (lambda x: LAYERS.Reshape((4,))(LAYERS.Dense(4, activation="softmax")(x)), "categorical_crossentropy", None),
        (lambda x: LAYERS.Dense(4, activation="softmax", dtype="float16")(x), "categorical_crossentropy", None),
        (lambda x: LAYERS.Dense(4, activation="relu")(x), "categorical_crossentropy", None),
    ],
    ids=[
        "dense-softmax",
        "softmax-binary",
        "sigmoid-sparse",
        "not-cross-entropy",
        "activation-layer",
        "softmax-layer",
        "ops-sigmoid",
        "through-identity-and-dropout-0",
        "through-linear-activation",
        "dropout-makes-a-new-tensor",
        "reshape-makes-a-new-tensor",
        "float16-is-cast",
        "relu",
    ],
)
def test_which_outputs_keras_takes_the_logits_of(outputs_of, loss, expected):
    """Each case checked against Keras 3.15: the loss it reports differs from the clipped loss of
    its predictions exactly where the logits are taken (measured with weights ×30)."""
    assert training_state.logits_activation(_graph(outputs_of), loss, "m.keras") == expected


def test_an_output_keras_takes_logits_of_that_torch_cannot_give_is_refused():
    """A SimpleRNN's sigmoid output: Keras takes the logits when the loop was unrolled, an option
    the architecture does not keep. A channels-first convolution's softmax: the torch module moves
    the channels after it."""
    graph = _graph(lambda x: LAYERS.SimpleRNN(3, activation="sigmoid", name="rnn")(x), (5, 2))
    with pytest.raises(
        UnsupportedLayerError,
        match="^m.keras: output layer 'rnn' SimpleRNN with a sigmoid activation: Keras takes its cross-entropy "
        "from the logits when the loop is unrolled, not otherwise; not reproduced$",
    ):
        training_state.logits_activation(graph, "binary_crossentropy", "m.keras")
    assert training_state.logits_activation(graph, "mse", "m.keras") is None
    conv = LAYERS.Conv1D(3, 2, data_format="channels_first", activation="sigmoid", name="conv")
    graph = _graph(conv, (2, 5))
    state = training_state.TrainingState(training_state.OptimizerSpec("SGD", {}), 0, {}, "binary_crossentropy")
    with pytest.raises(
        UnsupportedLayerError,
        match="^m.keras: Keras takes the loss from the logits of the output's sigmoid, which the torch module "
        "does not end with$",
    ):
        training_state.check_trainable_in_code(graph, state, "m.keras")


def test_the_kinds_say_where_the_logits_are():
    """The kinds' training hooks (`output_activation`, `passes_input_in_training`,
    `logits_not_reproduced`) on kinds the cases above leave out."""
    sigmoid = "binary_crossentropy"
    noise = _graph(lambda x: LAYERS.GaussianNoise(0.0)(LAYERS.Dense(4, activation="sigmoid")(x)))
    assert training_state.logits_activation(noise, sigmoid, "m.keras") == "sigmoid"
    noisy = _graph(lambda x: LAYERS.GaussianNoise(0.1)(LAYERS.Dense(4, activation="sigmoid")(x)))
    assert training_state.logits_activation(noisy, sigmoid, "m.keras") is None
    einsum = _graph(lambda x: LAYERS.EinsumDense("ab,bc->ac", 4, activation="sigmoid")(x))
    assert training_state.logits_activation(einsum, sigmoid, "m.keras") == "sigmoid"
    spatial = _graph(lambda x: LAYERS.SpatialDropout1D(0.0)(LAYERS.Conv1D(2, 2, activation="sigmoid")(x)), (5, 2))
    assert training_state.logits_activation(spatial, sigmoid, "m.keras") == "sigmoid"
    two_axes = _graph(lambda x: LAYERS.Softmax(axis=(1, 2))(x), (5, 2))
    assert training_state.logits_activation(two_axes, "categorical_crossentropy", "m.keras") is None
    lstm = _graph(lambda x: LAYERS.RNN(LAYERS.LSTMCell(3), name="rnn")(x), (5, 2))
    assert training_state.logits_activation(lstm, sigmoid, "m.keras") is None
    cell = _graph(lambda x: LAYERS.RNN(LAYERS.SimpleRNNCell(3, activation="sigmoid"), name="rnn")(x), (5, 2))
    with pytest.raises(UnsupportedLayerError, match="^m.keras: output layer 'rnn' SimpleRNN with a sigmoid activation"):
        training_state.logits_activation(cell, sigmoid, "m.keras")


def test_inference_code_and_other_losses_keep_forward_whole(tmp_path):
    """Without training state, or with a loss Keras takes from the output, no `pre_activation`."""
    model = _confident_model("softmax", "mse")
    graph = keras_adapter.architecture_of(model)
    assert "pre_activation" not in codegen.generate(graph, "m.safetensors", "m.keras")
    model.train_on_batch(*_batches(1, 0, "mse")[0])
    keras_adapter.save_keras_file(model, tmp_path / "m.keras")
    cli.convert(tmp_path / "m.keras", tmp_path / "m.py")
    source = (tmp_path / "m.py").read_text()
    assert "make_optimizer" in source and "pre_activation" not in source
