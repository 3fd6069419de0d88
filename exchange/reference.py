"""A numpy forward pass over file tensors: the model's outputs with no framework installed.

`convert --verify` uses it in place of a framework that is not installed, so a comparison still
runs (and says which).
"""

from __future__ import annotations

import numpy as np

from exchange.architecture import Architecture

def _softmax(x: np.ndarray) -> np.ndarray:
    exponentials = np.exp(x - x.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


NUMPY_ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "softmax": _softmax,
}


def forward(architecture: Architecture, file_tensors: dict[str, np.ndarray],
            inputs: np.ndarray) -> np.ndarray:
    """y = activation(x @ weight.T + bias), layer by layer, in float32 like both frameworks."""
    hidden = np.asarray(inputs, dtype=np.float32)
    for index, layer in enumerate(architecture.layers):
        hidden = hidden @ file_tensors[f"layers.{index}.weight"].T
        if layer.use_bias:
            hidden = hidden + file_tensors[f"layers.{index}.bias"]
        hidden = NUMPY_ACTIVATIONS[layer.activation](hidden).astype(np.float32)
    return hidden
