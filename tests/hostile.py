"""Hostile and broken inputs, built at test time, and the child process that runs them.

Every case is a small function that writes one crafted input (from the valid base files in
`base/`) and returns the command's arguments; `run_cases` runs each through the real entry point
(`exchange.cli.main`, `scripts/prepare_data.py`, `scripts/train.py`) in this process and records
its exit code, stderr, the files left behind and its peak memory. The tests run it in a child
process (`python tests/hostile.py ...`) so that the memory of each case can be measured (peak RSS
reset with /proc/self/clear_refs before each) and bounded (RLIMIT_AS) and a hang killed by an
alarm, without risking the test runner. The same child runs the seeded mutation fuzzer.

    python tests/hostile.py cases BASE WORK RESULTS.json [NAME ...]
    python tests/hostile.py fuzz BASE WORK RESULTS.json SEED COUNT
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import sys
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXISTING = b"an existing output that a failed run must leave byte-identical\n"
SECRET = b"SECRET!!"  # the outside file's bytes: none may reach an output
CASE_TIMEOUT = 30  # seconds: a case that runs longer is a hang (a FIFO read blocks forever)
ADDRESS_SPACE_HEADROOM = 3 << 30  # RLIMIT_AS above the child's size after imports: a bomb fails, not the machine
BOMB_BYTES = 256 << 20  # what the compression bombs expand to; the naive readers held all of it
KERNEL = "model_weights/dense_1/dense_1/kernel:0"  # in the Keras 2 seed .h5
KERAS3_KERNEL = "layers/dense/vars/0"  # in the .keras seed's model.weights.h5
SEED_ACTIVATIONS = "tanh,tanh,softmax"
MNIST_ROWS = 64


@dataclass(frozen=True)
class Case:
    """`build(case_dir, base)` writes the input and returns the arguments; `message` must appear
    in the one stderr line, and so must `names` (the file at fault)."""

    build: Callable[[Path, Path], list[str]]
    message: str
    names: str
    entry: str = "convert"  # convert, prepare (scripts/prepare_data.py) or train (scripts/train.py)
    output: str = "out.safetensors"
    converts: bool = False  # a valid (if odd) input: it must convert, within the same memory bound


# ---------------------------------------------------------------------------------------------
# Base files (written once by the test session; Keras writes the .keras)


def write_base_files(base: Path, keras_path: Path) -> None:
    """The valid files every case and the fuzzer start from."""
    import torch

    from exchange import fileformat
    from frameworks.recipe import SEED_ARCHITECTURE

    base.mkdir(parents=True, exist_ok=True)
    shutil.copy(keras_path, base / "seed.keras")
    fixtures = ROOT / "tests/fixtures/keras2"
    for name in ("seed_mlp.h5", "seed_mlp_weights.h5", "seed_mlp_config.json"):
        shutil.copy(fixtures / name, base / name)
    generator = np.random.default_rng(3)
    tensors = {
        key: (generator.standard_normal(shape) * 0.2).astype(np.float32)
        for key, shape in SEED_ARCHITECTURE.tensor_shapes().items()
    }
    fileformat.save(base / "seed.safetensors", SEED_ARCHITECTURE, tensors, "torch")
    torch.save({key: torch.from_numpy(value) for key, value in tensors.items()}, base / "seed.pt")
    write_idx_folder(base / "mnist", generator)
    (base / "architectures.json").write_text(json.dumps(fuzz_architectures()))


def fuzz_architectures() -> list[dict]:
    """Format-2 architectures of small real Keras models, for the fuzzer to mutate: a CNN, a
    masked sequence model and an attention block (most layer families, with nested configs)."""
    import keras

    from exchange import keras_adapter

    layers = keras.layers
    image = keras.Input((9, 8, 3), name="image")
    x = layers.ZeroPadding2D(((1, 0), (0, 1)), name="pad")(image)
    x = layers.Conv2D(4, 3, strides=2, padding="same", name="conv")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = layers.AveragePooling2D(2, padding="same", name="avg")(x)
    x = layers.Flatten(name="flatten")(layers.MaxPooling2D(1, name="max")(x))
    cnn = keras.Model(image, layers.Dense(5, activation="softmax", name="dense")(layers.Dropout(0.5)(x)), name="cnn")
    tokens = keras.Input((7,), dtype="int32", name="tokens")
    x = layers.Embedding(11, 6, mask_zero=True, name="embedding")(tokens)
    x = layers.LSTM(5, return_sequences=True, name="lstm")(x)
    x = layers.Bidirectional(layers.GRU(3, return_sequences=True), merge_mode="concat", name="bi")(x)
    x = layers.TimeDistributed(layers.Dense(4), name="td")(x)
    sequence = keras.Model(tokens, layers.GlobalAveragePooling1D(name="gap")(x), name="sequence")
    steps = keras.Input((5, 8), name="steps")
    attended = layers.MultiHeadAttention(2, 4, name="mha")(steps, steps)
    x = layers.LayerNormalization(name="ln")(layers.Add(name="add")([steps, attended]))
    x = layers.Concatenate(axis=-1, name="concat")([x, layers.Permute((1, 2), name="permute")(steps)])
    x = layers.Reshape((8, 10), name="reshape")(x)
    block = keras.Model(steps, layers.Softmax(axis=1, name="softmax")(x), name="block")
    return [keras_adapter.architecture_of(model).to_dict() for model in (cnn, sequence, block)]


def write_idx_folder(folder: Path, generator, gz: bool = False) -> None:
    """A small MNIST in IDX files: MNIST_ROWS training and test images with their labels."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        images = generator.integers(0, 256, (MNIST_ROWS, 28, 28), dtype=np.uint8)
        labels = generator.integers(0, 10, MNIST_ROWS, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)


def idx_bytes(array: np.ndarray, shape=None) -> bytes:
    shape = array.shape if shape is None else shape
    return bytes([0, 0, 8, len(shape)]) + b"".join(int(n).to_bytes(4, "big") for n in shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    data = idx_bytes(array)
    if gz:
        Path(f"{path}.gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# Helpers that build inputs


def outside_file(case_dir: Path) -> Path:
    """A file outside the case's folder that a hostile input points at."""
    secret = case_dir.parent / "outside" / "secret.bin"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(SECRET * (784 * 50 * 4 // len(SECRET)))
    return secret


def keras2_with(case_dir: Path, base: Path, edit) -> Path:
    """The Keras 2 seed `.h5`, edited in place by `edit(h5)`."""
    path = case_dir / "model.h5"
    shutil.copy(base / "seed_mlp.h5", path)
    with h5py.File(path, "r+") as h5:
        edit(h5)
    return path


def replace_dataset(h5, path: str, **create) -> None:
    group, name = h5[path.rsplit("/", 1)[0]], path.rsplit("/", 1)[1]
    del group[name]
    group.create_dataset(name, **create)


def keras3_with(
    case_dir: Path, base: Path, edit_weights=None, config: bytes | None = None, config_compressed: bool = False
) -> Path:
    """The `.keras` seed rebuilt: its weights member edited by `edit_weights(h5)`, or its
    config.json replaced."""
    with zipfile.ZipFile(base / "seed.keras") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    if edit_weights is not None:
        weights = case_dir / "weights.tmp.h5"
        weights.write_bytes(members["model.weights.h5"])
        with h5py.File(weights, "r+") as h5:
            edit_weights(h5)
        members["model.weights.h5"] = weights.read_bytes()
        weights.unlink()
    path = case_dir / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            if name == "config.json" and config is not None:
                data = config
            compressed = name == "config.json" and config_compressed
            archive.writestr(name, data, zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED)
    return path


def deflated_member(
    archive: zipfile.ZipFile, name: str, prefix: bytes, padding: int, suffix: bytes = b"", fill: bytes = b"\0"
) -> None:
    """A deflated member of `prefix`, `padding` bytes of `fill`, `suffix`, written in chunks."""
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w") as stream:
        stream.write(prefix)
        chunk = fill * (1 << 20)
        for _ in range(padding >> 20):
            stream.write(chunk)
        stream.write(suffix)


def gzip_bomb(path: Path, prefix: bytes, zeros: int) -> None:
    with gzip.open(path, "wb", compresslevel=1) as stream:
        stream.write(prefix)
        chunk = bytes(1 << 20)
        for _ in range(zeros >> 20):
            stream.write(chunk)


def safetensors_bytes(entries: dict, metadata: dict, data: bytes) -> bytes:
    header = json.dumps({"__metadata__": metadata, **entries}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def seed_metadata() -> dict:
    from frameworks.recipe import SEED_ARCHITECTURE

    return {
        "format": "pt",
        "exchange_version": "2",
        "architecture": SEED_ARCHITECTURE.to_json(),
        "source_framework": "torch",
    }


def seed_config(base: Path) -> dict:
    return json.loads((base / "seed_mlp_config.json").read_text())


def mnist_copy(case_dir: Path, base: Path) -> Path:
    folder = case_dir / "mnist"
    shutil.copytree(base / "mnist", folder)
    return folder


def pickle_folder(case_dir: Path, base: Path, x_train: bytes) -> Path:
    """The seed's four pickles, the training images replaced by `x_train`'s bytes."""
    import pickle

    folder = case_dir / "data"
    folder.mkdir()
    for name in ("mnist_X_test.pkl", "mnist_y_train.pkl", "mnist_y_test.pkl"):
        (folder / name).write_bytes(pickle.dumps(np.zeros((2, 784 if "X" in name else 10), np.float32)))
    (folder / "mnist_X_train.pkl").write_bytes(x_train)
    return folder


def train_args(case_dir: Path, data: Path) -> list[str]:
    return ["--data", str(data), "--epochs", "1", "--framework", "torch", "--out-dir", str(case_dir / "run")]


def convert_args(case_dir: Path, source: Path, *extra: str, output: str = "out.safetensors") -> list[str]:
    return [str(source), str(case_dir / output), *extra]


# ---------------------------------------------------------------------------------------------
# The cases


def _external_storage_h5(case_dir, base):
    secret = outside_file(case_dir)
    path = keras2_with(
        case_dir,
        base,
        lambda h5: replace_dataset(h5, KERNEL, shape=(784, 50), dtype="<f4", external=[(str(secret), 0, 784 * 50 * 4)]),
    )
    return convert_args(case_dir, path)


def _external_storage_keras(case_dir, base):
    secret = outside_file(case_dir)
    path = keras3_with(
        case_dir,
        base,
        lambda h5: replace_dataset(
            h5, KERAS3_KERNEL, shape=(784, 50), dtype="<f4", external=[(str(secret), 0, 784 * 50 * 4)]
        ),
    )
    return convert_args(case_dir, path)


def _outside_h5(case_dir: Path) -> Path:
    """An HDF5 file outside the case folder holding a (784, 50) dataset `/data` of the secret."""
    other = case_dir.parent / "outside" / "other.h5"
    other.parent.mkdir(exist_ok=True)
    with h5py.File(other, "w") as h5:
        h5["data"] = np.frombuffer(outside_file(case_dir).read_bytes(), "<f4").reshape(784, 50)
    return other


def _virtual_dataset(case_dir, base):
    other = _outside_h5(case_dir)

    def edit(h5):
        layout = h5py.VirtualLayout(shape=(784, 50), dtype="<f4")
        layout[:] = h5py.VirtualSource(str(other), "data", shape=(784, 50))
        group = h5[KERNEL.rsplit("/", 1)[0]]
        del group["kernel:0"]
        group.create_virtual_dataset("kernel:0", layout, fillvalue=0)

    return convert_args(case_dir, keras2_with(case_dir, base, edit))


def _external_link(case_dir, base):
    other = _outside_h5(case_dir)

    def edit(h5):
        group = h5[KERNEL.rsplit("/", 1)[0]]
        del group["kernel:0"]
        group["kernel:0"] = h5py.ExternalLink(str(other), "/data")

    return convert_args(case_dir, keras2_with(case_dir, base, edit))


def _soft_link(case_dir, base):
    def edit(h5):
        group = h5[KERNEL.rsplit("/", 1)[0]]
        h5["elsewhere"] = group["kernel:0"][()]
        del group["kernel:0"]
        group["kernel:0"] = h5py.SoftLink("/elsewhere")

    return convert_args(case_dir, keras2_with(case_dir, base, edit))


def _unknown_filter(case_dir, base):
    data = np.zeros((784, 50), "<f4")
    return convert_args(
        case_dir, keras2_with(case_dir, base, lambda h5: replace_dataset(h5, KERNEL, data=data, compression="lzf"))
    )


def _sparse_chunked(case_dir, base):
    return convert_args(
        case_dir,
        keras2_with(
            case_dir,
            base,
            lambda h5: replace_dataset(h5, KERNEL, shape=(40000, 40000), dtype="<f4", chunks=(1000, 1000)),
        ),
    )


def _unallocated_terabytes(case_dir, base):
    return convert_args(
        case_dir,
        keras2_with(case_dir, base, lambda h5: replace_dataset(h5, KERNEL, shape=(1_000_000, 1_000_000), dtype="<f4")),
    )


def _string_dataset(case_dir, base):
    return convert_args(
        case_dir,
        keras2_with(
            case_dir,
            base,
            lambda h5: replace_dataset(h5, KERNEL, data=np.array([b"weights"] * 784 * 50).reshape(784, 50)),
        ),
    )


def _set_attribute(name, value, where="/", **create):
    """An edit that replaces attribute `name` of the object at `where`."""

    def edit(h5):
        target = h5[where]
        if name in target.attrs:
            del target.attrs[name]
        target.attrs.create(name, value, **create)

    return edit


def _deep_model_config(case_dir, base):
    return convert_args(
        case_dir, keras2_with(case_dir, base, _set_attribute("model_config", "[" * 100_000 + "]" * 100_000))
    )


def _non_utf8_attribute(case_dir, base):
    return convert_args(
        case_dir,
        keras2_with(
            case_dir,
            base,
            _set_attribute("model_config", b'{"class_name": "\xff\xfe"}', dtype=h5py.string_dtype("utf-8")),
        ),
    )


def _model_config_wrong_type(case_dir, base):
    return convert_args(case_dir, keras2_with(case_dir, base, _set_attribute("model_config", np.arange(3))))


def _weight_names_wrong_type(case_dir, base):
    return convert_args(
        case_dir, keras2_with(case_dir, base, _set_attribute("weight_names", 5, where="model_weights/dense_1"))
    )


def _corrupted_h5(case_dir, base):
    data = bytearray((base / "seed_mlp.h5").read_bytes())
    data[800:4000] = bytes(range(256)) * 12 + bytes(3200 - 256 * 12)  # object headers and B-trees
    path = case_dir / "model.h5"
    path.write_bytes(bytes(data))
    return convert_args(case_dir, path)


def _seed_h5_with_byte(case_dir, base, offset: int, value: int):
    """The seed .h5 with one byte changed (cases the fuzzer found)."""
    data = bytearray((base / "seed_mlp.h5").read_bytes())
    data[offset] = value
    path = case_dir / "model.h5"
    path.write_bytes(bytes(data))
    return convert_args(case_dir, path)


def _h5_crashing_libhdf5(case_dir, base):
    """One byte of the model_config attribute message changed: reading the attribute makes
    libhdf5 crash with SIGSEGV."""
    return _seed_h5_with_byte(case_dir, base, 1009, 238)


def _h5_attribute_heap_bomb(case_dir, base):
    """One byte of the model_config attribute's global-heap reference changed: libhdf5 allocates
    about 2 GiB for the attribute before finding it damaged."""
    return _seed_h5_with_byte(case_dir, base, 1043, 128)


def _truncated_h5(case_dir, base):
    path = case_dir / "model.h5"
    path.write_bytes((base / "seed_mlp.h5").read_bytes()[:6000])
    return convert_args(case_dir, path)


def _use_bias_no(case_dir, base):
    config = seed_config(base)
    config["config"]["layers"][1]["config"]["use_bias"] = "no"  # the first Dense
    arch = case_dir / "config.json"
    arch.write_text(json.dumps(config))
    weights = case_dir / "weights.h5"
    shutil.copy(base / "seed_mlp_weights.h5", weights)
    return convert_args(case_dir, weights, "--arch", str(arch))


def _deep_arch_json(case_dir, base):
    arch = case_dir / "arch.json"
    arch.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return convert_args(case_dir, base / "seed.pt", "--arch", str(arch))


def _sparse_arch_json(case_dir, base):
    arch = case_dir / "arch.json"
    with open(arch, "wb") as stream:
        stream.truncate(1_500_000_000)  # a sparse file: 1.5 GB declared, nothing on disk
    return convert_args(case_dir, base / "seed.pt", "--arch", str(arch))


def _keras_config_zip_bomb(case_dir, base):
    path = case_dir / "model.keras"
    with zipfile.ZipFile(base / "seed.keras") as source, zipfile.ZipFile(path, "w") as archive:
        for name in source.namelist():
            if name == "config.json":
                deflated_member(archive, name, source.read(name)[:-1], BOMB_BYTES, b"}", fill=b" ")
            else:
                archive.writestr(name, source.read(name))
    return convert_args(case_dir, path)


def _deep_keras_config(case_dir, base):
    return convert_args(case_dir, keras3_with(case_dir, base, config=b"[" * 100_000 + b"]" * 100_000))


def _units_config(units: str):
    """The `.keras` seed with the first Dense's units written as `units`."""

    def build(case_dir, base):
        with zipfile.ZipFile(base / "seed.keras") as archive:
            config = archive.read("config.json").decode().replace('"units": 50', f'"units": {units}', 1)
        return convert_args(case_dir, keras3_with(case_dir, base, config=config.encode()))

    return build


def _lambda_layer(case_dir, base):
    with zipfile.ZipFile(base / "seed.keras") as archive:
        config = json.loads(archive.read("config.json"))
    layer = config["config"]["layers"][2]  # dense_1 becomes a Lambda carrying marshalled code
    layer.update(class_name="Lambda", module="keras.layers", registered_name=None)
    layer["config"] = {
        "name": "evil",
        "function": {
            "class_name": "__lambda__",
            "config": {"code": "4wEAAAAAAAAAAAAAAAEAAAADAAAA", "defaults": None, "closure": None},
        },
    }
    return convert_args(case_dir, keras3_with(case_dir, base, config=json.dumps(config).encode()))


def _folder_as_input(case_dir, base):
    (case_dir / "model.keras").mkdir()
    return convert_args(case_dir, case_dir / "model.keras")


def _fifo_as_input(case_dir, base):
    os.mkfifo(case_dir / "model.safetensors")
    return convert_args(case_dir, case_dir / "model.safetensors", output="out.pt")


def _safetensors_float8(case_dir, base):
    entries = {"dense_0.weight": {"dtype": "F8_E4M3", "shape": [50, 784], "data_offsets": [0, 39200]}}
    path = case_dir / "model.safetensors"
    path.write_bytes(safetensors_bytes(entries, seed_metadata(), bytes(39200)))
    return convert_args(case_dir, path, output="out.pt")


def _safetensors_offsets_beyond(case_dir, base):
    entries = {"dense_0.weight": {"dtype": "F32", "shape": [250000, 1000000], "data_offsets": [0, 10**12]}}
    path = case_dir / "model.safetensors"
    path.write_bytes(safetensors_bytes(entries, seed_metadata(), bytes(64)))
    return convert_args(case_dir, path, output="out.pt")


def _safetensors_header_beyond(case_dir, base):
    path = case_dir / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**15) + b"{}")
    return convert_args(case_dir, path, output="out.pt")


def _architecture_of_layers(count: int) -> str:
    node = (
        '{"name":"d%d","kind":"dense","inputs":["%s"],"dtype":"float32","config":{"units":1,'
        '"activation":"linear","use_bias":false}}'
    )
    nodes = ",".join(node % (index, "x" if index == 0 else f"d{index - 1}") for index in range(count))
    return (
        '{"name":"m","inputs":[{"name":"x","shape":[1],"dtype":"float32"}],"nodes":['
        + nodes
        + f'],"outputs":["d{count - 1}"]}}'
    )


def _huge_header(case_dir, base):
    metadata = {**seed_metadata(), "architecture": _architecture_of_layers(170_000)}  # about 20 MB
    path = case_dir / "model.safetensors"
    path.write_bytes(safetensors_bytes({}, metadata, b""))
    return convert_args(case_dir, path, output="out.pt")


def _too_many_layers(case_dir, base):
    metadata = {**seed_metadata(), "architecture": _architecture_of_layers(25_000)}
    path = case_dir / "model.safetensors"
    path.write_bytes(safetensors_bytes({}, metadata, b""))
    return convert_args(case_dir, path, output="out.pt")


def _pt_zip_bomb(case_dir, base):
    path = case_dir / "model.pt"
    with zipfile.ZipFile(base / "seed.pt") as source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            if info.filename.endswith("/data/0"):
                deflated_member(archive, info.filename, source.read(info), BOMB_BYTES)
            else:
                archive.writestr(info.filename, source.read(info))
    return convert_args(case_dir, path, "--activations", SEED_ACTIVATIONS)


def _pt_legacy(case_dir, base):
    import torch

    path = case_dir / "model.pt"
    torch.save(torch.load(base / "seed.pt", weights_only=True), path, _use_new_zipfile_serialization=False)
    return convert_args(case_dir, path, "--activations", SEED_ACTIVATIONS)


def _pt_with_code(case_dir, base):
    marker = case_dir.parent / "outside" / "pwned"
    marker.parent.mkdir(exist_ok=True)
    payload = (
        b"\x80\x02cposix\nsystem\nq\x00X"
        + struct.pack("<I", len(f"touch {marker}"))
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    path = case_dir / "model.pt"
    with zipfile.ZipFile(base / "seed.pt") as source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            archive.writestr(info.filename, payload if info.filename.endswith("data.pkl") else source.read(info))
    return convert_args(case_dir, path, "--activations", SEED_ACTIVATIONS)


def _pt_meta(case_dir, base):
    import torch

    path = case_dir / "model.pt"
    state = torch.load(base / "seed.pt", weights_only=True)
    state["dense_0.weight"] = torch.empty(50, 784, device="meta")
    torch.save(state, path)
    return convert_args(case_dir, path, "--activations", SEED_ACTIVATIONS)


def _pt_bzip2_member(case_dir, base):
    path = case_dir / "model.pt"
    with zipfile.ZipFile(base / "seed.pt") as source, zipfile.ZipFile(path, "w", zipfile.ZIP_BZIP2) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info))
    return convert_args(case_dir, path, "--activations", SEED_ACTIVATIONS)


def _pickle_memo_bomb(case_dir, base):
    # 9 bytes: PROTO 2, NONE, LONG_BINPUT 2**28, STOP; the C unpickler sizes its memo to the index.
    return train_args(case_dir, pickle_folder(case_dir, base, b"\x80\x02Nr" + struct.pack("<I", 1 << 28) + b"."))


def _pickle_huge_bytes(case_dir, base):
    # BINBYTES8 declaring 4 GB in a 19-byte file: read(4 GB) would allocate it before failing.
    return train_args(case_dir, pickle_folder(case_dir, base, b"\x80\x04\x8e" + struct.pack("<Q", 4 << 30) + b"."))


def _pickle_unknown_codec(case_dir, base):
    payload = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x05\x00\x00\x00bogus\x86R."
    return train_args(case_dir, pickle_folder(case_dir, base, payload))


def _pickle_with_code(case_dir, base):
    marker = case_dir.parent / "outside" / "pwned"
    marker.parent.mkdir(exist_ok=True)
    command = f"touch {marker}".encode()
    payload = b"\x80\x02cposix\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."
    return train_args(case_dir, pickle_folder(case_dir, base, payload))


def _pickle_fifo(case_dir, base):
    folder = pickle_folder(case_dir, base, b"")
    (folder / "mnist_X_train.pkl").unlink()
    os.mkfifo(folder / "mnist_X_train.pkl")
    return train_args(case_dir, folder)


def _idx_case(edit):
    """The small IDX folder with one file replaced by `edit(folder)`; run through prepare_data."""

    def build(case_dir, base):
        folder = mnist_copy(case_dir, base)
        edit(folder)
        (case_dir / "out").mkdir()
        return [str(folder), str(case_dir / "out")]

    return build


def _idx_gzip_bomb(folder):
    target = folder / "train-images-idx3-ubyte"
    target.unlink()
    gzip_bomb(
        Path(f"{target}.gz"),
        bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (MNIST_ROWS, 28, 28)),
        BOMB_BYTES,
    )


def _idx_dev_zero(folder):
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-images-idx3-ubyte").symlink_to("/dev/zero")


def _idx_write(name: str, data: bytes):
    def edit(folder):
        (folder / name).write_bytes(data)

    return edit


def _npz_case(make):
    def build(case_dir, base):
        path = case_dir / "mnist.npz"
        make(path)
        (case_dir / "out").mkdir()
        return [str(path), str(case_dir / "out")]

    return build


def _npz_absurd_shape(path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10_000_000, 28, 28)}
    )
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("x_train", "y_train", "x_test", "y_test"):
            archive.writestr(f"{name}.npy", header.getvalue() + bytes(64))


# Round 3: format-2 configs


def _format2_layer(kind: str, config: dict, shape: list):
    """For an output name, a case writing a format-2 `.safetensors` whose architecture is one layer
    `kind` with `config` on an input of `shape` (no tensors: the architecture is refused before they
    are read) and converting it to that output."""

    def for_output(output: str):
        def build(case_dir, base):
            architecture = {
                "name": "m",
                "inputs": [{"name": "x", "shape": shape, "dtype": "float32"}],
                "nodes": [{"name": "n", "kind": kind, "inputs": ["x"], "dtype": "float32", "config": config}],
                "outputs": ["n"],
            }
            path = case_dir / "model.safetensors"
            path.write_bytes(safetensors_bytes({}, {**seed_metadata(), "architecture": json.dumps(architecture)}, b""))
            return convert_args(case_dir, path, output=output)

        return build

    return for_output


def _format2_bidirectional(backward_go_backwards: bool = True, merge_mode: str = "concat"):
    side = {
        "units": 3,
        "activation": "tanh",
        "recurrent_activation": "sigmoid",
        "use_bias": True,
        "return_sequences": True,
        "return_state": False,
        "go_backwards": False,
        "zero_output_for_mask": True,
        "reset_after": True,
        "uses_mask": True,
    }
    return _format2_layer(
        "bidirectional",
        {
            "layer": "lstm",
            "forward": side,
            "merge_mode": merge_mode,
            "backward": {**side, "go_backwards": backward_go_backwards},
        },
        [5, 4],
    )


def _format2_pair(name: str, for_output, message: str) -> dict[str, Case]:
    """The case as code generation (`out.py`) and as `.keras`: both refused naming the file."""
    return {
        f"format-2 {name} -> {output}": Case(for_output(output), message, "model.safetensors", output=output)
        for output in ("out.py", "out.keras")
    }


def _deep_metadata_architecture(case_dir, base):
    metadata = {**seed_metadata(), "architecture": "[" * 100_000 + "]" * 100_000}
    path = case_dir / "model.safetensors"
    path.write_bytes(safetensors_bytes({}, metadata, b""))
    return convert_args(case_dir, path, output="out.pt")


def _verify_inputs_case(make):
    """The seed `.keras` converted with --verify on a hostile `--verify-inputs` file."""

    def build(case_dir, base):
        path = case_dir / "inputs.npz"
        make(path)
        return convert_args(case_dir, base / "seed.keras", "--verify", "--verify-inputs", str(path))

    return build


def _npz_member(descr: str, shape: tuple, payload: bytes):
    def make(path):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("input.npy", header.getvalue() + payload)

    return make


# Round 3: names and graph costs


def graph_file(case_dir: Path, description: dict, tensors: dict | None = None) -> Path:
    """A format-2 `.safetensors` holding `description` as its architecture (and `tensors`, float32)."""
    entries, data, offset = {}, b"", 0
    for key, array in sorted((tensors or {}).items()):
        raw = np.ascontiguousarray(array, "<f4").tobytes()
        entries[key] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    path = case_dir / "model.safetensors"
    path.write_bytes(safetensors_bytes(entries, {**seed_metadata(), "architecture": json.dumps(description)}, data))
    return path


def small_graph(layer: str = "d", input_name: str = "x", model: str = "m", width: int = 3) -> dict:
    """One Dense (`width` -> 2, no bias) named `layer`, reading input `input_name`."""
    return {
        "name": model,
        "inputs": [{"name": input_name, "shape": [width], "dtype": "float32"}],
        "nodes": [
            {
                "name": layer,
                "kind": "dense",
                "inputs": [input_name],
                "dtype": "float32",
                "config": {"units": 2, "activation": "linear", "use_bias": False},
            }
        ],
        "outputs": [layer],
    }


def _named(output: str = "out.py", **names):
    """A small graph whose layer, input or model name is hostile, converted to `output`."""

    def build(case_dir, base):
        marker = repr(str(case_dir.parent / "outside" / "pwned"))
        description = small_graph(**{key: value.replace("MARKER", marker) for key, value in names.items()})
        layer = names.get("layer", "d")
        from exchange.graph import python_name

        tensors = {f"{python_name(layer)}.weight": np.ones((2, 3), np.float32)} if layer.isprintable() else {}
        return convert_args(case_dir, graph_file(case_dir, description, tensors), output=output)

    return build


def _wide_add(case_dir, base):
    """One Add node listing the input 400,000 times (2.4 MB): 3.1 GB and a minute to build before."""
    description = small_graph()
    description["nodes"] = [{"name": "sum", "kind": "add", "inputs": ["x"] * 400_000, "dtype": "float32", "config": {}}]
    description["outputs"] = ["sum"]
    return convert_args(case_dir, graph_file(case_dir, description), output="out.py")


def _normalization_constant(case_dir, base):
    """A Normalization with a one-value mean on a 250,000,000-wide input: expanded per channel it
    took 2 GB from a file of a few hundred bytes (in the module and in the generated code)."""
    description = {
        "name": "m",
        "inputs": [{"name": "x", "shape": [250_000_000], "dtype": "float32"}],
        "nodes": [
            {
                "name": "norm",
                "kind": "normalization",
                "inputs": ["x"],
                "dtype": "float32",
                "config": {"axis": -1, "invert": False, "mean": [0.5], "variance": [2.0]},
            }
        ],
        "outputs": ["norm"],
    }
    return convert_args(case_dir, graph_file(case_dir, description), output="out.py")


def _keras2_model_named(model_name: str, layer: str | None = None, output: str = "out.py"):
    """The Keras 2 seed `.h5` with its model (and maybe its first Dense) renamed in model_config."""

    def build(case_dir, base):
        def edit(h5):
            config = json.loads(h5.attrs["model_config"])
            config["config"]["name"] = model_name.replace("MARKER", repr(str(case_dir.parent / "outside" / "pwned")))
            if layer is not None:
                config["config"]["layers"][1]["config"]["name"] = layer
            h5.attrs["model_config"] = json.dumps(config)

        return convert_args(case_dir, keras2_with(case_dir, base, edit), output=output)

    return build


def _arch_json_named(model_name: str):
    """The seed `.pt` with an exchange architecture JSON (`--arch`) whose model name is hostile."""

    def build(case_dir, base):
        from frameworks.recipe import SEED_ARCHITECTURE

        description = SEED_ARCHITECTURE.to_dict()
        description["name"] = model_name.replace("MARKER", repr(str(case_dir.parent / "outside" / "pwned")))
        arch = case_dir / "arch.json"
        arch.write_text(json.dumps(description))
        return convert_args(case_dir, base / "seed.pt", "--arch", str(arch), output="out.py")

    return build


CODE_IN_A_NAME = 'm"""; import pathlib; pathlib.Path(MARKER).touch(); """'


# Round 3: --verify (the frameworks run in a child process; these graphs crash, loop in or
# exhaust TensorFlow, or are refused before it runs)
VERIFY_CHILD_SECONDS = "12"  # --verify-timeout for the cases that make a framework loop: within CASE_TIMEOUT


def _graph(shape: list, nodes: list, dtype: str = "float32") -> dict:
    return {
        "name": "m",
        "inputs": [{"name": "x", "shape": shape, "dtype": dtype}],
        "nodes": nodes,
        "outputs": [nodes[-1]["name"]],
    }


def _verify_huge_pool(case_dir, base):
    """MaxPooling1D of pool size 10**9 ("same"): TensorFlow crashes (SIGSEGV) or loops."""
    pool = {
        "name": "pool",
        "kind": "max_pool1d",
        "inputs": ["x"],
        "dtype": "float32",
        "config": {"pool_size": [10**9], "strides": [10**9], "padding": "same"},
    }
    return convert_args(
        case_dir,
        graph_file(case_dir, _graph([10, 3], [pool])),
        "--verify",
        "--verify-timeout",
        VERIFY_CHILD_SECONDS,
        output="out.pt",
    )


def _verify_wide_add(case_dir, base):
    """An Add reading the input 10**5 times: TensorFlow builds for minutes, then crashes (SIGSEGV)."""
    add = {"name": "add", "kind": "add", "inputs": ["x"] * 10**5, "dtype": "float32", "config": {}}
    return convert_args(
        case_dir,
        graph_file(case_dir, _graph([3], [add])),
        "--verify",
        "--verify-timeout",
        VERIFY_CHILD_SECONDS,
        output="out.pt",
    )


def _verify_long_lstm(case_dir, base):
    """A masked LSTM over 2*10**6 declared steps: TensorFlow aborts (SIGABRT) under a memory cap,
    or runs for minutes."""
    lstm = {
        "units": 3,
        "activation": "tanh",
        "recurrent_activation": "sigmoid",
        "use_bias": True,
        "return_sequences": False,
        "return_state": False,
        "go_backwards": False,
        "zero_output_for_mask": False,
        "reset_after": True,
        "uses_mask": True,
    }
    nodes = [
        {
            "name": "emb",
            "kind": "embedding",
            "inputs": ["x"],
            "dtype": "float32",
            "config": {"input_dim": 10, "output_dim": 4, "mask_zero": True},
        },
        {"name": "lstm", "kind": "lstm", "inputs": ["emb"], "dtype": "float32", "config": lstm},
    ]
    tensors = {
        "emb.weight": np.ones((10, 4)),
        "lstm.weight_ih_l0": np.ones((12, 4)),
        "lstm.weight_hh_l0": np.ones((12, 3)),
        "lstm.bias_ih_l0": np.ones(12),
        "lstm.bias_hh_l0": np.zeros(12),
    }
    return convert_args(
        case_dir,
        graph_file(case_dir, _graph([2 * 10**6], nodes, "int32"), tensors),
        "--verify",
        "--verify-timeout",
        VERIFY_CHILD_SECONDS,
        output="out.pt",
    )


def _verify_huge_activation(case_dir, base):
    """One sample of 25,000,000 values: --verify sized its batch at 8 rows whatever the input."""
    relu = {"name": "relu", "kind": "activation", "inputs": ["x"], "dtype": "float32", "config": {"activation": "relu"}}
    return convert_args(case_dir, graph_file(case_dir, _graph([5000, 5000], [relu])), "--verify", output="out.pt")


def _deep_chain(output: str, *extra: str):
    """20,000 Dense layers in a chain (the layer cap): Keras recursed past Python's limit."""

    def build(case_dir, base):
        metadata = {**seed_metadata(), "architecture": _architecture_of_layers(20_000)}
        entries = {
            f"d{index}.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [4 * index, 4 * index + 4]}
            for index in range(20_000)
        }
        path = case_dir / "model.safetensors"
        path.write_bytes(safetensors_bytes(entries, metadata, np.ones(20_000, np.float32).tobytes()))
        return convert_args(case_dir, path, *extra, output=output)

    return build


def _verify_integer_activation(case_dir, base):
    """An int64 input into an Activation (a Dense raised a dtype mismatch with a traceback; it now
    casts, as Keras does): Keras keeps integers there, so the exchange refuses."""
    relu = {"name": "d", "kind": "activation", "inputs": ["x"], "dtype": "float32", "config": {"activation": "relu"}}
    return convert_args(case_dir, graph_file(case_dir, _graph([3], [relu], "int64"), {}), "--verify", output="out.pt")


CASES: dict[str, Case] = {
    # Round 3: names and graph costs (names that are valid but odd: tests/test_hostile_names.py).
    "layer name with a line break": Case(
        _named(layer="d\nimport os"), r"invalid layer or input name 'd\\nimport os'", "model.safetensors"
    ),
    "layer name with NUL": Case(_named(layer="d\0"), "invalid layer or input name", "model.safetensors"),
    "input name with a lone surrogate": Case(
        _named(input_name="x\udcff"), r"invalid layer or input name 'x\\udcff'", "model.safetensors"
    ),
    "model name with a right-to-left override": Case(
        _named(model="m\u202eyp.exe"), "invalid model name", "model.safetensors"
    ),
    "layer name Keras cannot use, to .keras": Case(
        _named(layer="my layer", output="out.keras"),
        "layer name 'my layer' cannot be a Keras layer's name",
        "model.safetensors",
        output="out.keras",
    ),
    "model name Keras cannot use, to .keras": Case(
        _named(model="-m", output="out.keras"),
        "model name '-m' cannot be a Keras model's name",
        "model.safetensors",
        output="out.keras",
    ),
    "Add of 400,000 inputs": Case(
        _wide_add, "reads 400,000 tensors, more than the 1,000", "model.safetensors", output="out.py"
    ),
    "Normalization constant on 250,000,000 channels": Case(
        _normalization_constant, "", "", output="out.py", converts=True
    ),
    "h5 layer name with a line break": Case(
        _keras2_model_named("sequential", layer="dense_1\nx"),
        r"invalid layer or input name 'dense_1\\nx'",
        "model.h5",
        output="out.py",
    ),
    "h5 model name closing the docstring, to .py": Case(
        _keras2_model_named(CODE_IN_A_NAME), "", "", output="out.py", converts=True
    ),
    "--arch model name closing the docstring, to .py": Case(
        _arch_json_named(CODE_IN_A_NAME), "", "", output="out.py", converts=True
    ),
    "safetensors model name closing the docstring, to .py": Case(
        _named(model=CODE_IN_A_NAME), "", "", output="out.py", converts=True
    ),
    # Data read from outside the input.
    "h5 external storage": Case(_external_storage_h5, "keeps its data in another file", "model.h5"),
    ".keras external storage": Case(_external_storage_keras, "keeps its data in another file", "model.keras"),
    "h5 virtual dataset": Case(_virtual_dataset, "virtual dataset", "model.h5"),
    "h5 external link": Case(_external_link, "ExternalLink", "model.h5"),
    "h5 soft link": Case(_soft_link, "SoftLink", "model.h5"),
    "h5 lzf filter": Case(_unknown_filter, r"filter\(s\) \[32000\]", "model.h5"),
    # Memory bombs.
    ".keras config.json zip bomb": Case(_keras_config_zip_bomb, "zip bomb", "model.keras"),
    "h5 chunked 40000x40000, no chunks": Case(_sparse_chunked, "sparse or bomb dataset", "model.h5"),
    "h5 contiguous terabytes, unallocated": Case(_unallocated_terabytes, "does not hold", "model.h5"),
    "--arch sparse 1.5 GB": Case(_sparse_arch_json, "more than the", "arch.json"),
    "safetensors 20 MB header, 170,000 layers": Case(
        _huge_header, "more than the", "model.safetensors", output="out.pt"
    ),
    "safetensors 25,000 layers": Case(
        _too_many_layers, "more than the 20,000 layers", "model.safetensors", output="out.pt"
    ),
    ".pt storage zip bomb": Case(_pt_zip_bomb, "zip bomb", "model.pt"),
    "pickle LONG_BINPUT 2**28": Case(
        _pickle_memo_bomb, "memo index 268,435,456", "mnist_X_train.pkl", entry="train", output="run"
    ),
    "pickle BINBYTES8 4 GB": Case(
        _pickle_huge_bytes, "not a readable pickle", "mnist_X_train.pkl", entry="train", output="run"
    ),
    "IDX gzip bomb": Case(
        _idx_case(_idx_gzip_bomb), "holds more values", "train-images-idx3-ubyte.gz", entry="prepare", output="out"
    ),
    "IDX /dev/zero": Case(
        _idx_case(_idx_dev_zero),
        r"not a regular file \(a character device\)",
        "train-images-idx3-ubyte",
        entry="prepare",
        output="out",
    ),
    # A hang.
    "pickle FIFO": Case(
        _pickle_fifo, r"not a regular file \(a FIFO\)", "mnist_X_train.pkl", entry="train", output="run"
    ),
    "FIFO as input": Case(_fifo_as_input, r"not a regular file \(a FIFO\)", "model.safetensors", output="out.pt"),
    # Tracebacks.
    ".keras deeply nested config": Case(_deep_keras_config, "nests 100000 levels", "model.keras"),
    "h5 deeply nested model_config": Case(_deep_model_config, "nests 100000 levels", "model.h5"),
    "--arch deeply nested": Case(_deep_arch_json, "nests 100001 levels", "arch.json"),
    ".keras 5000-digit integer": Case(_units_config("1" + "0" * 5000), "integer of 5001 digits", "model.keras"),
    ".keras 1e999": Case(_units_config("1e999"), "out of range", "model.keras"),
    "h5 non-UTF-8 model_config": Case(_non_utf8_attribute, "damaged or unsupported HDF5|not UTF-8", "model.h5"),
    "h5 model_config not text": Case(_model_config_wrong_type, "expected text", "model.h5"),
    "h5 weight_names not a list": Case(_weight_names_wrong_type, "not a list of names", "model.h5"),
    "h5 corrupted": Case(_corrupted_h5, "HDF5", "model.h5"),
    "h5 truncated": Case(_truncated_h5, "HDF5", "model.h5"),
    "h5 attribute making libhdf5 allocate 2 GiB": Case(_h5_attribute_heap_bomb, "memory allocation failed", "model.h5"),
    "h5 that crashes libhdf5": Case(_h5_crashing_libhdf5, r"HDF5 library crashed reading it: SIGSEGV", "model.h5"),
    "h5 dataset of strings": Case(_string_dataset, "not numbers", "model.h5"),
    "safetensors float8": Case(_safetensors_float8, "has dtype F8_E4M3", "model.safetensors", output="out.pt"),
    "safetensors offsets beyond the file": Case(
        _safetensors_offsets_beyond, "do not fit", "model.safetensors", output="out.pt"
    ),
    "safetensors header length beyond the file": Case(
        _safetensors_header_beyond, "header length", "model.safetensors", output="out.pt"
    ),
    ".pt meta tensor": Case(_pt_meta, "cannot hold", "model.pt"),
    ".pt legacy format": Case(_pt_legacy, "not the zip archive", "model.pt"),
    ".pt bzip2 member": Case(_pt_bzip2_member, "unsupported compression", "model.pt"),
    "IDX labels out of range": Case(
        _idx_case(_idx_write("train-labels-idx1-ubyte", idx_bytes(np.full(MNIST_ROWS, 11, np.uint8)))),
        "labels must be integers 0 to 9",
        "mnist",
        entry="prepare",
        output="out",
    ),
    "IDX 255 dimensions": Case(
        _idx_case(_idx_write("train-images-idx3-ubyte", bytes([0, 0, 8, 255]) + bytes(2000))),
        "255 dimensions",
        "train-images-idx3-ubyte",
        entry="prepare",
        output="out",
    ),
    "IDX 2-D images": Case(
        _idx_case(_idx_write("train-images-idx3-ubyte", idx_bytes(np.zeros((MNIST_ROWS, 28), np.uint8)))),
        r"expected \(N, 28, 28\)",
        "mnist",
        entry="prepare",
        output="out",
    ),
    "IDX wrapping dimension product": Case(
        _idx_case(
            _idx_write("train-images-idx3-ubyte", bytes([0, 0, 8, 3]) + b"\x80\x00\x00\x00" * 2 + b"\x00\x00\x00\x04")
        ),
        "more than the file can hold",
        "train-images-idx3-ubyte",
        entry="prepare",
        output="out",
    ),
    "npz absurd shape": Case(
        _npz_case(_npz_absurd_shape), "declares uint8", "mnist.npz", entry="prepare", output="out"
    ),
    "pickle unknown codec": Case(
        _pickle_unknown_codec, "refusing the codec 'bogus'", "mnist_X_train.pkl", entry="train", output="run"
    ),
    "--verify-inputs pickled objects": Case(
        _verify_inputs_case(_npz_member("|O", (3,), pickle.dumps([1, 2, 3]))), "holds Python objects", "inputs.npz"
    ),
    "--verify-inputs absurd shape": Case(
        _verify_inputs_case(_npz_member("<f4", (10**9, 784), bytes(64))), "declares float32", "inputs.npz"
    ),
    "--verify-inputs wrong shape": Case(
        _verify_inputs_case(lambda path: np.savez(path, images=np.zeros((5, 783), np.float32))),
        r"'input' has shape \(5, 783\), the input takes \(rows, 784\)",
        "inputs.npz",
    ),
    "--tolerance nan": Case(
        lambda d, b: convert_args(d, b / "seed.safetensors", "--verify", "--tolerance", "nan"),
        "--tolerance must be a finite non-negative number",
        "tolerance",
    ),
    "--tolerance abc": Case(
        lambda d, b: convert_args(d, b / "seed.safetensors", "--tolerance", "abc"),
        "invalid float value: 'abc'",
        "tolerance",
    ),
    "train --epochs 0": Case(
        lambda d, b: train_args(d, b / "mnist")[:2] + ["--epochs", "0", "--out-dir", str(d / "run")],
        "--epochs must be at least 1",
        "epochs",
        entry="train",
        output="run",
    ),
    "safetensors deeply nested architecture": Case(
        _deep_metadata_architecture, "architecture nests 100000 levels", "model.safetensors", output="out.pt"
    ),
    "--tolerance -1": Case(
        lambda d, b: convert_args(d, b / "seed.safetensors", "--verify", "--tolerance", "-1"),
        "--tolerance must be a finite non-negative number",
        "tolerance",
    ),
    # Round 3: format-2 configs
    **_format2_pair(
        "Permute dims out of range",
        _format2_layer("permute", {"dims": [1, 3]}, [4, 5]),
        r"Permute dims \[1, 3\] are not a permutation",
    ),
    **_format2_pair(
        "Permute dims duplicated",
        _format2_layer("permute", {"dims": [1, 1]}, [4, 5]),
        r"Permute dims \[1, 1\] are not a permutation",
    ),
    **_format2_pair("Dense on a rank-0 input", _format2_layer("dense", {"units": 3}, []), "needs a known feature axis"),
    **_format2_pair(
        "Softmax axis 10**18",
        _format2_layer("softmax", {"axis": 10**18}, [4]),
        "Softmax axis must be an integer from -9 to 9",
    ),
    **_format2_pair(
        "Softmax axis out of range", _format2_layer("softmax", {"axis": 5}, [4]), "axis 5 is not a feature axis"
    ),
    **_format2_pair(
        "Bidirectional merge_mode 'bogus'",
        _format2_bidirectional(merge_mode="bogus"),
        "merge_mode 'bogus' is not one of",
    ),
    **_format2_pair(
        "Bidirectional backward not go_backwards",
        _format2_bidirectional(backward_go_backwards=False),
        "different go_backwards, got False for both",
    ),
    **_format2_pair(
        "TimeDistributed unknown key",
        _format2_layer(
            "time_distributed", {"layer": "dense", "config": {"units": 3}, "layer_name": "d", "bogus": 1}, [5, 4]
        ),
        r"unknown option\(s\) 'bogus'",
    ),
    **_format2_pair(
        "pool size 10**9, same padding",
        _format2_layer("max_pool2d", {"pool_size": [10**9, 10**9], "strides": [1, 1], "padding": "same"}, [8, 8, 3]),
        "pooling kernel size must be an integer from 1 to 8,192",
    ),
    **_format2_pair(
        "ZeroPadding2D 10**9",
        _format2_layer("zero_padding2d", {"amounts": [[10**9, 0], [0, 0]]}, [8, 8, 3]),
        "padding or cropping amounts must be an integer from 0 to 8,192",
    ),
    **_format2_pair(
        "newline in a config key",
        _format2_layer("dense", {"units": 3, "bad\nkey": 1}, [4]),
        r"unknown option\(s\) 'bad\\nkey'",
    ),
    # Invalid input accepted.
    'use_bias "no"': Case(_use_bias_no, r"use_bias='no' \(must be true or false\)", "config.json"),
    # Round 3: --verify
    # Refused before any framework runs now (the size and fan-in caps); they segfaulted TensorFlow.
    "--verify MaxPooling1D of pool size 10**9": Case(
        _verify_huge_pool,
        "pooling kernel size must be an integer from 1 to 8,192",
        "model.safetensors",
        output="out.pt",
    ),
    "--verify Add of 100,000 inputs": Case(
        _verify_wide_add, "reads 100,000 tensors, more than the 1,000", "model.safetensors", output="out.pt"
    ),
    "--verify masked LSTM of 2,000,000 steps": Case(
        _verify_long_lstm, "--verify stopped", "model.safetensors", output="out.pt"
    ),
    "--verify 25,000,000 values per sample": Case(
        _verify_huge_activation, "more than the 16,000,000 --verify holds", "model.safetensors", output="out.pt"
    ),
    "--verify 20,000-layer chain": Case(
        _deep_chain("out.pt", "--verify"), "20,000 layers deep", "model.safetensors", output="out.pt"
    ),
    ".keras of a 20,000-layer chain": Case(
        _deep_chain("out.keras"), "20,000 layers deep", "model.safetensors", output="out.keras"
    ),
    "--verify int64 input into Activation": Case(
        _verify_integer_activation, "reads the integer input 'x'", "model.safetensors", output="out.pt"
    ),
    "--verify-timeout nan": Case(
        lambda d, b: convert_args(d, b / "seed.safetensors", "--verify", "--verify-timeout", "nan"),
        "--verify-timeout must be a finite positive number",
        "verify-timeout",
    ),
    # No input runs code.
    ".keras Lambda layer": Case(_lambda_layer, r"unsupported layer 'dense_1' \(Lambda\)", "model.keras"),
    ".pt carrying os.system": Case(_pt_with_code, "not a readable PyTorch weights file", "model.pt"),
    "pickle carrying os.system": Case(
        _pickle_with_code, "refusing posix.system", "mnist_X_train.pkl", entry="train", output="run"
    ),
    "folder as input": Case(_folder_as_input, r"not a regular file \(a folder\)", "model.keras"),
}


# Round 3: older failures


def _pickle_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _pickle_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _pickle_int(value: int) -> bytes:
    return b"\x8a\x08" + struct.pack("<q", value)  # LONG1 of 8 bytes


def _pickle_text(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


PICKLE_TERA_SHAPE = _pickle_tuple(_pickle_int(10**6), _pickle_int(10**6))


def _pickle_dtype(code: str) -> bytes:
    """`numpy.dtype(code, False, True)`, as numpy pickles a dtype (its state left out)."""
    return _pickle_global("numpy", "dtype") + _pickle_tuple(_pickle_text(code), b"\x89", b"\x88") + b"R"


def _pickle_empty_array() -> bytes:
    """`_reconstruct(ndarray, (0,), b"b")`: the empty array numpy's pickles then fill with BUILD."""
    return (
        _pickle_global("numpy.core.multiarray", "_reconstruct")
        + _pickle_tuple(_pickle_global("numpy", "ndarray"), _pickle_tuple(_pickle_int(0)), b"C\x01b")
        + b"R"
    )


def _pickle_case(payload: bytes):
    """The seed's pickles with the training images replaced by a protocol-2 `payload`, run
    through train.py."""

    def build(case_dir, base):
        return train_args(case_dir, pickle_folder(case_dir, base, b"\x80\x02" + payload + b"."))

    return build


CASES.update(
    {
        # Pickles whose allowed numpy callables would allocate terabytes from a few dozen bytes.
        "pickle numpy.ndarray((10**6, 10**6))": Case(
            _pickle_case(
                _pickle_global("numpy", "ndarray") + _pickle_tuple(PICKLE_TERA_SHAPE, _pickle_text("f4")) + b"R"
            ),
            r"declares a float32 array of shape \(1000000, 1000000\).*more than the file's",
            "mnist_X_train.pkl",
            entry="train",
            output="run",
        ),
        "pickle NEWOBJ numpy.ndarray((10**6, 10**6))": Case(
            _pickle_case(_pickle_global("numpy", "ndarray") + _pickle_tuple(PICKLE_TERA_SHAPE) + b"\x81"),
            "not a readable pickle",
            "mnist_X_train.pkl",
            entry="train",
            output="run",
        ),
        "pickle _reconstruct((10**6, 10**6))": Case(
            _pickle_case(
                _pickle_global("numpy.core.multiarray", "_reconstruct")
                + _pickle_tuple(_pickle_global("numpy", "ndarray"), PICKLE_TERA_SHAPE, b"C\x01b")
                + b"R"
            ),
            r"declares a int8 array of shape \(1000000, 1000000\)",
            "mnist_X_train.pkl",
            entry="train",
            output="run",
        ),
        "pickle _frombuffer((10**6, 10**6))": Case(
            _pickle_case(
                _pickle_global("numpy._core.numeric", "_frombuffer")
                + _pickle_tuple(b"C\x04abcd", _pickle_dtype("f4"), PICKLE_TERA_SHAPE, _pickle_text("C"))
                + b"R"
            ),
            "more than the file's",
            "mnist_X_train.pkl",
            entry="train",
            output="run",
        ),
        "pickle __setstate__ (10**6, 10**6), 3 bytes": Case(
            _pickle_case(
                _pickle_empty_array()
                + _pickle_tuple(_pickle_int(1), PICKLE_TERA_SHAPE, _pickle_dtype("f4"), b"\x89", b"C\x03abc")
                + b"b"
            ),
            r"declares float32 \(1000000, 1000000\) .* but holds 3 bytes",
            "mnist_X_train.pkl",
            entry="train",
            output="run",
        ),
        "pickle object array __setstate__ (10**6, 10**6)": Case(
            _pickle_case(
                _pickle_empty_array()
                + _pickle_tuple(_pickle_int(1), PICKLE_TERA_SHAPE, _pickle_dtype("O"), b"\x89", b"]")
                + b"b"
            ),
            "refusing the dtype 'O'",
            "mnist_X_train.pkl",
            entry="train",
            output="run",
        ),
        "pickle sub-array dtype of 4 GB": Case(
            _pickle_case(
                _pickle_global("numpy", "ndarray")
                + _pickle_tuple(_pickle_tuple(_pickle_int(10)), _pickle_text("(10000,10000)f4"))
                + b"R"
            ),
            r"refusing the dtype '\(10000,10000\)f4'",
            "mnist_X_train.pkl",
            entry="train",
            output="run",
        ),
        "pickle dtype __setstate__ item size": Case(
            _pickle_case(
                _pickle_global("numpy", "ndarray")
                + _pickle_tuple(
                    _pickle_tuple(_pickle_int(1000)),
                    _pickle_dtype("V8")
                    + _pickle_tuple(
                        _pickle_int(3),
                        _pickle_text("|"),
                        b"N",
                        b"N",
                        b"N",
                        _pickle_int(1 << 30),
                        _pickle_int(1),
                        _pickle_int(0),
                    )
                    + b"b",
                )
                + b"R"
            ),
            "refusing the dtype 'V8'",
            "mnist_X_train.pkl",
            entry="train",
            output="run",
        ),
    }
)


def _v1_architecture(**edits) -> dict:
    """The seed MLP as version 1 wrote it, with top-level `edits`; `layer0` edits the first layer."""
    layers = [
        {"kind": "dense", "units": units, "activation": activation, "use_bias": True}
        for units, activation in ((50, "tanh"), (50, "tanh"), (10, "softmax"))
    ]
    layers[0].update(edits.pop("layer0", {}))
    return {"input_dim": 784, "layers": layers, **edits}


def _v1_safetensors(**edits):
    def build(case_dir, base):
        metadata = {
            "format": "pt",
            "exchange_version": "1",
            "source_framework": "torch",
            "architecture": json.dumps(_v1_architecture(**edits)),
        }
        path = case_dir / "model.safetensors"
        path.write_bytes(safetensors_bytes({}, metadata, b""))
        return convert_args(case_dir, path, output="out.pt")

    return build


def _v1_arch_json(**edits):
    def build(case_dir, base):
        arch = case_dir / "arch.json"
        arch.write_text(json.dumps(_v1_architecture(**edits)))
        return convert_args(case_dir, base / "seed.pt", "--arch", str(arch))

    return build


CASES.update(
    {
        # Version-1 architectures carrying what version 1 never wrote, accepted silently before.
        "v1 safetensors with a field 'code'": Case(
            _v1_safetensors(code="__import__('os')"),
            r"version-1 architecture: unknown field\(s\) 'code'",
            "model.safetensors",
            output="out.pt",
        ),
        "v1 --arch JSON with a field 'code'": Case(
            _v1_arch_json(code="__import__('os')"), r"version-1 architecture: unknown field\(s\) 'code'", "arch.json"
        ),
        "v1 --arch JSON layer with a field 'exec\\n'": Case(
            _v1_arch_json(layer0={"exec\n": "rm -rf /"}),
            r"version-1 layer 0: unknown field\(s\) 'exec\\n'",
            "arch.json",
        ),
        'v1 safetensors units "50"': Case(
            _v1_safetensors(layer0={"units": "50"}),
            "version-1 layer 0: units must be an integer from 1 to",
            "model.safetensors",
            output="out.pt",
        ),
        "v1 --arch JSON units 10**19": Case(
            _v1_arch_json(layer0={"units": 10**19}),
            "version-1 layer 0: units must be an integer from 1 to",
            "arch.json",
        ),
        'v1 --arch JSON activation ["tanh"]': Case(
            _v1_arch_json(layer0={"activation": ["tanh"]}),
            "version-1 layer 0: activation must be a string",
            "arch.json",
        ),
    }
)


# ---------------------------------------------------------------------------------------------
# Keras 2 SavedModel folders (exchange/savedmodel.py): copies of a tf-keras fixture with one part
# broken. The checkpoint index is re-encoded with every checksum right, so an entry can lie.

SAVED_MODEL = ROOT / "tests/fixtures/keras2/saved_model/cnn"
SAVED_MODEL_KERNEL = "layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"  # the Conv2D's kernel


def proto_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def proto_field(number: int, value) -> bytes:
    """A varint field (an int) or a length-delimited one (bytes)."""
    if isinstance(value, int):
        return proto_varint(number << 3) + proto_varint(value)
    return proto_varint(number << 3 | 2) + proto_varint(len(value)) + value


def bundle_entry_bytes(entry) -> bytes:
    """A `savedmodel.BundleEntry` as TensorFlow encodes it."""
    shape = b"".join(proto_field(2, proto_field(1, size)) for size in entry.shape)
    return (
        proto_field(1, entry.dtype)
        + proto_field(2, shape)
        + proto_field(3, entry.shard_id)
        + proto_field(4, entry.offset)
        + proto_field(5, entry.size)
        + proto_varint(6 << 3 | 5)
        + entry.crc32c.to_bytes(4, "little")
        + (proto_field(7, b"") if entry.sliced else b"")
    )


def checkpoint_index_entries(path: Path) -> dict[bytes, bytes]:
    """The raw (key, value) pairs of a checkpoint index."""
    from exchange import savedmodel

    data = memoryview(path.read_bytes())
    footer = data[len(data) - savedmodel.FOOTER_BYTES :]
    _, position = savedmodel._block_handle(footer, 0, "")
    index_handle, _ = savedmodel._block_handle(footer, position, "")
    pairs = {}
    for _, handle_bytes in savedmodel._block_entries(data, index_handle, ""):
        handle, _ = savedmodel._block_handle(memoryview(handle_bytes), 0, "")
        pairs.update(savedmodel._block_entries(data, handle, ""))
    return pairs


def checkpoint_index_bytes(pairs: dict[bytes, bytes]) -> bytes:
    """A table as TensorFlow writes one: a data block, an empty metaindex block, an index block, the footer."""
    from exchange import savedmodel

    def block(items) -> bytes:
        body = b"".join(
            proto_varint(0) + proto_varint(len(key)) + proto_varint(len(value)) + key + value for key, value in items
        )
        return body + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")

    def trailed(body: bytes) -> bytes:
        return body + b"\0" + savedmodel.masked(savedmodel.crc32c(body + b"\0")).to_bytes(4, "little")

    keys = sorted(pairs)
    data = block([(key, pairs[key]) for key in keys])
    out = trailed(data)
    meta, meta_offset = block([]), len(out)
    out += trailed(meta)
    index = block([(keys[-1], proto_varint(0) + proto_varint(len(data)))])
    index_offset = len(out)
    out += trailed(index)
    handles = (
        proto_varint(meta_offset) + proto_varint(len(meta)) + proto_varint(index_offset) + proto_varint(len(index))
    )
    return out + handles.ljust(40, b"\0") + savedmodel.TABLE_MAGIC.to_bytes(8, "little")


def saved_model_copy(case_dir: Path, **entry_edits) -> Path:
    """The fixture's folder; `entry_edits` (dtype, shape, offset, size, …) replace fields of the
    kernel's entry in a re-encoded index."""
    import dataclasses

    from exchange import savedmodel

    folder = case_dir / "model"
    shutil.copytree(SAVED_MODEL, folder)
    if entry_edits:
        index = folder / savedmodel.INDEX_NAME
        pairs = checkpoint_index_entries(index)
        key = SAVED_MODEL_KERNEL.encode()
        entry = dataclasses.replace(
            savedmodel._bundle_entry(SAVED_MODEL_KERNEL, memoryview(pairs[key]), ""), **entry_edits
        )
        pairs[key] = bundle_entry_bytes(entry)
        index.write_bytes(checkpoint_index_bytes(pairs))
    return folder


def _saved_model_case(edit=None, **entry_edits):
    def build(case_dir, base):
        folder = saved_model_copy(case_dir, **entry_edits)
        if edit is not None:
            edit(folder, case_dir)
        return convert_args(case_dir, folder)

    return build


def _truncate(name: str, size: int):
    def edit(folder, case_dir):
        with open(folder / name, "r+b") as stream:
            stream.truncate(size)

    return edit


def _link_outside(name: str):
    def edit(folder, case_dir):
        (folder / name).unlink()
        (folder / name).symlink_to(outside_file(case_dir))

    return edit


def _link_variables_outside(folder, case_dir):
    outside_file(case_dir)
    shutil.move(folder / "variables", case_dir.parent / "outside" / "variables")
    (folder / "variables").symlink_to(case_dir.parent / "outside" / "variables")


def _flip_kernel_byte(folder, case_dir):
    from exchange import savedmodel

    pairs = checkpoint_index_entries(folder / savedmodel.INDEX_NAME)
    entry = savedmodel._bundle_entry(SAVED_MODEL_KERNEL, memoryview(pairs[SAVED_MODEL_KERNEL.encode()]), "")
    data = bytearray((folder / savedmodel.DATA_NAME).read_bytes())
    data[entry.offset + 5] ^= 0x40
    (folder / savedmodel.DATA_NAME).write_bytes(bytes(data))


def _garbage(name: str, data: bytes):
    def edit(folder, case_dir):
        (folder / name).write_bytes(data)

    return edit


def _remove_metadata(folder, case_dir):
    (folder / "keras_metadata.pb").unlink()


CASES.update(
    {
        "SavedModel entry past its data file": Case(_saved_model_case(offset=1 << 40), "declares bytes", "model"),
        "SavedModel entry size lies": Case(_saved_model_case(size=8), "but declares 8", "model"),
        "SavedModel keras_metadata.pb over the cap": Case(
            _saved_model_case(_truncate("keras_metadata.pb", (64 << 20) + 1)), "more than the", "keras_metadata.pb"
        ),
        "SavedModel data file linked outside": Case(
            _saved_model_case(_link_outside("variables/variables.data-00000-of-00001")),
            "outside the folder",
            "variables.data-00000-of-00001",
        ),
        "SavedModel variables folder linked outside": Case(
            _saved_model_case(_link_variables_outside), "outside the folder", "variables.index"
        ),
        "SavedModel tensor checksum mismatch": Case(
            _saved_model_case(_flip_kernel_byte), "checksum mismatch", "variables.data-00000-of-00001"
        ),
        "SavedModel truncated index": Case(
            _saved_model_case(_truncate("variables/variables.index", 300)), "not a checkpoint index", "variables.index"
        ),
        "SavedModel truncated data file": Case(
            _saved_model_case(_truncate("variables/variables.data-00000-of-00001", 1000)),
            "declares bytes",
            "variables.index",
        ),
        "SavedModel garbage keras_metadata.pb": Case(
            _saved_model_case(_garbage("keras_metadata.pb", b"\x0a\xff\xff\x7f")),
            "damaged metadata",
            "keras_metadata.pb",
        ),
        "SavedModel without keras_metadata.pb": Case(
            _saved_model_case(_remove_metadata), "not a Keras SavedModel folder", "model"
        ),
    }
)


# ---------------------------------------------------------------------------------------------
# Running cases in this process, measured


def _entry(name: str):
    if name == "convert":
        from exchange.cli import main

        return main
    path = ROOT / "scripts" / ("prepare_data.py" if name == "prepare" else "train.py")
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); where that is not allowed, the peak is the
    process's so far, which only makes the bound stricter."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with the bytes of the small files (None for large or special)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        small = path.is_file() and not path.is_symlink() and path.stat().st_size <= 1 << 20
        found[str(path.relative_to(folder))] = path.read_bytes() if small else None
    return found


def _timeout(signal_number, frame):
    raise TimeoutError(f"ran longer than {CASE_TIMEOUT} s")


def run_one(entry, args: list[str], case_dir: Path) -> dict:
    """Run one command in this process: exit code, stderr, files left behind, peak memory."""
    before = _listing(case_dir)
    stderr, stdout = io.StringIO(), io.StringIO()
    rss = _memory_kib("VmRSS")
    _reset_peak()
    result = {"traceback": None}
    signal.alarm(CASE_TIMEOUT)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            result["rc"] = entry(args)
    except SystemExit as err:  # argparse errors
        result["rc"] = err.code
    except BaseException:  # noqa: B036, BLE001 (everything is a finding: the test reports it)
        result["traceback"] = traceback.format_exc()
        result["rc"] = None
    finally:
        signal.alarm(0)
    result["peak_mib"] = max(0, _memory_kib("VmHWM") - rss) / 1024
    # The largest child process so far (the --verify child, HDF5 probes): a running maximum, so
    # bounding it bounds every case's children.
    result["children_peak_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    after = _listing(case_dir)
    result["stderr"] = stderr.getvalue()
    result["added"] = sorted(set(after) - set(before))
    result["changed"] = sorted(
        name for name in before if (name in after and before[name] != after[name]) or name not in after
    )
    return result


def _prepare_process() -> None:
    """Import everything the entries use before measuring, then bound the address space."""
    import torch  # noqa: F401

    import exchange.cli  # noqa: F401
    from exchange import torch_adapter  # noqa: F401
    from frameworks import (
        mnist,  # noqa: F401
        train_job,  # noqa: F401
    )

    signal.signal(signal.SIGALRM, _timeout)
    limit = _memory_kib("VmSize") * 1024 + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_cases(base: Path, work: Path, names: list[str]) -> dict:
    entries = {}
    results = {}
    for name in names:
        case = CASES[name]
        case_dir = work / "".join(c if c.isalnum() else "_" for c in name)
        case_dir.mkdir(parents=True)
        args = case.build(case_dir, base)
        output = case_dir / case.output
        if case.entry == "convert":
            output.write_bytes(EXISTING)
        else:
            output.mkdir(exist_ok=True)
            (output / "existing").write_bytes(EXISTING)
        entry = entries.setdefault(case.entry, _entry(case.entry))
        results[name] = run_one(entry, args, case_dir)
        if case.converts and output.suffix == ".py" and results[name]["rc"] == 0:
            results[name]["import_error"] = import_generated(output)  # where injected code would run
        results[name]["outside"] = (
            sorted(p.name for p in (work / "outside").glob("*")) if (work / "outside").is_dir() else []
        )
        results[name]["secret_leaked"] = any(
            SECRET in path.read_bytes()
            for path in case_dir.rglob("*")
            if path.is_file()
            and not path.is_symlink()
            and path.name != "secret.bin"
            and path.stat().st_size <= 64 << 20
            and path.suffix not in (".h5",)
        )
    return results


# ---------------------------------------------------------------------------------------------
# The mutation fuzzer

FUZZ_TARGETS = {  # base file -> (input name, extra arguments)
    "architectures.json": ("model.safetensors", []),  # format-2 graphs, mutated as JSON
    "seed.keras": ("model.keras", []),
    "seed_mlp.h5": ("model.h5", []),
    "seed.safetensors": ("model.safetensors", []),
    "seed.pt": ("model.pt", ["--activations", SEED_ACTIVATIONS]),
    "mnist": ("mnist", []),
}


def mutate(data: bytes, generator: random.Random, header_end: int) -> tuple[bytes, str]:
    """One seeded mutation: bit flips, a truncation, inserted bytes, or edits within the header
    (the first `header_end` bytes, where sizes and offsets live)."""
    data = bytearray(data)
    kind = generator.choice(("flip", "flip", "truncate", "insert", "header", "header", "tail"))
    if kind == "flip":
        for _ in range(generator.randint(1, 8)):
            position = generator.randrange(len(data))
            data[position] ^= 1 << generator.randrange(8)
    elif kind == "truncate":
        del data[generator.randrange(len(data)) :]
    elif kind == "insert":
        position = generator.randrange(len(data) + 1)
        data[position:position] = bytes(generator.randrange(256) for _ in range(generator.randint(1, 16)))
    elif kind == "header":
        for _ in range(generator.randint(1, 4)):
            position = generator.randrange(min(header_end, len(data)))
            data[position] = generator.choice((0, 0xFF, 0x7F, 0x80, generator.randrange(256)))
    else:  # the zip central directory and HDF5 end-of-file structures sit at the end
        for _ in range(generator.randint(1, 4)):
            position = len(data) - 1 - generator.randrange(min(1024, len(data)))
            data[position] = generator.randrange(256)
    return bytes(data), kind


def _header_end(name: str, data: bytes) -> int:
    if name.endswith(".safetensors"):
        return 8 + struct.unpack("<Q", data[:8])[0]
    if name == "mnist":
        return 16
    return 4096  # HDF5 superblock and root object headers; zip local headers


# Names that break generated code, fx code or messages if any of them is written unescaped;
# MARKER is replaced by the path of a file that injected code would create.
HOSTILE_NAMES = (
    'm"""; import pathlib; pathlib.Path(MARKER).touch(); """',
    "m'; import pathlib; '",
    "\ufb01x",
    "\uff46orward",
    "a\u00bd",
    "forward",
    "self",
    "class",
    "__init__",
    "load",
    "nn",
    "F",
    "torch",
    "a\nb",
    "a\0b",
    "a\udcffb",
    "a\u202eb",
    "",
    "x" * 1001,
    "a b",
    "a/b",
    "a\\N{",
    "0",
    "_",
    "dense",
    "conv",
    "lstm",
)
HOSTILE_INTS = (0, -1, 1, 2, 3, 10**9, 2**62, -(2**62))
HOSTILE_VALUES = (None, True, "same", "", [], {}, 1e308, 0.5, [1, 2], "\n")


def _config_slots(value, path=()):
    """Every (path, value) inside a node's config, nested lists and objects included."""
    yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _config_slots(item, path + (key,))


def _set_at(root, path, value):
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def mutate_architecture(description: dict, generator: random.Random, marker: Path) -> tuple[dict, str]:
    """One seeded structural mutation of a format-2 architecture: a hostile name (renamed
    consistently or not), a config value, a kind, a node's inputs, an input's shape or dtype."""
    import copy

    from exchange.kinds import KINDS

    graph = copy.deepcopy(description)
    nodes = graph["nodes"]
    node = generator.choice(nodes)
    kind = generator.choice(("name", "name", "config", "config", "config", "kind", "inputs", "shape", "dtype"))
    if kind == "name":
        new = generator.choice(HOSTILE_NAMES).replace("MARKER", repr(str(marker)))
        target = generator.choice(("model", "input", "node", "node"))
        if target == "model":
            graph["name"] = new
        else:
            old = graph["inputs"][0]["name"] if target == "input" else node["name"]
            for item in graph["inputs"] + nodes:
                item["name"] = new if item["name"] == old else item["name"]
            if generator.random() < 0.8:  # the references too, mostly: a consistent graph
                for item in nodes:
                    item["inputs"] = [new if name == old else name for name in item["inputs"]]
                graph["outputs"] = [new if name == old else name for name in graph["outputs"]]
    elif kind == "config":
        slots = [(path, value) for path, value in _config_slots(node["config"]) if path]
        if slots:
            path, value = generator.choice(slots)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            _set_at(
                node["config"],
                path,
                generator.choice(
                    HOSTILE_INTS if is_int and generator.random() < 0.8 else HOSTILE_VALUES + HOSTILE_INTS
                ),
            )
    elif kind == "kind":
        node["kind"] = generator.choice(sorted(KINDS))
    elif kind == "inputs":
        earlier = [item["name"] for item in graph["inputs"]] + [item["name"] for item in nodes]
        node["inputs"] = generator.choice(
            (
                node["inputs"] * generator.choice((2, 3, 1000, 1001)),
                [node["name"]],
                [earlier[-1]],
                [],
                node["inputs"][:1] + ["missing"],
            )
        )
    elif kind == "shape":
        spec = generator.choice(graph["inputs"])
        if spec["shape"]:
            spec["shape"][generator.randrange(len(spec["shape"]))] = generator.choice((0, None, 1, 10**9, -1, 2**62))
    else:
        item = generator.choice(nodes + graph["inputs"])
        item["dtype"] = generator.choice(("float16", "bfloat16", "float64", "int32", "int64", "bool", "float8"))
    return graph, f"{kind} of {node['kind']} {node['name'][:20]!r}"


def _architecture_case(case_dir: Path, base: Path, generator: random.Random) -> tuple[list[str], str]:
    """A `.safetensors` with a mutated architecture and the original's tensors (random), to `.py`,
    `.safetensors` or `.pt`."""
    from exchange import fileformat
    from exchange.graph import Graph

    description = generator.choice(json.loads((base / "architectures.json").read_text()))
    tensor_generator = np.random.default_rng(generator.randrange(1 << 30))
    tensors = {
        key: tensor_generator.standard_normal(shape).astype(dtype)
        for key, (shape, dtype) in Graph.from_dict(description).tensor_specs.items()
    }
    mutated, label = mutate_architecture(description, generator, case_dir.parent / "outside" / "pwned")
    path = case_dir / "model.safetensors"
    metadata = {
        "format": "pt",
        "exchange_version": "2",
        "architecture": json.dumps(mutated),
        "source_framework": "torch",
    }
    with open(path, "w+b") as stream:  # the mutated architecture, unchecked: what an attacker writes
        fileformat._write_safetensors(stream, tensors, metadata)
    output = case_dir / generator.choice(("out.py", "out.py", "out.safetensors", "out.pt"))
    output.write_bytes(EXISTING)
    return [str(path), str(output)], f"{description['name']} {label} -> {output.suffix}"


def import_generated(code: Path) -> str | None:
    """Import generated code, build its class and load its weights; None when that works, else
    the error (a bug of the generator)."""
    from exchange import fileformat
    from exchange.torch_adapter import class_name

    try:
        architecture = fileformat.load(code.with_suffix(".safetensors")).architecture
        spec = importlib.util.spec_from_file_location(f"generated_{code.parent.name}", code)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = getattr(module, class_name(architecture.name))()
        model.load_state_dict(module.load(str(code.with_suffix(".safetensors"))), strict=True)
    except Exception as err:  # noqa: BLE001 (every failure is a finding)
        return f"{type(err).__name__}: {err}"[:300]
    return None


def run_fuzz(base: Path, work: Path, seed: int, count: int) -> dict:
    generator = random.Random(seed)
    convert, prepare = _entry("convert"), _entry("prepare")
    results = {}
    progress = work.parent / f"{work.name}.progress"  # names the case a native crash happened in
    for index in range(count):
        source = generator.choice(sorted(FUZZ_TARGETS))
        name, extra = FUZZ_TARGETS[source]
        case_dir = work / f"{index:05d}"
        case_dir.mkdir(parents=True)
        if source == "architectures.json":
            args, label = _architecture_case(case_dir, base, generator)
            progress.write_text(f"{index} {label}")
            result = run_one(convert, args, case_dir)
            output = Path(args[1])
            if result["rc"] == 0 and output.suffix == ".py":
                result["import_error"] = import_generated(output)
            result["code_ran"] = (work / "outside" / "pwned").exists()
        elif source == "mnist":
            folder = mnist_copy(case_dir, base)
            target = folder / generator.choice(sorted(p.name for p in folder.iterdir()))
            data, kind = mutate(target.read_bytes(), generator, 16)
            target.write_bytes(data)
            (case_dir / "out").mkdir()
            (case_dir / "out" / "existing").write_bytes(EXISTING)
            result = run_one(prepare, [str(folder), str(case_dir / "out")], case_dir)
            label = f"{source}/{target.name} {kind}"
        else:
            original = (base / source).read_bytes()
            data, kind = mutate(original, generator, _header_end(source, original))
            (case_dir / name).write_bytes(data)
            (case_dir / "out.safetensors").write_bytes(EXISTING)
            progress.write_text(f"{index} {source} {kind}")
            result = run_one(convert, [str(case_dir / name), str(case_dir / "out.safetensors"), *extra], case_dir)
            label = f"{source} {kind}"
        if result["rc"] == 0 and result["traceback"] is None:
            result["stderr"] = ""  # a mutation in the data region converts; that is fine
        result["label"] = label
        results[f"{index:05d}"] = result
        shutil.rmtree(case_dir)
    return results


def main(argv: list[str]) -> int:
    mode, base, work, output = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    sys.path.insert(0, str(ROOT))
    _prepare_process()
    if mode == "cases":
        results = run_cases(base, work, argv[4:] or list(CASES))
    else:
        results = run_fuzz(base, work, int(argv[4]), int(argv[5]))
    output.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
