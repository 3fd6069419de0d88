"""The seed's pickled MNIST: formats, the restricted unpickler, and where data comes from."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from support import ROOT

from frameworks import mnist as mnist_module
from frameworks.mnist import DataError, load_folder, load_mnist, load_pickled_array, write_pickles


class RunsCode:
    """A pickle payload that would create a file if unpickled with plain pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_idx_folder_gives_the_seed_format(mnist):
    assert mnist.x_train.shape == (60_000, 784) and mnist.x_train.dtype == np.float32
    assert mnist.x_test.shape == (10_000, 784)
    assert mnist.y_train.shape == (60_000, 10) and mnist.y_train.dtype == np.float32
    assert mnist.x_train.min() == 0.0 and mnist.x_train.max() == 1.0
    np.testing.assert_array_equal(mnist.y_train.sum(axis=1), 1.0)
    # Label counts from the data's README.
    assert mnist.y_test.sum(axis=0).astype(int).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_pickles_round_trip_through_prepare_data(mnist, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/prepare_data.py"), os.environ["MNIST_DIR"], str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mnist_module.PICKLE_NAMES.values())
    from_pickles = load_folder(tmp_path)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(from_pickles, key), getattr(mnist, key))


def test_npz_source(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9], dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images[:2], y_test=labels[:2])
    data = load_folder(tmp_path)
    assert data.x_train.shape == (5, 784) and data.y_test.argmax(-1).tolist() == [0, 1]
    np.testing.assert_allclose(data.x_train[0] * 255, images[0].reshape(-1), atol=1e-4)


def test_pickle_that_carries_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "mnist_X_train.pkl"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(DataError, match=r"mnist_X_train.pkl: refusing posix.system: only numpy arrays"):
        load_pickled_array(path)
    assert not marker.exists()


def test_malicious_pickle_in_a_data_folder_stops_the_main_job(mnist, tmp_path):
    folder = tmp_path / "data"
    write_pickles(
        mnist_module.Mnist(mnist.x_train[:10], mnist.y_train[:10], mnist.x_test[:10], mnist.y_test[:10]), folder
    )
    marker = tmp_path / "code_ran"
    (folder / "mnist_y_test.pkl").write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/train.py"),
            "--data",
            str(folder),
            "--epochs",
            "1",
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {folder / 'mnist_y_test.pkl'}: refusing posix.system: only numpy arrays are accepted"
    ]
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        (pickle.dumps({"not": "an array"}), "holds dict, expected a numeric numpy array"),
        (pickle.dumps(np.array([object()], dtype=object)[:0]), "expected a numeric numpy array"),
        (b"not a pickle at all", "not a readable pickle of a numpy array"),
    ],
)
def test_non_array_pickles_are_refused(tmp_path, payload, message):
    path = tmp_path / "x.pkl"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message):
        load_pickled_array(path)


def test_data_source_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="absent: no such folder"):
        load_mnist()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither the seed's pickles"):
        load_mnist(tmp_path / "empty")


def test_no_data_anywhere_says_how_to_supply_it(tmp_path, monkeypatch):
    """No --data, no $MNIST_DIR, no ./data/ and no network: a message, not a traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    import keras.datasets.mnist

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(DataError, match="MNIST not found: pass --data DIR or set MNIST_DIR"):
        load_mnist()


def test_test_images_are_written_for_verify_inputs(mnist, tmp_path):
    """`scripts/train.py --test-images FILE.npz` (make demo): the test images keyed by the seed's
    input name, read back by the converter's guarded reader as --verify's batch."""
    from exchange import verify
    from frameworks.mnist import write_test_images
    from frameworks.recipe import SEED_ARCHITECTURE

    path = write_test_images(mnist, tmp_path / "run" / "mnist_test.npz", SEED_ARCHITECTURE.inputs[0].name)
    batch, used = verify.verification_inputs(SEED_ARCHITECTURE, verify.read_inputs_file(path))
    np.testing.assert_array_equal(batch[0], mnist.x_test)
    assert used.description == f"10,000 inputs from {path}"
    assert sorted(p.name for p in path.parent.iterdir()) == ["mnist_test.npz"]  # no temporary left


def test_exchange_knows_no_data_set():
    """The converter core imports nothing of the seed's data (issue 16): --verify's inputs are a parameter."""
    imports = [
        f"{path.name}: {line.strip()}"
        for path in (ROOT / "exchange").rglob("*.py")
        for line in path.read_text().splitlines()
        if line.lstrip().startswith(("import ", "from ")) and ("mnist" in line or "frameworks" in line)
    ]
    assert imports == []
