"""An input's kind comes from its content, an output's from its extension (exchange.filekinds).

Keras 2 projects saved `.hdf5` and extension-less files; a `.h5` may be a renamed `.keras`. Each is
converted here under names its content does not match, and must give the same tensors as the
correctly named file.
"""

import shutil
import sys

import numpy as np
import pytest
from support import ROOT

from exchange import cli, fileformat, filekinds
from exchange.errors import ExchangeFileError

FIXTURES = ROOT / "tests/fixtures/keras2"


def converted_tensors(source, tmp_path, name="out.safetensors"):
    out = tmp_path / name
    cli.convert(source, out)
    return fileformat.load(out).tensors


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The CNN fixture as the exchange, a .keras and a .pt, written by the converter."""
    folder = tmp_path_factory.mktemp("kinds")
    for name in ("cnn.safetensors", "cnn.keras", "cnn.pt"):
        cli.convert(FIXTURES / "cnn.h5", folder / name)
    return folder


@pytest.mark.parametrize(
    "original, renamed, kind",
    [
        ("cnn.h5", "cnn.hdf5", filekinds.HDF5),
        ("cnn.h5", "cnn", filekinds.HDF5),
        ("cnn.keras", "cnn.h5", filekinds.KERAS),
        ("cnn.keras", "cnn.bin", filekinds.KERAS),
        ("cnn.pt", "cnn.weights", filekinds.TORCH),
        ("cnn.safetensors", "cnn.pt", filekinds.SAFETENSORS),
    ],
)
def test_a_renamed_file_is_read_by_its_content(tmp_path, written, original, renamed, kind):
    source = (FIXTURES if original == "cnn.h5" else written) / original
    copy = tmp_path / renamed
    shutil.copyfile(source, copy)
    assert filekinds.input_kind(copy) is kind
    arch = written / "cnn.safetensors" if kind is filekinds.TORCH else None
    expected = fileformat.load(written / "cnn.safetensors").tensors
    out = tmp_path / "out.safetensors"
    cli.convert(copy, out, arch_path=arch)
    tensors = fileformat.load(out).tensors
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


def test_a_renamed_keras_file_verifies_with_keras_itself(tmp_path, written, capsys):
    """--verify opens a Keras 3 input with Keras, whose loader goes by extension: a `.keras`
    saved as `model.bin` is given to it under a name it accepts, and the comparison is with Keras
    on the file itself."""
    copy = tmp_path / "model.bin"
    shutil.copyfile(written / "cnn.keras", copy)
    assert cli.main([str(copy), str(tmp_path / "model.safetensors"), "--verify"]) == 0
    report = capsys.readouterr().out
    assert f"verify: Keras on {copy} vs" in report, report


@pytest.mark.parametrize(
    "name, message",
    [
        ("out.h5", r"out.h5: unsupported output kind '.h5'; expected one of .keras, .safetensors, .pt, .pth, .py$"),
        ("out", r"out: unsupported output kind '\(no extension\)'"),
    ],
)
def test_an_output_kind_is_named_by_its_extension(tmp_path, name, message):
    with pytest.raises(ExchangeFileError, match=message):
        cli.convert(FIXTURES / "seed_mlp.h5", tmp_path / name)
    assert not (tmp_path / name).exists()


def test_content_of_no_known_kind_is_refused_naming_both(tmp_path):
    unknown = tmp_path / "notes.txt"
    unknown.write_text("these are not weights")
    with pytest.raises(
        ExchangeFileError,
        match=r"notes.txt: not a file this tool reads \(neither its content "
        r"nor its extension '.txt' is one of .keras, .h5, .hdf5, ",
    ):
        cli.convert(unknown, tmp_path / "out.safetensors")


def test_a_damaged_file_gets_its_extensions_reader_and_its_error(tmp_path):
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # a zip signature, then nothing a zip holds
    with pytest.raises(ExchangeFileError, match=r"damaged.keras: not a .keras file \(a .keras file is a zip"):
        cli.convert(damaged, tmp_path / "out.safetensors")


def test_a_folder_is_read_only_as_a_saved_model(tmp_path):
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    with pytest.raises(ExchangeFileError, match=r"plain_folder: not a regular file \(a folder\)"):
        cli.convert(folder, tmp_path / "out.safetensors")


def test_one_conversion_opens_its_input_twice_and_checks_its_tensors_once(tmp_path, monkeypatch):
    """Issue 16: the input is opened once to tell its kind and once by its reader; beyond that,
    only the tensors' data is mapped as each is written. The tensors are checked once."""
    source = tmp_path / "cnn.h5"
    shutil.copyfile(FIXTURES / "cnn.h5", source)
    opens, checks = [], []
    original_check = fileformat.check_tensors
    monkeypatch.setattr(
        fileformat, "check_tensors", lambda *args, **kw: checks.append(1) or original_check(*args, **kw)
    )

    def record(event, args):
        if event == "open" and args and str(args[0]) == str(source):
            opens.append(
                any(
                    frame.name == "__new__" and frame.filename.endswith("memmap.py")
                    for frame in __import__("traceback").extract_stack()
                )
            )

    sys.addaudithook(record)  # audit hooks cannot be removed: this one only records this file
    graph = cli.convert(source, tmp_path / "out.safetensors")
    metadata_opens = opens.count(False)
    assert metadata_opens == 2, opens
    assert opens.count(True) <= len(graph.tensor_specs) + 1  # each tensor's data, one read early by a port
    assert len(checks) == 1
