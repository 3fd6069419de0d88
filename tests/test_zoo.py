"""The zoo (CNNs and sequence models): real Keras models saved as real files, converted in every direction by the CLI's
own functions, and compared on outputs (Keras on TensorFlow is the reference).

For each model: `.keras` -> `.safetensors` -> torch matches Keras; `.safetensors` -> `.keras`
(opened by Keras itself) matches; `.keras` -> `.pt` -> `.keras` matches; and file -> Keras -> file
is bit-identical. Run with `-s` to see each model's measured differences.
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from kerasmodels import batch, max_difference, randomize
from no_frameworks import convert_without_frameworks
from zoo_models import (
    APPLICATION_RELATIVE_TOLERANCE,
    APPLICATIONS,
    KERAS2_FIXTURES,
    SMALL,
    SMALL_TOLERANCE,
    ZOO,
    L,
    embedding_bilstm,
    mnist_cnn,
)

from exchange import cli, keras_adapter, keras_files, torch_adapter


def check(name: str, keras_outputs: list, other_outputs: list, application: bool, what: str) -> float:
    difference = max_difference(keras_outputs, other_outputs)
    scale = max(float(np.max(np.abs(output))) for output in keras_outputs)
    print(f"{name}: {what}: max abs diff {difference:.2e} (outputs up to {scale:.3g})")
    if application:
        assert difference <= APPLICATION_RELATIVE_TOLERANCE * scale, (what, difference, scale)
        for keras_output, other in zip(keras_outputs, other_outputs):
            np.testing.assert_array_equal(keras_output.argmax(-1), other.argmax(-1))
    else:
        assert difference <= SMALL_TOLERANCE, (what, difference)
    return difference


def convert(source: Path, target: Path, arch: Path | None = None) -> None:
    cli.convert(source, target, arch_path=arch)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_in_every_direction(name, tmp_path):
    application = name in APPLICATIONS
    keras.utils.set_random_seed(21)
    model = randomize((APPLICATIONS | SMALL)[name](), seed=5, offset_scale=0.05 if application else 0.2)
    inputs = batch(model, rows=4 if application else 8)
    reference = keras_adapter.predict(model, inputs)
    keras_path = tmp_path / f"{name}.keras"
    model.save(keras_path)

    common = tmp_path / f"{name}.safetensors"
    convert(keras_path, common)
    torch_model = torch_adapter.model_from_file(common)
    check(name, reference, torch_adapter.predict(torch_model, inputs), application, ".keras -> .safetensors -> torch")

    rebuilt = tmp_path / f"{name}_rebuilt.keras"
    convert(common, rebuilt)
    reopened = keras.saving.load_model(rebuilt, safe_mode=True)
    check(name, reference, keras_adapter.predict(reopened, inputs), application, ".safetensors -> .keras")

    state = tmp_path / f"{name}.pt"
    convert(keras_path, state)
    from_state = tmp_path / f"{name}_from_pt.keras"
    convert(state, from_state, arch=common)
    check(
        name,
        reference,
        keras_adapter.predict(keras.saving.load_model(from_state, safe_mode=True), inputs),
        application,
        ".keras -> .pt -> .keras",
    )

    again = tmp_path / f"{name}_again.safetensors"
    convert(rebuilt, again)
    assert again.read_bytes() == common.read_bytes(), "file -> Keras -> file must be bit-identical"


def test_keras2_cnn_written_by_tf_keras(tmp_path):
    """A Keras 2 `.h5` CNN (Conv2D, BatchNormalization, MaxPooling2D, stride-2 `same`, Flatten,
    Dense) against what Keras 2 itself computed, then on to `.keras` and back."""
    expected = np.load(KERAS2_FIXTURES / "expected_outputs.npz")["cnn_outputs"]
    inputs = [np.random.default_rng(0).random((len(expected), 29, 30, 3), dtype=np.float32)]
    common = tmp_path / "cnn.safetensors"
    convert(KERAS2_FIXTURES / "cnn.h5", common)
    check(
        "keras2_cnn",
        [expected],
        torch_adapter.predict(torch_adapter.model_from_file(common), inputs),
        False,
        "Keras 2 .h5 -> .safetensors -> torch vs Keras 2",
    )
    with keras_files.open_keras_file(KERAS2_FIXTURES / "cnn.h5") as weights:
        assert weights.architecture.channels_first_flattens == {"flatten": (7, 7, 12)}
    rebuilt = tmp_path / "cnn.keras"
    convert(common, rebuilt)
    check(
        "keras2_cnn",
        [expected],
        keras_adapter.predict(keras.saving.load_model(rebuilt, safe_mode=True), inputs),
        False,
        ".safetensors -> Keras 3 .keras vs Keras 2",
    )
    again = tmp_path / "again.safetensors"
    convert(rebuilt, again)
    assert again.read_bytes() == common.read_bytes()


def test_reading_zoo_files_imports_no_framework(tmp_path):
    """A CNN and a Bidirectional LSTM `.keras`, the Keras 2 `.h5` CNN and LSTM convert with
    tensorflow, keras and torch blocked."""
    keras.utils.set_random_seed(3)
    path = tmp_path / "cnn.keras"
    randomize(mnist_cnn(), seed=1).save(path)
    sequence_path = tmp_path / "bilstm.keras"
    randomize(embedding_bilstm(), seed=1).save(sequence_path)
    for source in (path, KERAS2_FIXTURES / "cnn.h5", sequence_path, KERAS2_FIXTURES / "lstm.h5"):
        result = convert_without_frameworks(source, tmp_path / f"{source.stem}_blocked.safetensors")
        assert result.returncode == 0, result.stderr
        assert "frameworks imported: none" in result.stdout


def application_input_size(name: str) -> int:
    """Small inputs each keras.applications model accepts (NASNetLarge needs its own 331)."""
    return {"NASNetLarge": 331, "NASNetMobile": 224, "InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}.get(
        name, 64
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in dir(keras.applications) if n[0].isupper()))
def test_every_keras_application(name):
    """Every keras.applications CNN made of supported layers converts and computes the same."""
    keras.utils.set_random_seed(21)
    size = application_input_size(name)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    # BatchNorm scales and variances in [0.4, 0.8): in [0.5, 1.5) the activations of the deepest
    # models (EfficientNetV2-S/M/L) grow to ~1e3 and float32 rounding alone decides their argmax.
    randomize(model, seed=5, offset_scale=0.05, positive_range=(0.4, 0.8))
    graph = keras_adapter.architecture_of(model)
    inputs = batch(model, rows=2)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
    check(
        name,
        keras_adapter.predict(model, inputs),
        torch_adapter.predict(torch_model, inputs),
        True,
        f"{len(graph.nodes)} layers, Keras -> torch",
    )
    keras.backend.clear_session()


@pytest.mark.slow  # ~12 s; wrong conventions are named at their layer in tests/test_verify.py
def test_verify_names_the_first_layer_that_diverges(tmp_path, capsys):
    """`--verify` compares the outputs; when they differ it compares every layer and names the
    first one whose outputs diverge (here a tampered bias in the middle of the CNN)."""
    from safetensors.numpy import load_file, save_file

    from exchange import fileformat

    keras.utils.set_random_seed(4)
    keras_path = tmp_path / "cnn.keras"
    randomize(mnist_cnn(), seed=2).save(keras_path)
    good, report = tmp_path / "cnn.safetensors", tmp_path / "report.json"
    assert cli.main([str(keras_path), str(good), "--verify", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert f"verify: Keras on {keras_path} vs PyTorch on {good}, on a fixed random batch of" in printed
    assert ", float64 max abs diff " in printed and "verdict from float64: match" in printed
    written = json.loads(report.read_text())  # --report: both comparisons, the user's output name
    assert written["passed"] and written["verdict"] == "float64" and written["float32"]["torch"] == f"PyTorch on {good}"

    tensors = load_file(str(good))
    tensors["conv2.bias"] = tensors["conv2.bias"] + np.float32(0.1)
    tampered = tmp_path / "tampered.safetensors"
    save_file(tensors, str(tampered), metadata=fileformat.read_metadata(good))
    graph = fileformat.load(good).architecture
    result = cli.verify(keras_path, tampered, graph, None, cli.DEFAULT_TOLERANCE)
    assert not result.passed and not result.float32.passed and result.verdict.dtype == "float64"
    assert (result.first_divergence.layer, result.first_divergence.kind) == ("conv2", "conv2d")
    # after the Flatten (whose torch output is in (C, H, W) order), the Dense is named, not the Flatten
    tensors = load_file(str(good))
    tensors["fc1.bias"] = tensors["fc1.bias"] + np.float32(0.1)
    save_file(tensors, str(tampered), metadata=fileformat.read_metadata(good))
    result = cli.verify(keras_path, tampered, graph, None, cli.DEFAULT_TOLERANCE)
    assert result.first_divergence.layer == "fc1"


def nested_multi_io():
    """Two inputs, two outputs, a Sequential and a functional model nested inside."""
    image = keras.Input((10, 9, 3), name="image")
    extra = keras.Input((5,), name="extra")
    trunk = keras.Sequential(
        [
            keras.Input((10, 9, 3)),
            L.Conv2D(4, 3, padding="same", name="inner_conv"),
            L.BatchNormalization(name="inner_bn"),
        ],
        name="trunk",
    )
    inner_in = keras.Input((4,), name="head_in")
    head = keras.Model(inner_in, L.Dense(3, activation="softmax", name="inner_dense")(inner_in), name="head")
    features = L.GlobalAveragePooling2D(name="gap")(trunk(image))
    joined = L.Concatenate(name="join")([features, L.Dense(4, name="side")(extra)])
    return keras.Model(
        [image, extra], [head(L.Dense(4, name="mix")(joined)), L.Dense(2, name="aux")(joined)], name="nested_multi_io"
    )


def test_nested_models_with_several_inputs_and_outputs(tmp_path):
    keras.utils.set_random_seed(8)
    model = randomize(nested_multi_io(), seed=3)
    inputs = batch(model)
    reference = keras_adapter.predict(model, inputs)
    keras_path = tmp_path / "nested.keras"
    model.save(keras_path)
    common = tmp_path / "nested.safetensors"
    convert(keras_path, common)
    graph = torch_adapter.model_from_file(common).exchange_graph
    assert [spec.name for spec in graph.inputs] == ["image", "extra"] and graph.outputs == ("inner_dense", "aux")
    assert {"inner_conv.weight", "inner_bn.running_var", "inner_dense.weight"} <= set(graph.tensor_specs)
    check(
        "nested_multi_io",
        reference,
        torch_adapter.predict(torch_adapter.model_from_file(common), inputs),
        False,
        "nested .keras -> .safetensors -> torch",
    )
    live = keras_adapter.get_tensors(model)
    with keras_files.open_keras_file(keras_path) as from_file:
        for key, tensor in from_file.tensors.items():
            np.testing.assert_array_equal(live[key], np.asarray(tensor.load() if hasattr(tensor, "load") else tensor))
    rebuilt = tmp_path / "rebuilt.keras"
    convert(common, rebuilt)
    check(
        "nested_multi_io",
        reference,
        keras_adapter.predict(keras.saving.load_model(rebuilt, safe_mode=True), inputs),
        False,
        ".safetensors -> .keras (inlined)",
    )


@pytest.mark.parametrize("output_name", ["cnn.safetensors", "cnn.pt", "cnn.py"])
def test_failed_verify_replaces_nothing(tmp_path, capsys, output_name, monkeypatch):
    """`--verify` runs on the temporary output: above the tolerance (below 0 here) the existing
    output stays byte-identical and no temporary is left."""
    monkeypatch.setattr("exchange.verify.FLOAT64_ATOL", -1.0)
    keras.utils.set_random_seed(4)
    keras_path = tmp_path / "source.keras"
    randomize(mnist_cnn(), seed=2).save(keras_path)
    out = tmp_path / output_name
    out.write_bytes(b"previous")
    assert cli.main([str(keras_path), str(out), "--verify", "--tolerance", "0"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {keras_path}: outputs differ beyond the float64 tolerance")
    assert "not written" in error[0]
    assert out.read_bytes() == b"previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["source.keras", output_name])
