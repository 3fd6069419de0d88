"""The compiled loss of a model whose output has steps or pixels (rank >= 2): the torch module's
output is channels-first, so Keras's loss `axis` (the classes, last in Keras) is torch's dim 1.
`training_state.torch_loss` and generated code's `loss_fn` take it there alike."""

import numpy as np
import pytest
import torch

from exchange import keras_adapter, torch_adapter, training_state

keras = pytest.importorskip("keras")

# float32 sums of 5 classes over 2 x 3 positions: a few ulps of a loss near 1.
TOLERANCE = 1e-6
SGD = training_state.OptimizerSpec(
    "SGD", {"learning_rate": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": None}
)


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "sparse_categorical_crossentropy"])
def test_torch_loss_of_a_sequence_output_sums_over_its_classes(loss):
    """A per-step softmax (Keras (N, 3, 5), torch (N, 5, 3)): the loss is Keras's, not one over steps."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((3, 4))
    model = keras.Model(inputs, keras.layers.Dense(5, activation="softmax", name="out")(inputs), name="tagger")
    for variable in model.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    graph = keras_adapter.architecture_of(model)
    module = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    labels = rng.integers(0, 5, (2, 3))
    if loss == "categorical_crossentropy":
        y = np.eye(5, dtype="float32")[labels]
        y_torch = torch.from_numpy(y).permute(0, 2, 1)  # the layout of the torch output
    else:
        y = labels.astype("float32")
        y_torch = torch.from_numpy(y)
    keras_loss = float(np.mean(keras.losses.get(loss)(y, model(x))))
    forward, loss_fn = training_state.torch_loss(module, training_state.TrainingState(SGD, 0, {}, loss))
    torch_loss = float(loss_fn(forward(torch.from_numpy(x).permute(0, 2, 1)), y_torch))
    assert torch_loss == pytest.approx(keras_loss, abs=TOLERANCE)
