"""Keras 2 SavedModel folders (`model.save("dir")` in tf-keras), read without TensorFlow
(`exchange/savedmodel.py`): the fixtures in tests/fixtures/keras2/saved_model/ were written by
tf-keras 2.21 (`scripts/make_keras2_fixtures.py --saved-model`), with what tf-keras computed.

Each converts to torch and computes what tf-keras computed; its tensors are those of the same model
saved as a Keras 2 `.h5`; it round-trips to a Keras 3 `.keras`; and broken or hostile folders are
one line each (more in the hostile corpus, `tests/hostile.py`: "SavedModel …").
"""

from __future__ import annotations

import os
import re
import shutil
import zlib

import hostile
import numpy as np
import pytest
from support import ROOT

from exchange import cli, keras_files, savedmodel, torch_adapter
from exchange.tensors import materialize

FIXTURES = ROOT / "tests/fixtures/keras2/saved_model"
MODELS = ("cnn", "rnn", "nested")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURES / "saved_model_expected.npz"))


def max_difference(outputs, wanted) -> float:
    """Absolute below output scale 1, relative above."""
    (output,) = outputs
    return float(np.max(np.abs(np.asarray(output, np.float64) - wanted)) / max(1.0, float(np.max(np.abs(wanted)))))


@pytest.mark.parametrize("name", MODELS)
def test_saved_model_computes_what_tf_keras_computed(name, expected):
    with savedmodel.open_saved_model(FIXTURES / name) as weights:
        assert set(weights.tensors) == set(weights.architecture.tensor_specs)
        tensors = {key: materialize(tensor) for key, tensor in weights.tensors.items()}
        model = torch_adapter.model_from_tensors(weights.architecture, tensors)
    difference = max_difference(torch_adapter.predict(model, [expected[f"{name}_inputs"]]), expected[f"{name}_outputs"])
    print(f"{name}: torch vs tf-keras {difference:.2e}")
    assert difference <= TOLERANCE


@pytest.mark.parametrize("name", MODELS)
def test_tensors_are_those_of_the_same_model_saved_as_keras2_h5(name):
    with (
        savedmodel.open_saved_model(FIXTURES / name) as folder,
        keras_files.open_keras_file(FIXTURES / f"{name}.h5") as h5,
    ):
        assert not folder.architecture.differences(h5.architecture)
        assert list(folder.tensors) == list(h5.tensors)  # the same keys in the same order
        for key, tensor in folder.tensors.items():
            stored = materialize(tensor)
            assert stored.dtype == h5.tensors[key].dtype and np.array_equal(stored, materialize(h5.tensors[key])), key


def test_saved_model_pb_is_never_read(tmp_path):
    """The traced graphs are not read: garbage in saved_model.pb changes nothing (the fixtures
    leave it out; tf-keras writes one)."""
    folder = shutil.copytree(FIXTURES / "cnn", tmp_path / "cnn")
    (folder / "saved_model.pb").write_bytes(b"\xff" * 1000)
    with savedmodel.open_saved_model(folder) as weights, savedmodel.open_saved_model(FIXTURES / "cnn") as original:
        for key, tensor in weights.tensors.items():
            assert np.array_equal(materialize(tensor), materialize(original.tensors[key]))


def test_folder_converts_to_keras3_and_back(tmp_path, expected):
    """Folder -> .keras (Keras 3 rebuilds the model) computes what tf-keras computed; the .keras
    file's tensors equal the folder's."""
    from exchange import keras_adapter

    keras_path = tmp_path / "nested.keras"
    graph = cli.convert(FIXTURES / "nested", keras_path)
    model = keras_adapter.load_keras_file(keras_path, graph)
    difference = max_difference(keras_adapter.predict(model, [expected["nested_inputs"]]), expected["nested_outputs"])
    print(f"nested: Keras 3 on the .keras vs tf-keras {difference:.2e}")
    assert difference <= TOLERANCE
    with keras_files.open_keras_file(keras_path) as written, savedmodel.open_saved_model(FIXTURES / "nested") as folder:
        for key, tensor in folder.tensors.items():
            assert np.array_equal(materialize(tensor), materialize(written.tensors[key])), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ("cnn", "rnn"))
def test_other_folders_convert_to_keras3(name, tmp_path, expected):
    from exchange import keras_adapter

    keras_path = tmp_path / f"{name}.keras"
    graph = cli.convert(FIXTURES / name, keras_path)
    model = keras_adapter.load_keras_file(keras_path, graph)
    assert (
        max_difference(keras_adapter.predict(model, [expected[f"{name}_inputs"]]), expected[f"{name}_outputs"])
        <= TOLERANCE
    )


def test_convert_command_reads_a_folder(tmp_path, capsys):
    assert cli.main([str(FIXTURES / "rnn"), str(tmp_path / "rnn.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (
        cli.load_architecture(FIXTURES / "rnn").differences(cli.load_architecture(tmp_path / "rnn.safetensors")) == []
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_generated_code_of_each_folder(name, tmp_path, expected):
    from generated_code import check_generated_file, run_generated

    from exchange.torch_adapter import class_name

    code_path = tmp_path / f"{name}.py"
    graph = cli.convert(FIXTURES / name, code_path)
    check_generated_file(code_path)
    result = run_generated(
        code_path, class_name(graph.name), expected[f"{name}_inputs"], expected[f"{name}_outputs"], tmp_path
    )
    assert result["loaded"] == [] and result["eager"] <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# CRC-32C


def test_crc32c_known_values():
    assert savedmodel.crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C (RFC 3720)
    assert savedmodel.crc32c(b"") == 0
    assert savedmodel.masked(0) == 0xA282EAD8


def test_crc32c_lanes_and_chunks_agree_with_byte_at_a_time(monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 300_007, dtype=np.uint8)
    by_bytes = savedmodel._crc_register(0xFFFFFFFF, data.tobytes()) ^ 0xFFFFFFFF
    assert savedmodel.crc32c(data) == by_bytes
    monkeypatch.setattr(savedmodel, "CRC_CHUNK_BYTES", 65_536 + 13)  # several chunks, lanes and tails
    assert savedmodel.crc32c(data) == by_bytes
    assert zlib.crc32(data.tobytes()) != by_bytes  # not CRC-32 (a different polynomial)


# ---------------------------------------------------------------------------------------------
# Broken and hostile folders beyond the corpus: each one line naming the file


def _entry_edit(**edits):
    return lambda tmp_path: hostile.saved_model_copy(tmp_path, **edits)


def _header(header: bytes):
    def build(tmp_path):
        folder = hostile.saved_model_copy(tmp_path)
        index = folder / savedmodel.INDEX_NAME
        pairs = hostile.checkpoint_index_entries(index)
        pairs[b""] = header
        index.write_bytes(hostile.checkpoint_index_bytes(pairs))
        return folder

    return build


def _with(edit):
    def build(tmp_path):
        folder = hostile.saved_model_copy(tmp_path)
        edit(folder)
        return folder

    return build


def _flip_index_block_byte(folder):
    index = folder / savedmodel.INDEX_NAME
    data = bytearray(index.read_bytes())
    data[40] ^= 1  # inside the data block
    index.write_bytes(bytes(data))


def _flip_last(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _compressed_block(folder):
    """The first block marked as Snappy-compressed, with a matching checksum."""
    index = folder / savedmodel.INDEX_NAME
    data = bytearray(index.read_bytes())
    footer = memoryview(bytes(data[-savedmodel.FOOTER_BYTES :]))
    _, position = savedmodel._block_handle(footer, 0, "")
    (index_offset, index_size), _ = savedmodel._block_handle(footer, position, "")
    handle_bytes = next(savedmodel._block_entries(memoryview(bytes(data)), (index_offset, index_size), ""))[1]
    (offset, size), _ = savedmodel._block_handle(memoryview(handle_bytes), 0, "")
    data[offset + size] = 1
    data[offset + size + 1 : offset + size + 5] = savedmodel.masked(
        savedmodel.crc32c(bytes(data[offset : offset + size + 1]))
    ).to_bytes(4, "little")
    index.write_bytes(bytes(data))


def _metadata(*objects: tuple[str, bytes]):
    """A keras_metadata.pb of (path, JSON) objects."""

    def edit(folder):
        (folder / savedmodel.METADATA_NAME).write_bytes(
            b"".join(
                hostile.proto_field(
                    1,
                    hostile.proto_field(3, path.encode())
                    + hostile.proto_field(4, b"_tf_keras_network")
                    + hostile.proto_field(5, metadata),
                )
                for path, metadata in objects
            )
        )

    return edit


def _fifo(name: str):
    def edit(folder):
        (folder / name).unlink()
        os.mkfifo(folder / name)

    return edit


def _object_graph(graph: bytes):
    """The checkpoint's object graph replaced by `graph`, every checksum right: only its content is wrong."""

    def edit(folder):
        import dataclasses

        index, data_path = folder / savedmodel.INDEX_NAME, folder / savedmodel.DATA_NAME
        pairs = hostile.checkpoint_index_entries(index)
        key = savedmodel.OBJECT_GRAPH_KEY.encode()
        length = len(graph).to_bytes(4, "little")
        length_checksum = savedmodel.masked(savedmodel.crc32c(length)).to_bytes(4, "little")
        tensor = hostile.proto_varint(len(graph)) + length_checksum + graph
        offset = data_path.stat().st_size
        with open(data_path, "ab") as stream:
            stream.write(tensor)
        entry = savedmodel._bundle_entry(savedmodel.OBJECT_GRAPH_KEY, memoryview(pairs[key]), "")
        pairs[key] = hostile.bundle_entry_bytes(
            dataclasses.replace(
                entry,
                offset=offset,
                size=len(tensor),
                crc32c=savedmodel.masked(savedmodel.crc32c(length + length_checksum + graph)),
            )
        )
        index.write_bytes(hostile.checkpoint_index_bytes(pairs))

    return edit


BROKEN = {
    "object graph of garbage": (
        _with(_object_graph(b"\x0a\x05\x0a\x03\x08\xff\x01")),
        "damaged object graph",
        savedmodel.DATA_NAME,
    ),
    "object graph without the layers": (
        _with(_object_graph(b"\x0a\x00")),
        "no object 'root.layer_with_weights-0'",
        savedmodel.DATA_NAME,
    ),
    "object graph entry with a bad checksum": (
        _with(lambda folder: (_object_graph(b"\x0a\x00")(folder), _flip_last(folder / savedmodel.DATA_NAME))),
        "checksum mismatch",
        savedmodel.DATA_NAME,
    ),
    "two shards": (_header(hostile.proto_field(1, 2)), "a checkpoint in 2 shards", savedmodel.INDEX_NAME),
    "big-endian": (_header(hostile.proto_field(1, 1) + hostile.proto_field(2, 1)), "big-endian", savedmodel.INDEX_NAME),
    "string kernel": (_entry_edit(dtype=7), "TensorFlow type 7", savedmodel.INDEX_NAME),
    "bfloat16 kernel": (_entry_edit(dtype=14), "TensorFlow type 14", savedmodel.INDEX_NAME),
    "kernel in shard 1": (_entry_edit(shard_id=1), "in shard 1", savedmodel.INDEX_NAME),
    "kernel saved in slices": (_entry_edit(sliced=True), "saved in slices", savedmodel.INDEX_NAME),
    "kernel of another shape": (
        _entry_edit(shape=(6, 3, 2, 3)),
        r"expected shape \(3, 2, 3, 6\), found \(6, 3, 2, 3\)",
        "model",
    ),
    "index block checksum": (_with(_flip_index_block_byte), "checksum of the block", savedmodel.INDEX_NAME),
    "compressed index block": (_with(_compressed_block), "compressed checkpoint index", savedmodel.INDEX_NAME),
    "FIFO as index": (_with(_fifo(savedmodel.INDEX_NAME)), r"not a regular file \(a FIFO\)", savedmodel.INDEX_NAME),
    "subclassed model": (
        _with(_metadata(("root", b'{"class_name": "MyModel", "name": "m"}'))),
        "no model config",
        savedmodel.METADATA_NAME,
    ),
    "two roots": (_with(_metadata(("root", b"{}"), ("root", b"{}"))), "2 root objects", savedmodel.METADATA_NAME),
    "metadata not JSON": (
        _with(_metadata(("root", b"{'model_config': 1"))),
        "not valid JSON",
        savedmodel.METADATA_NAME,
    ),
    "metadata path not UTF-8": (
        _with(
            lambda folder: (folder / savedmodel.METADATA_NAME).write_bytes(
                hostile.proto_field(1, hostile.proto_field(3, b"root\xff"))
            )
        ),
        "not UTF-8",
        savedmodel.METADATA_NAME,
    ),
    "overlong varint": (
        _with(lambda folder: (folder / savedmodel.METADATA_NAME).write_bytes(b"\x0a" + b"\xff" * 11)),
        "overlong varint",
        savedmodel.METADATA_NAME,
    ),
    "data file missing": (
        _with(lambda folder: (folder / savedmodel.DATA_NAME).unlink()),
        "no such file",
        savedmodel.DATA_NAME,
    ),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_folder_is_one_line(name, tmp_path, capsys):
    build, message, file_name = BROKEN[name]
    folder = build(tmp_path)
    output = tmp_path / "out.safetensors"
    assert cli.main([str(folder), str(output)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(message, lines[0]) and file_name.split("/")[-1] in lines[0], lines[0]
    assert not output.exists()


def test_a_link_that_stays_inside_the_folder_is_read(tmp_path):
    folder = hostile.saved_model_copy(tmp_path)
    (folder / "kept").mkdir()
    shutil.move(folder / savedmodel.DATA_NAME, folder / "kept/data")
    (folder / savedmodel.DATA_NAME).symlink_to(folder / "kept/data")
    with savedmodel.open_saved_model(folder) as weights:
        assert all(materialize(tensor) is not None for tensor in weights.tensors.values())
