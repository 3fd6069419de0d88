"""The common file: header, metadata, validation errors, atomic writes (numpy + safetensors only)."""

import json
import struct

import numpy as np
import pytest

from exchange import fileformat
from exchange.errors import ExchangeFileError, TensorMismatchError
from exchange.graph import dense_chain
from exchange.tensors import LazyTensor
from frameworks.recipe import SEED_ARCHITECTURE, seed_initial_tensors

TINY = dense_chain("tiny", 3, [(2, "tanh")])


def tiny_tensors():
    return {
        "dense_0.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "dense_0.bias": np.array([0.5, -0.5], dtype=np.float32),
    }


def read_header(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length])


def test_golden_header(tmp_path):
    """Pins the format: keys, dtype, shapes, offsets and every metadata field."""
    path = tmp_path / "tiny.safetensors"
    fileformat.save(path, TINY, tiny_tensors(), source_framework="torch")
    assert read_header(path) == {
        "__metadata__": {
            "format": "pt",
            "exchange_version": "2",
            "source_framework": "torch",
            "architecture": '{"name":"tiny","inputs":[{"name":"input","shape":[3],"dtype":"float32"}],'
            '"nodes":[{"name":"dense_0","kind":"dense","inputs":["input"],"dtype":"float32",'
            '"config":{"units":2,"activation":"tanh","use_bias":true}}],"outputs":["dense_0"]}',
        },
        "dense_0.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "dense_0.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]},
    }
    loaded = fileformat.load(path)
    assert loaded.architecture == TINY and loaded.source_framework == "torch"
    np.testing.assert_array_equal(loaded.tensors["dense_0.weight"], tiny_tensors()["dense_0.weight"])


def test_version_1_file_still_loads(tmp_path):
    """A file written by version 1 (keys layers.{i}.*) loads as the same Dense graph."""
    from safetensors.numpy import save_file

    path = tmp_path / "v1.safetensors"
    save_file(
        {"layers.0.weight": tiny_tensors()["dense_0.weight"], "layers.0.bias": tiny_tensors()["dense_0.bias"]},
        str(path),
        metadata={
            "format": "pt",
            "exchange_version": "1",
            "source_framework": "keras",
            "architecture": '{"input_dim":3,"layers":[{"kind":"dense","units":2,"activation":"tanh","use_bias":true}]}',
        },
    )
    loaded = fileformat.load(path)
    assert loaded.architecture == dense_chain("model", 3, [(2, "tanh")])
    assert sorted(loaded.tensors) == ["dense_0.bias", "dense_0.weight"]
    np.testing.assert_array_equal(loaded.tensors["dense_0.weight"], tiny_tensors()["dense_0.weight"])


def test_each_tensor_keeps_its_dtype(tmp_path):
    """float16 and float64 weights and an int64 counter are written and read back as they are."""
    from exchange.graph import Graph

    graph = Graph.from_dict(
        {
            "name": "m",
            "inputs": [{"name": "x", "shape": [4, 5, 3]}],
            "outputs": ["bn"],
            "nodes": [
                {
                    "name": "conv",
                    "kind": "conv2d",
                    "inputs": ["x"],
                    "dtype": "float16",
                    "config": {"filters": 2, "kernel_size": [1, 1], "strides": [1, 1], "dilation_rate": [1, 1]},
                },
                {"name": "bn", "kind": "batch_norm", "inputs": ["conv"], "dtype": "float64", "config": {}},
            ],
        }
    )
    tensors = {key: np.full(shape, 0.5, dtype=dtype) for key, (shape, dtype) in graph.tensor_specs.items()}
    assert tensors["bn.num_batches_tracked"].dtype == np.int64
    path = tmp_path / "mixed.safetensors"
    fileformat.save(path, graph, tensors, "torch")
    header = read_header(path)
    assert {key: entry["dtype"] for key, entry in header.items() if key != "__metadata__"} == {
        "conv.weight": "F16",
        "conv.bias": "F16",
        "bn.weight": "F64",
        "bn.bias": "F64",
        "bn.running_mean": "F64",
        "bn.running_var": "F64",
        "bn.num_batches_tracked": "I64",
    }
    loaded = fileformat.load(path)
    assert {key: value.dtype.name for key, value in loaded.tensors.items()} == {
        key: dtype for key, (_, dtype) in graph.tensor_specs.items()
    }


def test_seed_file_holds_42310_parameters(tmp_path):
    path = tmp_path / "seed.safetensors"
    fileformat.save(path, SEED_ARCHITECTURE, seed_initial_tensors(SEED_ARCHITECTURE), "keras")
    header = read_header(path)
    assert sum(int(np.prod(entry["shape"])) for key, entry in header.items() if key != "__metadata__") == 42_310


def test_mismatch_error_names_every_tensor_with_expected_and_actual(tmp_path):
    tensors = seed_initial_tensors(SEED_ARCHITECTURE)
    tensors["dense_1.weight"] = np.zeros((50, 51), np.float32)
    tensors["dense_2.weight"] = tensors["dense_2.weight"].astype(np.float64)
    del tensors["dense_0.bias"]
    tensors["dense_3.weight"] = np.zeros((1, 1), np.float32)
    with pytest.raises(TensorMismatchError) as caught:
        fileformat.save(tmp_path / "bad.safetensors", SEED_ARCHITECTURE, tensors, "keras")
    assert str(caught.value) == (
        "missing tensors: dense_0.bias; unexpected tensors: dense_3.weight; wrong shape or dtype: "
        "dense_1.weight: expected float32 (50, 50), found float32 (50, 51); "
        "dense_2.weight: expected float32 (10, 50), found float64 (10, 50)"
    )
    assert not list(tmp_path.iterdir()), "nothing may be written on a failed save"


def test_transposed_tensor_in_file_is_named(tmp_path):
    """A file written with (in, out) instead of (out, in) is refused on load, naming the key."""
    from safetensors.numpy import save_file

    tensors = seed_initial_tensors(SEED_ARCHITECTURE)
    tensors["dense_0.weight"] = np.ascontiguousarray(tensors["dense_0.weight"].T)
    path = tmp_path / "transposed.safetensors"
    save_file(
        tensors,
        str(path),
        metadata={"format": "pt", "exchange_version": "2", "architecture": SEED_ARCHITECTURE.to_json()},
    )
    with pytest.raises(
        TensorMismatchError, match=r"dense_0.weight: expected float32 \(50, 784\), found float32 \(784, 50\)"
    ):
        fileformat.load(path)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "seed.safetensors"
    fileformat.save(path, SEED_ARCHITECTURE, seed_initial_tensors(SEED_ARCHITECTURE), "keras")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ExchangeFileError, match="truncated.safetensors: not a readable safetensors file"):
        fileformat.load(truncated)
    with pytest.raises(ExchangeFileError, match="absent.safetensors: no such file"):
        fileformat.load(tmp_path / "absent.safetensors")


def test_file_without_exchange_metadata_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "foreign.safetensors"
    save_file(tiny_tensors(), str(path), metadata={"format": "pt"})
    with pytest.raises(ExchangeFileError, match="no exchange metadata"):
        fileformat.load(path)


def test_failed_write_keeps_existing_file(tmp_path):
    """A tensor that fails mid-write (after the header) leaves the old file and no temporary."""
    path = tmp_path / "model.safetensors"
    fileformat.save(path, TINY, tiny_tensors(), "torch")
    before = path.read_bytes()

    def failing_load():
        raise OSError("disk full")

    tensors = {**tiny_tensors(), "dense_0.weight": LazyTensor((2, 3), np.dtype(np.float32), failing_load)}
    assert not list(tmp_path.glob(".*")), "no temporary file before the save"
    with pytest.raises(OSError, match="disk full"):
        fileformat.save(path, TINY, tensors, "torch")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_written_file_has_the_usual_permissions(tmp_path):
    """The temporary file is private while written; the result gets the umask's mode."""
    import os

    previous = os.umask(0o022)
    try:
        fileformat.save(tmp_path / "m.safetensors", TINY, tiny_tensors(), "torch")
    finally:
        os.umask(previous)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("anonymous", [True, False], ids=["O_TMPFILE", "no O_TMPFILE"])
def test_write_without_o_tmpfile_falls_back_to_the_private_folder(tmp_path, monkeypatch, anonymous):
    """Where the filesystem refuses O_TMPFILE (tmpfs on old kernels, NFS: EOPNOTSUPP), the bytes
    are written under a name in the private folder; the result is the same."""
    import errno
    import os

    real_open, seen = os.open, []

    def open_without_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            seen.append(path)
            if not anonymous:
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(fileformat.os, "open", open_without_tmpfile)
    path = tmp_path / "model.safetensors"
    fileformat.save(path, TINY, tiny_tensors(), "torch")
    assert seen == [tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    np.testing.assert_array_equal(fileformat.load(path).tensors["dense_0.weight"], tiny_tensors()["dense_0.weight"])


def test_stale_temporaries_of_dead_owners_are_removed(tmp_path):
    """A private folder is removed by the next write of its target when its recorded owner has
    ended (the pid gone, reused by a later process, or from before a reboot); a live owner's, one
    whose owner is unknown, and anything not named exactly like a temporary of the target stay."""
    import os
    import subprocess

    ended = subprocess.Popen(["sleep", "60"])
    ended_identity = fileformat._process_identity(ended.pid)
    ended.kill()
    ended.wait()
    pid, start_time, boot_id = fileformat._process_identity(os.getpid()).split()
    records = {
        ".model.safetensors.ended000.tmp": ended_identity,
        ".model.safetensors.reused00.tmp": f"{pid} {int(start_time) + 1} {boot_id}",
        ".model.safetensors.rebooted.tmp": f"{pid} {start_time} 00000000-0000-0000-0000-000000000000",
        ".model.safetensors.live0000.tmp": f"{pid} {start_time} {boot_id}",
        ".model.safetensors.unknown0.tmp": "unknown",
        ".model.safetensors.norecord.tmp": None,
        ".model.safetensors.short.tmp": ended_identity,
        ".model.safetensors.ended000.tmp.x": ended_identity,
        "model.safetensors.ended000.tmp": ended_identity,
        ".model.safetensorsXended000.tmp": ended_identity,
        ".other.safetensors.ended000.tmp": ended_identity,
    }
    for name, record in records.items():
        (tmp_path / name).mkdir()
        if record is not None:
            (tmp_path / name / fileformat.OWNER_RECORD).write_text(record)
    (tmp_path / ".model.safetensors.afile000.tmp").write_text(ended_identity)
    (tmp_path / ".model.safetensors.alink000.tmp").symlink_to(tmp_path / ".model.safetensors.ended000.tmp.x")
    fileformat.save(tmp_path / "model.safetensors", TINY, tiny_tensors(), "torch")
    removed = {".model.safetensors.ended000.tmp", ".model.safetensors.reused00.tmp", ".model.safetensors.rebooted.tmp"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        (set(records) - removed)
        | {".model.safetensors.afile000.tmp", ".model.safetensors.alink000.tmp", "model.safetensors"}
    )


def test_private_folder_records_its_owner(tmp_path):
    import os

    with fileformat.atomic_output(tmp_path / "report.json") as temporary:
        temporary.write_text("{}")
        record = (temporary.parent / fileformat.OWNER_RECORD).read_text()
    assert record == fileformat._process_identity(os.getpid()) and record.startswith(f"{os.getpid()} ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
