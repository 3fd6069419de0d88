"""A compiled subclassed model's training state (`--custom-objects`): Keras orders its optimizer's
variables by the class's attributes, the traced graph by the calls, so the slots cannot be matched
to the variables by position; the state is left out with a note, never matched wrongly."""

from pathlib import Path

import numpy as np
import pytest

from exchange import cli, fileformat, subclassed

keras = pytest.importorskip("keras")

MODELS = '''
import keras


@keras.saving.register_keras_serializable(package="review_training")
class Swapped(keras.Model):
    """`second` is made first but called second: Keras's variable order is not the call order."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.second = keras.layers.Dense(4, name="second")
        self.first = keras.layers.Dense(4, name="first")

    def call(self, x):
        return self.second(self.first(x))
'''


def test_a_subclassed_models_state_is_left_out_with_a_note(tmp_path):
    models_file = tmp_path / "models.py"
    models_file.write_text(MODELS)
    subclassed.use_custom_objects([models_file])
    try:
        model = subclassed.custom_objects()["Swapped"]()
        model(np.zeros((1, 4), np.float32))
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
        rng = np.random.default_rng(0)
        model.train_on_batch(rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 4)).astype("float32"))
        assert [variable.path.split("/")[1] for variable in model.trainable_variables][:1] == ["second"]
        path = Path(tmp_path / "swapped.keras")
        model.save(path)
        notes: list[str] = []
        cli.convert(path, tmp_path / "swapped.safetensors", notes=notes, optimizer_state=True)
    finally:
        subclassed.use_custom_objects([])
    assert len(notes) == 1 and notes[0].startswith("optimizer state left out") and "subclassed" in notes[0], notes
    assert fileformat.load(tmp_path / "swapped.safetensors").training_tensors == {}
