"""Hostile training state in a `.keras`: `optimizer/vars` holding more entries than the model's
optimizer can have is refused from its count, before any entry is listed or opened."""

import zipfile

import h5py
import numpy as np
import pytest

from exchange import keras_files, training_state
from exchange.errors import ExchangeFileError

keras = pytest.importorskip("keras")
EXTRA_ENTRIES = 40


def _with_extra_optimizer_variables(source, target, scratch):
    """`source` (.keras) with EXTRA_ENTRIES more scalars in optimizer/vars, numbered on."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    weights = scratch / "model.weights.h5"
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "r+") as h5:
        group = h5["optimizer/vars"]
        first = len(group)
        for index in range(first, first + EXTRA_ENTRIES):
            group.create_dataset(str(index), data=np.float32(0))
    members["model.weights.h5"] = weights.read_bytes()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_too_many_optimizer_variables_are_refused_before_they_are_opened(tmp_path, monkeypatch):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs), name="small")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5), loss="mean_squared_error")
    model.train_on_batch(np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32))
    model.save(tmp_path / "small.keras")
    path = tmp_path / "hostile.keras"
    _with_extra_optimizer_variables(tmp_path / "small.keras", path, tmp_path)
    with keras_files.open_keras_file(path) as weights:
        graph = weights.architecture
    opened = []
    original = keras_files._Hdf5Source.lazy
    monkeypatch.setattr(
        keras_files._Hdf5Source, "lazy", lambda self, where: opened.append(where) or original(self, where)
    )
    with pytest.raises(ExchangeFileError, match=r"stores 44 variables; the model's 2 trainable variables need 4"):
        training_state.read_keras_training(path, graph, training_state.parameter_keys_of(graph))
    assert [where for where in opened if where.startswith("optimizer/")] == []
