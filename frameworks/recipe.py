"""The seed notebook's model and training recipe, written down once for both frameworks.

Nothing here imports a framework: the Keras and PyTorch trainers read these values, and the seed's
starting weights are drawn with numpy exactly as old Keras did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from exchange import weight_layout
from exchange.graph import Graph, dense_chain

# The seed's table: 784 -> 50 tanh -> 50 tanh -> 10 softmax; 39,250 + 2,550 + 510 = 42,310.
# Layers dense_0, dense_1, dense_2 fed by an input named "input".
SEED_ARCHITECTURE = dense_chain("mlp", 784, [(50, "tanh"), (50, "tanh"), (10, "softmax")])


# The seed's per-layer names in its printed report.
def layer_role(index: int, count: int) -> str:
    if index == 0:
        return "Input"
    if index == count - 1:
        return "Output"
    return "Hidden" if count == 3 else f"Hidden {index}"


@dataclass(frozen=True)
class Recipe:
    """SGD(lr=0.001, momentum=0.9, decay=1e-7, nesterov=False), categorical cross-entropy,
    50 epochs of batch 300, the last 10% of the training set held out for validation."""

    learning_rate: float = 0.001
    momentum: float = 0.9
    decay: float = 1e-7  # old Keras: lr_t = lr / (1 + decay * t), t = updates so far
    epochs: int = 50
    batch_size: int = 300
    validation_split: float = 0.1
    init_seed: int = 0  # np.random.seed(0) before drawing the initial weights
    init_stddev: float = 0.05  # old Keras init='normal': N(0, 0.05)
    shuffle_seed: int = 0  # seeds the per-epoch batch order

    def to_dict(self) -> dict:
        return asdict(self)

    def learning_rate_at(self, updates_so_far: int) -> np.float32:
        """The decayed learning rate, in float32 as Keras computes it."""
        one, decay = np.float32(1.0), np.float32(self.decay)
        return np.float32(self.learning_rate) / (one + decay * np.float32(updates_so_far))


def seed_initial_tensors(architecture: Graph, recipe: Recipe = Recipe()) -> dict[str, np.ndarray]:
    """The seed's starting weights as file tensors (PyTorch layout).

    Old Keras `init='normal'` drew each kernel from numpy's global RNG in Keras layout (in, out),
    row-major, layer after layer, after `np.random.seed(0)`; biases started at zero. The draw is
    reproduced in that order, then converted by the Dense kind's ports like any Keras weights.
    """
    np.random.seed(recipe.init_seed)
    stored = {}
    for node in architecture.nodes:
        variables = []
        for name, shape in architecture.keras_variables(node):
            if name == "kernel":
                variables.append((name, np.random.normal(0.0, recipe.init_stddev, size=shape).astype(np.float32)))
            else:
                variables.append((name, np.zeros(shape, dtype=np.float32)))
        stored[node.name] = variables
    return weight_layout.keras_to_file(architecture, stored)


def validation_split(x: np.ndarray, y: np.ndarray, fraction: float):
    """Hold out the last `fraction` of the samples before any shuffling, as Keras's
    `validation_split` does. Returns (x_train, y_train, x_val, y_val)."""
    split_at = int(len(x) * (1.0 - fraction))
    return x[:split_at], y[:split_at], x[split_at:], y[split_at:]


def epoch_orders(sample_count: int, epochs: int, seed: int) -> list[np.ndarray]:
    """One permutation of the training samples per epoch, shared by both frameworks."""
    generator = np.random.default_rng(seed)
    return [generator.permutation(sample_count) for _ in range(epochs)]
