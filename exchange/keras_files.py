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
import os
import re
import signal
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from exchange import filekinds, untrusted, weight_layout
from exchange.errors import ExchangeFileError, first_line
from exchange.graph import Graph
from exchange.keras_config import KerasLocation, ParsedModel, parse_model_config
from exchange.tensors import AnyTensor, LazyTensor

KERAS_WEIGHTS_MEMBER = "model.weights.h5"
KERAS_CONFIG_MEMBER = "config.json"
HDF5_PROBE_SECONDS = 60  # reading a real model's metadata takes milliseconds; a damaged file can loop
HDF5_PROBE_MEMORY = 256 << 20  # address space the probe may add: a real model's metadata needs a few MiB,
# a damaged global heap can make libhdf5 allocate gigabytes


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
        if self.position >= self.size:  # a damaged file may seek anywhere, even past what pread takes
            return 0
        wanted = min(len(buffer), self.size - self.position)
        data = os.pread(self.descriptor, wanted, self.start + self.position)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


class _Hdf5Source:
    """An HDF5 file (or a stored zip member) opened for metadata, with fast tensor reads."""

    def __init__(self, path: Path, start: int = 0, size: int | None = None, member: str = ""):
        self.path, self.start = path, start
        self.label = f"{path}:{member}" if member else str(path)
        untrusted.regular_file(path)
        self.descriptor: int | None = os.open(path, os.O_RDONLY)  # None once closed
        size = os.fstat(self.descriptor).st_size - start if size is None else size
        self.size = size
        self.groups: dict = {}  # groups whose path was checked for links
        try:
            _survives_hdf5(self.descriptor, start, size, self.label)
            self.h5 = h5py.File(_FileWindow(self.descriptor, start, size), "r")
        except (OSError, RuntimeError, ValueError):
            os.close(self.descriptor)
            raise ExchangeFileError(f"{self.label}: not an HDF5 file") from None
        except BaseException:
            os.close(self.descriptor)
            raise

    def attribute(self, node, name: str, default=None):
        return untrusted.hdf5_attribute(node, name, self.label, self.size, default)

    def close(self) -> None:
        """Idempotent. The h5py file closes before the descriptor: it may read while closing."""
        if self.descriptor is None:
            return
        self.h5.close()
        os.close(self.descriptor)
        self.descriptor = None

    def lazy(self, dataset_path: str) -> LazyTensor:
        dataset = untrusted.hdf5_get(self.h5, dataset_path, self.label, self.groups)
        if not isinstance(dataset, h5py.Dataset):
            raise ExchangeFileError(
                f"{self.label}: no weights at {dataset_path!r:.120}; config and weights do not match"
            )
        untrusted.check_hdf5_dataset(dataset, self.label, self.size)
        shape, dtype = tuple(dataset.shape), np.dtype(dataset.dtype)
        offset = dataset.id.get_offset()
        if dataset.chunks is not None or 0 in shape:  # chunked, filtered or empty: h5py reads it when used
            return LazyTensor(shape, dtype, lambda: self._read(dataset))
        path, absolute = self.path, self.start + offset
        return LazyTensor(shape, dtype, lambda: np.memmap(path, dtype=dtype, mode="r", offset=absolute, shape=shape))

    def _read(self, dataset: h5py.Dataset) -> np.ndarray:
        with hdf5_errors(self.label):
            return dataset[()]


def _survives_hdf5(descriptor: int, start: int, size: int, label: str) -> None:
    """Walk the file's metadata in a forked child first: the HDF5 library can crash (SIGSEGV),
    loop, or allocate gigabytes on a damaged file, which no exception handler catches or bounds.
    The child's address space is capped at HDF5_PROBE_MEMORY more than the parent's; a child that
    fails, dies or runs past HDF5_PROBE_SECONDS means the file is refused, so the parent only reads
    what the child read safely."""
    if not hasattr(os, "fork"):
        return
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child: touch every attribute and dataset header, then leave at once
        os.close(reader)
        _probe_child(descriptor, start, size, writer)
    os.close(writer)
    try:
        _wait_for_probe(child, label)
        with os.fdopen(reader, "rb", closefd=False) as stream:
            failure = stream.read(500).decode("utf-8", "replace")
    finally:
        os.close(reader)
    if failure:
        raise ExchangeFileError(f"{label}: damaged or unsupported HDF5 content ({failure})")


def _probe_child(descriptor: int, start: int, size: int, writer: int) -> None:
    """Never returns: exit 0 when the metadata reads cleanly, else 1 with the reason on `writer`."""
    status = 0
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        address_space = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        import resource

        limit = address_space + HDF5_PROBE_MEMORY
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            h5 = h5py.File(_FileWindow(descriptor, start, size), "r")
        except (OSError, RuntimeError, ValueError):
            os._exit(0)  # not HDF5 at all: the parent's own open says so
        with h5:
            _touch_metadata(h5, size)
    except BaseException as err:  # noqa: B036, BLE001 (reported to the parent, which refuses the file)
        status = 1
        try:
            os.write(writer, (first_line(err) or type(err).__name__).encode("utf-8", "replace")[:500])
        except BaseException:  # noqa: B036, BLE001
            pass
    os._exit(status)


def _wait_for_probe(child: int, label: str) -> None:
    deadline = time.monotonic() + HDF5_PROBE_SECONDS
    try:
        while True:
            finished, status = os.waitpid(child, os.WNOHANG)
            if finished:
                break
            if time.monotonic() > deadline:
                raise ExchangeFileError(
                    f"{label}: damaged HDF5 file (the HDF5 library did not finish reading "
                    f"its metadata in {HDF5_PROBE_SECONDS} s)"
                )
            time.sleep(0.002)
    except BaseException:  # noqa: B036 (a timeout, or an interrupt while waiting: the child goes too)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        raise
    if os.WIFSIGNALED(status):
        raise ExchangeFileError(
            f"{label}: damaged HDF5 file (the HDF5 library crashed reading it: "
            f"{signal.Signals(os.WTERMSIG(status)).name})"
        )


def _touch_metadata(h5: h5py.File, size: int) -> None:
    """Read what the readers read: every attribute, and each dataset's type, shape, layout,
    filters and storage. A size check that fails is the parent's to report, not the probe's."""

    def touch(node) -> None:
        for name in list(node.attrs):
            try:
                untrusted.hdf5_attribute(node, name, "", size)
            except ExchangeFileError:
                pass
        if isinstance(node, h5py.Dataset):
            plist = node.id.get_create_plist()
            _ = (
                node.shape,
                node.dtype,
                node.chunks,
                node.external,
                node.is_virtual,
                node.id.get_offset(),
                node.id.get_storage_size(),
                [plist.get_filter(i) for i in range(plist.get_nfilters())],
            )

    touch(h5)
    h5.visititems(lambda name, node: touch(node))


@contextmanager
def hdf5_errors(label: str):
    """What h5py raises for a damaged file (OSError, RuntimeError, KeyError, ValueError, TypeError
    for a type numpy lacks) as one ExchangeFileError naming the file."""
    try:
        yield
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, OverflowError) as err:
        raise ExchangeFileError(f"{label}: damaged or unsupported HDF5 content ({first_line(err)})") from None


def _stored_member(path: Path, archive: zipfile.ZipFile, name: str) -> tuple[int, int]:
    """Byte offset and size of an uncompressed zip member's data within the file."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ExchangeFileError(f"{path}: {name} is compressed; Keras stores it uncompressed")
    if archive.fp is None:
        raise ExchangeFileError(f"{path}: zip archive already closed")
    archive.fp.seek(info.header_offset)  # the archive's own open file: no second open
    local_header = archive.fp.read(30)
    if local_header[:4] != b"PK\x03\x04":
        raise ExchangeFileError(f"{path}: damaged zip entry for {name}")
    name_length = int.from_bytes(local_header[26:28], "little")
    extra_length = int.from_bytes(local_header[28:30], "little")
    start = info.header_offset + 30 + name_length + extra_length
    if start + info.file_size > path.stat().st_size:
        raise ExchangeFileError(f"{path}: {name} declares {info.file_size:,} bytes the file does not hold")
    return start, info.file_size


# ---------------------------------------------------------------------------------------------
# Variable locators: where each format keeps a layer's variables


def _keras3_variables(source: _Hdf5Source, location: KerasLocation) -> list:
    """Keras 3: `<group>/vars/0`, `vars/1`, … in the layer's variable order (no names stored);
    a layer made of sub-layers keeps them below its group (an LSTM in `<group>/cell/vars`)."""
    if not location.keras3_group:
        return []  # an operation (`x + 3.0`): not a layer, nothing stored
    found = []
    for subgroup in location.keras3_subgroups:
        path = "/".join(part for part in (location.keras3_group, subgroup, "vars") if part)
        group = untrusted.hdf5_get(source.h5, path, source.label, source.groups)
        if not isinstance(group, h5py.Group):
            continue
        stored_name = source.attribute(group, "name")
        if stored_name is not None:
            stored_name = untrusted.check_path_text(stored_name, source.label, f"{path} name")
        if not subgroup and stored_name is not None and stored_name != location.layer_name:
            raise ExchangeFileError(
                f"{source.label}: group {location.keras3_group} holds layer "
                f"{stored_name!r}, expected {location.layer_name!r}; "
                "config and weights do not match"
            )
        extras = dict(location.keras3_extras) if not subgroup else {}
        for name in set(extras) & set(group):
            stored = source.lazy(f"{path}/{name}").load()
            if stored.shape != (len(extras[name]),) or not np.array_equal(stored, np.asarray(extras[name], np.float32)):
                raise ExchangeFileError(
                    f"{source.label}: {path}/{name} differs from the values the layer's config "
                    "gives; config and weights do not match"
                )
        entries = [name for name in group if name not in extras]
        count = len(entries)
        if sorted(entries) != sorted(str(index) for index in range(count)):
            raise ExchangeFileError(f"{source.label}: unexpected entries in {path}: {sorted(group)[:10]}")
        found += [(None, source.lazy(f"{path}/{index}")) for index in range(count)]
    return found


def _keras2_variables(source: _Hdf5Source, root: str, location: KerasLocation, groups: dict | None = None) -> list:
    """Keras 2: the top-level layer's group lists its datasets in `weight_names`
    (`conv_a/kernel:0`; for a nested model `inner/kernel:0`; an LSTM's `lstm/lstm_cell/kernel:0`).
    A top-level layer's group holds its own alone, whatever their folder: Keras on TensorFlow 1
    (and tf-keras in graph mode) named them by a name scope made unique, `conv2d_1_1/kernel:0` for
    layer `conv2d_1`, and Keras loads them by their order. In a nested model's group, those with
    the layer's name as a folder of their path belong to the layer. `groups` maps the model's
    top-level layers to the file's groups where they are matched by order."""
    stored_group = (groups or {}).get(location.keras2_group, location.keras2_group)
    group_path = f"{root}/{stored_group}" if root else stored_group
    group = untrusted.hdf5_get(source.h5, group_path, source.label, source.groups)
    if not isinstance(group, h5py.Group):
        return []
    own_group = not location.container_path and location.layer_name == location.keras2_group
    found = []
    for weight_name in _weight_names(source, group):
        parts = weight_name.split("/")
        if own_group or location.layer_name in parts[:-1]:
            found.append((re.sub(r":\d+$", "", parts[-1]), source.lazy(f"{group_path}/{weight_name}")))
    return found


def _weight_names(source: _Hdf5Source, group: h5py.Group) -> list[str]:
    """Keras 2's `weight_names` attribute: a 1-D array of names."""
    names = source.attribute(group, "weight_names", [])
    if not isinstance(names, (np.ndarray, list)) or np.ndim(names) != 1:
        raise ExchangeFileError(f"{source.label}: weight_names of {group.name} is not a list of names")
    return [untrusted.check_path_text(name, source.label, f"weight_names of {group.name}") for name in names]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# Public readers


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass
class KerasWeights:
    """Graph and lazy file-layout tensors of a Keras file; close() when done reading."""

    architecture: Graph
    tensors: dict[str, AnyTensor]  # lazy where a port only permutes axes; read where it splits, packs, reshapes
    source: Closable  # what holds the file open: an HDF5 source, a SavedModel's data file
    # What the reader learnt on the way, so that nobody opens the file again to ask (--verify's
    # reference, the training state): Keras 3 opens the file itself and means what the exchange
    # reads (a `.keras`, a Keras 3 full-model `.h5`); the Keras 2 file holding the model's config
    # (the file, or a Keras 2 `--arch`); a compiled `.keras` or full-model `.h5` (a `compile_config`,
    # a `training_config`).
    keras3_loadable: bool = False
    keras2_config: Path | None = None
    compiled: bool = False

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> KerasWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_keras_config(path: str | os.PathLike, kind: filekinds.FileKind | None = None) -> dict:
    """The model config of a `.keras`, a Keras 2 full-model `.h5`, or a JSON file (`kind`, when
    the caller has it, saves deciding it again)."""
    path = Path(path)
    kind = kind or filekinds.input_kind(path)
    size = untrusted.regular_file(path)
    if kind is filekinds.KERAS:
        with _open_zip(path) as archive:
            return _json(_config_member(archive, path), f"{path}:{KERAS_CONFIG_MEMBER}")
    if kind is filekinds.HDF5:
        source = _Hdf5Source(path)
        try:
            with hdf5_errors(str(path)):
                if "model_config" not in source.h5.attrs:
                    raise ExchangeFileError(f"{path}: no model_config attribute (a weights-only file)")
                return _json(_model_config_text(source), str(path))
        finally:
            source.close()
    if kind is not filekinds.JSON:
        raise ExchangeFileError(f"{path}: {kind.description}, not a Keras model or model config")
    if size > untrusted.MAX_JSON_BYTES:
        raise ExchangeFileError(
            f"{path}: {size:,} bytes, more than the {untrusted.MAX_JSON_BYTES:,} a model config may have"
        )
    return _json(path.read_bytes(), str(path))


def _config_member(archive: zipfile.ZipFile, path: Path) -> bytes:
    return untrusted.read_zip_member(archive, KERAS_CONFIG_MEMBER, str(path), untrusted.MAX_JSON_BYTES)


def _model_config_text(source: _Hdf5Source) -> str:
    return untrusted.check_path_text(
        source.attribute(source.h5, "model_config"), source.label, "the model_config attribute"
    )


def open_keras_file(
    path: str | os.PathLike,
    architecture_from: str | os.PathLike | None = None,
    by_name: bool = False,
    kind: filekinds.FileKind | None = None,
) -> KerasWeights:
    """Open any supported Keras file. `architecture_from` (a .keras, a Keras 2 full .h5, or a
    config JSON) is required for weights-only files and ignored otherwise. A Keras 2 weights-only
    file is matched to the architecture's layers by order, as Keras 2's `load_weights` does, or
    by layer name with `by_name` (`load_weights(by_name=True)`)."""
    path = Path(path)
    kind = kind or filekinds.input_kind(path)
    if kind is filekinds.KERAS:
        with _open_zip(path) as archive:
            config = _json(_config_member(archive, path), f"{path}:{KERAS_CONFIG_MEMBER}")
            start, size = _stored_member(path, archive, KERAS_WEIGHTS_MEMBER)
        parsed = parse_model_config(config, str(path))
        source = _Hdf5Source(path, start, size, member=KERAS_WEIGHTS_MEMBER)
        with hdf5_errors(source.label):
            weights = _finish(parsed, source, lambda location: _keras3_variables(source, location))
        weights.keras3_loadable, weights.compiled = True, bool(config.get("compile_config"))
        return weights
    if kind is not filekinds.HDF5:
        raise ExchangeFileError(f"{path}: not a Keras file but {kind.description}")
    source = _Hdf5Source(path)
    h5 = source.h5
    try:
        with hdf5_errors(str(path)):
            return _open_h5(path, source, h5, architecture_from, by_name)
    except BaseException:
        source.close()
        raise


def check_readable(path: str | os.PathLike, kind: filekinds.FileKind | None = None) -> None:
    """The direct reader's guards (zip members, HDF5 metadata walked in a capped child first) on a
    Keras file that Keras itself will then read: a subclassed model's (`exchange.subclassed`)."""
    path = Path(path)
    kind = kind or filekinds.input_kind(path)
    if kind is filekinds.KERAS:
        with _open_zip(path) as archive:
            start, size = _stored_member(path, archive, KERAS_WEIGHTS_MEMBER)
        _Hdf5Source(path, start, size, member=KERAS_WEIGHTS_MEMBER).close()
    else:
        _Hdf5Source(path).close()


def _open_h5(path: Path, source: _Hdf5Source, h5: h5py.File, architecture_from, by_name: bool) -> KerasWeights:
    """The three kinds of `.h5`, told apart by their top-level attributes and groups."""
    if "model_config" in h5.attrs and "model_weights" in h5:  # Keras 2 full model
        keras2 = _keras2_version(source.attribute(h5, "keras_version"))
        parsed = parse_model_config(_json(_model_config_text(source), str(path)), str(path), keras2=keras2)
        weights = _finish(parsed, source, lambda location: _keras2_variables(source, "model_weights", location))
        weights.keras3_loadable, weights.keras2_config = not keras2, path if keras2 else None
        weights.compiled = "training_config" in h5.attrs  # saved after compile: its training state
        return weights
    weights = _open_weights_only_h5(path, source, h5, architecture_from, by_name)
    config_path = Path(architecture_from)  # given: a weights-only file without it was refused
    arch_kind = filekinds.input_kind(config_path)
    if arch_kind in (filekinds.HDF5, filekinds.JSON) and written_by_keras2(config_path, arch_kind):
        weights.keras2_config = config_path
    return weights


def _open_weights_only_h5(
    path: Path, source: _Hdf5Source, h5: h5py.File, architecture_from, by_name: bool
) -> KerasWeights:
    if "layers" in h5 and "layer_names" not in h5.attrs:  # Keras 3 weights only
        parsed = _description_from(architecture_from, path)
        return _finish(parsed, source, lambda location: _keras3_variables(source, location))
    if "layer_names" in h5.attrs:  # Keras 2 weights only
        parsed = _description_from(architecture_from, path, keras2=True)
        groups = {} if by_name else _keras2_groups_by_order(source, parsed)
        return _finish(parsed, source, lambda location: _keras2_variables(source, "", location, groups))
    if architecture_from is None:  # a subclassed model's Keras 3 weights are grouped by attribute
        raise ExchangeFileError(
            f"{path}: HDF5 file without Keras weights (no model_weights, layers or layer_names; "
            "a subclassed model's .weights.h5 needs --arch and --custom-objects FILE)"
        )
    raise ExchangeFileError(f"{path}: HDF5 file without Keras weights (no model_weights, layers or layer_names)")


def _keras2_groups_by_order(source: _Hdf5Source, parsed: ParsedModel) -> dict[str, str]:
    """Keras 2's `load_weights` (without by_name): the file's layers that hold weights, in its
    `layer_names` order, go to the model's top-level layers that hold weights, in the model's
    order; a count that differs is an error, as in Keras. Architecture group -> file group."""
    holding: list[str] = []  # the model's top-level layers (a nested model is one) with weights
    for node in parsed.graph.nodes:  # in the config's order
        group = parsed.locations[node.name].keras2_group if node.name in parsed.locations else None
        if group is not None and group not in holding and parsed.graph.keras_variables(node):
            holding.append(group)
    names = source.attribute(source.h5, "layer_names", [])
    if not hasattr(names, "__len__") or len(names) > untrusted.MAX_LAYERS:
        raise ExchangeFileError(f"{source.label}: layer_names is not a list of at most {untrusted.MAX_LAYERS:,} names")
    stored = []
    for name in names:
        name = untrusted.check_path_text(name, source.label, "layer_names")
        group = untrusted.hdf5_get(source.h5, name, source.label, source.groups)
        if isinstance(group, h5py.Group) and len(_weight_names(source, group)):
            stored.append(name)
    if len(stored) != len(holding):
        raise ExchangeFileError(
            f"{source.label}: holds weights for {len(stored)} layers, the architecture has "
            f"{len(holding)} layers with weights (Keras 2 loads them by order; with --by-name "
            "by layer name)"
        )
    return dict(zip(holding, stored))


def _finish(parsed: ParsedModel, source: _Hdf5Source, variables_of) -> KerasWeights:
    """Locate every node's variables and map them to file tensors (shapes checked, data unread)."""
    try:
        stored = {node.name: variables_of(parsed.locations[node.name]) for node in parsed.graph.layers}
        tensors = weight_layout.keras_to_file(parsed.graph, stored, source.label, parsed.class_names)
    except BaseException:
        source.close()
        raise
    return KerasWeights(parsed.graph, tensors, source)


def _description_from(architecture_from, weights_path: Path, keras2: bool = False) -> ParsedModel:
    if architecture_from is None:
        raise ExchangeFileError(
            f"{weights_path}: a weights-only file; give the architecture "
            "(--arch a .keras, a Keras 2 .h5 or a config .json; a subclassed model's "
            ".weights.h5 needs --arch and --custom-objects FILE)"
        )
    config_path = Path(architecture_from)
    return parse_model_config(
        read_keras_config(config_path), str(config_path), keras2=keras2 or written_by_keras2(config_path)
    )


def written_by_keras2(path: Path, kind: filekinds.FileKind | None = None) -> bool:
    """Whether Keras 2 wrote this model file (some meanings differ, e.g. `hard_sigmoid`): a `.h5`
    or a `to_json()` file says so in `keras_version` (a Keras 2 `.h5` without it is old Keras 2);
    `.keras` files are Keras 3's."""
    try:
        kind = kind or filekinds.input_kind(path)
        if kind is filekinds.HDF5:
            with h5py.File(path, "r") as h5:
                return _keras2_version(h5.attrs.get("keras_version"))
        if kind is filekinds.JSON:
            untrusted.regular_file(path)
            return _keras2_version(_json(path.read_bytes(), str(path)).get("keras_version", "2"))
    except (ExchangeFileError, OSError, RuntimeError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
        return False
    return False


def _keras2_version(version) -> bool:
    return version is None or not _text(version).startswith("3")


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        raise ExchangeFileError(f"{path}: not a .keras file (a .keras file is a zip archive)") from None
    missing = {KERAS_CONFIG_MEMBER, KERAS_WEIGHTS_MEMBER} - set(archive.namelist())
    if missing:
        archive.close()
        raise ExchangeFileError(f"{path}: not a Keras 3 file (missing {', '.join(sorted(missing))})")
    try:
        untrusted.check_zip_members(archive, str(path), path.stat().st_size)
    except ExchangeFileError:
        archive.close()
        raise
    return archive


def _json(raw, label: str) -> dict:
    value = untrusted.load_json(raw, label, "model config")
    if not isinstance(value, dict) or "class_name" not in value:
        raise ExchangeFileError(f"{label}: not a Keras model config")
    return value
