"""The kinds of files the converter reads and writes: one table, and which kind a path holds.

An input's kind is decided by its first bytes, not its name: Keras 2 projects saved `.hdf5`,
`.model` or no extension at all, and a `.h5` may be a renamed `.keras`. Where the bytes match no
kind (a truncated or damaged file), the suffix picks the reader, so the error says what is wrong
with the file rather than only that it is unknown. An output's kind is named by its suffix.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from exchange import untrusted
from exchange.errors import ExchangeFileError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0: Keras and h5py never write a user block
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
# torch.save before torch 1.6 wrote a pickle that starts with this magic number (refused when read).
LEGACY_TORCH_SIGNATURE = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
KERAS_ZIP_MEMBERS = {"config.json", "model.weights.h5"}
TORCH_ZIP_RECORD = "data.pkl"  # torch.save's zip: `<name>/data.pkl` and the tensors


@dataclass(frozen=True)
class FileKind:
    """One kind of file. `suffixes` name it as an output (the first is the usual one) and pick
    its reader when the content is not recognised."""

    name: str
    suffixes: tuple[str, ...]
    description: str
    readable: bool
    writable: bool


KERAS = FileKind("keras", (".keras",), "a Keras 3 model (a zip of config.json and model.weights.h5)", True, True)
HDF5 = FileKind(
    "hdf5",
    (".h5", ".hdf5"),
    "a Keras HDF5 file: a Keras 2 model, Keras 2 weights or a Keras 3 `.weights.h5`",
    True,
    False,
)
SAFETENSORS = FileKind(
    "safetensors", (".safetensors",), "the exchange file (architecture + torch state_dict)", True, True
)
TORCH = FileKind("torch", (".pt", ".pth"), "a PyTorch state_dict written by torch.save", True, True)
CODE = FileKind("code", (".py",), "PyTorch source code, its weights in a .safetensors beside it", False, True)
JSON = FileKind("json", (".json",), "a Keras model config or an exchange architecture (JSON)", False, False)
SAVED_MODEL = FileKind(
    "saved_model", (), "a TensorFlow SavedModel folder written by Keras 2 (`model.save(dir)`)", True, False
)
FILE_KINDS = (KERAS, HDF5, SAFETENSORS, TORCH, CODE, JSON, SAVED_MODEL)


def kind_named(name: str) -> FileKind:
    """The kind of this `name` (a kind decided once and handed on by name, as to --verify's child)."""
    for kind in FILE_KINDS:
        if kind.name == name:
            return kind
    raise ValueError(f"no file kind named {name!r}")


def _suffix_names(kinds) -> str:
    return ", ".join(suffix for kind in kinds for suffix in kind.suffixes)


def output_kind(path: Path) -> FileKind:
    """The kind an output path names by its suffix."""
    for kind in FILE_KINDS:
        if kind.writable and path.suffix in kind.suffixes:
            return kind
    raise ExchangeFileError(
        f"{path}: unsupported output kind {path.suffix or '(no extension)'!r}; expected one "
        f"of {_suffix_names(kind for kind in FILE_KINDS if kind.writable)}"
    )


def input_kind(path: Path) -> FileKind:
    """The kind of file `path` holds, from its content; the suffix where the content is not
    recognised. A folder can only be a SavedModel; special files are refused unopened."""
    if os.path.isdir(path):  # its reader says whether Keras wrote it
        return SAVED_MODEL
    size = untrusted.regular_file(path)
    kind = _kind_by_content(path, size)
    if kind is None:
        kind = next((kind for kind in FILE_KINDS if path.suffix in kind.suffixes), None)
    if kind is None:
        raise ExchangeFileError(
            f"{path}: not a file this tool reads (neither its content nor its extension "
            f"{path.suffix or '(none)'!r} is one of "
            f"{_suffix_names(kind for kind in FILE_KINDS if kind.readable)})"
        )
    return kind


def weights_kind(path: Path) -> FileKind:
    """`input_kind`, refusing what holds no weights (code, a bare config)."""
    kind = input_kind(path)
    if not kind.readable:
        raise ExchangeFileError(
            f"{path}: {kind.description}, which holds no weights; give a model or weights file "
            f"({_suffix_names(kind for kind in FILE_KINDS if kind.readable)} or a SavedModel "
            "folder)"
        )
    return kind


def _kind_by_content(path: Path, size: int) -> FileKind | None:
    with open(path, "rb") as stream:
        head = stream.read(16)
    if head.startswith(HDF5_SIGNATURE):
        return HDF5
    if head.startswith(LEGACY_TORCH_SIGNATURE):
        return TORCH
    if head.startswith(ZIP_SIGNATURES):
        return _zip_kind(path)
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return SAFETENSORS
    if head.lstrip()[:1] in (b"{", b"["):
        return JSON
    return None


def _zip_kind(path: Path) -> FileKind | None:
    """A `.keras` and a torch.save file are both zip archives: their member names tell them apart."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return None
    if set(names) >= KERAS_ZIP_MEMBERS:
        return KERAS
    if any(name == TORCH_ZIP_RECORD or name.endswith("/" + TORCH_ZIP_RECORD) for name in names):
        return TORCH
    return None
