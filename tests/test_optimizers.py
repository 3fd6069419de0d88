"""Keras's optimizers and schedules in PyTorch (`exchange.optimizers`): the same steps as Keras."""

import numpy as np
import pytest
import torch

from exchange import optimizers, training_state
from exchange.errors import UnsupportedLayerError

keras = pytest.importorskip("keras")

STEPS = 12
# float32 rounding between TensorFlow and PyTorch after a dozen steps, measured at ~1e-8.
STEP_TOLERANCE = 1e-6

SCHEDULES = {
    "ExponentialDecay": {"initial_learning_rate": 0.05, "decay_steps": 3, "decay_rate": 0.7, "staircase": False},
    "ExponentialDecay-staircase": {
        "initial_learning_rate": 0.05,
        "decay_steps": 3,
        "decay_rate": 0.7,
        "staircase": True,
    },
    "InverseTimeDecay": {"initial_learning_rate": 0.05, "decay_steps": 2, "decay_rate": 0.5, "staircase": False},
    "PiecewiseConstantDecay": {"boundaries": [2, 5], "values": [0.05, 0.02, 0.01]},
    "PolynomialDecay": {
        "initial_learning_rate": 0.05,
        "decay_steps": 7,
        "end_learning_rate": 0.001,
        "power": 1.5,
        "cycle": False,
    },
    "PolynomialDecay-cycle": {
        "initial_learning_rate": 0.05,
        "decay_steps": 5,
        "end_learning_rate": 0.001,
        "power": 2.0,
        "cycle": True,
    },
    "CosineDecay": {
        "initial_learning_rate": 0.05,
        "decay_steps": 8,
        "alpha": 0.1,
        "warmup_target": None,
        "warmup_steps": 0,
    },
    "CosineDecay-warmup": {
        "initial_learning_rate": 0.0,
        "decay_steps": 6,
        "alpha": 0.0,
        "warmup_target": 0.05,
        "warmup_steps": 4,
    },
}

OPTIMIZERS = {
    "Adam": {"learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-3},
    "AdamW": {"learning_rate": 0.01, "weight_decay": 0.1, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
    "SGD": {"learning_rate": 0.05, "momentum": 0.0, "nesterov": False},
    "SGD-momentum": {"learning_rate": 0.05, "momentum": 0.9, "nesterov": False},
    "SGD-nesterov": {"learning_rate": 0.05, "momentum": 0.7, "nesterov": True, "weight_decay": 0.01},
    "RMSprop": {"learning_rate": 0.01, "rho": 0.8, "momentum": 0.0, "epsilon": 1e-3, "centered": False},
    "RMSprop-centered-momentum": {
        "learning_rate": 0.01,
        "rho": 0.9,
        "momentum": 0.5,
        "epsilon": 1e-7,
        "centered": True,
    },
    "Adagrad": {"learning_rate": 0.1, "initial_accumulator_value": 0.3, "epsilon": 1e-7},
    "Adamax": {"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.9, "epsilon": 1e-7},
    "Nadam": {"learning_rate": 0.01, "beta_1": 0.85, "beta_2": 0.99, "epsilon": 1e-4},
}


def _gradients(seed, steps=STEPS):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 5)).astype(np.float32) for _ in range(steps)]


def _run_both(class_name, config, seed=0, steps=STEPS):
    """`steps` updates of one (3, 5) variable with the same gradients in Keras and in torch."""
    start = np.random.default_rng(seed + 100).normal(size=(3, 5)).astype(np.float32)
    keras_variable = keras.Variable(start)
    keras_config = {key: value for key, value in config.items()}
    if isinstance(keras_config["learning_rate"], dict):
        keras_config["learning_rate"] = keras.optimizers.schedules.deserialize(keras_config["learning_rate"])
    keras_optimizer = getattr(keras.optimizers, class_name)(**keras_config)
    parameter = torch.nn.Parameter(torch.from_numpy(start.copy()))
    torch_optimizer = optimizers.make_optimizer([parameter], class_name, config)
    for gradient in _gradients(seed, steps):
        keras_optimizer.apply_gradients([(keras.ops.convert_to_tensor(gradient), keras_variable)])
        parameter.grad = torch.from_numpy(gradient.copy())
        torch_optimizer.step()
    return keras_variable.numpy(), parameter.detach().numpy(), keras_optimizer, torch_optimizer, parameter


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_takes_keras_steps(name):
    class_name = name.split("-")[0]
    keras_value, torch_value, keras_optimizer, torch_optimizer, parameter = _run_both(class_name, OPTIMIZERS[name])
    np.testing.assert_allclose(torch_value, keras_value, rtol=0, atol=STEP_TOLERANCE)
    _check_slots_and_scalars(keras_optimizer, torch_optimizer, parameter, STEPS)


def _check_slots_and_scalars(keras_optimizer, torch_optimizer, parameter, steps, relative=0, absolute=STEP_TOLERANCE):
    """The slots, then the optimizer's own scalars, named and ordered as Keras's optimizer variables."""
    slots = torch_optimizer.slots()
    head = 2 if isinstance(torch_optimizer.learning_rate, float) else 1  # iterations, learning rate
    keras_slots = [variable.numpy() for variable in keras_optimizer.variables[head:]]
    assert len(keras_slots) == len(slots) + len(torch_optimizer.scalars)
    for slot, keras_slot in zip(slots, keras_slots):
        np.testing.assert_allclose(
            torch_optimizer.state[parameter][slot].numpy(), keras_slot, rtol=relative, atol=absolute
        )
    for value, keras_value in zip(torch_optimizer.scalars.values(), keras_slots[len(slots) :]):
        assert float(value) == pytest.approx(float(keras_value), rel=STEP_TOLERANCE)
    assert torch_optimizer.iterations == int(keras_optimizer.iterations.numpy()) == steps


VOCABULARY, WIDTH = 6, 2


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_takes_keras_steps_on_embedding_lookups(name):
    """An embedding's gradient, one row per lookup (a token twice or thrice in a batch, others
    not at all): Keras on TensorFlow gets it as `tf.IndexedSlices`, torch as a sparse gradient
    (`torch_sparse_lookups`); every slot takes the same steps. Summing a token's rows first (a
    dense torch gradient) gives a different velocity / accumulator / norm to all but SGD."""
    import tensorflow as tf

    class_name = name.split("-")[0]
    config = OPTIMIZERS[name]
    start = np.random.default_rng(5).normal(size=(VOCABULARY, WIDTH)).astype(np.float32)
    keras_variable = keras.Variable(start)
    keras_optimizer = getattr(keras.optimizers, class_name)(**config)
    parameter = torch.nn.Parameter(torch.from_numpy(start.copy()))
    torch_optimizer = optimizers.make_optimizer([parameter], class_name, config)
    rng = np.random.default_rng(6)
    for step in range(STEPS):
        rows = np.array([1, 1, 2, 1, 4] if step % 2 == 0 else [2, 3, 3], np.int64)
        values = rng.normal(size=(len(rows), WIDTH)).astype(np.float32)
        lookups = tf.IndexedSlices(tf.constant(values), tf.constant(rows), tf.constant([VOCABULARY, WIDTH], tf.int64))
        keras_optimizer.apply_gradients([(lookups, keras_variable)])
        parameter.grad = torch.sparse_coo_tensor(
            torch.from_numpy(rows)[None], torch.from_numpy(values), (VOCABULARY, WIDTH), check_invariants=True
        )
        torch_optimizer.step()
    np.testing.assert_allclose(parameter.detach().numpy(), keras_variable.numpy(), rtol=0, atol=STEP_TOLERANCE)
    _check_slots_and_scalars(keras_optimizer, torch_optimizer, parameter, STEPS, relative=STEP_TOLERANCE)


def test_embedding_gradients_are_lookups():
    """`torch_sparse_lookups`: one gradient row per lookup, not yet summed per token."""
    model = optimizers.torch_sparse_lookups(torch.nn.Sequential(torch.nn.Embedding(VOCABULARY, WIDTH)))
    model(torch.tensor([[1, 1, 2], [1, 4, 4]])).sum().backward()
    gradient = model[0].weight.grad
    assert gradient.is_sparse and gradient._indices().tolist() == [[1, 1, 2, 1, 4, 4]]
    squares = optimizers.per_lookup(torch.square, model[0].weight, gradient.to_dense())
    assert squares[1].tolist() == [3.0, 3.0] and squares[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_gives_keras_rates(name):
    class_name = name.split("-")[0]
    description = {"class_name": class_name, "config": SCHEDULES[name]}
    keras_schedule = keras.optimizers.schedules.deserialize(description)
    torch_schedule = optimizers.make_schedule(description)
    for step in range(14):
        assert float(torch_schedule(step)) == pytest.approx(float(keras_schedule(step)), rel=1e-6, abs=1e-9), step


def test_sgd_momentum_under_a_schedule():
    config = {
        "learning_rate": {"class_name": "ExponentialDecay", "config": SCHEDULES["ExponentialDecay"]},
        "momentum": 0.9,
        "nesterov": False,
    }
    keras_value, torch_value, *_ = _run_both("SGD", config)
    np.testing.assert_allclose(torch_value, keras_value, rtol=0, atol=STEP_TOLERANCE)


def test_adam_under_a_schedule():
    config = {
        "learning_rate": {"class_name": "CosineDecay", "config": SCHEDULES["CosineDecay-warmup"]},
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-7,
    }
    keras_value, torch_value, *_ = _run_both("Adam", config)
    np.testing.assert_allclose(torch_value, keras_value, rtol=0, atol=STEP_TOLERANCE)


def _naive_run(start, make, steps_gradients, schedule=None):
    parameter = torch.nn.Parameter(torch.from_numpy(start.copy()))
    optimizer = make([parameter])
    for step, gradient in enumerate(steps_gradients):
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = float(schedule(step))
        parameter.grad = torch.from_numpy(gradient.copy())
        optimizer.step()
    return parameter.detach().numpy()


def test_torch_adam_with_keras_epsilon_drifts():
    """torch's Adam given Keras's epsilon adds it after the bias correction: with a large epsilon
    (or small gradients) the steps differ by far more than rounding."""
    config = {"learning_rate": 0.05, "beta_1": 0.8, "beta_2": 0.95, "epsilon": 0.1}
    keras_value, _, *_ = _run_both("Adam", config)
    start = np.random.default_rng(100).normal(size=(3, 5)).astype(np.float32)
    naive = _naive_run(
        start, lambda params: torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.95), eps=0.1), _gradients(0)
    )
    assert np.max(np.abs(naive - keras_value)) > 1e-3


NADAM_STEPS = 40


def test_nadam_takes_keras_steps_for_dozens_of_steps():
    """Keras's Nadam under a schedule, with weight decay: 40 steps, weights, slots and
    `u_product` (1.5e-7 by then) within 1e-6 relative."""
    config = {
        "learning_rate": {"class_name": "ExponentialDecay", "config": SCHEDULES["ExponentialDecay"]},
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-7,
        "weight_decay": 0.01,
    }
    keras_value, torch_value, keras_optimizer, torch_optimizer, parameter = _run_both(
        "Nadam", config, steps=NADAM_STEPS
    )
    np.testing.assert_allclose(torch_value, keras_value, rtol=STEP_TOLERANCE)
    _check_slots_and_scalars(keras_optimizer, torch_optimizer, parameter, NADAM_STEPS, STEP_TOLERANCE, 0)


def test_torch_nadam_drifts():
    """torch's NAdam with Keras's hyperparameters (its momentum schedule 0.96^(0.004 t), not
    Keras's 0.96^t) moves the variable elsewhere; with `momentum_decay=1` it follows Keras."""
    config = OPTIMIZERS["Nadam"]
    keras_value, _, *_ = _run_both("Nadam", config, steps=NADAM_STEPS)
    start = np.random.default_rng(100).normal(size=(3, 5)).astype(np.float32)

    def torch_nadam(momentum_decay):
        return lambda params: torch.optim.NAdam(
            params, lr=0.01, betas=(0.85, 0.99), eps=1e-4, momentum_decay=momentum_decay
        )

    naive = _naive_run(start, torch_nadam(4e-3), _gradients(0, NADAM_STEPS))
    assert np.max(np.abs(naive - keras_value)) > 1e-3
    following = _naive_run(start, torch_nadam(1.0), _gradients(0, NADAM_STEPS))
    np.testing.assert_allclose(following, keras_value, rtol=1e-5)


def test_torch_rmsprop_drifts():
    config = OPTIMIZERS["RMSprop"]
    keras_value, _, *_ = _run_both("RMSprop", config)
    start = np.random.default_rng(100).normal(size=(3, 5)).astype(np.float32)
    naive = _naive_run(start, lambda params: torch.optim.RMSprop(params, lr=0.01, alpha=0.8, eps=1e-3), _gradients(0))
    assert np.max(np.abs(naive - keras_value)) > 1e-3


def test_torch_sgd_momentum_under_a_schedule_drifts():
    schedule = {"class_name": "ExponentialDecay", "config": SCHEDULES["ExponentialDecay"]}
    keras_value, _, *_ = _run_both("SGD", {"learning_rate": schedule, "momentum": 0.9, "nesterov": False})
    start = np.random.default_rng(100).normal(size=(3, 5)).astype(np.float32)
    naive = _naive_run(
        start,
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        _gradients(0),
        schedule=optimizers.make_schedule(schedule),
    )
    assert np.max(np.abs(naive - keras_value)) > 1e-3


def test_module_imports_only_torch():
    """Its source can be copied into generated code, which imports torch alone."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(optimizers))
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "torch"}


@pytest.mark.parametrize(
    "description, kind",
    [
        ("categorical_crossentropy", "probabilities"),
        (
            {
                "class_name": "CategoricalCrossentropy",
                "config": {"from_logits": True, "label_smoothing": 0.1, "reduction": "sum_over_batch_size", "axis": -1},
            },
            "logits",
        ),
        ({"class_name": "SparseCategoricalCrossentropy", "config": {"from_logits": True}}, "sparse-logits"),
        ("sparse_categorical_crossentropy", "sparse-probabilities"),
        ({"class_name": "BinaryCrossentropy", "config": {"label_smoothing": 0.2}}, "binary"),
        ({"class_name": "BinaryCrossentropy", "config": {"from_logits": True}}, "binary-logits"),
        ("mse", "values"),
        ("mae", "values"),
    ],
)
def test_loss_is_keras_loss(description, kind):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
    if kind in ("probabilities", "sparse-probabilities"):
        y_pred = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        y_pred[0, 0] = 0.0  # a clipped probability
    elif kind == "binary":
        y_pred = 1 / (1 + np.exp(-logits))
    else:
        y_pred = logits
    if kind.startswith("sparse"):
        y_true = rng.integers(0, 4, size=6).astype(np.float32)
    elif kind.startswith("binary"):
        y_true = rng.integers(0, 2, size=(6, 4)).astype(np.float32)
    else:
        y_true = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=6)]
    keras_loss = float(np.mean(keras.losses.get(description)(y_true, keras.ops.convert_to_tensor(y_pred))))
    torch_loss = float(training_state.make_loss(description)(torch.from_numpy(y_pred), torch.from_numpy(y_true)))
    assert torch_loss == pytest.approx(keras_loss, rel=1e-6)


def test_unreproduced_loss_is_refused():
    with pytest.raises(UnsupportedLayerError, match="loss 'huber' is not supported for training"):
        training_state.make_loss("huber")
    with pytest.raises(UnsupportedLayerError, match=r"reduction='sum' is not supported \(only 'sum_over_batch_size'"):
        training_state.make_loss({"class_name": "MeanSquaredError", "config": {"reduction": "sum"}})
