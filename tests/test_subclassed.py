"""Subclassed Keras models (`class M(keras.Model)` with its own `call`), converted with the user's
own code (`--custom-objects FILE`): Keras opens the model, `call` is traced into a functional model
over the same layers, which converts as usual. The models are in tests/fixtures/subclassed_models.py
(which also registers a layer kind, so it is given as `--kinds` too). Real Keras, real PyTorch.
"""

import json
from pathlib import Path

import keras
import layer_suite
import numpy as np
import pytest
from kerasmodels import randomize

from exchange import cli, kinds, subclassed, torch_adapter
from exchange.errors import ExchangeError, UnsupportedLayerError

MODELS_FILE = Path(__file__).resolve().parent / "fixtures" / "subclassed_models.py"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models():
    """The fixture file, run once as `--kinds` runs it (its kind registered), then reused as
    `--custom-objects`."""
    kinds.load_kinds_file(MODELS_FILE)
    subclassed.use_custom_objects([MODELS_FILE])
    module = subclassed._load_file(str(MODELS_FILE))
    subclassed.use_custom_objects([])
    return module


@pytest.fixture(autouse=True)
def custom_objects(models):
    """`--custom-objects MODELS_FILE` for each test, and none after it (the setting is global)."""
    subclassed.use_custom_objects([MODELS_FILE])
    yield
    subclassed.use_custom_objects([])


def saved(folder: Path, model: keras.Model, inputs: np.ndarray, seed: int = 3):
    """Build on two rows, seed the weights (BatchNorm statistics included), save as `.keras` and
    `.weights.h5`; Keras's outputs on `inputs`."""
    model(inputs[:2])
    randomize(model, seed)
    model.save(folder / "model.keras")
    model.save_weights(folder / "model.weights.h5")
    return [np.asarray(model.predict(inputs, verbose=0))]


def conversions(source: Path, arch: Path | None, inputs: list, reference: list) -> dict[str, float]:
    """`source` -> .safetensors (run in torch) -> .keras (opened by Keras in safe mode), and
    -> .py (generated code): the max difference of each from Keras on the subclassed model."""
    folder = source.parent / f"from_{source.name.split('.')[1]}"
    folder.mkdir()
    common = folder / "model.safetensors"
    graph = cli.convert(source, common, arch_path=arch)
    diffs = {
        "torch": layer_suite.max_difference(
            reference, torch_adapter.predict(torch_adapter.model_from_file(common), inputs)
        )
    }
    cli.convert(common, folder / "functional.keras")
    rebuilt = keras.saving.load_model(folder / "functional.keras", safe_mode=True)
    diffs[".keras"] = layer_suite.max_difference(reference, [np.asarray(rebuilt.predict(inputs[0], verbose=0))])
    (folder / "code").mkdir()
    cli.convert(source, folder / "code" / "model.py", arch_path=arch)
    diffs[".py"] = layer_suite.max_difference(
        reference, layer_suite.run_generated_code(folder / "code" / "model.py", graph, inputs)
    )
    return diffs


def check_both_files(folder: Path, inputs: np.ndarray, reference: list) -> tuple[dict, dict]:
    """The `.keras` and the `.weights.h5` (with `--arch model.keras`) convert to the same file."""
    from_keras = conversions(folder / "model.keras", None, [inputs], reference)
    from_weights = conversions(folder / "model.weights.h5", folder / "model.keras", [inputs], reference)
    assert max(from_keras.values()) <= TOLERANCE, from_keras
    assert max(from_weights.values()) <= TOLERANCE, from_weights
    assert (folder / "from_keras" / "model.safetensors").read_bytes() == (
        folder / "from_weights" / "model.safetensors"
    ).read_bytes()
    return from_keras, from_weights


def test_cnn_keras_and_weights_files_convert_every_way(models, tmp_path):
    """Conv2D (3x2 kernel), BatchNormalization (seeded moving statistics), MaxPooling, Dense on
    odd-sized 9x7 images; layers named by the attributes that hold them."""
    keras.utils.set_random_seed(1)
    images = np.random.default_rng(0).random((6, 9, 7, 3), dtype=np.float32)
    model = models.SmallCNN()
    reference = saved(tmp_path, model, images)
    check_both_files(tmp_path, images, reference)
    # --arch may also be the JSON of keras.saving.serialize_keras_object(model)
    (tmp_path / "model.json").write_text(json.dumps(keras.saving.serialize_keras_object(model)))
    cli.convert(tmp_path / "model.weights.h5", tmp_path / "from_json.safetensors", arch_path=tmp_path / "model.json")
    from_json = (tmp_path / "from_json.safetensors").read_bytes()
    assert from_json == (tmp_path / "from_keras" / "model.safetensors").read_bytes()
    graph = cli.load_architecture(tmp_path / "model.keras")
    assert [spec.name for spec in graph.inputs] == ["images"]
    assert [node.name for node in graph.nodes] == ["conv", "bn", "pool", "flat", "head"]


def test_keras_ops_in_call(models, tmp_path):
    """`y + z`, `y * 0.5` and `ops.concatenate` in `call` are operations of the graph."""
    keras.utils.set_random_seed(2)
    values = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    reference = saved(tmp_path, models.TwoBranches(), values)
    diffs = conversions(tmp_path / "model.keras", None, [values], reference)
    assert max(diffs.values()) <= TOLERANCE, diffs
    graph = cli.load_architecture(tmp_path / "model.keras")
    assert [node.kind for node in graph.nodes] == ["dense", "dense", "op_add", "op_multiply", "op_concatenate", "dense"]


@pytest.mark.slow
def test_recurrent_subclass(models, tmp_path):
    """Embedding -> LSTM -> GRU -> Dense: token ids given as floats, as Keras takes them."""
    keras.utils.set_random_seed(3)
    ids = np.random.default_rng(2).integers(0, 20, (6, 7)).astype(np.float32)
    reference = saved(tmp_path, models.SequenceClassifier(), ids)
    check_both_files(tmp_path, ids, reference)


@pytest.mark.slow
def test_custom_layers_inside(models, tmp_path):
    """`Residual` (no kind) is traced into: its Dense, `+` and LayerNormalization become nodes,
    named by where they are kept (`blocks_0_dense`); `Project` (a kind) stays one node."""
    keras.utils.set_random_seed(4)
    values = np.random.default_rng(3).standard_normal((6, 6)).astype(np.float32)
    reference = saved(tmp_path, models.WithCustomLayers(), values)
    check_both_files(tmp_path, values, reference)
    graph = cli.load_architecture(tmp_path / "model.keras")
    assert [node.name for node in graph.nodes] == [
        "blocks_0_dense",
        "add",
        "blocks_0_norm",
        "blocks_1_dense",
        "add_1",
        "blocks_1_norm",
        "project",
        "head",
    ]


def test_untraceable_call_names_the_layer_and_the_line(models, tmp_path, capsys):
    """Python control flow on a tensor's value: one line naming the layer, the user's line and why."""
    model = models.Untraceable()
    model(np.ones((2, 5), np.float32))
    model.save(tmp_path / "model.keras")
    line = next(
        number
        for number, text in enumerate(MODELS_FILE.read_text().splitlines(), 1)
        if "if ops.sum(inputs) > 0:" in text
    )
    status = cli.main(
        [
            str(tmp_path / "model.keras"),
            str(tmp_path / "model.py"),
            "--custom-objects",
            str(MODELS_FILE),
            "--input-shape",
            "5",
        ]
    )
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1, error
    assert error == (
        f"error: {tmp_path / 'model.keras'}: cannot trace Untraceable.call in layer 'gate' (Gate) at "
        f"subclassed_models.py:{line} (`if ops.sum(inputs) > 0:`): TypeError: A symbolic KerasTensor "
        "cannot be used as a boolean.\n"
    )
    assert not (tmp_path / "model.py").exists()


def test_tensorflow_function_in_call_names_the_line(models):
    model = models.RawTensorFlow()
    model(np.ones((2, 5), np.float32))
    line = next(
        number
        for number, text in enumerate(MODELS_FILE.read_text().splitlines(), 1)
        if "return tf.nn.relu(self.dense(x))" in text
    )
    with pytest.raises(UnsupportedLayerError) as err:
        subclassed.trace(model, "model.keras")
    assert str(err.value).startswith(
        f"model.keras: cannot trace RawTensorFlow.call at subclassed_models.py:{line} "
        "(`return tf.nn.relu(self.dense(x))`): ValueError: "
    )
    assert "\n" not in str(err.value)


def test_own_variable_in_call_without_a_kind_is_refused(models, tmp_path):
    model = models.OwnVariable()
    model(np.ones((2, 5), np.float32))
    model.save(tmp_path / "model.keras")
    with pytest.raises(
        UnsupportedLayerError,
        match=r"model.keras: layer 'scale' \(Scale\) computes with its own "
        r"variable 'gamma' in call; register a layer kind for its class",
    ):
        cli.convert(tmp_path / "model.keras", tmp_path / "model.safetensors")


def test_refused_without_custom_objects(models, tmp_path, capsys):
    """Without the user's code, one line names the class and the option; the weights file says
    what it needs."""
    keras.utils.set_random_seed(1)
    saved(tmp_path, models.SmallCNN(), np.random.default_rng(0).random((2, 9, 7, 3), dtype=np.float32))
    assert cli.main([str(tmp_path / "model.keras"), str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'model.keras'}: unsupported model class 'SmallCNN': a subclassed model's config has no "
        "layers; pass the Python file that defines it with --custom-objects FILE (Sequential and functional models "
        "are read from their config)\n"
    )
    assert cli.main([str(tmp_path / "model.weights.h5"), str(tmp_path / "out.safetensors")]) == 2
    assert "a subclassed model's .weights.h5 needs --arch and --custom-objects FILE" in capsys.readouterr().err


def test_input_shape_option_is_checked(models):
    subclassed.use_custom_objects([MODELS_FILE], ["9,x"])
    with pytest.raises(ExchangeError, match=r"--input-shape '9,x': expected sizes without the batch axis"):
        subclassed._input_specs(models.SmallCNN())


@pytest.mark.slow
def test_verify_runs_the_subclassed_model_itself(models, tmp_path, capsys):
    """`--verify` reopens the input in its child process with the same --custom-objects and
    --kinds, and runs the user's model (not the traced one) against the generated code."""
    keras.utils.set_random_seed(4)
    saved(tmp_path, models.WithCustomLayers(), np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32))
    status = cli.main(
        [
            str(tmp_path / "model.keras"),
            str(tmp_path / "model.py"),
            "--custom-objects",
            str(MODELS_FILE),
            "--kinds",
            str(MODELS_FILE),
            "--verify",
        ]
    )
    output = capsys.readouterr()
    assert status == 0, output.err
    assert (
        f"verify: Keras on {tmp_path / 'model.keras'} (your WithCustomLayers) vs the generated PyTorch code"
        in output.out
    )
