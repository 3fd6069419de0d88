"""The seed's data: MNIST as four pickles (X float32 (N, 784) in [0, 1], y one-hot float32 (N, 10)).

The seed's training (`frameworks/`, scripts/train.py, scripts/prepare_data.py) reads it from
here; `scripts/train.py --test-images FILE.npz` writes the test images for `convert --verify-inputs`
(the converter itself knows no data set).

A folder may hold the seed's pickles, the canonical IDX files (`train-images-idx3-ubyte[.gz]`, …)
or Keras's `mnist.npz`. Pickles are read with a restricted unpickler that builds numpy arrays and
nothing else, so a pickle carrying code is refused before any of it runs; every shape and dtype it
would allocate is checked against the file's size first.

Where data comes from, first match wins: `--data DIR`, `$MNIST_DIR`, `./data/`, Keras's standard
download (machines with internet only).
"""

from __future__ import annotations

import codecs
import gzip
import io
import math
import os
import pickle
import pickletools
import reprlib
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exchange import untrusted
from exchange.errors import ExchangeError, ExchangeFileError, first_line
from exchange.fileformat import atomic_output

PICKLE_NAMES = {
    "x_train": "mnist_X_train.pkl",
    "x_test": "mnist_X_test.pkl",
    "y_train": "mnist_y_train.pkl",
    "y_test": "mnist_y_test.pkl",
}
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NPZ_NAME = "mnist.npz"
NUM_CLASSES = 10
IMAGE_PIXELS = 28 * 28

# The only globals a pickled numpy array needs. numpy 1 names the modules `numpy.core.*`,
# numpy 2 `numpy._core.*`; `_codecs.encode` appears in protocol-2 pickles of array bytes.
ALLOWED_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


# Protocol-2 pickles of array bytes encode them as latin-1 text; no other codec is needed.
PICKLE_CODECS = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")
# What a pickled array may hold: numbers (bool, int, uint, float, complex) without fields or
# sub-arrays. An object array's `__setstate__` allocates its shape before it looks at its list.
PICKLE_DTYPE_KINDS = "biufc"
MAX_PICKLE_DIMS = 32  # numpy 1's limit; the seed's arrays have 2
# The state numpy pickles for a dtype of plain numbers (after the byte order): no sub-array, no
# fields, no item size or alignment of its own, no flags. Any other would rewrite the dtype.
PLAIN_DTYPE_STATE = (None, None, None, -1, -1, 0)
MEMO_OPCODES = ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET")
IDX_UINT8 = 0x08
MAX_IDX_DIMS = 3  # images are (N, 28, 28), labels (N,)


class DataError(ExchangeError):
    """MNIST could not be found or read; the message says what to do."""


def _regular_file(path: Path) -> int:
    """`untrusted.regular_file` with this module's error."""
    try:
        return untrusted.regular_file(path)
    except ExchangeFileError as err:
        raise DataError(str(err)) from None


class _ClampedReader(io.RawIOBase):
    """A file whose reads never ask for more than it holds: a pickle that declares a 4 GB string
    in 9 bytes makes the unpickler call read(4 GB), which would allocate that much first."""

    def __init__(self, stream, size: int):
        self.stream, self.left, self.size = stream, size, size

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size - self.left

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: self.left]
        count = self.stream.readinto(view)
        self.left -= count
        return count

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(self.left if size is None or size < 0 else min(size, self.left))
        self.left -= len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self.stream.readline(self.left if size is None or size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """`_codecs.encode` as array pickles use it, refusing any codec but latin-1."""
    try:
        known = isinstance(encoding, str) and codecs.lookup(encoding).name in PICKLE_CODECS
    except LookupError:
        known = False
    if not known or not isinstance(text, str):
        raise DataError(f"refusing the codec {encoding!r:.40}: array pickles use latin-1")
    return codecs.encode(text, encoding, errors)


def _check_pickle_opcodes(path: Path, size: int) -> None:
    """Walk the opcodes before unpickling: memo indexes must stay below MAX_PICKLE_MEMO."""
    with open(path, "rb") as stream:
        try:
            for opcode, argument, _ in pickletools.genops(_ClampedReader(stream, size)):
                if opcode.name in MEMO_OPCODES and isinstance(argument, int) and argument >= untrusted.MAX_PICKLE_MEMO:
                    raise DataError(f"{path}: memo index {argument:,} (an array pickle needs a few dozen)")
        except DataError:
            raise
        except (ValueError, EOFError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a readable pickle of a numpy array ({err})") from None


@dataclass(frozen=True)
class Mnist:
    x_train: np.ndarray  # float32 (60000, 784) in [0, 1]
    y_train: np.ndarray  # float32 one-hot (60000, 10)
    x_test: np.ndarray
    y_test: np.ndarray


class _PickledArray(np.ndarray):
    """An array the unpickler builds. The pickle fills it with BUILD, which calls `__setstate__`:
    numpy's allocates the declared shape (an object array's before it reads its list), so the state
    is checked first: a dtype of numbers and exactly the shape's bytes, already in the pickle."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise DataError("an array's pickled state is not (version, shape, dtype, fortran, bytes)")
        version = state[0] if len(state) == 5 else 1
        shape, dtype, fortran, raw = state[-4:]
        shape, dtype = _checked_shape(shape), _checked_dtype(dtype)
        nbytes = untrusted.declared_nbytes(shape, dtype)
        if not isinstance(raw, (bytes, str)) or len(raw) != nbytes:
            held = f"{len(raw):,} bytes" if isinstance(raw, (bytes, str)) else type(raw).__name__
            raise DataError(f"an array's pickled state declares {dtype} {shape} ({nbytes:,} bytes) but holds {held}")
        super().__setstate__((version, shape, dtype, bool(fortran), raw))


class _PickledDtype:
    """A dtype the pickle names, standing in for numpy's until an array uses it: numpy's
    `dtype.__setstate__` (the BUILD after it) could set any item size, fields or sub-array, so only
    the state numpy writes for plain numbers (a byte order) is taken."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        if not (
            isinstance(state, tuple)
            and len(state) == 8
            and state[0] == 3
            and state[1] in ("<", ">", "|", "=")
            and state[2:] == PLAIN_DTYPE_STATE
        ):
            raise DataError(
                f"refusing the pickled state {reprlib.repr(state)} of dtype {self.dtype}: only a byte order is accepted"
            )
        self.dtype = self.dtype.newbyteorder(state[1])


class _Allowed:
    """A global the pickle may name, standing in for numpy's: the call is checked, BUILD on it
    (which would set its attributes) is refused, and NEWOBJ fails (it needs a class)."""

    __slots__ = ("call", "name")

    def __init__(self, name: str, call):
        self.name, self.call = name, call

    def __call__(self, *args):
        return self.call(*args)

    def __setstate__(self, state):
        raise DataError(f"refusing to modify {self.name}")


def _checked_shape(shape) -> tuple[int, ...]:
    shape = (shape,) if type(shape) is int else shape
    if not (
        isinstance(shape, (tuple, list))
        and len(shape) <= MAX_PICKLE_DIMS
        and all(type(size) is int and size >= 0 for size in shape)
    ):
        raise DataError(f"refusing the array shape {reprlib.repr(shape)}: expected up to {MAX_PICKLE_DIMS} sizes")
    return tuple(shape)


def _checked_dtype(value) -> np.dtype:
    """A dtype of numbers from what a pickle passes as one (a `_PickledDtype` or a type code)."""
    if isinstance(value, _PickledDtype):
        return value.dtype
    if isinstance(value, bytes):
        value = value.decode("latin1")
    if not isinstance(value, str):
        raise DataError(f"refusing {type(value).__name__} as a dtype: expected a numeric numpy array")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as err:
        raise DataError(f"refusing the dtype {value!r:.40} ({first_line(err)[:60]})") from None
    if dtype.kind not in PICKLE_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise DataError(f"refusing the dtype {value!r:.40} ({dtype.kind!r}): expected a numeric numpy array")
    return dtype


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and refuses every other global, so no code from the file runs.

    The globals it allows are replaced by checked stand-ins: whatever shape and dtype a call (or a
    BUILD) would allocate must fit in `limit` bytes, the file's size (a pickle holds its arrays'
    bytes), and must be numbers."""

    def __init__(self, stream, limit: int, **options):
        super().__init__(stream, **options)
        self.limit = limit

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_PICKLE_GLOBALS:
            raise DataError(f"refusing {module}.{name}: only numpy arrays are accepted")
        if (module, name) == ("_codecs", "encode"):
            return _Allowed("_codecs.encode", _latin1_encode)
        if (module, name) == ("numpy", "dtype"):
            return _Allowed("numpy.dtype", _pickled_dtype)
        if (module, name) == ("numpy", "ndarray"):
            return _Allowed("numpy.ndarray", self._new_array)
        if module.startswith("numpy.core."):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        numpy_function = super().find_class(module, name)
        checked = self._reconstruct if name == "_reconstruct" else self._frombuffer
        return _Allowed(f"{module}.{name}", lambda *args: checked(numpy_function, *args))

    def _fits(self, shape, dtype) -> tuple[tuple[int, ...], np.dtype]:
        shape, dtype = _checked_shape(shape), _checked_dtype(dtype)
        nbytes = untrusted.declared_nbytes(shape, dtype)
        if nbytes > self.limit:
            raise DataError(
                f"declares a {dtype} array of shape {shape} ({nbytes:,} bytes), more than the file's {self.limit:,}"
            )
        return shape, dtype

    def _new_array(self, shape, dtype="f8", buffer=None, offset=0, strides=None, order="C"):
        """`numpy.ndarray(...)` called by the pickle."""
        shape, dtype = self._fits(shape, dtype)
        return _PickledArray(shape, dtype, buffer, offset, strides, order)

    def _reconstruct(self, numpy_reconstruct, subtype, shape, dtype):
        """numpy's `_reconstruct(ndarray, shape, dtype)`: an empty array that BUILD then fills."""
        if not (isinstance(subtype, _Allowed) and subtype.name == "numpy.ndarray"):
            raise DataError(f"refusing to reconstruct a {type(subtype).__name__}: only numpy arrays are accepted")
        shape, dtype = self._fits(shape, dtype)
        return numpy_reconstruct(_PickledArray, shape, dtype)

    def _frombuffer(self, numpy_frombuffer, buffer, dtype, shape, order):
        """numpy's `_frombuffer(bytes, dtype, shape, order)` (protocol 5): a view of the bytes."""
        shape, dtype = self._fits(shape, dtype)
        return numpy_frombuffer(buffer, dtype, shape, order).view(_PickledArray)


def _pickled_dtype(code, align=False, copy=False) -> _PickledDtype:
    """`numpy.dtype(code, align, copy)` as pickles call it, for numbers only."""
    return _PickledDtype(_checked_dtype(code))


def load_pickled_array(path: str | os.PathLike) -> np.ndarray:
    """One numpy array from a pickle, refusing anything else with a one-line error."""
    path = Path(path)
    size = _regular_file(path)
    if size > untrusted.MAX_PICKLE_BYTES:
        raise DataError(f"{path}: {size:,} bytes, more than the {untrusted.MAX_PICKLE_BYTES:,} a pickle may have")
    _check_pickle_opcodes(path, size)
    try:
        with open(path, "rb") as stream:
            # latin1 reads pickles written by Python 2, as old seed notebooks may have.
            array = NumpyOnlyUnpickler(_ClampedReader(stream, size), size, encoding="latin1").load()
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        LookupError,
        IndexError,
        OverflowError,
    ) as err:
        raise DataError(f"{path}: not a readable pickle of a numpy array ({err})") from None
    if isinstance(array, _PickledArray):
        array = array.view(np.ndarray)
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise DataError(f"{path}: holds {type(array).__name__}, expected a numeric numpy array")
    return array


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of its stated shape.

    The header is read first and its size checked against the file (for gzip: within
    MAX_COMPRESSION_RATIO of it), then exactly that many values are read, so neither a gzip bomb
    nor a header declaring terabytes allocates more than the file can hold."""
    path = Path(path)
    size = _regular_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            shape = _idx_shape(path, stream)
            count = math.prod(shape)
            limit = (
                untrusted.MAX_COMPRESSION_RATIO * size + untrusted.COMPRESSION_SLACK
                if path.suffix == ".gz"
                else size - 4 - 4 * len(shape)
            )
            if count > limit:
                raise DataError(f"{path}: header says {shape} ({count:,} values), more than the file can hold")
            data = np.empty(count, dtype=np.uint8)
            filled = stream.readinto(memoryview(data)) if count else 0
            extra = stream.read(1)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable ({err})") from None
    if filled != count or extra:
        raise DataError(f"{path}: header says {shape} but holds {'more' if extra else filled} values")
    return data.reshape(shape)


def _idx_shape(path: Path, stream) -> tuple[int, ...]:
    magic = stream.read(4)
    if len(magic) < 4 or magic[:3] != bytes([0, 0, IDX_UINT8]):
        raise DataError(f"{path}: not an IDX file of uint8 data")
    if not 1 <= magic[3] <= MAX_IDX_DIMS:
        raise DataError(f"{path}: {magic[3]} dimensions; MNIST's IDX files have 1 (labels) or 3 (images)")
    header = stream.read(4 * magic[3])
    if len(header) < 4 * magic[3]:
        raise DataError(f"{path}: truncated IDX header")
    return tuple(int.from_bytes(header[4 * axis : 4 * axis + 4], "big") for axis in range(magic[3]))


def to_seed_format(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and integer labels (N,) -> the seed's X and one-hot y."""
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"images {images.shape} and labels {labels.shape}: expected (N, 28, 28) and (N,)")
    if labels.dtype.kind not in "iu" or (labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES):
        raise DataError(f"labels must be integers 0 to {NUM_CLASSES - 1}")
    x = images.reshape(len(images), IMAGE_PIXELS).astype(np.float32) / np.float32(255.0)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[labels.astype(np.int64)]
    return x, y


def load_folder(folder: str | os.PathLike) -> Mnist:
    """MNIST from a folder of the seed's pickles, IDX files (.gz or not), or `mnist.npz`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    if all((folder / name).exists() for name in PICKLE_NAMES.values()):
        arrays = {key: load_pickled_array(folder / name) for key, name in PICKLE_NAMES.items()}
        mnist = Mnist(**arrays)
    elif all(_idx_path(folder, name) for name in IDX_NAMES.values()):
        raw = {key: read_idx(_idx_path(folder, name)) for key, name in IDX_NAMES.items()}
        try:
            x_train, y_train = to_seed_format(raw["x_train"], raw["y_train"])
            x_test, y_test = to_seed_format(raw["x_test"], raw["y_test"])
        except DataError as err:
            raise DataError(f"{folder}: {err}") from None
        mnist = Mnist(x_train, y_train, x_test, y_test)
    elif (folder / NPZ_NAME).exists():
        mnist = load_npz(folder / NPZ_NAME)
    else:
        raise DataError(
            f"{folder}: holds neither the seed's pickles ({', '.join(PICKLE_NAMES.values())}),"
            f" nor the IDX files ({', '.join(IDX_NAMES.values())}[.gz]), nor {NPZ_NAME}"
        )
    _check_seed_format(mnist, folder)
    return mnist


def local_data_folder(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first of `data_dir`, `$MNIST_DIR`, `./data/` that is given (or, for ./data/, exists)."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("MNIST_DIR"):
        return Path(os.environ["MNIST_DIR"])
    return Path("data") if Path("data").is_dir() else None


def load_mnist(data_dir: str | os.PathLike | None = None) -> Mnist:
    """MNIST from `data_dir`, else `$MNIST_DIR`, else `./data/`, else Keras's download."""
    folder = local_data_folder(data_dir)
    if folder is not None:
        return load_folder(folder)
    try:
        from keras.datasets import mnist as keras_mnist

        (train_images, train_labels), (test_images, test_labels) = keras_mnist.load_data()
    except Exception as err:  # noqa: BLE001 (no keras, no internet, a broken cache: all mean "supply it")
        raise DataError(
            "MNIST not found: pass --data DIR or set MNIST_DIR to a folder holding the "
            "IDX files or the seed's pickles (see scripts/prepare_data.py); Keras's "
            f"download failed too ({type(err).__name__})"
        ) from None
    x_train, y_train = to_seed_format(train_images, train_labels)
    x_test, y_test = to_seed_format(test_images, test_labels)
    return Mnist(x_train, y_train, x_test, y_test)


def write_pickles(mnist: Mnist, folder: str | os.PathLike) -> list[Path]:
    """Write the seed's four pickles, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = [folder / name for name in PICKLE_NAMES.values()]
    # All four are written to temporary files first and renamed only when every one succeeded,
    # so a failure never leaves old and new pickles mixed.
    with ExitStack() as stack:
        for key, target in zip(PICKLE_NAMES, targets):
            temporary = stack.enter_context(atomic_output(target))
            with open(temporary, "wb") as stream:
                pickle.dump(getattr(mnist, key), stream, protocol=4)
    return targets


def write_test_images(mnist: Mnist, path: str | os.PathLike, input_name: str) -> Path:
    """The test images (float32 (N, 784)) as a `.npz` keyed by the model's input name, written
    atomically: the batch `convert --verify --verify-inputs` runs a model taking MNIST on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, **{input_name: mnist.x_test})
    return path


def _idx_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    return None


def load_npz(path: Path) -> Mnist:
    """MNIST from a Keras `mnist.npz` (x_train, y_train, x_test, y_test as uint8 and labels),
    read by the exchange's guarded .npz reader (`untrusted.load_npz`)."""
    path = Path(path)
    try:
        arrays = untrusted.load_npz(path)
        x_train, y_train = to_seed_format(arrays["x_train"], arrays["y_train"])
        x_test, y_test = to_seed_format(arrays["x_test"], arrays["y_test"])
    except (ExchangeFileError, KeyError, DataError) as err:
        reason = str(err).removeprefix(f"{path}: ") if not isinstance(err, KeyError) else f"no array {err}"
        raise DataError(f"{path}: not a readable Keras mnist.npz ({reason})") from None
    return Mnist(x_train, y_train, x_test, y_test)


def _check_seed_format(mnist: Mnist, source: Path) -> None:
    for key in PICKLE_NAMES:
        array = getattr(mnist, key)
        width = IMAGE_PIXELS if key.startswith("x") else NUM_CLASSES
        if array.ndim != 2 or array.shape[1] != width or array.dtype != np.float32:
            raise DataError(f"{source}: {key} is {array.dtype} {array.shape}, expected float32 (N, {width})")
    if len(mnist.x_train) != len(mnist.y_train) or len(mnist.x_test) != len(mnist.y_test):
        raise DataError(f"{source}: images and labels differ in count")
