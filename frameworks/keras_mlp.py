"""The seed MLP in Keras: the exchange's Keras model of the seed graph, and the seed's training."""

from __future__ import annotations

import keras
import numpy as np

from exchange import keras_adapter
from exchange.graph import Graph
from frameworks.recipe import Recipe


def build_keras_model(architecture: Graph) -> keras.Model:
    """The functional model of the graph (layers `dense_0`, `dense_1`, … for the seed), whose
    `predict` returns the last layer's activations (probabilities for the seed)."""
    return keras_adapter.build_model(architecture)


def compile_with_recipe(model: keras.Model, recipe: Recipe, jit_compile: bool = False) -> None:
    """The seed's optimizer and loss in Keras 3 terms.

    Keras 3 has no `decay` argument; `InverseTimeDecay(lr, decay_steps=1, decay_rate=decay)` is
    exactly old Keras's lr / (1 + decay * t), with t the optimizer's update count. XLA is off so
    that the computation is the plain TensorFlow kernels (and comparable run to run).
    """
    schedule = keras.optimizers.schedules.InverseTimeDecay(recipe.learning_rate, decay_steps=1, decay_rate=recipe.decay)
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=recipe.momentum, nesterov=False)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"], jit_compile=jit_compile)


def train_keras_epoch(
    model: keras.Model,
    x_train,
    y_train,
    x_val,
    y_val,
    batch_size: int,
    order: np.ndarray | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """One epoch of `fit`. With `order`, batches follow that permutation (Keras's own shuffling
    off); without it Keras shuffles, as `fit(shuffle=True)` does."""
    if order is not None:
        x_train, y_train = x_train[order], y_train[order]
    elif seed is not None:
        keras.utils.set_random_seed(seed)
    history = model.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=1,
        shuffle=order is None,
        validation_data=(x_val, y_val),
        verbose=0,
    )
    return {name: float(values[-1]) for name, values in history.history.items()}


def predict(model: keras.Model, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
