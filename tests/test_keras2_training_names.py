"""Names from a Keras 2 `.h5`'s `optimizer_weights` in refusals: shown as a repr cut short, however
long the file makes them (the attribute may hold megabytes)."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from exchange import keras_files, training_state
from exchange.errors import ExchangeError

FIXTURE = Path(__file__).parent / "fixtures" / "keras2" / "training_adam.h5"
MESSAGE_LIMIT = 400  # the path, a name cut to 120 characters, two shapes


def test_a_long_optimizer_weight_name_is_cut_in_the_message(tmp_path):
    path = tmp_path / "model.h5"
    shutil.copyfile(FIXTURE, path)
    long_name = "A" * 3000 + "/m/hidden/kernel:0"
    with h5py.File(path, "r+") as h5:
        group = h5["optimizer_weights"]
        names = [name.decode() if isinstance(name, bytes) else name for name in group.attrs["weight_names"]]
        names[names.index("Adam/m/hidden/kernel:0")] = long_name
        group.attrs["weight_names"] = np.array(names, dtype=object)
        group[long_name] = np.zeros((4, 15), np.float32)  # the wrong shape: refused naming it
    with keras_files.open_keras_file(path) as weights:
        graph = weights.architecture
    with pytest.raises(ExchangeError, match=r"optimizer weight 'AAAA.* has shape \(4, 15\)") as error:
        training_state.read_keras2_training(path, graph, training_state.parameter_keys_of(graph))
    assert len(str(error.value)) < MESSAGE_LIMIT
