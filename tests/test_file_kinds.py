"""An input's kind comes from its content, an output's from its extension (exchange.filekinds).

Keras 2 projects saved `.hdf5` and extension-less files; a `.h5` may be a renamed `.keras`. Each is
converted here under names its content does not match, and must give the same tensors as the
correctly named file.
"""

import collections
import shutil
import sys
import traceback
from pathlib import Path

import h5py
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


class OpenCounter:
    """Every open of one file, by who opened it: its kind decided ("kind"), the exchange's reader
    ("reader"), Keras's own loader ("keras"), a tensor's data mapped as it is written ("data"), or
    "other". Python's `open` audit event (which zipfile and h5py's file-object reads raise too),
    and `h5py.File` given the path itself (HDF5's C library opens it unseen by the audit hook)."""

    def __init__(self, path, monkeypatch):
        self.path, self.opens = str(path), []
        sys.addaudithook(self.record)  # audit hooks cannot be removed: this one only records its file
        counter, original = self, h5py.File

        class CountedFile(original):
            def __init__(self, name, *args, **kwargs):
                if isinstance(name, (str, Path)) and str(name) == counter.path:
                    counter.opens.append(counter.opener())
                super().__init__(name, *args, **kwargs)

        monkeypatch.setattr(h5py, "File", CountedFile)

    def record(self, event, args):
        if event == "open" and args and str(args[0]) == self.path:
            self.opens.append(self.opener())

    @staticmethod
    def opener() -> str:
        frames = [(Path(frame.filename).name, frame.name) for frame in traceback.extract_stack()[:-2]]
        for who, files in (
            ("data", ("memmap.py",)),
            ("kind", ("filekinds.py",)),
            ("reader", ("keras_files.py",)),
            ("keras", ("saving_lib.py", "saving_api.py", "legacy_h5_format.py")),
        ):
            if any(name in files for name, _ in frames):
                return who
        return "other: " + " <- ".join(f"{name}:{function}" for name, function in frames[-4:])

    def metadata(self) -> dict:
        return collections.Counter(item for item in self.opens if item != "data")


def counted_checks(monkeypatch) -> collections.Counter:
    """`fileformat.check_tensors` calls, by the function that made them."""
    checks: collections.Counter = collections.Counter()
    original_check = fileformat.check_tensors

    def check(*args, **kw):
        checks[sys._getframe(1).f_code.co_name] += 1
        return original_check(*args, **kw)

    monkeypatch.setattr(fileformat, "check_tensors", check)
    return checks


def test_one_conversion_opens_its_input_twice_and_checks_its_tensors_once(tmp_path, monkeypatch):
    """Issue 16: the input is opened once to tell its kind and once by its reader; beyond that,
    only the tensors' data is mapped as each is written. The tensors are checked once."""
    source = tmp_path / "cnn.h5"
    shutil.copyfile(FIXTURES / "cnn.h5", source)
    checks, counter = counted_checks(monkeypatch), OpenCounter(source, monkeypatch)
    graph = cli.convert(source, tmp_path / "out.safetensors")
    assert counter.metadata() == {"kind": 1, "reader": 1}, counter.opens
    assert counter.opens.count("data") <= len(graph.tensor_specs) + 1  # each tensor's data, one read early by a port
    assert checks == {"write": 1}


@pytest.fixture(scope="module")
def compiled_keras(tmp_path_factory):
    """A compiled `.keras` (its training state is asked about: by what the reader learnt)."""
    from exchange import keras_adapter
    from frameworks import keras_mlp
    from frameworks.recipe import SEED_ARCHITECTURE

    model = keras_mlp.build_keras_model(SEED_ARCHITECTURE)
    keras_adapter.set_tensors(
        model, {key: np.full(shape, 0.01, np.float32) for key, shape in SEED_ARCHITECTURE.tensor_shapes().items()}
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    path = tmp_path_factory.mktemp("compiled") / "seed.keras"
    model.save(path)
    return path


@pytest.mark.parametrize(
    "name, expected, rebuilt",
    [
        # the zip's signature and its member names; the zip's config, then its weights member; Keras's own load
        ("seed.keras", {"kind": 2, "reader": 2, "keras": 2}, {}),
        # the signature; the reader in the conversion, and again in --verify's reference: without
        # tf-keras, the exchange's Keras 3 rebuild of this Keras 2 file, on the tensors read by it
        ("cnn.h5", {"kind": 1, "reader": 2}, {"set_tensors": 2}),
    ],
)
def test_with_verify_the_input_is_opened_once_more_by_its_reference(
    tmp_path, monkeypatch, compiled_keras, name, expected, rebuilt
):
    """--verify's child (run in this process here, so that its opens are counted too) is told the
    input's kind and facts: it opens only the Keras reference (Keras on a `.keras`) and the output
    as written; nothing decides the kind again or re-reads the input to ask what it is."""
    import functools

    from exchange import verify

    source = tmp_path / name
    shutil.copyfile(compiled_keras if name == "seed.keras" else FIXTURES / name, source)
    installed = verify._installed
    monkeypatch.setattr(verify, "_installed", lambda module: module != "tf_keras" and installed(module))
    monkeypatch.setattr(verify, "VERIFY_BATCH", 16)
    monkeypatch.setattr(cli, "verify", functools.partial(verify.verify, in_process=True))
    checks, counter = counted_checks(monkeypatch), OpenCounter(source, monkeypatch)
    assert cli.main([str(source), str(tmp_path / "out.safetensors"), "--verify"]) == 0
    assert counter.metadata() == expected, counter.opens
    # The conversion checks once, as it writes; the child checks the output as it reads it, and
    # the torch module's tensors as it is built (in float32, then in float64), and the rebuilt
    # Keras reference's likewise.
    assert checks == {"write": 1, "load": 1, "model_from_tensors": 2, **rebuilt}, checks
