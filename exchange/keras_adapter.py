"""Keras side of the exchange: live Keras models <-> graph and file tensors; graph -> Keras model.

A live model is described by the same parser as a Keras file (`exchange.keras_config`, fed with
`model.get_config()`), so a model and its saved `.keras` give the same graph. Every layout
difference lives in the layer kinds' ports (`exchange.kinds`); this module only reads and assigns
variables and builds a functional `keras.Model` from a graph.

Example:
    >>> from exchange import keras_adapter
    >>> keras_adapter.save_file(keras_model, "model.safetensors")
    >>> restored = keras_adapter.model_from_file("model.safetensors")
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import keras
import numpy as np

from exchange import fileformat, filekinds, weight_layout
from exchange.errors import ExchangeFileError, UnsupportedLayerError, first_line, framework_errors
from exchange.graph import Graph
from exchange.keras_config import MAX_KERAS_DEPTH, KerasLocation, ParsedModel, check_depth, parse_model_config
from exchange.kinds import kind_of

# Room for Keras's recursive graph walk (see `keras_config.MAX_KERAS_DEPTH`) whatever the caller's stack.
KERAS_RECURSION_LIMIT = 3 * MAX_KERAS_DEPTH + 1_000


@contextmanager
def recursion_room():
    """Python's recursion limit at least KERAS_RECURSION_LIMIT while Keras builds or loads a model."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, KERAS_RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def parse_model(model: keras.Model) -> ParsedModel:
    """The graph of a live Sequential or functional model, and where each layer lives in it."""
    if isinstance(model, keras.Sequential):
        class_name = "Sequential"
    elif (isinstance(model, keras.Model) and getattr(model, "_is_graph_network", False)) or type(
        model
    ).__name__ == "Functional":
        class_name = "Functional"
    else:
        raise UnsupportedLayerError(
            f"model {model.name!r} is a subclassed {type(model).__name__}; only "
            "Sequential and functional models have a config to convert"
        )
    # Through JSON, as a saved config.json is: tuples become lists, so both read the same.
    config = json.loads(json.dumps({"class_name": class_name, "config": model.get_config()}, default=_plain))
    return parse_model_config(config, f"Keras model {model.name!r}")


def _plain(value):
    """JSON for the numpy values a live config may hold."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"config value of type {type(value).__name__} is not JSON")


def architecture_of(model: keras.Model) -> Graph:
    return parse_model(model).graph


def _layers_by_name(container) -> dict:
    """`{name: layer}` of a model's layers, cached on the model: `get_layer` walks the list each
    time, which is quadratic over a model's layers."""
    cached = getattr(container, "_exchange_layers_by_name", None)
    if cached is None or len(cached) != len(container.layers):
        cached = {layer.name: layer for layer in container.layers}
        object.__setattr__(container, "_exchange_layers_by_name", cached)
    return cached


def _layer_at(model: keras.Model, location: KerasLocation):
    container = model
    for name in location.container_path:
        container = _layers_by_name(container)[name]
    return _layers_by_name(container)[location.layer_name]


def get_tensors(model: keras.Model) -> dict[str, np.ndarray]:
    """The model's weights as file tensors (torch layout)."""
    parsed = parse_model(model)
    stored = {}
    for node in parsed.graph.layers:
        if parsed.graph.keras_variables(node):  # operations (`x + 3.0`) are not layers and hold none
            keras_layer = _layer_at(model, parsed.locations[node.name])
            stored[node.name] = [(variable.name, np.asarray(variable.numpy())) for variable in keras_layer.weights]
    tensors = weight_layout.keras_to_file(parsed.graph, stored, f"Keras model {model.name!r}", parsed.class_names)
    return cast(dict[str, np.ndarray], tensors)  # arrays in memory in, arrays out: nothing is lazy


def set_tensors(model: keras.Model, file_tensors: dict[str, np.ndarray], graph: Graph | None = None) -> None:
    """Assign file tensors to the model's variables; every key and shape is checked first."""
    parsed = parse_model(model)
    if graph is not None:
        fileformat.check_same_architecture(graph, parsed.graph, f"Keras model {model.name!r}")
    fileformat.check_tensors(parsed.graph, file_tensors)
    per_node = weight_layout.file_to_keras(parsed.graph, file_tensors)
    for node in parsed.graph.layers:
        if not per_node[node.name]:
            continue
        keras_layer = _layer_at(model, parsed.locations[node.name])
        for variable, value in zip(keras_layer.weights, per_node[node.name]):
            if value is not None:
                variable.assign(value)
        finalize = getattr(keras_layer, "finalize_state", None)
        if callable(finalize):
            finalize()  # layers that derive state from their variables (Normalization)


def build_model(graph: Graph) -> keras.Model:
    """A functional Keras model computing the graph, every layer option explicit (random weights)."""
    graph.check_keras_names()
    check_depth(graph)
    with recursion_room():
        return _build_model(graph)


def _build_model(graph: Graph) -> keras.Model:
    values = {spec.name: keras.Input(shape=spec.shape, dtype=spec.dtype, name=spec.name) for spec in graph.inputs}
    inputs = [values[spec.name] for spec in graph.inputs]
    layers = {}  # a shared layer is one Keras layer, called at each of its nodes
    for node in graph.nodes:
        kind = kind_of(node.kind)
        context = graph.context(node)
        with framework_errors(node, "Keras"):
            if node.shares is None:
                layers[node.name] = kind.keras_layer(keras, context)
            values[node.name] = kind.keras_call(
                layers[node.shares or node.name], [values[name] for name in node.inputs], context
            )
    outputs = [values[name] for name in graph.outputs]
    return keras.Model(
        inputs=inputs[0] if len(inputs) == 1 else inputs,
        outputs=outputs[0] if len(outputs) == 1 else outputs,
        name=graph.name,
    )


def model_from_tensors(graph: Graph, file_tensors: dict) -> keras.Model:
    model = build_model(graph)
    set_tensors(model, fileformat.materialize(file_tensors))
    return model


def save_file(model: keras.Model, path: str | os.PathLike) -> None:
    fileformat.save(path, architecture_of(model), get_tensors(model), source_framework="keras")


def load_file(model: keras.Model, path: str | os.PathLike) -> None:
    """Load a common file into an existing model of the same architecture."""
    exchange_file = fileformat.load(path)
    set_tensors(model, exchange_file.tensors, graph=exchange_file.architecture)


def model_from_file(path: str | os.PathLike) -> keras.Model:
    """Build a Keras model from the file's architecture and load its weights."""
    exchange_file = fileformat.load(path)
    return model_from_tensors(exchange_file.architecture, exchange_file.tensors)


def predict(model: keras.Model, arrays: list[np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
    with recursion_room():
        outputs = model.predict(arrays[0] if len(arrays) == 1 else arrays, batch_size=batch_size, verbose=0)
    return [np.asarray(output) for output in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def intermediate_outputs(
    model: keras.Model, graph: Graph, arrays: list[np.ndarray], names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """The outputs (Keras layout) of the named nodes (default: every node) by layer name, for
    layer-by-layer checks; a node without an output of its own (an operation, a layer inside a
    nested model) is left out."""
    parsed = getattr(model, "_exchange_parsed", None)
    if parsed is None:
        parsed = parse_model(model)
        object.__setattr__(model, "_exchange_parsed", parsed)
    layers = _layers_by_name(model)
    outputs_by_name = {}
    for name in names if names is not None else [node.name for node in graph.nodes]:
        location = parsed.locations.get(name)
        if (
            location is not None
            and not location.container_path
            and name in layers
            and len(layers[name]._inbound_nodes) == 1
        ):  # a shared layer has no one output
            output = layers[name].output  # top-level layers only: a nested model's have no outer output
            if not isinstance(output, (list, tuple)):
                outputs_by_name[name] = output
    if not outputs_by_name:
        return {}
    wanted = list(outputs_by_name)
    with recursion_room():
        probe = keras.Model(model.inputs, [outputs_by_name[name] for name in wanted])
        outputs = probe.predict(arrays[0] if len(arrays) == 1 else arrays, batch_size=256, verbose=0)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return {name: np.asarray(output) for name, output in zip(wanted, outputs)}


def load_keras_file(
    path: str | os.PathLike, graph: Graph | None = None, kind: filekinds.FileKind | None = None
) -> keras.Model:
    """Open a `.keras` (or legacy Keras 2 `.h5`) file with Keras, in safe mode (no arbitrary
    code from the file). `graph`, the file's architecture when known, is checked first; `kind`,
    when the caller has decided it, is not decided again."""
    if graph is not None:
        check_depth(graph)
    kind = kind or filekinds.input_kind(Path(path))
    if kind not in (filekinds.KERAS, filekinds.HDF5):
        raise ExchangeFileError(f"{path}: not a Keras file but {kind.description}")
    try:
        with recursion_room(), named_for_keras(Path(path), kind) as keras_path:
            return keras.saving.load_model(os.fspath(keras_path), compile=False, safe_mode=True)
    except (ValueError, OSError, KeyError, TypeError) as err:
        message = first_line(err)
        raise ExchangeFileError(f"{path}: Keras could not load it ({message})") from None


@contextmanager
def named_for_keras(path: Path, kind: filekinds.FileKind):
    """`path`, or a link to it with the extension Keras's loader goes by (it picks its reader by
    name, the converter by content: a Keras 2 `model.hdf5`, a `.keras` saved as `model.bin`)."""
    if path.suffix in kind.suffixes:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="keras-load.") as folder:
        link = Path(folder) / f"model{kind.suffixes[0]}"
        link.symlink_to(path.resolve())
        yield link


def save_keras_file(model: keras.Model, path: str | os.PathLike) -> None:
    """Write a `.keras` file atomically."""
    with fileformat.atomic_output(path) as temporary, recursion_room():
        model.save(temporary)
