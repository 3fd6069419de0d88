"""Real Keras models for the tests, with seeded, non-trivial weights, and the comparisons they share
(`check_both_directions`: the Keras -> torch and torch -> Keras check every kind test makes).

Keras initialises biases to zero and BatchNorm statistics to (0, 1); such defaults hide layout
bugs (a transposed bias or a swapped mean/variance computes the same thing). `randomize` gives
every bias, BatchNorm parameter and statistic and Normalization mean/variance a seeded value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from exchange import keras_adapter, torch_adapter
from exchange.graph import Graph
from exchange.ports import Summed, TorchOnly

TOKEN_IDS = 7  # integer inputs (token ids) are drawn in [0, 7): every test vocabulary is larger

# Variables drawn in [0.5, 1.5): scales and variances must stay positive.
POSITIVE_VARIABLES = ("gamma", "moving_variance", "variance")
# ConvNeXt's LayerScale adds its gamma unnamed: Keras calls it `variable`, `variable_1`, …
UNNAMED_VARIABLE = "variable"
# Variables Keras starts at zero (or a default) that get a seeded normal value.
OFFSET_VARIABLES = ("beta", "moving_mean", "bias", "mean")


def randomize(
    model: keras.Model, seed: int, offset_scale: float = 0.2, positive_range: tuple[float, float] = (0.5, 1.5)
) -> keras.Model:
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
            layer.finalize_state()  # Normalization recomputes what it uses from its variables
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
    constants = {
        f"{graph.torch_names[node.name]}.{port.torch}": port
        for node in graph.nodes
        for port in graph.ports(node)
        if isinstance(port, TorchOnly)
    }
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
    specs = (
        [(spec.shape, spec.dtype) for spec in graph_or_model.inputs]
        if isinstance(graph_or_model, Graph)
        else [(tuple(tensor.shape[1:]), str(tensor.dtype)) for tensor in graph_or_model.inputs]
    )
    generator = np.random.default_rng(seed)
    return [
        generator.integers(0, TOKEN_IDS, (rows,) + tuple(shape)).astype(dtype)
        if "int" in dtype
        else generator.standard_normal((rows,) + tuple(shape)).astype(np.float32)
        for shape, dtype in specs
    ]


def max_difference(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.shape == b.shape, (a.shape, b.shape)
    return max(float(np.max(np.abs(a - b))) for a, b in zip(first, second))


def keras_vs_torch(keras_model: keras.Model, graph: Graph, tensors: dict, inputs: list) -> float:
    """Max abs difference between Keras's outputs and the torch module's built from the tensors."""
    torch_model = torch_adapter.model_from_tensors(graph, tensors)
    return max_difference(keras_adapter.predict(keras_model, inputs), torch_adapter.predict(torch_model, inputs))


def seed_all(model: keras.Model, seed: int) -> keras.Model:
    """Every variable random (LoRA's B starts at zero in Keras, which would hide its layout)."""
    generator = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign((generator.standard_normal(tuple(variable.shape)) * 0.3).astype(variable.dtype))
    return model


def config_with(layer, shape, **changes) -> dict:
    """A Sequential model's config around `layer` with some of its options changed, as a file
    written by hand (or by another Keras version) may hold them."""
    model = keras.Sequential([keras.Input(shape, dtype="float32"), layer])
    config = json.loads(json.dumps({"class_name": "Sequential", "config": model.get_config()}))
    config["config"]["layers"][-1]["config"].update(changes)
    return config


def padded_batch(model, rows=7, seed=0):
    """Random inputs in each input's dtype (float32 values: Keras's predict rounds float64 inputs
    to float32); token ids get trailing padding (0) of every length and zeros inside."""
    arrays = [
        array.astype(str(tensor.dtype)) for array, tensor in zip(batch(model, rows=rows, seed=seed), model.inputs)
    ]
    for array in arrays:
        if array.dtype.kind == "i":
            for row in range(rows):
                array[row, array.shape[1] - row % (array.shape[1] - 1) :] = 0
    return arrays


def lossy_keys(graph: Graph) -> set:
    """State keys of `Summed` ports (a recurrent layer's two biases, one bias in Keras)."""
    return {
        f"{graph.torch_names[node.name]}.{key}"
        for node in graph.nodes
        for port in graph.ports(node)
        if isinstance(port, Summed)
        for key in port.torch
    }


def same_tensors(graph: Graph, torch_state: dict, back: dict) -> None:
    """The weights read back from the Keras model equal the torch state bit for bit."""
    for key, tensor in torch_state.items():
        np.testing.assert_array_equal(back[key], tensor, err_msg=key)


def same_tensors_but_summed(graph: Graph, torch_state: dict, back: dict) -> None:
    """As `same_tensors`, leaving out the tensors of `Summed` ports (Keras holds their sum)."""
    lossy = lossy_keys(graph)
    for key, tensor in torch_state.items():
        if key not in lossy:
            np.testing.assert_array_equal(back[key], tensor, err_msg=key)


@dataclass
class BothDirections:
    """What `check_both_directions` measured, for the checks a test adds."""

    graph: Graph
    inputs: list
    to_torch: float  # Keras's outputs vs the torch module's from the Keras weights
    to_keras: float  # the torch module's outputs (random state) vs the Keras model rebuilt from them
    keras_outputs: list  # of the Keras model given
    torch_outputs: list  # of the torch module built from its weights
    torch_state: dict
    rebuilt: keras.Model


def _scale(outputs) -> float:
    return max(1.0, max(float(np.max(np.abs(output))) for output in outputs))


def check_both_directions(
    keras_model: keras.Model,
    inputs: list | None = None,
    *,
    tolerance: float | None = 1e-5,
    relative_to: str | None = None,
    graph: Graph | None = None,
    must_vary: float | None = 1e-3,
    seed: int = 4,
    same_weights: Callable[[Graph, dict, dict], None] = same_tensors,
) -> BothDirections:
    """Keras -> torch: the live model's tensors into the torch module, outputs compared. torch ->
    Keras: a random state_dict (`random_torch_state(graph, seed)`) into the torch module and into the
    Keras model rebuilt from the graph, outputs compared, and the Keras weights read back equal the
    state (`same_weights`). Differences are absolute, or with `relative_to` divided by the outputs'
    largest magnitude where that is above 1: "source" the outputs of the side the weights came from
    (Keras, then torch), "keras" Keras's outputs in both directions. `tolerance=None` asserts no
    bound (the caller does); `must_vary` is the least peak-to-peak range some output must show."""
    graph = keras_adapter.architecture_of(keras_model) if graph is None else graph
    inputs = batch(keras_model) if inputs is None else inputs

    def difference(keras_side, torch_side, source):
        scale = {None: 1.0, "source": _scale(source), "keras": _scale(keras_side)}[relative_to]
        return max_difference(keras_side, torch_side) / scale

    keras_outputs = keras_adapter.predict(keras_model, inputs)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(keras_model))
    forward_outputs = torch_adapter.predict(torch_model, inputs)
    to_torch = difference(keras_outputs, forward_outputs, keras_outputs)
    assert tolerance is None or to_torch <= tolerance, ("Keras -> torch", to_torch)

    torch_state = random_torch_state(graph, seed=seed)
    torch_outputs = torch_adapter.predict(torch_adapter.model_from_tensors(graph, torch_state), inputs)
    rebuilt = keras_adapter.model_from_tensors(graph, torch_state)
    to_keras = difference(keras_adapter.predict(rebuilt, inputs), torch_outputs, torch_outputs)
    print(f"Keras -> torch {to_torch:.2e}, torch -> Keras {to_keras:.2e}")
    assert tolerance is None or to_keras <= tolerance, ("torch -> Keras", to_keras)
    if must_vary is not None:
        assert max(float(np.ptp(np.asarray(output, dtype=np.float64))) for output in torch_outputs) > must_vary, (
            "outputs must vary"
        )
    back = keras_adapter.get_tensors(rebuilt)
    assert sorted(back) == sorted(torch_state)
    same_weights(graph, torch_state, back)
    return BothDirections(graph, inputs, to_torch, to_keras, keras_outputs, forward_outputs, torch_state, rebuilt)
