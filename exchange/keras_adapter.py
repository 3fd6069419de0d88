"""Keras side of the exchange: Keras model <-> common file.

Keras keeps a Dense kernel as (in, out); the file keeps PyTorch's (out, in). That difference, and
every other, lives in `exchange.layout.LAYOUT_RULES`; this module only reads and assigns variables.

Example:
    >>> from exchange import keras_adapter
    >>> keras_adapter.save_file(keras_model, "mlp.safetensors")
    >>> restored = keras_adapter.model_from_file("mlp.safetensors")
"""

from __future__ import annotations

import os
import zipfile

import keras
import numpy as np

from exchange import fileformat, layout
from exchange.architecture import ACTIVATIONS, Architecture, DenseLayer
from exchange.errors import ExchangeFileError, UnsupportedLayerError, first_line

# Layers that carry no weights and do nothing at inference in a single chain.
PASS_THROUGH = ("InputLayer",)


def architecture_of(model: keras.Model) -> Architecture:
    """Describe a Keras model made of Dense layers; any other layer is an error naming it."""
    layers = []
    for keras_layer in _weighted_layers(model):
        activation = keras.activations.serialize(keras_layer.activation)
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise UnsupportedLayerError(f"unsupported activation {activation!r} in layer "
                                        f"{keras_layer.name!r}; supported: {', '.join(ACTIVATIONS)}")
        layers.append(DenseLayer(int(keras_layer.units), activation, bool(keras_layer.use_bias)))
    input_shape = model.input_shape
    if not isinstance(input_shape, tuple) or len(input_shape) != 2 or input_shape[1] is None:
        raise UnsupportedLayerError(f"model input shape {input_shape} is not a flat (batch, features)")
    return Architecture(int(input_shape[1]), tuple(layers))


def get_tensors(model: keras.Model) -> dict[str, np.ndarray]:
    """The model's weights as file tensors (PyTorch layout)."""
    architecture = architecture_of(model)
    keras_variables = [{variable.name: np.asarray(variable.numpy()) for variable in layer.weights}
                       for layer in _weighted_layers(model)]
    return layout.keras_to_file(architecture, keras_variables)


def set_tensors(model: keras.Model, file_tensors: dict[str, np.ndarray]) -> None:
    """Assign file tensors to the model's variables; every shape is checked before any is set."""
    architecture = architecture_of(model)
    fileformat.check_tensors(architecture, file_tensors)
    per_layer = layout.file_to_keras(architecture, file_tensors)
    for keras_layer, keras_variables in zip(_weighted_layers(model), per_layer):
        for variable in keras_layer.weights:
            variable.assign(keras_variables[variable.name])


def save_file(model: keras.Model, path: str | os.PathLike) -> None:
    fileformat.save(path, architecture_of(model), get_tensors(model), source_framework="keras")


def load_file(model: keras.Model, path: str | os.PathLike) -> None:
    """Load a common file into an existing model of the same architecture."""
    exchange_file = fileformat.load(path)
    fileformat.check_same_architecture(exchange_file.architecture, architecture_of(model), path)
    set_tensors(model, exchange_file.tensors)


def model_from_file(path: str | os.PathLike) -> keras.Model:
    """Build a Keras model from the file's architecture and load its weights."""
    from frameworks.keras_mlp import build_keras_model

    exchange_file = fileformat.load(path)
    model = build_keras_model(exchange_file.architecture)
    set_tensors(model, exchange_file.tensors)
    return model


def load_keras_file(path: str | os.PathLike) -> keras.Model:
    """Open a `.keras` (or legacy Keras 2 `.h5`) file with Keras, in safe mode (no arbitrary
    code from the file)."""
    if not os.path.isfile(path):
        raise ExchangeFileError(f"{path}: no such file")
    if not os.fspath(path).endswith(".h5") and not zipfile.is_zipfile(path):
        raise ExchangeFileError(f"{path}: not a .keras file (a .keras file is a zip archive)")
    try:
        return keras.saving.load_model(os.fspath(path), compile=False, safe_mode=True)
    except (ValueError, OSError, KeyError, TypeError) as err:
        message = first_line(err)
        raise ExchangeFileError(f"{path}: Keras could not load it ({message})") from None


def save_keras_file(model: keras.Model, path: str | os.PathLike) -> None:
    """Write a `.keras` file atomically."""
    with fileformat.atomic_output(path) as temporary:
        model.save(temporary)


def _weighted_layers(model: keras.Model) -> list:
    weighted = []
    for keras_layer in model.layers:
        kind = type(keras_layer).__name__
        if kind in PASS_THROUGH:
            continue
        if not isinstance(keras_layer, keras.layers.Dense):
            raise UnsupportedLayerError(f"unsupported layer {keras_layer.name!r} ({kind})")
        weighted.append(keras_layer)
    return weighted

