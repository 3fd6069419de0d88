"""`--verify`: the float32 and float64 comparisons, the inputs it draws, the Keras 2 reference and
`--report` (exchange/verify.py).

Most cases run the frameworks in this process (`verify(..., in_process=True)`), so that they share
this process's TensorFlow; one runs the command line and its child process end to end.
"""

import json

import keras
import numpy as np
import pytest
from kerasmodels import randomize
from support import ROOT

from exchange import cli, fileformat, keras_adapter, verify
from exchange.errors import ExchangeError
from exchange.graph import Graph

L = keras.layers
KERAS2_FIXTURES = ROOT / "tests/fixtures/keras2"
ROWS = 64  # the random batch here (1,000 by default): enough rows to show each difference


@pytest.fixture(autouse=True)
def small_batch(monkeypatch):
    monkeypatch.setattr(verify, "VERIFY_BATCH", ROWS)


def conv_bn_stack(depth: int = 12, gain: float = 3.0) -> keras.Model:
    """Conv -> BatchNormalization -> ReLU, `depth` times, gammas scaled by `gain`: activations grow
    to ~5e3, where float32 rounding alone (TensorFlow and torch sum in different orders) differs
    by ~4e-3, far beyond an absolute 1e-5, while float64 agrees to ~4e-12."""
    keras.utils.set_random_seed(3)
    x = inputs = keras.Input((9, 11, 3), name="image")
    for index in range(depth):
        x = L.Conv2D(16, 3, padding="same", name=f"conv{index}")(x)
        x = L.BatchNormalization(name=f"bn{index}")(x)
        x = L.ReLU(name=f"relu{index}")(x)
    model = randomize(keras.Model(inputs, L.GlobalAveragePooling2D(name="gap")(x), name="stack"), seed=5)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.gamma.assign(layer.gamma.numpy() * gain)
    return model


def saved(model: keras.Model, tmp_path, name: str = "model"):
    """The model as a `.keras` file and converted to `.safetensors`: (keras path, safetensors path, graph)."""
    keras_path = tmp_path / f"{name}.keras"
    model.save(keras_path)
    common = tmp_path / f"{name}.safetensors"
    graph = cli.convert(keras_path, common)
    return keras_path, common, graph


def run(keras_path, common, graph, **options) -> verify.VerifyResult:
    return verify.verify(keras_path, common, graph, None, in_process=True, **options)


def tampered(common, tmp_path, change) -> object:
    """A copy of the exchange file with `change(tensors)` applied."""
    exchange_file = fileformat.load(common)
    tensors = {key: np.array(value) for key, value in exchange_file.tensors.items()}
    change(tensors)
    path = tmp_path / "tampered.safetensors"
    fileformat.save(path, exchange_file.architecture, tensors, "keras")
    return path


# ---------------------------------------------------------------------------------------------
# Rounding against conversion errors


def test_float32_rounding_beyond_1e5_passes_on_float64(tmp_path):
    """The deep stack: float32 differs beyond 1e-5 absolute (within 1e-4 of the output scale);
    both rebuilt in float64 agree to ~1e-12, and the verdict comes from float64. --report holds
    both comparisons and every layer's maximum."""
    keras_path, common, graph = saved(conv_bn_stack(), tmp_path)
    result = run(keras_path, common, graph, every_layer=True)
    print(
        f"stack: float32 {result.float32.max_abs_diff:.3e} (scale {result.float32.output_scale:.3g}), "
        f"float64 {result.float64.max_abs_diff:.3e}"
    )
    assert result.float32.max_abs_diff > 1e-5 and result.float32.passed
    assert result.float64.max_abs_diff < 1e-9 and result.float64.output_scale > 1e3
    assert result.passed and result.verdict is result.float64 and result.first_divergence is None
    assert [layer.layer for layer in result.layers] == [node.name for node in graph.nodes]
    assert all(layer.passed for layer in result.layers)
    assert result.inputs_used == [verify.InputUsed("image", [ROWS, 9, 11, 3], "float32", "uniform in [0, 1)")]
    report = tmp_path / "report.json"
    verify.write_report(report, result)
    written = json.loads(report.read_text())
    assert written["verdict"] == "float64" and written["passed"] is True
    assert written["float32"]["tolerance"] == pytest.approx(1e-5 + 1e-4 * result.float32.output_scale)
    assert len(written["layers"]) == len(graph.nodes) and written["inputs_used"][0]["shape"] == [ROWS, 9, 11, 3]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.keras", "model.safetensors", "report.json"]
    assert verify.VerifyResult.from_dict(written).to_dict() == written


def dense_then_gru() -> keras.Model:
    keras.utils.set_random_seed(6)
    inputs = keras.Input((7, 5), name="series")
    x = L.Dense(5, activation="tanh", name="square")(inputs)
    x = L.GRU(4, return_sequences=True, name="gru")(x)
    return randomize(keras.Model(inputs, L.Dense(3, name="head")(x), name="dense_gru"), seed=2)


def transpose_kernel(tensors):
    tensors["square.weight"] = np.ascontiguousarray(tensors["square.weight"].T)


def swap_gru_gates(tensors):
    """torch's GRU rows are (r, z, n): swap r and z, as a converter with Keras's order would."""
    for key in ("gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0"):
        reset, update, new = np.split(tensors[key], 3)
        tensors[key] = np.concatenate([update, reset, new])


@pytest.mark.parametrize("change, layer", [(transpose_kernel, "square"), (swap_gru_gates, "gru")])
def test_a_wrong_convention_fails_in_both_dtypes_naming_its_layer(tmp_path, change, layer):
    keras_path, common, graph = saved(dense_then_gru(), tmp_path)
    result = run(keras_path, tampered(common, tmp_path, change), graph)
    print(f"{change.__name__}: float32 {result.float32.max_abs_diff:.3e}, float64 {result.float64.max_abs_diff:.3e}")
    assert not result.float32.passed and not result.float64.passed and result.verdict.dtype == "float64"
    assert result.first_divergence.layer == layer and result.layers[-1] is result.first_divergence
    assert "first divergent layer" in verify.failure(result) and repr(layer) in verify.failure(result)


def dropped_mask(tmp_path):
    """The torch side built without the Embedding's mask_zero: token ids cover the vocabulary,
    0 included, so the LSTM that reads the mask differs. (keras path, torch path, its graph)."""
    keras.utils.set_random_seed(2)
    ids = keras.Input((6,), dtype="int32", name="ids")
    x = L.Embedding(9, 4, mask_zero=True, name="embed")(ids)
    model = randomize(keras.Model(ids, L.LSTM(3, name="lstm")(x), name="masked"), seed=1)
    keras_path, common, graph = saved(model, tmp_path)
    description = graph.to_dict()
    for node in description["nodes"]:
        if node["name"] == "embed":
            node["config"]["mask_zero"] = False
    return keras_path, common, Graph.from_dict(description)


def test_a_dropped_mask_fails_naming_the_layer_that_reads_it(tmp_path):
    result = run(*dropped_mask(tmp_path))
    assert not result.float32.passed and not result.float64.passed and result.verdict.dtype == "float64"
    assert result.first_divergence.layer == "lstm"
    assert result.inputs_used[0].values == "token ids covering 0..8"


def wrong_convention(name, tmp_path):
    """(keras path, torch path, graph) of a conversion with one convention deliberately wrong."""
    if name == "dropped mask":
        return dropped_mask(tmp_path)
    keras_path, common, graph = saved(dense_then_gru(), tmp_path)
    change = transpose_kernel if name == "transposed kernel" else swap_gru_gates
    return keras_path, tampered(common, tmp_path, change), graph


@pytest.mark.parametrize(
    "name, layer", [("transposed kernel", "square"), ("swapped GRU gates", "gru"), ("dropped mask", "lstm")]
)
def test_without_float64_the_float32_comparison_decides_and_names_the_layer(tmp_path, monkeypatch, name, layer):
    """A side that cannot be built in float64: the verdict and the layer search are float32's, and
    each wrong convention is named at its layer there too."""

    def unbuildable(graph):
        raise ExchangeError("no float64 here")

    monkeypatch.setattr(verify, "float64_graph", unbuildable)
    result = run(*wrong_convention(name, tmp_path))
    print(f"{name}: float32 {result.float32.max_abs_diff:.3e}")
    assert result.float64 is None and "no float64 here" in result.float64_missing
    assert result.verdict.dtype == "float32" and not result.passed and result.first_divergence.layer == layer
    assert "float64 not run (ExchangeError: no float64 here)" in verify.describe(result)


# ---------------------------------------------------------------------------------------------
# Inputs that exercise the model


def test_axes_of_unknown_length_get_one(tmp_path):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((None, 4), name="frames")
    x = L.Conv1D(5, 3, name="conv")(inputs)
    model = randomize(keras.Model(inputs, L.GlobalMaxPooling1D(name="pool")(x), name="free"), seed=1)
    keras_path, common, graph = saved(model, tmp_path)
    result = run(keras_path, common, graph)
    assert result.passed and result.inputs_used[0].shape == [ROWS, verify.FREE_AXIS_LENGTH, 4]
    chosen = run(keras_path, common, graph, input_shapes={"frames": (50, 4)})
    assert chosen.passed and chosen.inputs_used[0].shape == [ROWS, 50, 4]


def test_free_axis_length_grows_until_the_model_takes_it_and_input_shape_is_checked():
    pools = [
        {
            "name": f"p{index}",
            "kind": "max_pool1d",
            "inputs": [f"p{index - 1}" if index else "x"],
            "config": {"pool_size": [2], "strides": [2], "padding": "valid"},
        }
        for index in range(6)
    ]
    graph = Graph.from_dict(
        {"name": "m", "inputs": [{"name": "x", "shape": [None, 3]}], "nodes": pools, "outputs": ["p5"]}
    )
    assert verify.sized_graph(graph).inputs[0].shape == (64, 3)  # 32 / 2**6 is empty
    assert verify.sized_graph(graph, {"x": (128, 3)}).shapes["p5"] == (2, 3)
    assert verify.parse_input_shape("x=128,3") == ("x", (128, 3))
    for text in ("x", "x=", "x=0,3", "=4", "x=a,3"):
        with pytest.raises(ExchangeError, match="expected NAME=D1,D2,..."):
            verify.parse_input_shape(text)
    with pytest.raises(ExchangeError, match=r"--input-shape x=128,4 does not fit the input's shape \(None, 3\)"):
        verify.sized_graph(graph, {"x": (128, 4)})
    with pytest.raises(ExchangeError, match="--input-shape names 'y', not an input of the model"):
        verify.sized_graph(graph, {"y": (5, 3)})
    with pytest.raises(ExchangeError, match="choose one with --input-shape"):
        verify.sized_graph(graph, {"x": (16, 3)})


def test_ids_cover_the_vocabulary_and_masks_hold_both_values():
    token_ids = keras.Input((5,), dtype="int32", name="ids")
    flags = keras.Input((5,), dtype="bool", name="flags")
    scores = keras.Input((5,), name="scores")
    weights = keras.Input((5,), name="weights")
    x = L.Embedding(40, 3, name="embed")(token_ids)
    x = L.LSTM(3, return_sequences=True, name="lstm")(x, mask=flags)
    x = L.Flatten(name="flat")(x)
    y = L.Softmax(name="soft")(scores, mask=weights)
    model = keras.Model([token_ids, flags, scores, weights], [x, y], name="inputs")
    graph = keras_adapter.architecture_of(model)
    batch, drawn = verify.verification_inputs(graph, None)  # 64 rows x 5 ids: room for all 40
    ids, bools, floats, mask = batch
    assert sorted(np.unique(ids)) == list(range(40)) and ids.dtype == np.int32
    assert bools.dtype == np.bool_ and bools.any() and not bools.all()
    assert floats.dtype == np.float32 and floats.min() > 0 and floats.max() < 1
    assert sorted(np.unique(mask)) == pytest.approx([0.0, 0.3, 1.0])
    assert [item.values for item in drawn.inputs] == [
        "token ids covering 0..39",
        "bool, about 70% True",
        "uniform in [0, 1)",
        "a mask: 0, 0.3 and 1",
    ]
    # one row: a bool mask still holds both values, and the largest vocabulary its extremes
    generator = np.random.default_rng(0)
    array, _ = verify._draw(graph, graph.inputs[1], 1, generator)
    assert array.any() and not array.all()
    assert set(verify._cover(generator, 1000, (1, 5), "int64").reshape(-1)) >= {0, 999}


def masks_model() -> keras.Model:
    """A bool mask read by an LSTM, a float mask read by a Softmax."""
    keras.utils.set_random_seed(4)
    series = keras.Input((6, 3), name="series")
    flags = keras.Input((6,), dtype="bool", name="flags")
    weights = keras.Input((6,), name="weights")
    x = L.LSTM(4, name="lstm")(series, mask=flags)
    scores = L.Flatten(name="flat")(L.Dense(1, name="score")(series))
    y = L.Softmax(name="soft")(scores, mask=weights)
    return randomize(keras.Model([series, flags, weights], [x, y], name="masks"), seed=3)


@pytest.mark.slow
def test_bool_and_float_masks_verify(tmp_path):
    keras_path, common, graph = saved(masks_model(), tmp_path)
    result = run(keras_path, common, graph)
    assert result.passed and result.float64 is not None, verify.describe(result)


@pytest.mark.parametrize("mask, layer", [("weights", "soft"), pytest.param("flags", "lstm", marks=pytest.mark.slow)])
def test_a_model_that_drops_its_mask_input_fails(tmp_path, mask, layer):
    """The torch side built as if the layer had no `mask=`: the float mask holds 0 (issue 16: values
    in [0, 1) never masked anything, and such a model passed), the bool mask False."""
    keras_path, common, graph = saved(masks_model(), tmp_path)
    description = graph.to_dict()
    for node in description["nodes"]:
        if mask in node["inputs"]:
            node["inputs"].remove(mask)
            node["config"].update({key: False for key in ("mask_input", "uses_mask") if key in node["config"]})
    result = run(keras_path, common, Graph.from_dict(description))
    assert not result.float32.passed and not result.passed and result.first_divergence.layer == layer


# ---------------------------------------------------------------------------------------------
# The Keras 2 reference


def test_keras2_lstm_with_hard_sigmoid_without_tf_keras(tmp_path, monkeypatch):
    """Keras 3 reads Keras 2's hard_sigmoid as its own (relu6(x + 3) / 6); without tf-keras the
    reference is the exchange's Keras 3 rebuild, which computes Keras 2's, and matches what Keras 2
    itself computed (stored by scripts/make_keras2_fixtures.py)."""
    installed = verify._installed
    monkeypatch.setattr(verify, "_installed", lambda module: module != "tf_keras" and installed(module))
    source = KERAS2_FIXTURES / "lstm.h5"
    common = tmp_path / "lstm.safetensors"
    graph = cli.convert(source, common)
    result = run(source, common, graph)
    assert result.passed and result.float64 is not None
    assert result.compared == f"the exchange's Keras 3 rebuild of {source} vs PyTorch on {common}"
    assert any("tf-keras is not installed" in note for note in result.notes)
    assert (
        "Keras 3 has no 'hard_sigmoid_keras2': the rebuild computes hard_sigmoid_keras2 as clip(0.2x + 0.5, "
        "0, 1) in keras.ops" in result.notes
    )
    stored = np.load(KERAS2_FIXTURES / "expected_outputs.npz")
    side = verify._rebuild_side("rebuild", graph, fileformat.materialize(fileformat.load(common).tensors), [])
    assert np.max(np.abs(side.run([stored["lstm_ids"]])[0] - stored["lstm_outputs"])) <= 1e-6


@pytest.mark.skipif(not verify._installed("tf_keras"), reason="tf-keras (Keras 2) is not installed")
def test_keras2_lstm_with_tf_keras(tmp_path):
    source = KERAS2_FIXTURES / "lstm.h5"
    common = tmp_path / "lstm.safetensors"
    result = run(source, common, cli.convert(source, common))
    assert result.passed and result.float64 is not None and not result.notes
    assert result.compared.startswith(f"tf-keras (Keras 2) on {source}")


def test_writing_keras2_activation_as_keras3_names_the_file(tmp_path, capsys):
    common = tmp_path / "lstm.safetensors"
    cli.convert(KERAS2_FIXTURES / "lstm.h5", common)
    assert cli.main([str(common), str(tmp_path / "lstm.keras")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {common}: layer 'lstm_b': activation 'hard_sigmoid_keras2' has no Keras 3 equivalent"
    )


# ---------------------------------------------------------------------------------------------
# The command line, end to end (child process; test_zoo's test_verify_names_the_first_layer_that_diverges
# checks the line and --report in the default run)


@pytest.mark.slow
def test_command_line_prints_both_comparisons_and_writes_the_report(tmp_path, capsys):
    keras_path = tmp_path / "stack.keras"
    conv_bn_stack(depth=4, gain=1.0).save(keras_path)
    out, report = tmp_path / "stack.pt", tmp_path / "report.json"
    assert cli.main([str(keras_path), str(out), "--verify", "--report", str(report)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(
        f"verify: Keras on {keras_path} vs PyTorch on {out}, on a fixed random batch of {ROWS} "
        "inputs: float32 max abs diff "
    )
    assert ", float64 max abs diff " in line and line.endswith("verdict from float64: match")
    written = json.loads(report.read_text())
    assert written["compared"] == f"Keras on {keras_path} vs PyTorch on {out}" and written["passed"]
    assert len(written["layers"]) == 13 and written["child_peak_mib"] > 0


# ---------------------------------------------------------------------------------------------
# keras.applications with random weights (slow)


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("InceptionV3", 75), ("EfficientNetB0", 32)])
def test_applications_pass_with_the_defaults(tmp_path, name, size):
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    randomize(model, seed=5, offset_scale=0.05, positive_range=(0.4, 0.8))
    keras_path, common, graph = saved(model, tmp_path, name)
    result = verify.verify(keras_path, common, graph, None)
    print(
        f"{name}: float32 {result.float32.max_abs_diff:.3e} (scale {result.float32.output_scale:.3g}), "
        f"float64 {result.float64.max_abs_diff:.3e}"
    )
    assert result.passed and result.verdict.dtype == "float64", verify.describe(result)


# ---------------------------------------------------------------------------------------------
# --verify-inputs FILE.npz: the user's own batch


def two_inputs() -> Graph:
    ids = keras.Input((None,), dtype="int32", name="ids")
    scores = keras.Input((3,), name="scores")
    x = L.GlobalAveragePooling1D(name="pool")(L.Embedding(10, 3, name="embed")(ids))
    return keras_adapter.architecture_of(keras.Model([ids, scores], L.Add(name="add")([x, scores]), name="two"))


def test_given_inputs_are_matched_by_name_and_checked(tmp_path):
    graph = two_inputs()
    path = tmp_path / "inputs.npz"
    ids, scores = np.arange(35, dtype=np.int32).reshape(5, 7) % 10, np.ones((5, 3), np.float32)
    np.savez(path, scores=scores, ids=ids)
    batch, used = verify.verification_inputs(graph, verify.read_inputs_file(path))
    assert [array.tolist() for array in batch] == [ids.tolist(), scores.tolist()]  # in the model's order
    assert used.description == f"5 inputs from {path}"
    assert used.inputs[0] == verify.InputUsed("ids", [5, 7], "int32", f"from {path}")

    def refused(message, input_shapes=None, **arrays):
        np.savez(path, **arrays)
        with pytest.raises(ExchangeError, match=message):
            verify.verification_inputs(graph, verify.read_inputs_file(path), input_shapes)

    refused(
        rf"^{path}: holds 'ids', 'other'; expected one array per input of the model, keyed by its name \('ids', 'scores'\)$",
        ids=ids,
        other=scores,
    )
    refused(rf"^{path}: 'scores' is float64, the input takes float32$", ids=ids, scores=scores.astype(np.float64))
    refused(
        rf"^{path}: 'scores' has shape \(5, 4\), the input takes \(rows, 3\)$",
        ids=ids,
        scores=np.ones((5, 4), np.float32),
    )
    refused(rf"^{path}: 'scores' has 4 rows, 'ids' 5$", ids=ids, scores=scores[:4])
    refused(rf"^{path}: 'ids' has shape \(5, 0\): an empty axis$", ids=ids[:, :0], scores=scores)
    refused(rf"^{path}: 'scores' holds values that are not finite", ids=ids, scores=scores * np.nan)
    refused("^--input-shape and --verify-inputs", {"ids": (7,)}, ids=ids, scores=scores)


def test_one_array_serves_a_one_input_model_and_rows_are_capped(tmp_path, monkeypatch):
    frames = keras.Input((None, 4), name="frames")
    graph = keras_adapter.architecture_of(keras.Model(frames, L.Dense(2, name="d")(frames), name="one"))
    path = tmp_path / "whatever.npz"
    np.savez(path, np.zeros((9, 50, 4), np.float32))  # saved as arr_0
    monkeypatch.setattr(verify, "VERIFY_ACTIVATION_ELEMENTS", 50 * 4 * 6)
    batch, used = verify.verification_inputs(graph, verify.read_inputs_file(path))
    assert batch[0].shape == (6, 50, 4) and used.description == f"6 inputs from {path} (the first of its 9)"


def test_a_model_verifies_on_given_inputs(tmp_path, capsys):
    """A model verified on the user's arrays, its sequence length from the file (the command
    line's child runs it in tests/test_convert_cli.py on the MNIST test images)."""
    frames = keras.Input((None, 4), name="frames")
    model = randomize(keras.Model(frames, L.LSTM(3, name="lstm")(frames), name="seq"), seed=2)
    keras_path, common, graph = saved(model, tmp_path)
    inputs = tmp_path / "frames.npz"
    np.savez(inputs, frames=np.random.default_rng(0).standard_normal((20, 11, 4)).astype(np.float32))
    given = verify.read_inputs_file(inputs)
    result = verify.verify(keras_path, common, graph, given, in_process=True)
    assert result.passed and result.inputs == f"20 inputs from {inputs}", verify.describe(result)
    assert result.inputs_used == [verify.InputUsed("frames", [20, 11, 4], "float32", f"from {inputs}")]
    assert cli.main([str(keras_path), str(tmp_path / "x.pt"), "--verify-inputs", str(inputs)]) == 2
    assert capsys.readouterr().err.strip() == "error: --verify-inputs gives --verify its inputs: pass --verify too"
