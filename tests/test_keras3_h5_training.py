"""A compiled Keras 3 full-model `.h5` (`model.save("m.h5")`): its training state is Keras 3's
(`adam/head_kernel_momentum`, not tf-keras's `Adam/m/...`), which the Keras 2 reader does not
read; the note says so, not that its optimizer is a legacy Keras 2 one."""

from pathlib import Path

import numpy as np
import pytest

from exchange import cli

keras = pytest.importorskip("keras")


def test_a_keras3_h5_training_state_is_left_out_naming_why(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs), name="small")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
    model.train_on_batch(np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32))
    path = Path(tmp_path / "small.h5")
    model.save(path)
    notes: list[str] = []
    cli.convert(path, tmp_path / "small.safetensors", notes=notes, optimizer_state=True)
    (note,) = notes
    assert "optimizer state left out" in note and "saved by Keras 3" in note and "legacy" not in note, note
