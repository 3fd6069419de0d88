"""With `--custom-objects`, whether the input is a subclassed model is asked of the kind the
conversion decided once (`cli.open_weights`'s `kind`), not decided again from the file."""

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from exchange import cli, filekinds, subclassed

keras = pytest.importorskip("keras")
MODELS_FILE = Path(__file__).resolve().parent / "fixtures" / "subclassed_models.py"


def test_a_decided_kind_is_not_decided_again(tmp_path, monkeypatch):
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs), name="small").save(tmp_path / "small.keras")
    decided = []
    original = filekinds.input_kind
    monkeypatch.setattr(filekinds, "input_kind", lambda path: decided.append(path) or original(path))
    subclassed.use_custom_objects([MODELS_FILE])  # a functional model: the usual reader takes it
    try:
        with ExitStack() as stack:
            opened = cli.open_weights(tmp_path / "small.keras", stack, kind=filekinds.KERAS)
            assert opened.graph.name == "small" and np.shape(opened.tensors["head.weight"]) == (2, 3)
    finally:
        subclassed.use_custom_objects([])
    assert decided == []
