"""Read Keras weight files directly: zipfile, json, h5py and numpy, no TensorFlow, Keras or torch.

Four kinds of file, each read to (graph, tensors in file layout):

    .keras             Keras 3: a zip of config.json + model.weights.h5 (layers/<group>/vars/0, 1, …)
    .weights.h5        Keras 3 weights only; the architecture comes from a .keras or config.json
    .h5 (full model)   Keras 2: the config as JSON in the `model_config` attribute, weights under
                       model_weights/<layer>/…/kernel:0 as listed in each layer's `weight_names`
    .h5 (weights only) Keras 2: the same groups at the top level; architecture given alongside

The config is read by `exchange.keras_config` (the one parser, shared with live models), which
also says where each layer's variables are stored. Tensors come back as `LazyTensor`s: every
shape is checked before any data is read, and a large model is read one tensor at a time.
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

from exchange import layout
from exchange.errors import ExchangeFileError
from exchange.graph import Graph
from exchange.keras_config import KerasLocation, ParsedModel, parse_model_config
from exchange.tensors import LazyTensor

KERAS_WEIGHTS_MEMBER = "model.weights.h5"
KERAS_CONFIG_MEMBER = "config.json"


def describe_model_config(model_config: dict, source: str, keras2: bool = False) -> ParsedModel:
    """A Keras 2 or Keras 3 model config -> graph and variable locations."""
    return parse_model_config(model_config, source, keras2)


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
# Variable locators: where each format keeps a layer's variables


def _keras3_variables(source: _Hdf5Source, location: KerasLocation) -> list:
    """Keras 3: `<group>/vars/0`, `vars/1`, … in the layer's variable order (no names stored);
    a layer made of sub-layers keeps them below its group (an LSTM in `<group>/cell/vars`)."""
    if not location.keras3_group:
        return []   # an operation (`x + 3.0`): not a layer, nothing stored
    found = []
    for subgroup in location.keras3_subgroups:
        path = "/".join(part for part in (location.keras3_group, subgroup, "vars") if part)
        group = source.h5.get(path)
        if not isinstance(group, h5py.Group):
            continue
        stored_name = group.attrs.get("name")
        if not subgroup and stored_name is not None and _text(stored_name) != location.layer_name:
            raise ExchangeFileError(f"{source.label}: group {location.keras3_group} holds layer "
                                    f"{_text(stored_name)!r}, expected {location.layer_name!r}; "
                                    "config and weights do not match")
        count = len(group)
        if sorted(group) != sorted(str(index) for index in range(count)):
            raise ExchangeFileError(f"{source.label}: unexpected entries in {path}: {sorted(group)[:10]}")
        found += [(None, source.lazy(f"{path}/{index}")) for index in range(count)]
    return found


def _keras2_variables(source: _Hdf5Source, root: str, location: KerasLocation) -> list:
    """Keras 2: the top-level layer's group lists its datasets in `weight_names`
    (`conv_a/kernel:0`; for a nested model `inner/kernel:0`; an LSTM's `lstm/lstm_cell/kernel:0`):
    those with the layer's name as a folder of their path belong to the layer."""
    group_path = f"{root}/{location.keras2_group}" if root else location.keras2_group
    group = source.h5.get(group_path)
    if not isinstance(group, h5py.Group):
        return []
    found = []
    for weight_name in (_text(name) for name in group.attrs.get("weight_names", [])):
        parts = weight_name.split("/")
        if location.layer_name in parts[:-1]:
            found.append((re.sub(r":\d+$", "", parts[-1]), source.lazy(f"{group_path}/{weight_name}")))
    return found


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# Public readers


@dataclass
class KerasWeights:
    """Graph and lazy file-layout tensors of a Keras file; close() when done reading."""

    architecture: Graph
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
        parsed = describe_model_config(config, str(path))
        source = _Hdf5Source(path, start, size, member=KERAS_WEIGHTS_MEMBER)
        return _finish(parsed, source, lambda location: _keras3_variables(source, location))
    if path.suffix != ".h5":
        raise ExchangeFileError(f"{path}: not a Keras file (.keras, .weights.h5 or .h5)")
    source = _Hdf5Source(path)
    h5 = source.h5
    try:
        if "model_config" in h5.attrs and "model_weights" in h5:       # Keras 2 full model
            parsed = describe_model_config(_json(h5.attrs["model_config"], str(path)), str(path),
                                           keras2=_keras2_version(h5.attrs.get("keras_version")))
            return _finish(parsed, source, lambda location: _keras2_variables(source, "model_weights", location))
        if "layers" in h5 and "layer_names" not in h5.attrs:              # Keras 3 weights only
            parsed = _description_from(architecture_from, path)
            return _finish(parsed, source, lambda location: _keras3_variables(source, location))
        if "layer_names" in h5.attrs:                                     # Keras 2 weights only
            parsed = _description_from(architecture_from, path, keras2=True)
            return _finish(parsed, source, lambda location: _keras2_variables(source, "", location))
        raise ExchangeFileError(f"{path}: HDF5 file without Keras weights (no model_weights, "
                                "layers or layer_names)")
    except BaseException:
        source.close()
        raise


def _finish(parsed: ParsedModel, source: _Hdf5Source, variables_of) -> KerasWeights:
    """Locate every node's variables and map them to file tensors (shapes checked, data unread)."""
    try:
        stored = {node.name: variables_of(parsed.locations[node.name]) for node in parsed.graph.nodes}
        tensors = layout.keras_to_file(parsed.graph, stored, source.label, parsed.class_names)
    except BaseException:
        source.close()
        raise
    return KerasWeights(parsed.graph, tensors, source)


def _description_from(architecture_from, weights_path: Path, keras2: bool = False) -> ParsedModel:
    if architecture_from is None:
        raise ExchangeFileError(f"{weights_path}: a weights-only file; give the architecture "
                                "(--arch a .keras, a Keras 2 .h5 or a config .json)")
    config_path = Path(architecture_from)
    return describe_model_config(read_keras_config(config_path), str(config_path),
                                 keras2=keras2 or written_by_keras2(config_path))


def written_by_keras2(path: Path) -> bool:
    """Whether Keras 2 wrote this model file (some meanings differ, e.g. `hard_sigmoid`): a `.h5`
    or a `to_json()` file says so in `keras_version` (a Keras 2 `.h5` without it is old Keras 2);
    `.keras` files are Keras 3's."""
    try:
        if path.suffix == ".h5":
            with h5py.File(path, "r") as h5:
                return _keras2_version(h5.attrs.get("keras_version"))
        if path.suffix == ".json":
            return _keras2_version(json.loads(path.read_bytes()).get("keras_version", "2"))
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    return False


def _keras2_version(version) -> bool:
    return version is None or not _text(version).startswith("3")


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
