"""Reading files from strangers: the limits, and the guards every reader calls before it opens,
allocates or follows anything.

People convert model files downloaded from anywhere, so every size a file declares is checked
against what the file can actually hold (its bytes on disk, its zip members, a compression ratio)
and against the caps below before anything is allocated. Reading a file of N bytes needs at most
about N bytes of memory (MAX_COMPRESSION_RATIO times N for compressed data) plus a constant.
Special files (FIFOs, devices, folders) are refused before they are opened. Each failure is an
`ExchangeFileError` naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import h5py
import numpy as np
from numpy.typing import DTypeLike

from exchange.errors import ExchangeFileError, first_line
from exchange.graph import MAX_NODES

# JSON (Keras configs, architectures, safetensors headers).
MAX_JSON_BYTES = 16 << 20  # the largest keras.applications config (NASNetLarge) is 1.0 MB
MAX_JSON_DEPTH = 256  # ResNet50's config nests 11 levels, a nested model a few more; Python recurses at 1000
MAX_JSON_OBJECTS = 200_000  # NASNetLarge has 13,083 (1,041 layers): fifteen times that
MAX_INT_DIGITS = 20  # int64 has 19 digits: no size, index or count a model holds is longer
MAX_LAYERS = MAX_NODES  # the graph's cap: a file may not hold more layers than a graph may hold nodes
MAX_DENSE_WIDTH = 1 << 20  # units or inputs of a version-1 Dense: the seed's are 784, 50 and 10, VGG16's
# widest 25,088 in, 4,096 out; 2**20 by 2**20 would declare 4 TiB of weights

# Compressed data (zip members, gzip, HDF5 filters).
MAX_COMPRESSION_RATIO = 32  # weights deflate about 1.1x and configs 5-15x; beyond 32x only padding or a bomb
COMPRESSION_SLACK = 16 << 20  # small members (a zero bias compresses 1000x) may exceed the ratio by this much

# Pickles (the seed's MNIST data).
MAX_PICKLE_BYTES = 1 << 30  # the seed's largest pickle (x_train, float32 60000x784) is 188 MB
MAX_PICKLE_MEMO = 1 << 16  # an array pickle stores a few dozen memo entries; the C unpickler
# sizes its memo by the largest index, so 2**28 would take 4 GB

# numpy .npz files (`--verify-inputs`, the seed's mnist.npz): every member a .npy array.
MAX_NPZ_BYTES = 1 << 30  # MNIST's test images as float32 are 31 MB, Keras's mnist.npz 11 MB
MAX_NPZ_ARRAYS = 1024  # a model's inputs, or mnist.npz's four arrays

# HDF5 filters Keras and h5py's built-in compression write; plugins (and their code) are refused.
ALLOWED_HDF5_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32"}

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_FILE_TYPES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_file(path: str | os.PathLike[str]) -> int:
    """The size of `path` after checking, without opening it, that it is a regular file: reading a
    FIFO blocks forever and /dev/zero never ends."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise ExchangeFileError(f"{path}: no such file") from None
    except OSError as err:
        raise ExchangeFileError(f"{path}: cannot read ({err.strerror or err})") from None
    for is_kind, name in _FILE_TYPES:
        if is_kind(status.st_mode):
            raise ExchangeFileError(f"{path}: not a regular file ({name})")
    if not stat.S_ISREG(status.st_mode):
        raise ExchangeFileError(f"{path}: not a regular file")
    return status.st_size


def load_json(raw: bytes | str, label: str, what: str = "JSON") -> object:
    """Parse JSON within the caps: length, nesting depth (checked without recursing), object
    count, integer length; NaN, Infinity and 1e999 are refused (no config needs them)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > MAX_JSON_BYTES:
        raise ExchangeFileError(
            f"{label}: {what} is {len(data):,} bytes, more than the {MAX_JSON_BYTES:,} this tool reads"
        )
    depth, objects = _json_structure(data)
    if depth > MAX_JSON_DEPTH:
        raise ExchangeFileError(f"{label}: {what} nests {depth} levels deep, more than {MAX_JSON_DEPTH}")
    if objects > MAX_JSON_OBJECTS:
        raise ExchangeFileError(f"{label}: {what} holds {objects:,} objects, more than {MAX_JSON_OBJECTS:,}")
    try:
        return json.loads(data, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ExchangeFileError(f"{label}: {what} is not valid JSON ({first_line(err)})") from None


def _json_structure(data: bytes) -> tuple[int, int]:
    """(deepest nesting, number of objects and arrays), counting brackets outside strings."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    opening = (skeleton == ord("{")) | (skeleton == ord("["))
    closing = (skeleton == ord("}")) | (skeleton == ord("]"))
    positions = np.flatnonzero(opening | closing)
    if positions.size == 0:
        return 0, 0
    steps = np.where(opening[positions], 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max()), int(opening.sum())


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _json_constant(text: str) -> NoReturn:
    raise ValueError(f"{text} is not a number this tool accepts")


def check_layer_count(count: int, label: str = "") -> None:
    if count > MAX_LAYERS:
        raise ExchangeFileError(f"{label + ': ' if label else ''}more than the {MAX_LAYERS:,} layers this tool reads")


def check_zip_members(archive: zipfile.ZipFile, label: str, file_size: int) -> None:
    """The members' declared sizes must fit what the archive can hold: together no more than
    MAX_COMPRESSION_RATIO times its size on disk (plus COMPRESSION_SLACK). Python's zipfile and
    torch's reader both stop at the declared size, so this bounds what reading can produce."""
    declared = sum(info.file_size for info in archive.infolist())
    if declared > MAX_COMPRESSION_RATIO * file_size + COMPRESSION_SLACK:
        raise ExchangeFileError(
            f"{label}: its zip members declare {declared:,} bytes from {file_size:,} on disk "
            f"(more than {MAX_COMPRESSION_RATIO}x): a zip bomb or a damaged archive"
        )
    for info in archive.infolist():
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ExchangeFileError(
                f"{label}: member {info.filename!r:.80} uses an unsupported compression (method {info.compress_type})"
            )


def read_zip_member(archive: zipfile.ZipFile, name: str, label: str, limit: int) -> bytes:
    """A member's bytes, refusing one that declares (or yields) more than `limit`."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise ExchangeFileError(f"{label}: {name} declares {info.file_size:,} bytes, more than {limit:,}")
    try:
        with archive.open(info) as stream:
            data = stream.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise ExchangeFileError(f"{label}: {name} is damaged ({first_line(err)})") from None
    if len(data) > limit:
        raise ExchangeFileError(f"{label}: {name} holds more than {limit:,} bytes")
    return data


def load_npz(path: Path, limit: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
    """Every array of a numpy `.npz`, by name, read with `allow_pickle=False` after the checks:
    a regular file of at most `limit` bytes whose members inflate to at most `limit`, each member
    a `.npy` whose declared shape fits its bytes (numpy allocates it before reading) and whose
    dtype holds no Python objects."""
    size = regular_file(path)
    if size > limit:
        raise ExchangeFileError(f"{path}: {size:,} bytes, more than the {limit:,} a .npz may have here")
    try:
        # One open (never blocking: a FIFO put in its place since would), so the file checked
        # is the file read.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_size != size:
                raise ExchangeFileError(f"{path}: changed while it was read")
            return _checked_npz(path, handle, size, limit)
    except ExchangeFileError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        zipfile.BadZipFile,
        IndexError,
        EOFError,
        zlib.error,
        NotImplementedError,
    ) as err:
        raise ExchangeFileError(f"{path}: not a readable .npz ({first_line(err)})") from None


def _checked_npz(path: Path, handle: BinaryIO, size: int, limit: int) -> dict[str, np.ndarray]:
    """`load_npz`'s checks, then its arrays, on one open file."""
    with zipfile.ZipFile(handle) as archive:
        check_zip_members(archive, str(path), size)
        members = archive.infolist()
        if len(members) > MAX_NPZ_ARRAYS:
            raise ExchangeFileError(f"{path}: {len(members):,} members, more than {MAX_NPZ_ARRAYS:,}")
        inflated = sum(info.file_size for info in members)
        if inflated > limit:  # the arrays are read whole: the compression cap alone allows 32x
            raise ExchangeFileError(f"{path}: its arrays inflate to {inflated:,} bytes, more than {limit:,}")
        for info in members:
            if not info.filename.endswith(".npy"):
                raise ExchangeFileError(f"{path}: member {info.filename!r:.80} is not a .npy array")
            with archive.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(stream)
            member = f"{info.filename!r:.80}"
            if dtype.hasobject:
                raise ExchangeFileError(f"{path}: {member} holds Python objects, which are never unpickled")
            if declared_nbytes(shape, dtype) > info.file_size:
                raise ExchangeFileError(
                    f"{path}: {member} declares {dtype} {shape}, more than its {info.file_size:,} bytes"
                )
    handle.seek(0)
    with np.load(handle, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def declared_nbytes(shape: Iterable[int], dtype: DTypeLike) -> int:
    """Bytes of an array of `shape`, in Python integers (numpy's product wraps around at 2**63)."""
    count: int = math.prod(int(size) for size in shape)
    return count * np.dtype(dtype).itemsize


def check_path_text(value: object, label: str, what: str) -> str:
    """An HDF5 attribute or name that must be text: bytes are decoded strictly as UTF-8."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ExchangeFileError(f"{label}: {what} is not UTF-8 text") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # h5py decodes invalid UTF-8 to lone surrogates
        except UnicodeEncodeError:
            raise ExchangeFileError(f"{label}: {what} is not UTF-8 text") from None
        return value
    raise ExchangeFileError(f"{label}: {what} is {type(value).__name__}, expected text")


def hdf5_get(h5: h5py.Group, path: str, label: str, checked: dict[str, Any] | None = None) -> Any:
    """`h5.get(path)`, following hard links only: a soft or external link could lead out of the
    file (h5py opens the file an external link names), and Keras writes neither. `checked` keeps
    the groups already resolved (a model's 300 datasets share a few dozen groups)."""
    checked = {} if checked is None else checked
    node, walked = h5, ""
    for part in (part for part in path.split("/") if part):
        walked = f"{walked}/{part}"
        if walked in checked:
            node = checked[walked]
            continue
        if not isinstance(node, h5py.Group):
            return None
        link = node.get(part, getlink=True)
        if link is None:
            return None
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            target = getattr(link, "filename", "") or ""
            raise ExchangeFileError(
                f"{label}: {path} is a {type(link).__name__} "
                f"to {target + ':' if target else ''}{link.path}; links are refused"
            )
        node = node.get(part)
        if isinstance(node, h5py.Group):
            checked[walked] = node
    return node


def check_hdf5_dataset(dataset: h5py.Dataset, label: str, window_size: int) -> int:
    """A dataset must hold its numbers in this file: no external storage (it would read the file it
    names), no virtual dataset, only ALLOWED_HDF5_FILTERS, and a declared size its stored bytes
    can produce. Returns the declared size in bytes."""
    name = dataset.name
    if dataset.external:
        files = ", ".join(str(entry[0]) for entry in dataset.external)
        raise ExchangeFileError(f"{label}: dataset {name} keeps its data in another file ({files}); refused")
    if dataset.is_virtual:
        raise ExchangeFileError(f"{label}: dataset {name} is a virtual dataset (data from other files); refused")
    dtype = np.dtype(dataset.dtype)
    if dtype.kind not in "fiub" or dtype.fields is not None or dtype.subdtype is not None:
        raise ExchangeFileError(f"{label}: dataset {name} holds {dtype}, not numbers")
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(index)[0] for index in range(plist.get_nfilters())]
    refused = [code for code in filters if code not in ALLOWED_HDF5_FILTERS]
    if refused:
        raise ExchangeFileError(
            f"{label}: dataset {name} uses HDF5 filter(s) {refused}; only "
            f"{', '.join(ALLOWED_HDF5_FILTERS.values())} are read"
        )
    nbytes = declared_nbytes(dataset.shape, dtype)
    if nbytes == 0:
        return 0
    stored = dataset.id.get_storage_size()
    if dataset.chunks is None:
        offset = dataset.id.get_offset()
        if offset is None or offset + nbytes > window_size:
            raise ExchangeFileError(f"{label}: dataset {name} declares {nbytes:,} bytes the file does not hold")
    elif stored > window_size or nbytes > (MAX_COMPRESSION_RATIO * stored + COMPRESSION_SLACK if filters else stored):
        raise ExchangeFileError(
            f"{label}: dataset {name} declares {nbytes:,} bytes from {stored:,} stored: a sparse or bomb dataset"
        )
    return nbytes


def check_torch_archive(path: Path) -> None:
    """A `.pt` must be the zip archive torch.save writes (since torch 1.6) whose members fit the
    file: torch's reader allocates each member's declared size before reading it."""
    size = regular_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_members(archive, str(path), size)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        raise ExchangeFileError(
            f"{path}: not a readable PyTorch weights file (not the zip archive torch.save "
            "writes; files of torch before 1.6 are not read)"
        ) from None


def hdf5_attribute(node: Any, name: str, label: str, window_size: int, default: Any = None) -> Any:
    """An attribute's value, after checking that its declared size fits the file: h5py allocates
    the declared shape before reading it."""
    if name not in node.attrs:
        return default
    attribute = node.attrs.get_id(name)
    if declared_nbytes(attribute.shape or (), attribute.dtype) > window_size:
        raise ExchangeFileError(f"{label}: attribute {name} of {node.name} declares more bytes than the file holds")
    return node.attrs[name]
