"""Read Keras weight files directly: zipfile, json, h5py and numpy, no TensorFlow, Keras or torch.

Four kinds of file, each read to (architecture, tensors in file layout):

    .keras             Keras 3: a zip of config.json + model.weights.h5 (layers/<group>/vars/0, 1)
    .weights.h5        Keras 3 weights only; the architecture comes from a .keras or config.json
    .h5 (full model)   Keras 2: the config as JSON in the `model_config` attribute, weights under
                       model_weights/<layer>/…/kernel:0 as listed in each layer's `weight_names`
    .h5 (weights only) Keras 2: the same groups at the top level; architecture given alongside

Models must be a Sequential or a functional model forming a single chain, of Dense layers with
InputLayer, Dropout, Activation and Flatten (of an already flat input) passing through; anything
else is an error that names the layer. Tensors come back as `LazyTensor`s: every shape is checked
before any data is read, and a large model is read one tensor at a time.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from exchange import fileformat, layout
from exchange.architecture import ACTIVATIONS, Architecture, DenseLayer
from exchange.errors import ExchangeFileError, TensorMismatchError, UnsupportedLayerError
from exchange.tensors import LazyTensor

KERAS_WEIGHTS_MEMBER = "model.weights.h5"
KERAS_CONFIG_MEMBER = "config.json"
# Layers that compute nothing at inference in a chain of Dense layers.
PASS_THROUGH = ("InputLayer", "Dropout", "Flatten", "Activation")
SEQUENTIAL_CLASSES = ("Sequential",)
FUNCTIONAL_CLASSES = ("Functional", "Model")


@dataclass(frozen=True)
class KerasLayerConfig:
    class_name: str
    name: str
    config: dict


@dataclass(frozen=True)
class KerasModelDescription:
    """What a model config says: the architecture, and the Dense layers' names in order."""

    architecture: Architecture
    dense_names: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Model config -> architecture


def describe_model_config(model_config: dict, source: str) -> KerasModelDescription:
    """A Keras 2 or Keras 3 model config (as in config.json or `model_config`) -> architecture."""
    try:
        return _describe_model_config(model_config, source)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        raise ExchangeFileError(f"{source}: malformed Keras model config ({type(err).__name__}: {err})") from None


def _describe_model_config(model_config: dict, source: str) -> KerasModelDescription:
    layers, input_shape = _chain_of_layers(model_config, source)
    dense_layers: list[DenseLayer] = []
    dense_names: list[str] = []
    for layer in layers:
        config = layer.config
        if input_shape is None:
            input_shape = _declared_input_shape(config)
        if layer.class_name == "Dense":
            dense_layers.append(DenseLayer(int(config["units"]), _activation(layer, source),
                                           bool(config.get("use_bias", True))))
            dense_names.append(layer.name)
        elif layer.class_name == "Activation":
            _fold_activation(layer, dense_layers, source)
        elif layer.class_name == "Flatten":
            flat_input = bool(dense_layers) or (input_shape is not None and len(input_shape) == 1)
            if not flat_input:
                raise UnsupportedLayerError(
                    f"{source}: unsupported layer {layer.name!r} (Flatten of a {input_shape} input; "
                    "only a Flatten of an already flat input passes through)")
        elif layer.class_name not in PASS_THROUGH:
            raise UnsupportedLayerError(f"{source}: unsupported layer {layer.name!r} ({layer.class_name})")
    if not dense_layers:
        raise UnsupportedLayerError(f"{source}: the model has no Dense layer")
    if input_shape is None or len(input_shape) != 1 or input_shape[0] is None:
        raise UnsupportedLayerError(f"{source}: input shape {input_shape} is not a flat "
                                    "(batch, features) input")
    return KerasModelDescription(Architecture(int(input_shape[0]), tuple(dense_layers)),
                                 tuple(dense_names))


def _chain_of_layers(model_config: dict, source: str):
    class_name = model_config.get("class_name")
    config = model_config.get("config")
    if class_name in SEQUENTIAL_CLASSES:
        raw_layers = config if isinstance(config, list) else config.get("layers", [])
        build_shape = (model_config.get("build_config") or {}).get("input_shape")
        input_shape = tuple(build_shape[1:]) if build_shape else None
        return [_layer(raw) for raw in raw_layers], input_shape
    if class_name in FUNCTIONAL_CLASSES:
        layers = [_layer(raw) for raw in config["layers"]]
        _require_single_chain(config, layers, source)
        return layers, None
    raise UnsupportedLayerError(f"{source}: unsupported model class {class_name!r} "
                                "(Sequential and single-chain functional models are supported)")


def _layer(raw: dict) -> KerasLayerConfig:
    config = raw.get("config", {})
    return KerasLayerConfig(raw["class_name"], raw.get("name") or config.get("name", "?"), config)


def _require_single_chain(config: dict, layers: list[KerasLayerConfig], source: str) -> None:
    """Each layer must take exactly one input, the layer listed just before it."""
    raw_layers = config["layers"]
    for previous, (raw, layer) in zip([None] + layers[:-1], zip(raw_layers, layers)):
        inbound = _inbound_layer_names(raw.get("inbound_nodes", []))
        expected = [] if previous is None else [previous.name]
        if inbound != expected:
            raise UnsupportedLayerError(
                f"{source}: layer {layer.name!r} ({layer.class_name}) takes {inbound or 'no input'}; "
                "only functional models that form a single chain are supported")
    outputs = _flat_names(config.get("output_layers", []))
    if outputs and outputs[0] != layers[-1].name or len(outputs) > 1:
        raise UnsupportedLayerError(f"{source}: model outputs {outputs} are not the last layer "
                                    f"{layers[-1].name!r} alone")


def _inbound_layer_names(inbound_nodes: list) -> list[str]:
    names = []
    for node in inbound_nodes:
        if isinstance(node, dict):  # Keras 3: {"args": [keras_tensor, …], "kwargs": {…}}
            names += [history[0] for history in _keras_histories(node.get("args", []))]
        else:                       # Keras 2: [["layer_name", node_index, tensor_index, {…}], …]
            names += [entry[0] for entry in node]
    return names


def _keras_histories(value) -> list:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return [value["config"]["keras_history"]]
        return [h for item in value.values() for h in _keras_histories(item)]
    if isinstance(value, list):
        return [h for item in value for h in _keras_histories(item)]
    return []


def _flat_names(layers_spec) -> list[str]:
    if not layers_spec:
        return []
    if isinstance(layers_spec[0], str):  # a single ["name", 0, 0]
        return [layers_spec[0]]
    return [entry[0] for entry in layers_spec]


def _declared_input_shape(config: dict):
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    return tuple(shape[1:]) if shape else None


def _activation(layer: KerasLayerConfig, source: str) -> str:
    activation = layer.config.get("activation", "linear")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise UnsupportedLayerError(f"{source}: unsupported activation {activation!r} in layer "
                                    f"{layer.name!r}; supported: {', '.join(ACTIVATIONS)}")
    return activation


def _fold_activation(layer: KerasLayerConfig, dense_layers: list[DenseLayer], source: str) -> None:
    """An Activation layer after a linear Dense becomes that Dense's activation."""
    activation = _activation(layer, source)
    if activation == "linear":
        return
    if not dense_layers or dense_layers[-1].activation != "linear":
        raise UnsupportedLayerError(
            f"{source}: unsupported layer {layer.name!r} (Activation {activation!r} that does not "
            "follow a linear Dense layer)")
    last = dense_layers[-1]
    dense_layers[-1] = DenseLayer(last.units, activation, last.use_bias)


# ---------------------------------------------------------------------------------------------
# HDF5 access: metadata through h5py, data with one pread per tensor


class _FileWindow(io.RawIOBase):
    """A read-only file object over bytes [start, start + size) of a file, read with os.pread.

    h5py reads a `.keras` member through it without extracting it; seeking backwards is free,
    unlike a zipfile member stream, which re-reads from its start.
    """

    def __init__(self, descriptor: int, start: int, size: int):
        self.descriptor, self.start, self.size, self.position = descriptor, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        wanted = max(0, min(len(buffer), self.size - self.position))
        data = os.pread(self.descriptor, wanted, self.start + self.position)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


class _Hdf5Source:
    """An HDF5 file (or a stored zip member) opened for metadata, with fast tensor reads."""

    def __init__(self, path: Path, start: int = 0, size: int | None = None, member: str = ""):
        self.path, self.start = path, start
        self.label = f"{path}:{member}" if member else str(path)
        self.descriptor = os.open(path, os.O_RDONLY)
        size = os.fstat(self.descriptor).st_size - start if size is None else size
        try:
            self.h5 = h5py.File(_FileWindow(self.descriptor, start, size), "r")
        except OSError:
            os.close(self.descriptor)
            raise ExchangeFileError(f"{self.label}: not an HDF5 file") from None

    def close(self) -> None:
        """Idempotent. The h5py file closes before the descriptor: it may read while closing."""
        if self.descriptor is None:
            return
        self.h5.close()
        os.close(self.descriptor)
        self.descriptor = None

    def lazy(self, dataset_path: str) -> LazyTensor:
        dataset = self.h5.get(dataset_path)
        if not isinstance(dataset, h5py.Dataset):
            raise ExchangeFileError(f"{self.label}: no weights at {dataset_path}; "
                                    "config and weights do not match")
        shape, dtype = tuple(dataset.shape), np.dtype(dataset.dtype)
        offset = dataset.id.get_offset()
        plain = dataset.chunks is None and dataset.compression is None and offset is not None
        if not plain or 0 in shape:  # chunked, filtered or empty: let h5py read it now
            array = dataset[()]
            return LazyTensor(shape, dtype, lambda: array)
        path, absolute = self.path, self.start + offset
        return LazyTensor(shape, dtype, lambda: np.memmap(path, dtype=dtype, mode="r",
                                                          offset=absolute, shape=shape))


def _stored_member(path: Path, archive: zipfile.ZipFile, name: str) -> tuple[int, int]:
    """Byte offset and size of an uncompressed zip member's data within the file."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ExchangeFileError(f"{path}: {name} is compressed; Keras stores it uncompressed")
    with open(path, "rb") as stream:
        stream.seek(info.header_offset)
        local_header = stream.read(30)
    if local_header[:4] != b"PK\x03\x04":
        raise ExchangeFileError(f"{path}: damaged zip entry for {name}")
    name_length = int.from_bytes(local_header[26:28], "little")
    extra_length = int.from_bytes(local_header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length, info.file_size


# ---------------------------------------------------------------------------------------------
# Weights -> file tensors


def _keras3_variables(source: _Hdf5Source, description: KerasModelDescription) -> list[dict]:
    """Keras 3 names a layer's group by class and order (dense, dense_1, …), not by layer name;
    its variables are vars/0 (kernel) and vars/1 (bias)."""
    per_layer = []
    for index, (layer, name) in enumerate(zip(description.architecture.layers, description.dense_names)):
        group = "layers/dense" if index == 0 else f"layers/dense_{index}"
        if f"{group}/vars" not in source.h5:
            raise ExchangeFileError(f"{source.label}: no weights for layer {name!r} (expected "
                                    f"group {group}/vars); config and weights do not match")
        stored_name = source.h5[f"{group}/vars"].attrs.get("name")
        if stored_name is not None and _text(stored_name) != name:
            raise ExchangeFileError(f"{source.label}: group {group} holds layer {_text(stored_name)!r}, "
                                    f"expected {name!r}; config and weights do not match")
        variables = source.h5[f"{group}/vars"]
        names = ["kernel", "bias"] if layer.use_bias else ["kernel"]
        if len(variables) != len(names):
            raise ExchangeFileError(f"{source.label}: layer {name!r} has {len(variables)} variables, "
                                    f"expected {len(names)} ({', '.join(names)})")
        per_layer.append({var: source.lazy(f"{group}/vars/{i}") for i, var in enumerate(names)})
    return per_layer


def _keras2_variables(source: _Hdf5Source, root: str, description: KerasModelDescription) -> list[dict]:
    """Keras 2 keeps a group per layer name; its `weight_names` attribute lists the datasets
    (`dense_1/kernel:0`, …), whose last component before ':' names the variable."""
    per_layer = []
    for name in description.dense_names:
        group_path = f"{root}/{name}" if root else name
        if group_path not in source.h5:
            raise ExchangeFileError(f"{source.label}: no weights for layer {name!r}; "
                                    "config and weights do not match")
        group = source.h5[group_path]
        variables = {}
        for weight_name in (_text(n) for n in group.attrs.get("weight_names", [])):
            variable = re.sub(r":\d+$", "", weight_name.rsplit("/", 1)[-1])
            variables[variable] = source.lazy(f"{group_path}/{weight_name}")
        per_layer.append(variables)
    return per_layer


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _to_file_tensors(description: KerasModelDescription, per_layer: list[dict], label: str):
    """Apply the layout rules (lazily) and check every shape against the config before any
    tensor data is read."""
    where = f"{label}: config and weights do not match"
    try:
        tensors = layout.keras_to_file(description.architecture, per_layer)
    except TensorMismatchError as err:
        raise TensorMismatchError(err.missing, err.unexpected, err.mismatched, where) from None
    fileformat.check_tensors(description.architecture, tensors, where=where)
    return tensors


# ---------------------------------------------------------------------------------------------
# Public readers


@dataclass
class KerasWeights:
    """Architecture and lazy file-layout tensors of a Keras file; close() when done reading."""

    architecture: Architecture
    tensors: dict[str, LazyTensor]
    source: _Hdf5Source

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "KerasWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_keras_config(path: str | os.PathLike) -> dict:
    """The model config of a `.keras`, a Keras 2 full-model `.h5`, or a JSON file."""
    path = Path(path)
    if not path.is_file():
        raise ExchangeFileError(f"{path}: no such file")
    if path.suffix == ".keras":
        with _open_zip(path) as archive:
            return _json(archive.read(KERAS_CONFIG_MEMBER), f"{path}:{KERAS_CONFIG_MEMBER}")
    if path.suffix == ".h5":
        try:
            h5 = h5py.File(path, "r")
        except OSError:
            raise ExchangeFileError(f"{path}: not an HDF5 file") from None
        with h5:
            if "model_config" not in h5.attrs:
                raise ExchangeFileError(f"{path}: no model_config attribute (a weights-only file)")
            return _json(h5.attrs["model_config"], str(path))
    return _json(path.read_bytes(), str(path))


def open_keras_file(path: str | os.PathLike, architecture_from: str | os.PathLike | None = None) -> KerasWeights:
    """Open any supported Keras file. `architecture_from` (a .keras, a Keras 2 full .h5, or a
    config JSON) is required for weights-only files and ignored otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ExchangeFileError(f"{path}: no such file")
    if path.suffix == ".keras":
        with _open_zip(path) as archive:
            config = _json(archive.read(KERAS_CONFIG_MEMBER), f"{path}:{KERAS_CONFIG_MEMBER}")
            start, size = _stored_member(path, archive, KERAS_WEIGHTS_MEMBER)
        description = describe_model_config(config, str(path))
        source = _Hdf5Source(path, start, size, member=KERAS_WEIGHTS_MEMBER)
        return _finish(description, source, lambda: _keras3_variables(source, description))
    if path.suffix != ".h5":
        raise ExchangeFileError(f"{path}: not a Keras file (.keras, .weights.h5 or .h5)")
    source = _Hdf5Source(path)
    h5 = source.h5
    try:
        if "model_config" in h5.attrs and "model_weights" in h5:       # Keras 2 full model
            description = describe_model_config(_json(h5.attrs["model_config"], str(path)), str(path))
            return _finish(description, source, lambda: _keras2_variables(source, "model_weights", description))
        if "layers" in h5 and "layer_names" not in h5.attrs:              # Keras 3 weights only
            description = _description_from(architecture_from, path)
            return _finish(description, source, lambda: _keras3_variables(source, description))
        if "layer_names" in h5.attrs:                                     # Keras 2 weights only
            description = _description_from(architecture_from, path)
            return _finish(description, source, lambda: _keras2_variables(source, "", description))
        raise ExchangeFileError(f"{path}: HDF5 file without Keras weights (no model_weights, "
                                "layers or layer_names)")
    except BaseException:
        source.close()
        raise


def _finish(description, source, read_variables) -> KerasWeights:
    try:
        tensors = _to_file_tensors(description, read_variables(), source.label)
    except BaseException:
        source.close()
        raise
    return KerasWeights(description.architecture, tensors, source)


def _description_from(architecture_from, weights_path: Path) -> KerasModelDescription:
    if architecture_from is None:
        raise ExchangeFileError(f"{weights_path}: a weights-only file; give the architecture "
                                "(--arch a .keras, a Keras 2 .h5 or a config .json)")
    return describe_model_config(read_keras_config(architecture_from), str(architecture_from))


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ExchangeFileError(f"{path}: not a .keras file (a .keras file is a zip archive)") from None
    missing = {KERAS_CONFIG_MEMBER, KERAS_WEIGHTS_MEMBER} - set(archive.namelist())
    if missing:
        archive.close()
        raise ExchangeFileError(f"{path}: not a Keras 3 file (missing {', '.join(sorted(missing))})")
    return archive


def _json(raw, label: str) -> dict:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExchangeFileError(f"{label}: model config is not valid JSON ({err})") from None
    if not isinstance(value, dict) or "class_name" not in value:
        raise ExchangeFileError(f"{label}: not a Keras model config")
    return value
