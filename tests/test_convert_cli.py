"""scripts/convert.py on real files: every direction, --verify, and one-line errors with exit 2."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import ROOT, random_file_tensors

from exchange import cli, fileformat, keras_adapter
from frameworks import keras_mlp, torch_mlp
from frameworks.mnist import write_test_images
from frameworks.recipe import SEED_ARCHITECTURE

OUTPUT_TOLERANCE = 1e-6  # as in test_cross_framework: float32 rounding between the frameworks


def run_convert(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert.py"), *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """A real `.keras` file written by Keras, and the model it holds."""
    model = keras_mlp.build_keras_model(SEED_ARCHITECTURE)
    keras_adapter.set_tensors(model, random_file_tensors(SEED_ARCHITECTURE))
    path = tmp_path_factory.mktemp("keras") / "seed.keras"
    model.save(path)
    return path, model


def test_keras_to_safetensors_to_keras_and_pt(keras_file, mnist, tmp_path):
    """--verify on the MNIST test images, as make demo runs it (train.py --test-images)."""
    keras_path, keras_model = keras_file
    common = tmp_path / "seed.safetensors"
    images = write_test_images(mnist, tmp_path / "mnist_test.npz", SEED_ARCHITECTURE.inputs[0].name)
    result = run_convert(keras_path, common, "--verify", "--verify-inputs", images)
    assert result.returncode == 0, result.stderr
    assert f"wrote {common}: 6 tensors, 42,310 parameters" in result.stdout
    assert f"on 10,000 inputs from {images}:" in result.stdout and "argmax agreement 100.00%" in result.stdout

    rebuilt = tmp_path / "rebuilt.keras"
    assert run_convert(common, rebuilt).returncode == 0
    import keras

    reopened = keras.saving.load_model(rebuilt, safe_mode=True)
    np.testing.assert_array_equal(
        keras_mlp.predict(reopened, mnist.x_test), keras_mlp.predict(keras_model, mnist.x_test)
    )

    state_path = tmp_path / "seed.pt"
    assert run_convert(common, state_path).returncode == 0
    state_dict = torch.load(state_path, weights_only=True)
    assert sorted(state_dict) == sorted(SEED_ARCHITECTURE.tensor_shapes())
    torch_model = torch_mlp.TorchMLP(SEED_ARCHITECTURE)
    torch_model.load_state_dict(state_dict, strict=True)
    keras_probs = keras_mlp.predict(keras_model, mnist.x_test)
    torch_probs = torch_mlp.predict(torch_model, mnist.x_test)
    assert np.max(np.abs(keras_probs - torch_probs)) <= OUTPUT_TOLERANCE
    np.testing.assert_array_equal(keras_probs.argmax(-1), torch_probs.argmax(-1))


@pytest.mark.slow  # ~15 s; the default run converts to .pt in test_keras_to_safetensors_to_keras_and_pt
def test_keras_to_pt_directly_and_back(keras_file, tmp_path):
    keras_path, keras_model = keras_file
    state_path = tmp_path / "direct.pt"
    result = run_convert(keras_path, state_path, "--verify")
    assert result.returncode == 0, result.stderr
    assert f"Keras on {keras_path} vs PyTorch on {state_path}" in result.stdout

    back = tmp_path / "back.safetensors"
    result = run_convert(state_path, back, "--activations", "tanh,tanh,softmax", "--verify")
    assert result.returncode == 0, result.stderr
    exchange_file = fileformat.load(back)
    assert exchange_file.architecture.differences(SEED_ARCHITECTURE) == []
    assert exchange_file.source_framework == "torch"
    for key, tensor in keras_adapter.get_tensors(keras_model).items():
        np.testing.assert_array_equal(exchange_file.tensors[key], tensor)


def test_verify_without_inputs_uses_a_fixed_random_batch(keras_file, tmp_path, capsys):
    """A 784-wide model is no special case: without --verify-inputs it gets the random batch."""
    assert cli.main([str(keras_file[0]), str(tmp_path / "x.safetensors"), "--verify"]) == 0
    assert "on a fixed random batch of 1,000 inputs:" in capsys.readouterr().out


def test_bad_input_is_one_line_exit_2_without_traceback(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"existing")
    result = run_convert(tmp_path / "missing.keras", out)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.keras'}: no such file"]
    assert out.read_bytes() == b"existing"


def _write_pt_with_wrong_shape(path):
    tensors = {key: torch.from_numpy(value) for key, value in random_file_tensors(SEED_ARCHITECTURE).items()}
    tensors["dense_1.weight"] = torch.zeros(50, 49)
    torch.save(tensors, path)


def _write_unsupported_keras(path):
    import keras

    keras.Sequential(
        [keras.Input((5, 8)), keras.layers.Dense(4, name="d"), keras.layers.Lambda(lambda x: x * 2.0, name="norm")]
    ).save(path)


@pytest.mark.parametrize(
    "make_input, input_name, extra, message",
    [
        (lambda p: p.write_text("{}"), "model.json", [], r"architecture \(JSON\), which holds no weights"),
        (lambda p: p.write_bytes(b"\x00" * 40), "trunc.safetensors", [], "not a readable safetensors file"),
        (lambda p: p.write_text("not a zip"), "fake.keras", [], "not a .keras file"),
        (_write_unsupported_keras, "norm.keras", [], r"unsupported layer 'norm' \(Lambda\)"),
        (
            _write_pt_with_wrong_shape,
            "wrong.pt",
            ["--activations", "tanh,tanh,softmax"],
            r"dense_1.weight: expected float32 \(50, 50\), found float32 \(50, 49\)",
        ),
        (
            lambda p: p.write_bytes(b"garbage"),
            "garbage.pt",
            ["--activations", "tanh"],
            "not a readable PyTorch weights file",
        ),
    ],
)
@pytest.mark.parametrize("output_name", ["out.safetensors", "out.keras", "out.pt"])
def test_bad_inputs(tmp_path, capsys, make_input, input_name, extra, message, output_name):
    source = tmp_path / input_name
    make_input(source)
    out = tmp_path / output_name
    assert cli.main([str(source), str(out), *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [input_name], "nothing may be written"


def test_pt_without_architecture_asks_for_one(tmp_path, capsys):
    path = tmp_path / "plain.pt"
    torch.save(torch_mlp.TorchMLP(SEED_ARCHITECTURE).state_dict(), path)
    assert cli.main([str(path), str(tmp_path / "x.safetensors")]) == 2
    assert "carries no architecture; pass --activations" in capsys.readouterr().err
    arch = tmp_path / "arch.json"
    arch.write_text(SEED_ARCHITECTURE.to_json())
    assert cli.main([str(path), str(tmp_path / "x.safetensors"), "--arch", str(arch)]) == 0


def test_failed_read_back_check_keeps_the_existing_output(keras_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"old")

    def failing_check(path, architecture):
        raise cli.ExchangeError(f"{path}: read-back check failed")

    monkeypatch.setattr(cli, "check_written", failing_check)
    assert cli.main([str(keras_file[0]), str(out)]) == 2
    assert "read-back check failed" in capsys.readouterr().err
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_malformed_inputs_are_one_line_errors(tmp_path, capsys):
    import json

    config = json.loads((ROOT / "tests/fixtures/keras2/seed_mlp_config.json").read_text())
    del config["config"]["layers"][1]["config"]["units"]
    broken_config = tmp_path / "broken.json"
    broken_config.write_text(json.dumps(config))
    weights = ROOT / "tests/fixtures/keras2/seed_mlp_weights.h5"
    assert cli.main([str(weights), str(tmp_path / "a.safetensors"), "--arch", str(broken_config)]) == 2
    assert "layer 'dense_1' (Dense): option 'units' is missing" in capsys.readouterr().err

    bfloat16 = tmp_path / "bf16.pt"
    torch.save({"layers.0.weight": torch.zeros(2, 3, dtype=torch.bfloat16)}, bfloat16)
    assert cli.main([str(bfloat16), str(tmp_path / "b.safetensors"), "--activations", "tanh"]) == 2
    assert "layers.0.weight (torch.bfloat16)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.pt", "broken.json"]


def test_verify_feeds_a_float16_model_float16_inputs(tmp_path, capsys):
    """--verify draws its batch in each input's dtype (float32 inputs crashed a float16 torch module)."""
    import keras

    keras.utils.set_random_seed(1)
    path = tmp_path / "half.keras"
    keras.Sequential([keras.Input((5,), dtype="float16"), keras.layers.Dense(3, dtype="float16")]).save(path)
    assert cli.main([str(path), str(tmp_path / "half.safetensors"), "--verify", "--tolerance", "1e-2"]) == 0
    assert "argmax agreement" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# --verify runs the frameworks in a child process


def _exchange_file(path, graph: dict, tensors: dict | None = None):
    from exchange.graph import Graph

    fileformat.save(path, Graph.from_dict(graph), tensors or {}, "torch")
    return path


def _chain(kind_config: list[tuple[str, str, dict]], shape: list, input_dtype: str = "float32") -> dict:
    nodes, previous = [], "x"
    for index, (kind, dtype, config) in enumerate(kind_config):
        nodes.append({"name": f"n{index}", "kind": kind, "inputs": [previous], "dtype": dtype, "config": config})
        previous = nodes[-1]["name"]
    return {
        "name": "m",
        "inputs": [{"name": "x", "shape": shape, "dtype": input_dtype}],
        "nodes": nodes,
        "outputs": [previous],
    }


@pytest.mark.parametrize("fault, signal_number, exit_code", [("abort", None, 2), ("hang", "SIGTERM", 143)])
def test_verify_child_crash_or_signal_is_one_line_and_leaves_nothing(
    keras_file, tmp_path, fault, signal_number, exit_code
):
    """A native crash of the verify child (simulated: it aborts) is one line and exit 2; a SIGTERM
    to the parent while the child runs (simulated: it hangs) stops both, exit 143. Nothing is left."""
    import os
    import signal
    import time

    out = tmp_path / "out.safetensors"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/convert.py"), str(keras_file[0]), str(out), "--verify"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EXCHANGE_VERIFY_TEST_FAULT": fault},
    )
    try:
        if signal_number is not None:
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob(".out.safetensors.*/.verify.*")) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the child has started
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            process.send_signal(getattr(signal, signal_number))
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == exit_code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    if fault == "abort":
        assert lines[0] == (
            f"error: {keras_file[0]}: --verify stopped: Keras or PyTorch crashed running this model "
            "(SIGABRT; it may use 4.0 GiB more than the frameworks themselves)"
        )
    else:
        assert lines[0] == f"error: interrupted by SIGTERM; {out} was not written"
        assert children and not any(Path(f"/proc/{child}").exists() for child in children), "the child still runs"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_verify_child_address_space_is_capped(tmp_path):
    """The cap the child sets on itself: an allocation beyond it fails (MemoryError), not the machine."""
    code = (
        "from exchange.verify import _cap_address_space\n_cap_address_space(256 << 20)\n"
        "try:\n    bytearray(1 << 30)\nexcept MemoryError:\n    print('refused')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "refused", result.stderr


def test_verify_casts_float_inputs_to_the_layer_dtype_as_keras_does(tmp_path, capsys):
    """Keras casts a float32 input to a float16 layer's dtype; the torch module and the generated
    code cast it there too (torch raised a dtype mismatch)."""
    graph = _chain(
        [
            ("dense", "float16", {"units": 2, "activation": "linear", "use_bias": False}),
            ("activation", "float32", {"activation": "tanh"}),
        ],
        [3],
    )
    source = _exchange_file(
        tmp_path / "half.safetensors", graph, {"n0.weight": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3)}
    )
    for output in ("half.pt", "code.py"):
        assert cli.main([str(source), str(tmp_path / output), "--verify"]) == 0, capsys.readouterr().err
        assert "argmax agreement 100.00%" in capsys.readouterr().out
    assert ".to(torch.float16)" in (tmp_path / "code.py").read_text()


@pytest.mark.slow  # ~15 s; the layer search itself runs in tests/test_verify.py's wrong-convention tests
def test_divergent_layer_is_found_in_bounded_memory(tmp_path, monkeypatch):
    """400 activations on a 1000-wide input, outputs differing (tolerances below 0: every layer
    fails): the layers are compared on the rows that differ most, in chunks; all of them at once
    took gigabytes."""
    monkeypatch.setattr("exchange.verify.FLOAT64_ATOL", -1.0)
    source = _exchange_file(
        tmp_path / "chain.safetensors", _chain([("activation", "float32", {"activation": "tanh"})] * 400, [1000])
    )
    out = tmp_path / "chain.pt"
    assert cli.main([str(source), str(out)]) == 0
    graph = fileformat.load(source).architecture
    result = cli.verify(source, out, graph, None, 0.0)
    assert result.verdict.dtype == "float64" and (result.first_divergence.layer, result.first_divergence.kind) == (
        "n0",
        "activation",
    )
    # Measured 850 MiB run alone and 1,571 MiB once inside the full default run (same inputs; the
    # child's peak varies with what TensorFlow allocates), of which about 730 are the frameworks'
    # imports; all layers at once took 4.7 GB, which this bound still tells apart.
    assert result.child_peak_mib < 2048, result


def test_verify_batch_is_sized_by_the_largest_activation():
    from exchange.graph import Graph
    from exchange.verify import VERIFY_ACTIVATION_ELEMENTS, verification_inputs

    # A Dense of 1,000,000 units (the feature cap) on 4 steps: 4,000,000 values per sample.
    wide = Graph.from_dict(
        _chain([("dense", "float32", {"units": 1_000_000, "activation": "linear", "use_bias": False})], [4, 2])
    )
    inputs, drawn = verification_inputs(wide, None)
    assert inputs[0].shape == (VERIFY_ACTIVATION_ELEMENTS // 4_000_000, 4, 2)
    assert drawn.description == "a fixed random batch of 4 inputs"
    with pytest.raises(cli.ExchangeError, match="'n0' makes 20,000,000 values per sample, more than the 16,000,000"):
        verification_inputs(
            Graph.from_dict(
                _chain([("dense", "float32", {"units": 1_000_000, "activation": "linear", "use_bias": False})], [20, 2])
            ),
            None,
        )
