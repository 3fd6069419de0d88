"""Read a TensorFlow 2 SavedModel folder that Keras 2 wrote (`model.save("dir")` in tf.keras or
tf-keras), without TensorFlow and without running anything saved in it.

    keras_metadata.pb                         read: one record per Keras object (its path from the
                                              model, e.g. `root.layer_with_weights-1.cell`, and a JSON
                                              description); the root's holds the model config
    variables/variables.index                 read: the checkpoint's table, key -> tensor entry
    variables/variables.data-00000-of-00001   read: the tensors' bytes, at the offsets the table gives
    saved_model.pb                            NEVER read: the traced TensorFlow graphs (running them is
                                              what this reader avoids; the Keras config describes the model)
    fingerprint.pb, assets/                   not read

Why a reader of our own, not TensorFlow or the protobuf package: the formats are small and stable
(protobuf's wire format: varints and length-prefixed fields; the checkpoint index: a LevelDB-style
table that TensorFlow writes without compression), and reading them ourselves keeps every size
checked before anything is allocated: the files against the caps below, every declared length
against the bytes that hold it, every tensor's offset and size against the data file, every block
and tensor against its CRC-32C. No path comes from the files: the three names above are fixed, and
each must be a regular file inside the folder (a symbolic link leading out of it is refused).

How a layer finds its variables: keras_metadata.pb names each Keras object and gives its path of
attribute names from the model (`root.layer_with_weights-2.layer_with_weights-0` for a layer of a
nested model); the checkpoint's `_CHECKPOINTABLE_OBJECT_GRAPH` is the same object tree, each node
with its children by those names. Walking it from the root along a layer's path reaches the layer's
object, whose `variables` child lists its variables in the layer's weight order (as a Keras 2 `.h5`
lists them in `weight_names`: an LSTM's `kernel`, `recurrent_kernel`, `bias` from its cell), each
with its checkpoint key. The rest (shapes, ports, torch layout) is the Keras 2 `.h5` path's.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exchange import keras_files, untrusted, weight_layout
from exchange.errors import ExchangeFileError
from exchange.keras_config import KerasLocation, parse_model_config
from exchange.tensors import LazyTensor

METADATA_NAME = "keras_metadata.pb"
INDEX_NAME = "variables/variables.index"
DATA_NAME = "variables/variables.data-00000-of-00001"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
ROOT_PATH = "root"

MAX_METADATA_BYTES = 64 << 20  # each layer's JSON repeats its config: NASNetLarge's 1 MB config gives a few MB
MAX_INDEX_BYTES = 64 << 20  # about 100 bytes an entry: 200,000 tensors take 20 MB
MAX_OBJECT_GRAPH_BYTES = 64 << 20  # about 60 objects a layer, 20 bytes each: 20,000 layers take 24 MB
MAX_METADATA_OBJECTS = 200_000  # Keras objects (layers, cells, nested models): ten per layer of MAX_LAYERS
MAX_BUNDLE_ENTRIES = 400_000  # tensors in the checkpoint: twice untrusted's 200,000 a model reads
MAX_GRAPH_OBJECTS = 2_000_000  # trackable objects: 100 per layer of MAX_LAYERS
MAX_PATH_PARTS = 64  # a layer's path from the model: MAX_NESTING nested models, a wrapper, a cell
MAX_LAYER_VARIABLES = 1_000  # as untrusted's per-layer cap
MAX_RANK = 32  # TensorFlow's own limit on a tensor's rank (TensorShape: 254); Keras uses <= 6

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's (and TensorFlow's io/table) footer magic number
FOOTER_BYTES = 48  # two block handles padded to 40 bytes, then the magic number
BLOCK_TRAILER_BYTES = 5  # compression type (0: none) and the block's masked CRC-32C

# TensorFlow's DataType codes of the numbers a Keras variable holds, as numpy little-endian types.
DTYPES = {1: "<f4", 2: "<f8", 19: "<f2", 3: "<i4", 9: "<i8", 4: "u1", 6: "i1", 5: "<i2", 17: "<u2"}
DT_STRING = 7


@dataclass(frozen=True)
class BundleEntry:
    """One tensor of the checkpoint: tensor_bundle.proto's BundleEntryProto."""

    key: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    sliced: bool


# ---------------------------------------------------------------------------------------------
# Protobuf wire format: (field number, wire type, value) triples; a length-delimited value is a
# memoryview into the message, never a copy.


def _fields(data: memoryview, label: str, what: str):
    position, end = 0, len(data)
    while position < end:
        key, position = _varint(data, position, label, what)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ExchangeFileError(f"{label}: damaged {what} (field number 0)")
        value: int | memoryview
        if wire_type == 0:
            value, position = _varint(data, position, label, what)
        elif wire_type == 1 or wire_type == 5:
            width = 8 if wire_type == 1 else 4
            if position + width > end:
                raise ExchangeFileError(f"{label}: damaged {what} (a field runs past its end)")
            value = int.from_bytes(data[position : position + width], "little")
            position += width
        elif wire_type == 2:
            length, position = _varint(data, position, label, what)
            if length > end - position:
                raise ExchangeFileError(
                    f"{label}: damaged {what} (a field declares {length:,} bytes, {end - position:,} remain)"
                )
            value = data[position : position + length]
            position += length
        else:  # groups (3, 4) are not in these messages; 6 and 7 do not exist
            raise ExchangeFileError(f"{label}: damaged {what} (wire type {wire_type})")
        yield number, wire_type, value


def _varint(data: memoryview, position: int, label: str, what: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ExchangeFileError(f"{label}: damaged {what} (a truncated or overlong varint)")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, position
        shift += 7


def _expect(wire_type: int, wanted: int, number: int, label: str, what: str) -> None:
    if wire_type != wanted:
        raise ExchangeFileError(f"{label}: damaged {what} (field {number} has wire type {wire_type})")


def _text(value: memoryview, label: str, what: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise ExchangeFileError(f"{label}: {what} is not UTF-8 text") from None


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# ---------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TensorFlow and LevelDB check blocks and tensors. Table-driven in Python
# for short data; for long data numpy runs many lanes of LANE_BYTES side by side and the lanes'
# registers are joined by shifting each over the bytes after it (CRC is linear), about 100 MB/s.

CRC_POLYNOMIAL = 0x82F63B78  # reflected
CRC_MASK_DELTA = 0xA282EAD8  # crc32c::Mask: rotate right by 15 bits, add this
LANE_BYTES = 512
PYTHON_CRC_BELOW = 16 << 10
CRC_CHUNK_BYTES = 16 << 20  # numpy works on this much at a time: bounded memory for any tensor


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        register = byte
        for _ in range(8):
            register = (register >> 1) ^ (CRC_POLYNOMIAL if register & 1 else 0)
        table.append(register)
    return table


_CRC_TABLE = _crc_table()
_CRC_TABLE_NUMPY = np.array(_CRC_TABLE, dtype=np.uint32)


def _crc_register(register: int, data: bytes) -> int:
    table = _CRC_TABLE
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _apply(columns: tuple[int, ...], vector: int) -> int:
    """A 32x32 matrix over GF(2) (its columns) times a vector."""
    result, index = 0, 0
    while vector:
        if vector & 1:
            result ^= columns[index]
        vector >>= 1
        index += 1
    return result


@functools.cache
def _zeros_operator(power: int) -> tuple[int, ...]:
    """The register's change over 2**power zero bytes, as a matrix."""
    if power == 0:
        return tuple(_CRC_TABLE[(1 << bit) & 0xFF] ^ ((1 << bit) >> 8) for bit in range(32))
    half = _zeros_operator(power - 1)
    return tuple(_apply(half, column) for column in half)


def _shift(register: int, count: int) -> int:
    """The register after `count` more zero bytes."""
    power = 0
    while count:
        if count & 1:
            register = _apply(_zeros_operator(power), register)
        count >>= 1
        power += 1
    return register


@functools.cache
def _lane_shift_tables() -> tuple[list[int], ...]:
    return tuple([_shift(byte << (8 * index), LANE_BYTES) for byte in range(256)] for index in range(4))


def _raw_register(data: np.ndarray) -> int:
    """The register over `data` from 0 (no initial value, no final xor)."""
    lanes = data.size // LANE_BYTES
    if data.size < PYTHON_CRC_BELOW:
        return _crc_register(0, data.tobytes())
    columns = np.ascontiguousarray(data[: lanes * LANE_BYTES].reshape(lanes, LANE_BYTES).T)
    registers = np.zeros(lanes, dtype=np.uint32)
    for column in columns:
        registers = _CRC_TABLE_NUMPY[(registers ^ column) & 0xFF] ^ (registers >> 8)
    first, second, third, fourth = _lane_shift_tables()
    total = 0
    for register in registers.tolist():
        total = (
            first[total & 0xFF]
            ^ second[(total >> 8) & 0xFF]
            ^ third[(total >> 16) & 0xFF]
            ^ fourth[total >> 24]
            ^ register
        )
    return _crc_register(total, data[lanes * LANE_BYTES :].tobytes())


def crc32c(data) -> int:
    """CRC-32C of bytes or of an array's bytes."""
    octets = (
        np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    )
    total = 0
    for start in range(0, octets.size, CRC_CHUNK_BYTES):
        chunk = octets[start : start + CRC_CHUNK_BYTES]
        total = _shift(total, chunk.size) ^ _raw_register(chunk)
    return _shift(0xFFFFFFFF, octets.size) ^ total ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    """crc32c::Mask, how TensorFlow and LevelDB store a CRC beside the data it covers."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + CRC_MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# The folder's files


def _member(folder: Path, name: str, limit: int | None = None) -> Path:
    """`folder/name`, a regular file inside the folder (checked through every symbolic link)."""
    path = folder / name
    label = str(path)
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise ExchangeFileError(
            f"{label}: no such file (a Keras SavedModel folder holds {METADATA_NAME}, {INDEX_NAME} and {DATA_NAME})"
        ) from None
    except OSError as err:
        raise ExchangeFileError(f"{label}: cannot read ({err.strerror or err})") from None
    resolved, inside = path.resolve(), folder.resolve()
    if inside not in resolved.parents:
        raise ExchangeFileError(f"{label}: a symbolic link to {resolved}, outside the folder; refused")
    size = untrusted.regular_file(resolved)
    if limit is not None and size > limit:
        raise ExchangeFileError(f"{label}: {size:,} bytes, more than the {limit:,} this tool reads")
    return resolved


def _read_member(folder: Path, name: str, limit: int) -> bytes:
    path = _member(folder, name, limit)
    try:
        with open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except OSError as err:
        raise ExchangeFileError(f"{folder / name}: cannot read ({err.strerror or err})") from None
    if len(data) > limit:
        raise ExchangeFileError(f"{folder / name}: more than the {limit:,} bytes this tool reads")
    return data


def is_saved_model_folder(path: Path) -> bool:
    """Whether `path` is a folder (a SavedModel is one); the reader says whether it is Keras's."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# keras_metadata.pb: SavedMetadata { repeated SavedObject nodes = 1 }, SavedObject { int32 node_id = 2;
# string node_path = 3; string identifier = 4; string metadata = 5 (JSON); VersionDef version = 6 }


@dataclass(frozen=True)
class KerasObject:
    path: str  # "root.layer_with_weights-0.cell"
    identifier: str  # "_tf_keras_layer", "_tf_keras_network", …
    metadata: bytes  # JSON


def read_metadata(folder: Path) -> list[KerasObject]:
    label = str(folder / METADATA_NAME)
    data = memoryview(_read_member(folder, METADATA_NAME, MAX_METADATA_BYTES))
    objects: list[KerasObject] = []
    for number, wire_type, value in _fields(data, label, "metadata"):
        if number != 1:
            continue
        _expect(wire_type, 2, number, label, "metadata")
        if len(objects) >= MAX_METADATA_OBJECTS:
            raise ExchangeFileError(f"{label}: more than {MAX_METADATA_OBJECTS:,} Keras objects")
        path = identifier = ""
        metadata = b""
        for field, field_type, field_value in _fields(value, label, "metadata"):
            if field in (3, 4, 5):
                _expect(field_type, 2, field, label, "metadata")
                if field == 3:
                    path = _text(field_value, label, "an object's path")
                elif field == 4:
                    identifier = _text(field_value, label, "an object's identifier")
                else:
                    metadata = bytes(field_value)
        objects.append(KerasObject(path, identifier, metadata))
    return objects


def _root_config(objects: list[KerasObject], label: str) -> dict:
    roots = [entry for entry in objects if entry.path == ROOT_PATH]
    if len(roots) != 1:
        raise ExchangeFileError(f"{label}: {len(roots)} root objects, expected one")
    description = untrusted.load_json(roots[0].metadata, label, "the model's metadata")
    if not isinstance(description, dict):
        raise ExchangeFileError(f"{label}: the model's metadata is not a JSON object")
    config = _plain(description.get("model_config"))
    if not isinstance(config, dict) or "class_name" not in config:
        raise ExchangeFileError(
            f"{label}: no model config in the model's metadata (a subclassed model "
            f"{description.get('class_name')!r} saves none; only Sequential and "
            "functional models are read)"
        )
    return config


def _plain(value):
    """The JSON as `model.to_json()` writes it: tf.keras's SavedModel metadata writes tuples and
    shapes as {"class_name": "__tuple__" or "TensorShape", "items": [...]} (its json_utils)."""
    if isinstance(value, dict):
        if (
            value.get("class_name") in ("__tuple__", "TensorShape")
            and isinstance(value.get("items"), list)
            and len(value) == 2
        ):
            return [_plain(item) for item in value["items"]]
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _layer_paths(objects: list[KerasObject], label: str) -> dict[tuple[str, ...], list[str]]:
    """Each Keras object's names from the model (nested models' names, then its own) -> its path's
    attribute names below the root. Objects outside the tree of layers (metrics) are left out."""
    by_path = {entry.path: entry for entry in objects if entry.identifier.startswith("_tf_keras_")}
    names: dict[str, tuple[str, ...] | None] = {ROOT_PATH: ()}
    found: dict[tuple[str, ...], list[str]] = {}
    for path in sorted(by_path, key=lambda text: text.count(".")):
        parts = path.split(".")
        if path == ROOT_PATH or parts[0] != ROOT_PATH:
            continue
        if len(parts) > MAX_PATH_PARTS:
            raise ExchangeFileError(f"{label}: object path {path[:200]!r} is more than {MAX_PATH_PARTS} deep")
        parent = names.get(".".join(parts[:-1]))
        if parent is None:  # below an object that is not a layer: not one of the model's
            names[path] = None
            continue
        description = untrusted.load_json(by_path[path].metadata, label, f"metadata of {path[:200]}")
        name = description.get("name") if isinstance(description, dict) else None
        if not isinstance(name, str):
            raise ExchangeFileError(f"{label}: the metadata of {path[:200]!r} names no layer")
        chain = parent + (name,)
        if chain in found:
            raise ExchangeFileError(f"{label}: two objects are layer {'/'.join(chain)[:200]!r}")
        names[path] = chain
        found[chain] = parts[1:]
    return found


# ---------------------------------------------------------------------------------------------
# variables.index: a table of sorted keys (LevelDB's format, no compression): data blocks of
# prefix-compressed entries, an index block of their handles, a 48-byte footer. Each value is a
# BundleEntryProto, the empty key's a BundleHeaderProto.


def read_index(folder: Path) -> dict[str, BundleEntry]:
    label = str(folder / INDEX_NAME)
    data = memoryview(_read_member(folder, INDEX_NAME, MAX_INDEX_BYTES))
    if len(data) < FOOTER_BYTES:
        raise ExchangeFileError(f"{label}: {len(data)} bytes, too short for a checkpoint index")
    footer = data[len(data) - FOOTER_BYTES :]
    if int.from_bytes(footer[40:], "little") != TABLE_MAGIC:
        raise ExchangeFileError(f"{label}: not a checkpoint index (no table magic number at its end)")
    _, position = _block_handle(footer, 0, label)  # the metaindex block: empty in TensorFlow's tables
    index_handle, _ = _block_handle(footer, position, label)
    entries: dict[str, BundleEntry] = {}
    header_seen = False
    previous = None
    for _, handle_bytes in _block_entries(data, index_handle, label):
        handle, _ = _block_handle(memoryview(handle_bytes), 0, label)
        for key_bytes, value in _block_entries(data, handle, label):
            if previous is not None and key_bytes <= previous:
                raise ExchangeFileError(f"{label}: damaged checkpoint index (keys out of order)")
            previous = key_bytes
            key = _text(memoryview(key_bytes), label, "a checkpoint key")
            if key == "":
                _check_header(memoryview(value), label)
                header_seen = True
                continue
            if len(entries) >= MAX_BUNDLE_ENTRIES:
                raise ExchangeFileError(f"{label}: more than {MAX_BUNDLE_ENTRIES:,} tensors")
            entries[key] = _bundle_entry(key, memoryview(value), label)
    if not header_seen:
        raise ExchangeFileError(f"{label}: damaged checkpoint index (no header entry)")
    return entries


def _block_handle(data: memoryview, position: int, label: str) -> tuple[tuple[int, int], int]:
    offset, position = _varint(data, position, label, "checkpoint index")
    size, position = _varint(data, position, label, "checkpoint index")
    return (offset, size), position


def _block_entries(data: memoryview, handle: tuple[int, int], label: str):
    """(key, value) of one block, after checking it lies in the file and its CRC."""
    offset, size = handle
    if offset + size + BLOCK_TRAILER_BYTES > len(data) - FOOTER_BYTES:
        raise ExchangeFileError(
            f"{label}: damaged checkpoint index (a block at {offset:,} of {size:,} bytes lies outside the file)"
        )
    block = data[offset : offset + size]
    kind = data[offset + size]
    stored_crc = int.from_bytes(data[offset + size + 1 : offset + size + 5], "little")
    if masked(crc32c(bytes(data[offset : offset + size + 1]))) != stored_crc:
        raise ExchangeFileError(f"{label}: damaged checkpoint index (checksum of the block at {offset:,})")
    if kind != 0:
        raise ExchangeFileError(
            f"{label}: a compressed checkpoint index (block type {kind}); TensorFlow "
            "writes them uncompressed and only those are read"
        )
    if size < 4:
        raise ExchangeFileError(f"{label}: damaged checkpoint index (a block of {size} bytes)")
    restarts = int.from_bytes(block[size - 4 :], "little")
    if restarts < 1 or 4 * (restarts + 1) > size:
        raise ExchangeFileError(f"{label}: damaged checkpoint index ({restarts:,} restart points)")
    end = size - 4 * (restarts + 1)
    position, key = 0, b""
    while position < end:
        shared, position = _varint(block, position, label, "checkpoint index")
        unshared, position = _varint(block, position, label, "checkpoint index")
        value_length, position = _varint(block, position, label, "checkpoint index")
        if shared > len(key) or unshared + value_length > end - position:
            raise ExchangeFileError(f"{label}: damaged checkpoint index (an entry runs past its block)")
        key = key[:shared] + bytes(block[position : position + unshared])
        position += unshared
        yield key, bytes(block[position : position + value_length])
        position += value_length


def _check_header(value: memoryview, label: str) -> None:
    """BundleHeaderProto { int32 num_shards = 1; Endianness endianness = 2; VersionDef version = 3 }"""
    shards, endianness = 1, 0  # protobuf's defaults (proto3 leaves 0 out; TensorFlow writes 1 shard)
    for number, wire_type, field in _fields(value, label, "checkpoint header"):
        if number == 1:
            _expect(wire_type, 0, number, label, "checkpoint header")
            shards = field
        elif number == 2:
            _expect(wire_type, 0, number, label, "checkpoint header")
            endianness = field
    if shards != 1:
        raise ExchangeFileError(
            f"{label}: a checkpoint in {shards:,} shards; only single-shard checkpoints "
            "(what model.save writes) are read"
        )
    if endianness != 0:
        raise ExchangeFileError(f"{label}: a big-endian checkpoint; only little-endian ones are read")


def _bundle_entry(key: str, value: memoryview, label: str) -> BundleEntry:
    """BundleEntryProto { DataType dtype = 1; TensorShapeProto shape = 2; int32 shard_id = 3;
    int64 offset = 4; int64 size = 5; fixed32 crc32c = 6; repeated TensorSliceProto slices = 7 }"""
    what = f"entry {key[:200]!r}"
    dtype = shard = offset = size = crc = 0
    shape: tuple[int, ...] = ()
    sliced = False
    for number, wire_type, field in _fields(value, label, what):
        if number in (1, 3, 4, 5):
            _expect(wire_type, 0, number, label, what)
            if number == 1:
                dtype = field
            elif number == 3:
                shard = _signed64(field)
            elif number == 4:
                offset = _signed64(field)
            else:
                size = _signed64(field)
        elif number == 2:
            _expect(wire_type, 2, number, label, what)
            shape = _shape(field, label, what)
        elif number == 6:
            _expect(wire_type, 5, number, label, what)
            crc = field
        elif number == 7:
            sliced = True
    if offset < 0 or size < 0:
        raise ExchangeFileError(f"{label}: {what} declares a negative offset or size")
    return BundleEntry(key, dtype, shape, shard, offset, size, crc, sliced)


def _shape(value: memoryview, label: str, what: str) -> tuple[int, ...]:
    """TensorShapeProto { repeated Dim dim = 2 (Dim { int64 size = 1; string name = 2 }); bool unknown_rank = 3 }"""
    dims: list[int] = []
    for number, wire_type, field in _fields(value, label, what):
        if number == 2:
            _expect(wire_type, 2, number, label, what)
            if len(dims) >= MAX_RANK:
                raise ExchangeFileError(f"{label}: {what} has more than {MAX_RANK} dimensions")
            size = 0
            for dim_number, dim_type, dim_value in _fields(field, label, what):
                if dim_number == 1:
                    _expect(dim_type, 0, dim_number, label, what)
                    size = _signed64(dim_value)
            if size < 0:
                raise ExchangeFileError(f"{label}: {what} has a dimension of unknown size ({size})")
            dims.append(size)
        elif number == 3 and field:
            raise ExchangeFileError(f"{label}: {what} has an unknown rank")
    return tuple(dims)


# ---------------------------------------------------------------------------------------------
# The data file


class _DataFile:
    """variables.data-00000-of-00001, opened once; each tensor is a read-only memory map of its
    bytes, whose CRC-32C is checked the first time it is read."""

    def __init__(self, folder: Path):
        self.label = str(folder / DATA_NAME)
        path = _member(folder, DATA_NAME)
        try:
            self.stream = open(path, "rb")  # noqa: SIM115 (held while the tensors are read; close() closes it)
        except OSError as err:
            raise ExchangeFileError(f"{self.label}: cannot read ({err.strerror or err})") from None
        self.size = os.fstat(self.stream.fileno()).st_size
        self.checked: set[str] = set()

    def close(self) -> None:
        self.stream.close()

    def check_entry(self, entry: BundleEntry, index_label: str) -> None:
        what = f"{index_label}: entry {entry.key[:200]!r}"
        if entry.sliced:
            raise ExchangeFileError(f"{what} is saved in slices (a partitioned variable); not read")
        if entry.shard_id != 0:
            raise ExchangeFileError(f"{what} is in shard {entry.shard_id}; the checkpoint has one")
        if entry.offset + entry.size > self.size:
            raise ExchangeFileError(
                f"{what} declares bytes {entry.offset:,} to {entry.offset + entry.size:,} "
                f"of {self.label}, which holds {self.size:,}"
            )

    def bytes_of(self, entry: BundleEntry) -> bytes:
        """A small entry's bytes (the object graph), CRC checked."""
        data = os.pread(self.stream.fileno(), entry.size, entry.offset)
        if len(data) != entry.size:
            raise ExchangeFileError(f"{self.label}: ends before the bytes of {entry.key[:200]!r}")
        return data

    def array(self, entry: BundleEntry, dtype: np.dtype) -> np.ndarray:
        if entry.size == 0:
            return np.zeros(entry.shape, dtype=dtype)
        try:
            stored = np.memmap(self.stream, dtype=dtype, mode="r", offset=entry.offset, shape=entry.shape)
        except (OSError, ValueError) as err:
            raise ExchangeFileError(f"{self.label}: cannot read {entry.key[:200]!r} ({err})") from None
        if entry.key not in self.checked:
            if masked(crc32c(np.asarray(stored))) != entry.crc32c:
                raise ExchangeFileError(
                    f"{self.label}: checksum mismatch in the bytes of {entry.key[:200]!r} (a damaged file)"
                )
            self.checked.add(entry.key)
        return stored


def _string_scalar(data: bytes, entry: BundleEntry, label: str) -> bytes:
    """A DT_STRING scalar as tensor_bundle.cc writes it: varint64 length, the masked CRC-32C of the
    length (as 4 little-endian bytes), the bytes. The entry's CRC covers the length as 4 bytes, that
    checksum, and the bytes."""
    what = f"{label}: entry {entry.key!r}"
    length, position = _varint(memoryview(data), 0, label, f"entry {entry.key!r}")
    if length > 0xFFFFFFFF or position + 4 + length != len(data):
        raise ExchangeFileError(f"{what}: its length {length:,} does not match its {len(data):,} bytes")
    length_bytes = length.to_bytes(4, "little")
    length_checksum = data[position : position + 4]
    if masked(crc32c(length_bytes)) != int.from_bytes(length_checksum, "little"):
        raise ExchangeFileError(f"{what}: checksum mismatch of its length (a damaged file)")
    value = data[position + 4 :]
    if masked(crc32c(length_bytes + length_checksum + value)) != entry.crc32c:
        raise ExchangeFileError(f"{what}: checksum mismatch (a damaged file)")
    return value


# ---------------------------------------------------------------------------------------------
# The object graph: TrackableObjectGraph { repeated TrackableObject nodes = 1 }; TrackableObject {
# repeated ObjectReference children = 1 (int32 node_id = 1; string local_name = 2); repeated
# SerializedTensor attributes = 2 (string name = 1; string full_name = 2; string checkpoint_key = 3) }


class ObjectGraph:
    """The checkpoint's object tree; a node's children and attributes are decoded when asked for."""

    def __init__(self, data: bytes, label: str):
        self.data, self.label = memoryview(data), label
        self.nodes: list[memoryview] = []
        for number, wire_type, value in _fields(self.data, label, "object graph"):
            if number == 1:
                _expect(wire_type, 2, number, label, "object graph")
                if len(self.nodes) >= MAX_GRAPH_OBJECTS:
                    raise ExchangeFileError(f"{label}: more than {MAX_GRAPH_OBJECTS:,} objects in the object graph")
                self.nodes.append(value)
        if not self.nodes:
            raise ExchangeFileError(f"{label}: an empty object graph")
        self.decoded: dict[int, list[tuple[int, str]]] = {}  # the root's children are asked for once a layer

    def children(self, node: int) -> list[tuple[int, str]]:
        if node not in self.decoded:
            self.decoded[node] = self._children(node)
        return self.decoded[node]

    def _children(self, node: int) -> list[tuple[int, str]]:
        found = []
        for number, wire_type, value in _fields(self.nodes[node], self.label, "object graph"):
            if number == 1:
                _expect(wire_type, 2, number, self.label, "object graph")
                child, name = -1, ""
                for field, field_type, field_value in _fields(value, self.label, "object graph"):
                    if field == 1:
                        _expect(field_type, 0, field, self.label, "object graph")
                        child = _signed64(field_value)
                    elif field == 2:
                        _expect(field_type, 2, field, self.label, "object graph")
                        name = _text(field_value, self.label, "an object's name")
                if not 0 <= child < len(self.nodes):
                    raise ExchangeFileError(f"{self.label}: damaged object graph (a reference to object {child})")
                found.append((child, name))
        return found

    def child(self, node: int, name: str) -> int | None:
        matches = {child for child, local_name in self.children(node) if local_name == name}
        if len(matches) > 1:
            raise ExchangeFileError(f"{self.label}: object {node} has {len(matches)} children named {name[:200]!r}")
        return matches.pop() if matches else None

    def attributes(self, node: int) -> list[tuple[str, str, str]]:
        found = []
        for number, wire_type, value in _fields(self.nodes[node], self.label, "object graph"):
            if number == 2:
                _expect(wire_type, 2, number, self.label, "object graph")
                parts = ["", "", ""]
                for field, field_type, field_value in _fields(value, self.label, "object graph"):
                    if field in (1, 2, 3):
                        _expect(field_type, 2, field, self.label, "object graph")
                        parts[field - 1] = _text(field_value, self.label, "an attribute")
                found.append((parts[0], parts[1], parts[2]))
        return found


def _layer_variables(graph: ObjectGraph, path: list[str], where: str) -> list[tuple[str, str]]:
    """(variable name, checkpoint key) of the layer at `path`, in the layer's weight order."""
    node = 0
    for part in path:
        child = graph.child(node, part)
        if child is None:
            raise ExchangeFileError(
                f"{graph.label}: no object {'.'.join([ROOT_PATH] + path)[:200]!r} in the object graph ({where})"
            )
        node = child
    listing = graph.child(node, "variables")
    if listing is None:
        return []
    items = graph.children(listing)
    if len(items) > MAX_LAYER_VARIABLES:
        raise ExchangeFileError(f"{graph.label}: {where} lists more than {MAX_LAYER_VARIABLES:,} variables")
    if sorted(name for _, name in items) != sorted(str(index) for index in range(len(items))):
        raise ExchangeFileError(f"{graph.label}: {where}'s variables are not numbered 0 to {len(items) - 1}")
    found = []
    for variable, _ in sorted(items, key=lambda item: int(item[1])):
        values = [(full_name, key) for name, full_name, key in graph.attributes(variable) if name == "VARIABLE_VALUE"]
        if len(values) != 1:
            raise ExchangeFileError(
                f"{graph.label}: a variable of {where} has {len(values)} saved values, expected one"
            )
        full_name, key = values[0]
        found.append((full_name.rsplit("/", 1)[-1], key))
    return found


# ---------------------------------------------------------------------------------------------
# The reader


class _SavedModelSource:
    """What KerasWeights keeps open: the data file."""

    def __init__(self, data: _DataFile):
        self.data = data

    def close(self) -> None:
        self.data.close()


def open_saved_model(folder: str | os.PathLike) -> keras_files.KerasWeights:
    """A Keras 2 SavedModel folder -> graph and lazy file-layout tensors, as `open_keras_file` gives
    for the same model saved as a Keras 2 `.h5`."""
    folder = Path(folder)
    if not is_saved_model_folder(folder):
        raise ExchangeFileError(f"{folder}: not a folder")
    metadata_path = folder / METADATA_NAME
    if not os.path.lexists(metadata_path):
        raise ExchangeFileError(
            f"{folder}: not a regular file (a folder), and not a Keras SavedModel folder: no "
            f"{METADATA_NAME} (a TensorFlow SavedModel not written by Keras has no Keras config "
            "to read)"
        )
    label = str(metadata_path)
    objects = read_metadata(folder)
    parsed = parse_model_config(_root_config(objects, label), label, keras2=True)
    paths = _layer_paths(objects, label)
    index_label = str(folder / INDEX_NAME)
    entries = read_index(folder)
    data = _DataFile(folder)
    try:
        for entry in entries.values():
            data.check_entry(entry, index_label)
        graph_entry = entries.get(OBJECT_GRAPH_KEY)
        if graph_entry is None or graph_entry.dtype != DT_STRING or graph_entry.shape != ():
            raise ExchangeFileError(f"{index_label}: no object graph ({OBJECT_GRAPH_KEY}) in the checkpoint")
        if graph_entry.size > MAX_OBJECT_GRAPH_BYTES:
            raise ExchangeFileError(
                f"{index_label}: an object graph of {graph_entry.size:,} bytes, more than "
                f"the {MAX_OBJECT_GRAPH_BYTES:,} this tool reads"
            )
        object_graph = ObjectGraph(_string_scalar(data.bytes_of(graph_entry), graph_entry, data.label), data.label)

        def variables_of(location: KerasLocation) -> list:
            where = f"layer {location.layer_name!r}"
            path = paths.get(location.container_path + (location.layer_name,))
            if path is None:
                return []  # no saved object: no variables (checked against the layer's kind)
            found = []
            for name, key in _layer_variables(object_graph, path, where):
                found.append((name, _lazy(data, entries, key, index_label, where)))
            return found

        stored = {node.name: variables_of(parsed.locations[node.name]) for node in parsed.graph.layers}
        tensors = weight_layout.keras_to_file(parsed.graph, stored, str(folder), parsed.class_names)
    except BaseException:
        data.close()
        raise
    return keras_files.KerasWeights(parsed.graph, tensors, _SavedModelSource(data))


def _lazy(data: _DataFile, entries: dict[str, BundleEntry], key: str, index_label: str, where: str) -> LazyTensor:
    entry = entries.get(key)
    if entry is None:
        raise ExchangeFileError(f"{index_label}: no tensor {key[:200]!r} ({where})")
    if entry.dtype not in DTYPES:
        raise ExchangeFileError(
            f"{index_label}: tensor {key[:200]!r} ({where}) has TensorFlow type {entry.dtype}; "
            "only float16/32/64 and integers are read"
        )
    dtype = np.dtype(DTYPES[entry.dtype])
    declared = untrusted.declared_nbytes(entry.shape, dtype)
    if declared != entry.size:
        raise ExchangeFileError(
            f"{index_label}: tensor {key[:200]!r} ({where}) is {entry.shape} {dtype.name}, "
            f"{declared:,} bytes, but declares {entry.size:,}"
        )
    return LazyTensor(entry.shape, dtype, lambda: data.array(entry, dtype))


def read_config(folder: str | os.PathLike) -> dict:
    """The model config in a Keras SavedModel folder's keras_metadata.pb."""
    folder = Path(folder)
    if not os.path.lexists(folder / METADATA_NAME):
        raise ExchangeFileError(
            f"{folder}: not a regular file (a folder), and not a Keras SavedModel folder: no {METADATA_NAME}"
        )
    return _root_config(read_metadata(folder), str(folder / METADATA_NAME))


__all__ = ["crc32c", "is_saved_model_folder", "masked", "open_saved_model", "read_config"]
