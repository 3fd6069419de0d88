"""Real Keras models for the tests, with seeded, non-trivial weights, and the comparisons they share.

Keras initialises biases to zero and BatchNorm statistics to (0, 1); such defaults hide layout
bugs (a transposed bias or a swapped mean/variance computes the same thing). `randomize` gives
every bias, BatchNorm parameter and statistic and Normalization mean/variance a seeded value.
"""

from __future__ import annotations

import keras
import numpy as np

from exchange import keras_adapter, torch_adapter
from exchange.graph import Graph
from exchange.ports import TorchOnly

TOKEN_IDS = 7   # integer inputs (token ids) are drawn in [0, 7): every test vocabulary is larger

# Variables drawn in [0.5, 1.5): scales and variances must stay positive.
POSITIVE_VARIABLES = ("gamma", "moving_variance", "variance")
# ConvNeXt's LayerScale adds its gamma unnamed: Keras calls it `variable`, `variable_1`, …
UNNAMED_VARIABLE = "variable"
# Variables Keras starts at zero (or a default) that get a seeded normal value.
OFFSET_VARIABLES = ("beta", "moving_mean", "bias", "mean")


def randomize(model: keras.Model, seed: int, offset_scale: float = 0.2,
              positive_range: tuple[float, float] = (0.5, 1.5)) -> keras.Model:
    """Seeded non-trivial biases and statistics; kernels keep Keras's (seeded) initialisation.
    Very deep models take a lower `positive_range`, or their activations grow without bound."""
    generator = np.random.default_rng(seed)
    for variable in model.weights:
        name, shape = variable.name, tuple(variable.shape)
        if name in POSITIVE_VARIABLES or name.split("_")[0] == UNNAMED_VARIABLE:
            variable.assign(generator.uniform(*positive_range, shape).astype(variable.dtype))
        elif name in OFFSET_VARIABLES:
            variable.assign(generator.normal(0.0, offset_scale, shape).astype(variable.dtype))
    for layer in _all_layers(model):
        if callable(getattr(layer, "finalize_state", None)):
            layer.finalize_state()   # Normalization recomputes what it uses from its variables
    return model


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def random_torch_state(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    """A state_dict as a torch user would have it after training: every tensor random, except
    those Keras cannot hold (a BatchNorm bias with center=False stays 0)."""
    generator = np.random.default_rng(seed)
    constants = {f"{graph.torch_names[node.name]}.{port.torch}": port
                 for node in graph.nodes for port in graph.ports(node) if isinstance(port, TorchOnly)}
    state = {}
    for key, (shape, dtype) in graph.tensor_specs.items():
        if key in constants:
            state[key] = np.full(shape, constants[key].fill, dtype=dtype)
        elif key.endswith(("running_var", ".variance")) or (key.endswith(".weight") and len(shape) == 1):
            state[key] = generator.uniform(0.5, 1.5, shape).astype(dtype)
        else:
            state[key] = (generator.standard_normal(shape) * 0.3).astype(dtype)
    return state


def batch(graph_or_model, rows: int = 6, seed: int = 0) -> list[np.ndarray]:
    """A fixed random batch for each input (Keras layout)."""
    specs = ([(spec.shape, spec.dtype) for spec in graph_or_model.inputs] if isinstance(graph_or_model, Graph)
             else [(tuple(tensor.shape[1:]), str(tensor.dtype)) for tensor in graph_or_model.inputs])
    generator = np.random.default_rng(seed)
    return [generator.integers(0, TOKEN_IDS, (rows,) + tuple(shape)).astype(dtype) if "int" in dtype
            else generator.standard_normal((rows,) + tuple(shape)).astype(np.float32) for shape, dtype in specs]


def max_difference(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.shape == b.shape, (a.shape, b.shape)
    return max(float(np.max(np.abs(a - b))) for a, b in zip(first, second))


def keras_vs_torch(keras_model: keras.Model, graph: Graph, tensors: dict, inputs: list) -> float:
    """Max abs difference between Keras's outputs and the torch module's built from the tensors."""
    torch_model = torch_adapter.model_from_tensors(graph, tensors)
    return max_difference(keras_adapter.predict(keras_model, inputs), torch_adapter.predict(torch_model, inputs))
