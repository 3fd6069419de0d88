"""The common file: one `.safetensors` that is exactly the torch module's `state_dict()`.

Tensors are keyed by the Keras layer names made safe for torch (`conv1_conv.weight`,
`conv1_bn.running_mean`), in torch layout, each in its own dtype (float16, float32, float64;
BatchNorm's `num_batches_tracked` int64). A plain `safetensors.torch.load_file` +
`load_state_dict(strict=True)` loads it into the module built from its architecture.
Metadata (all strings, as safetensors requires):

    format            "pt"            what `transformers` and others look for
    exchange_version  "2"             this file format's version ("1" files still load)
    architecture      JSON            `Graph.to_json()`: rebuild the model from the file
    source_framework  "keras"|"torch" who produced the weights

A file converted from a Keras file with training state also holds (`exchange.training_state`):

    optimizer         JSON            the Keras optimizer's class, checked config and iteration count
    training          JSON            the loss (Keras's compile config) and regularization factors
    optimizer/KEY/SLOT tensors        each optimizer slot of parameter KEY (`optimizer/dense.weight/momentum`)

The slot keys contain `/`, which no torch state_dict key does: `load` and the model loaders set
them apart (`ExchangeFile.training_tensors`), so the model's tensors load as before;
`safetensors.torch.load_file` returns them too, so a plain `load_state_dict` needs them left out.

Version 1 files (a Dense stack, keys `layers.{i}.weight`) are upgraded on read: the same graph
with layers `dense_0`, `dense_1`, … and keys renamed to match.

This module needs numpy and safetensors only: no framework is imported.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
from safetensors import SafetensorError, safe_open

from exchange import untrusted
from exchange.errors import ArchitectureMismatchError, ExchangeError, ExchangeFileError, TensorMismatchError, first_line
from exchange.graph import Graph, dense_chain
from exchange.tensors import AnyTensor, LazyTensor
from exchange.tensors import materialize as materialize_tensor

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
SOURCE_FRAMEWORKS = ("keras", "torch")
# safetensors dtype code <-> numpy dtype, for the dtypes the exchange file holds.
SAFETENSORS_DTYPES: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
}
DTYPE_CODES = {dtype.name: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class ExchangeFile:
    """What one common-format file holds."""

    architecture: Graph
    tensors: dict[str, np.ndarray]
    source_framework: str
    metadata: dict[str, str]
    training_tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # optimizer/KEY/SLOT


TRAINING_PREFIX = "optimizer/"  # keys of optimizer slots; never a torch state_dict key (no `/` there)


def split_training(tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model tensors, optimizer slot tensors) of a file's tensors."""
    training = {key: value for key, value in tensors.items() if key.startswith(TRAINING_PREFIX)}
    return {key: value for key, value in tensors.items() if key not in training}, training


def check_tensors(architecture: Graph, tensors: Mapping[str, AnyTensor], where: str = "") -> None:
    """Raise one `TensorMismatchError` listing every missing, unexpected and mis-shaped tensor.

    `where` (a file name, say) starts the message when given.
    """
    check_specs(architecture.tensor_specs, tensors, where)


def check_specs(
    expected: Mapping[str, tuple[tuple[int, ...], str]], tensors: Mapping[str, AnyTensor], where: str = ""
) -> None:
    """`check_tensors` against specs (key -> (shape, dtype name)) from anywhere: an architecture,
    or a torch module's own state_dict (`torch_adapter.set_tensors`)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = []
    for key in sorted(set(expected) & set(tensors)):
        actual_shape, actual_dtype = tuple(tensors[key].shape), np.dtype(tensors[key].dtype).name
        expected_shape, expected_dtype = expected[key]
        if actual_shape != tuple(expected_shape) or actual_dtype != expected_dtype:
            mismatched.append(
                f"{key}: expected {expected_dtype} {tuple(expected_shape)}, found {actual_dtype} {actual_shape}"
            )
    if missing or unexpected or mismatched:
        raise TensorMismatchError(missing, unexpected, mismatched, where)


# Atomic outputs. A SIGKILL (or a power cut) cannot be caught, so what it may leave is designed:
# bytes the exchange writes itself go to a file without a name until complete; a writer that
# needs a path gets a private folder that records its owner, removed by the next run if stale.
OWNER_RECORD = ".owner"  # in a private folder: "PID START_TIME BOOT_ID" of the process using it
# O_TMPFILE unknown to the filesystem (EOPNOTSUPP: tmpfs before Linux 3.11, NFS, FUSE, …) or the
# kernel (before 3.11 it reads as O_DIRECTORY: EISDIR), or refused with these flags (EINVAL).
NO_TMPFILE_ERRORS = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)


class PendingOutput:
    """The temporary of one `atomic_file`, written one of two ways.

    `open()`: where the exchange writes the bytes itself. On Linux they go to an anonymous file in
    the target's folder (O_TMPFILE) that gets a name only once complete, so a SIGKILL mid-write
    leaves no entry at all, and its blocks are freed.
    `path`: `.NAME.XXXXXXXX.tmp/NAME` in a private folder beside the target, for writers that insist
    on a path (Keras needs a `.keras` name); what they write next to it lands in the folder too.
    The folder records its owner, so the next `atomic_file` for the target removes it if a SIGKILL
    left it behind. Readers (the read-back check, --verify) use `path` once the file is written.
    """

    def __init__(self, target: Path):
        self.target = target
        self.folder: Path | None = None

    @property
    def path(self) -> Path:
        """The temporary's name in the private folder, which is made (and its owner recorded) on first use."""
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp"))
            (self.folder / OWNER_RECORD).write_text(_process_identity(os.getpid()) or "unknown")
        return self.folder / self.target.name

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """A file to write the output into (readable too: the safetensors writer maps it)."""
        descriptor = _anonymous_file(self.target.parent) if self.folder is None else None
        anonymous = descriptor is not None
        if descriptor is None:  # no O_TMPFILE here: a named file in the private folder
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(descriptor, "r+b", closefd=False) as stream:
                yield stream
            if anonymous:  # complete: only now does it get a name, in the private folder
                _link_anonymous(descriptor, self.path)
        finally:
            os.close(descriptor)

    def commit(self) -> None:
        """Move the written file onto the target; the data, then the folder's entry, reach the disk."""
        temporary = self.path
        # The private folder is readable by its owner only; give the file the usual umask mode.
        os.chmod(temporary, 0o666 & ~_current_umask())
        flush_to_disk(temporary)
        os.replace(temporary, self.target)
        flush_to_disk(self.target.parent)

    def discard(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[PendingOutput]:
    """Yield the `PendingOutput` for `path`; it replaces `path` only if the block succeeds.

    A failed or interrupted write leaves no partial file and never clobbers an existing one; the
    data and then the folder holding `path` are flushed to disk around the rename, so a crash
    leaves the old file or the new one. Stale temporaries of `path` are removed first.

    Example:
        >>> with atomic_file("model.pt") as pending, pending.open() as stream:
        ...     torch.save(state_dict, stream)
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ExchangeFileError(f"{path}: output folder {path.parent} does not exist")
    remove_stale_temporaries(path)
    pending = PendingOutput(path)
    try:
        yield pending
        pending.commit()
    finally:
        pending.discard()


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """`atomic_file` for a writer that insists on a path: yields `PendingOutput.path`."""
    with atomic_file(path) as pending:
        yield pending.path


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the private folders beside `path` that SIGKILLed runs left: only folders named
    exactly `.NAME.XXXXXXXX.tmp` (as `tempfile.mkdtemp` names them), owned by this user, whose
    recorded owner process is gone. A folder whose owner cannot be told is kept."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    removed: list[Path] = []
    try:
        with os.scandir(path.parent) as listing:
            entries = [entry for entry in listing if pattern.fullmatch(entry.name)]
    except OSError:
        return removed
    for entry in entries:
        try:
            status = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and _owner_is_gone(Path(entry.path)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _owner_is_gone(folder: Path) -> bool:
    """Whether the process a private folder records has ended: no such pid, a pid reused by a
    later process (another start time), or a pid from before a reboot (another boot id)."""
    try:
        with open(folder / OWNER_RECORD, "rb") as record:
            fields = record.read(200).decode("ascii", "replace").split()
    except OSError:
        return False
    if len(fields) != 3 or not fields[0].isdecimal() or _boot_id() is None:
        return False
    return _process_identity(int(fields[0])) != " ".join(fields)


def _process_identity(pid: int) -> str | None:
    """ "PID START_TIME BOOT_ID" of a running process, or None when there is none (or no /proc).
    The start time (field 22 of /proc/PID/stat, after the command name in parentheses) tells a
    process from a later one given the same pid."""
    boot = _boot_id()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return f"{pid} {fields[19]} {boot}" if boot is not None and len(fields) > 19 else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _anonymous_file(folder: Path) -> int | None:
    """A descriptor of a new file without a name in `folder` (O_TMPFILE), or None where the system
    or the filesystem has none (it is then written under a name)."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):  # the name is given through /proc
        return None
    try:
        return os.open(folder, flag | os.O_RDWR, 0o600)
    except OSError as err:
        if err.errno in NO_TMPFILE_ERRORS:
            return None
        raise


def _link_anonymous(descriptor: int, path: Path) -> None:
    """Give an O_TMPFILE file the name `path`: linkat(2) of /proc/self/fd/N with AT_SYMLINK_FOLLOW
    (needs no privilege, unlike AT_EMPTY_PATH). `dst_dir_fd` makes CPython call linkat: without a
    folder descriptor it calls link(2), which links /proc's symlink itself and fails with EXDEV."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{descriptor}", path.name, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def flush_to_disk(path: Path) -> None:
    """fsync a file's data, or a folder's entries (so that a rename in it survives a crash)."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(
    path: str | os.PathLike[str],
    architecture: Graph,
    tensors: Mapping[str, AnyTensor],
    source_framework: str,
    training: tuple[dict[str, str], Mapping[str, AnyTensor]] | None = None,
) -> None:
    """Validate `tensors` against `architecture`, then write the common file atomically.

    Tensors may be arrays or `LazyTensor`s; lazy ones are read one at a time, so a large model
    is never whole in memory.

    Example:
        >>> graph = dense_chain("tiny", 2, [(1, "linear")])
        >>> save("tiny.safetensors", graph, {"dense_0.weight": np.ones((1, 2), np.float32),
        ...      "dense_0.bias": np.zeros(1, np.float32)}, source_framework="torch")
    """
    with atomic_file(path) as pending, pending.open() as stream:
        write(stream, architecture, tensors, source_framework, training)


def write(
    destination: str | os.PathLike[str] | BinaryIO,
    architecture: Graph,
    tensors: Mapping[str, AnyTensor],
    source_framework: str,
    training: tuple[dict[str, str], Mapping[str, AnyTensor]] | None = None,
) -> None:
    """`save` without the atomic rename, for a caller that owns the temporary: a path, or a file
    open for reading and writing (`PendingOutput.open()`). `training`: (metadata, slot tensors)
    from `exchange.training_state`, written beside the model's."""
    if source_framework not in SOURCE_FRAMEWORKS:
        raise ExchangeError(f"source_framework must be one of {SOURCE_FRAMEWORKS}, got {source_framework!r}")
    check_tensors(architecture, tensors)
    metadata = {
        "format": "pt",
        "exchange_version": FORMAT_VERSION,
        "architecture": architecture.to_json(),
        "source_framework": source_framework,
    }
    if training is not None:
        extra_metadata, slot_tensors = training
        if set(extra_metadata) & set(metadata) or any(not key.startswith(TRAINING_PREFIX) for key in slot_tensors):
            raise ExchangeError(f"training state must add metadata of its own and keys under {TRAINING_PREFIX!r}")
        metadata.update(extra_metadata)
        tensors = {**tensors, **slot_tensors}
    if isinstance(destination, (str, os.PathLike)):
        with open(destination, "w+b") as stream:
            _write_safetensors(stream, tensors, metadata)
    else:
        _write_safetensors(destination, tensors, metadata)


def _write_safetensors(stream: BinaryIO, tensors: Mapping[str, AnyTensor], metadata: dict[str, str]) -> None:
    """The safetensors layout, written directly: an 8-byte little-endian header length, the JSON
    header padded with spaces to 8 bytes, then each tensor's bytes in header order.

    Each tensor is copied (or transposed) straight into a memory map of its place in the file,
    one at a time, so memory holds at most one tensor of the input and one of the output.
    """
    keys = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in keys:
        dtype = np.dtype(tensors[key].dtype)
        nbytes = int(np.prod(tensors[key].shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {
            "dtype": DTYPE_CODES[dtype.name],
            "shape": list(tensors[key].shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    data_start = 8 + len(header_bytes)
    stream.write(struct.pack("<Q", len(header_bytes)))
    stream.write(header_bytes)
    stream.truncate(data_start + offset)
    stream.flush()
    for key in keys:
        begin, end = header[key]["data_offsets"]
        if end == begin:
            continue
        out = np.memmap(
            stream,
            dtype=SAFETENSORS_DTYPES[header[key]["dtype"]],
            mode="r+",
            offset=data_start + begin,
            shape=tuple(header[key]["shape"]),
        )
        tensor = tensors[key]
        if isinstance(tensor, LazyTensor):
            tensor.copy_into(out)
        else:
            np.copyto(out, tensor)
        del out  # unmapped: the pages stay in the page cache, not in this process


def materialize(tensors: Mapping[str, AnyTensor]) -> dict[str, np.ndarray]:
    """Every tensor as an array (lazy ones are read now)."""
    return {key: materialize_tensor(tensor) for key, tensor in tensors.items()}


def check_header(path: str | os.PathLike[str], architecture: Graph) -> None:
    """Check a written file from its header alone (no tensor data is read): its architecture,
    and every tensor's key, dtype and shape."""
    path = Path(path)
    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="numpy") as reader:
            metadata = dict(reader.metadata() or {})
            shapes = {
                key: (tuple(reader.get_slice(key).get_shape()), reader.get_slice(key).get_dtype())
                for key in reader.keys()
            }
    except (SafetensorError, OSError) as err:
        raise ExchangeFileError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
    differences = architecture_from_metadata(path, metadata).differences(architecture)
    if differences:
        raise ExchangeFileError(f"{path}: architecture in the file differs: {'; '.join(differences)}")
    expected = {key: (tuple(shape), DTYPE_CODES[dtype]) for key, (shape, dtype) in architecture.tensor_specs.items()}
    if split_training(shapes)[0] != expected:
        raise ExchangeFileError(f"{path}: tensors in the file differ from the architecture's")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's metadata, reading only its header."""
    path = Path(path)
    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="numpy") as reader:
            return dict(reader.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ExchangeFileError(f"{path}: not a readable safetensors file ({first_line(err)})") from None


def load(path: str | os.PathLike[str]) -> ExchangeFile:
    """Read and validate a common file: its metadata, architecture and every tensor's shape."""
    path = Path(path)
    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="numpy") as reader:
            metadata = dict(reader.metadata() or {})
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except TypeError as err:  # a dtype numpy lacks, such as bfloat16
        raise ExchangeFileError(
            f"{path}: holds a tensor numpy cannot read ({first_line(err)}); "
            f"the exchange file stores {', '.join(DTYPE_CODES)}"
        ) from None
    except (SafetensorError, OSError) as err:
        raise ExchangeFileError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
    architecture = architecture_from_metadata(path, metadata)
    if metadata.get("exchange_version") == "1":
        tensors = upgrade_v1_keys(tensors)
    source_framework = metadata.get("source_framework", "unknown")
    tensors, training_tensors = split_training(tensors)
    check_tensors(architecture, tensors, where=str(path))
    return ExchangeFile(architecture, tensors, source_framework, metadata, training_tensors)


def check_same_architecture(in_file: Graph, in_model: Graph, path: str | os.PathLike[str]) -> None:
    """Refuse to load a file into a model of another architecture, saying how they differ."""
    differences = in_file.differences(in_model)
    if differences:
        raise ArchitectureMismatchError(f"{path}: architecture differs from the model's: " + "; ".join(differences))


def architecture_from_metadata(path: Path, metadata: dict[str, str]) -> Graph:
    version = metadata.get("exchange_version")
    if "architecture" not in metadata or version is None:
        raise ExchangeFileError(
            f"{path}: no exchange metadata (architecture, exchange_version); it was not written by this tool"
        )
    if version not in READABLE_VERSIONS:
        raise ExchangeFileError(
            f"{path}: exchange_version {version!r} is not supported "
            f"(this tool reads versions {', '.join(READABLE_VERSIONS)})"
        )
    description = untrusted.load_json(metadata["architecture"], str(path), "architecture")
    return architecture_from_description(path, description, version)


def architecture_from_description(path: Path, description: object, version: str) -> Graph:
    """The graph of an architecture's parsed JSON, of either version: from an exchange file's
    metadata or from a `.json` given as `--arch`. Errors name `path`."""
    try:
        if version == "1":
            return upgrade_v1_architecture(description)
        if not isinstance(description, dict):
            raise ExchangeError("architecture JSON must be an object")
        untrusted.check_layer_count(len(description.get("nodes") or ()))
        return Graph.from_dict(description)
    except ExchangeError as err:
        raise ExchangeFileError(f"{path}: {err}") from None


V1_LAYER_KIND = "dense"
V1_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")
# The fields version 1 wrote, and no others: a file carrying more was not written by this tool.
V1_FIELDS = ("input_dim", "layers")
V1_LAYER_FIELDS = ("kind", "units", "activation", "use_bias")


def upgrade_v1_architecture(description: object) -> Graph:
    """A version-1 architecture (parsed JSON: `{"input_dim": 784, "layers": [{"kind": "dense", …}]}`)
    as a graph. Unknown fields and values of the wrong type are refused, naming them."""
    if not isinstance(description, dict):
        raise ExchangeError("malformed version-1 architecture (expected a JSON object)")
    _check_v1_fields(description, V1_FIELDS, "version-1 architecture")
    input_dim, layers = description.get("input_dim"), description.get("layers")
    input_width = _check_v1_width(input_dim, "version-1 architecture: input_dim")
    if not isinstance(layers, list) or not layers:
        raise ExchangeError("malformed version-1 architecture (layers must be a non-empty list)")
    untrusted.check_layer_count(len(layers))
    chain: list[tuple[int, str, bool]] = []
    for index, layer in enumerate(layers):
        where = f"version-1 layer {index}"
        if not isinstance(layer, dict):
            raise ExchangeError(f"{where}: expected a JSON object, found {type(layer).__name__}")
        _check_v1_fields(layer, V1_LAYER_FIELDS, where)
        if layer.get("kind") != V1_LAYER_KIND:  # version 1 knew Dense stacks only
            raise ExchangeError(f"{where}: unsupported layer kind {layer.get('kind')!r:.60}")
        units, activation, use_bias = layer.get("units"), layer.get("activation", "linear"), layer.get("use_bias", True)
        width = _check_v1_width(units, f"{where}: units")
        if not isinstance(activation, str):
            raise ExchangeError(f"{where}: activation must be a string, found {type(activation).__name__}")
        if not isinstance(use_bias, bool):
            raise ExchangeError(f"{where}: use_bias must be true or false, found {use_bias!r:.60}")
        chain.append((width, activation, use_bias))
    return dense_chain("model", input_width, chain)


def _check_v1_fields(description: dict[Any, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(description) - set(known))
    if unknown:
        names = ", ".join(f"{name!r:.60}" for name in unknown[:5])
        more = f" and {len(unknown) - 5:,} more" if len(unknown) > 5 else ""
        raise ExchangeError(f"{where}: unknown field(s) {names}{more} (version 1 has {', '.join(known)})")


def _check_v1_width(value: object, what: str) -> int:
    if type(value) is not int or not 1 <= value <= untrusted.MAX_DENSE_WIDTH:
        raise ExchangeError(f"{what} must be an integer from 1 to {untrusted.MAX_DENSE_WIDTH:,}, found {value!r:.60}")
    return value


Tensor = TypeVar("Tensor")


def upgrade_v1_keys(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`layers.{i}.weight` -> `dense_{i}.weight`: the keys of the upgraded graph."""
    renamed: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        match = V1_KEY.match(key)
        renamed[f"dense_{match.group(1)}.{match.group(2)}" if match else key] = tensor
    return renamed


def check_safetensors_header(path: Path) -> None:
    """Check the header against the file before the safetensors library reads it: its length,
    its JSON (within the caps), and every tensor's dtype, shape and byte range, so no declared
    size is ever allocated that the file does not hold."""
    size = untrusted.regular_file(path)
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        header_length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_length is None or header_length > size - 8:
            raise ExchangeFileError(
                f"{path}: not a readable safetensors file (the header length "
                f"{header_length} does not fit the file's {size:,} bytes)"
            )
        if header_length > untrusted.MAX_JSON_BYTES:
            raise ExchangeFileError(
                f"{path}: a safetensors header of {header_length:,} bytes, more than "
                f"the {untrusted.MAX_JSON_BYTES:,} this tool reads"
            )
        try:
            header = untrusted.load_json(stream.read(header_length), str(path), "the header")
        except ExchangeFileError as err:
            reason = str(err).removeprefix(f"{path}: ")
            raise ExchangeFileError(f"{path}: not a readable safetensors file ({reason})") from None
    if not isinstance(header, dict):
        raise ExchangeFileError(f"{path}: not a readable safetensors file (the header is not an object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise ExchangeFileError(f"{path}: not a readable safetensors file (metadata must map text to text)")
    data_size = size - 8 - header_length
    for key, entry in header.items():
        _check_header_entry(path, key, entry, data_size)


def _check_header_entry(path: Path, key: str, entry: object, data_size: int) -> None:
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        found = entry.get("dtype") if isinstance(entry, dict) else entry
        raise ExchangeFileError(
            f"{path}: tensor {key} has dtype {str(found)[:40]}; the exchange file "
            f"stores {', '.join(SAFETENSORS_DTYPES)}"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (
        isinstance(shape, list)
        and all(type(size) is int and size >= 0 for size in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(offset) is int for offset in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_size
        and offsets[1] - offsets[0] == untrusted.declared_nbytes(shape, SAFETENSORS_DTYPES[entry["dtype"]])
    ):
        raise ExchangeFileError(
            f"{path}: not a readable safetensors file (tensor {key}: shape {str(shape)[:60]} "
            f"and byte range {str(offsets)[:60]} do not fit its {data_size:,} bytes of data)"
        )
