"""`convert.py model.keras model.py`: standalone PyTorch source code for every zoo model.

Each generated file is imported in a fresh process whose `sys.path` holds nothing of this
project and where tensorflow, keras and this project's packages cannot be imported; it loads its
weights with its own `load()` helper and must compute what Keras computed, then go through
`torch.export.export` and compute the same again.
"""

import keras
import numpy as np
import pytest
from generated_code import check_generated_file, run_generated
from kerasmodels import batch, randomize
from support import ROOT
from zoo_models import APPLICATION_RELATIVE_TOLERANCE, APPLICATIONS, KERAS2_FIXTURES, SMALL, SMALL_TOLERANCE

from exchange import cli, codegen
from frameworks.recipe import SEED_ARCHITECTURE

GOLDEN = ROOT / "tests/fixtures/golden/seed_mlp.py"


# The default run keeps a few models whose generated code differs in kind (a CNN, a recurrent text
# model, attention); the others, with the slowest, run with -m slow (each kind's own generated code
# is checked in tests/test_layer_kinds.py and tests/test_kinds_*.py).
DEFAULT_RUN_CODE = {"mnist_cnn", "embedding_lstm", "transformer_block"}


@pytest.mark.parametrize(
    "name",
    [
        name if name in DEFAULT_RUN_CODE else pytest.param(name, marks=pytest.mark.slow)
        for name in [*SMALL, *APPLICATIONS]
    ],
)
def test_generated_code_of_each_zoo_model(name, tmp_path):
    application = name in APPLICATIONS
    keras.utils.set_random_seed(21)
    model = randomize((APPLICATIONS | SMALL)[name](), seed=5, offset_scale=0.05 if application else 0.2)
    (inputs,) = batch(model, rows=2 if application else 8)
    (expected,) = [np.asarray(model.predict(inputs, verbose=0))]
    keras_path = tmp_path / f"{name}.keras"
    model.save(keras_path)
    code_path = tmp_path / f"{name}.py"
    graph = cli.convert(keras_path, code_path)
    assert (tmp_path / f"{name}.safetensors").is_file()
    check_generated_file(code_path)
    source = code_path.read_text()
    assert "import keras" not in source and "exchange" not in source.split('"""', 2)[2]
    from exchange.torch_adapter import class_name

    result = run_generated(code_path, class_name(graph.name), inputs, expected, tmp_path)
    print(
        f"{name}: generated code vs Keras {result['eager']:.2e}, after torch.export {result['exported']:.2e} "
        f"(outputs up to {result['scale']:.3g})"
    )
    assert result["loaded"] == []
    tolerance = APPLICATION_RELATIVE_TOLERANCE * result["scale"] if application else SMALL_TOLERANCE
    assert result["eager"] <= tolerance and result["exported"] <= tolerance
    assert result["argmax_equal"] or not application


def test_generated_code_of_the_keras2_cnn(tmp_path):
    expected = np.load(KERAS2_FIXTURES / "expected_outputs.npz")["cnn_outputs"]
    inputs = np.random.default_rng(0).random((len(expected), 29, 30, 3), dtype=np.float32)
    code_path = tmp_path / "cnn.py"
    graph = cli.convert(KERAS2_FIXTURES / "cnn.h5", code_path)
    check_generated_file(code_path)
    from exchange.torch_adapter import class_name

    result = run_generated(code_path, class_name(graph.name), inputs, expected, tmp_path)
    assert result["eager"] <= SMALL_TOLERANCE and result["exported"] <= SMALL_TOLERANCE


def test_generated_module_matches_the_converted_module(tmp_path):
    """Same state_dict keys, shapes and dtypes as `model_from_file`'s module."""
    import importlib.util

    from exchange import torch_adapter

    keras.utils.set_random_seed(1)
    keras_path = tmp_path / "sep.keras"
    randomize(SMALL["depthwise_separable"](), seed=1).save(keras_path)
    cli.convert(keras_path, tmp_path / "sep.py")
    spec = importlib.util.spec_from_file_location("generated_sep", tmp_path / "sep.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    ours = generated.DepthwiseSeparable().state_dict()
    theirs = torch_adapter.model_from_file(tmp_path / "sep.safetensors").state_dict()
    assert {key: (tuple(v.shape), v.dtype) for key, v in ours.items()} == {
        key: (tuple(v.shape), v.dtype) for key, v in theirs.items()
    }


def test_seed_mlp_source_is_pinned():
    """Regenerate with `python scripts/make_golden_code.py` after a deliberate change."""
    assert codegen.generate(SEED_ARCHITECTURE, "seed_mlp.safetensors", "seed_mlp.keras") == GOLDEN.read_text()


def test_generation_is_deterministic(tmp_path):
    keras.utils.set_random_seed(1)
    keras_path = tmp_path / "cnn.keras"
    randomize(SMALL["mnist_cnn"](), seed=1).save(keras_path)
    cli.convert(keras_path, tmp_path / "first.py")
    cli.convert(keras_path, tmp_path / "second.py")
    first = (tmp_path / "first.py").read_text()
    assert first.replace("first.safetensors", "X") == (tmp_path / "second.py").read_text().replace(
        "second.safetensors", "X"
    )
    assert (tmp_path / "first.safetensors").read_bytes() == (tmp_path / "second.safetensors").read_bytes()


def test_code_from_a_torch_state_dict_with_its_architecture(tmp_path, capsys):
    """`.pt` + `--arch` -> `.py`: the generated class loads the same tensors the .pt held."""
    import torch

    keras.utils.set_random_seed(2)
    keras_path = tmp_path / "ae.keras"
    randomize(SMALL["autoencoder"](), seed=2).save(keras_path)
    cli.convert(keras_path, tmp_path / "ae.safetensors")
    cli.convert(keras_path, tmp_path / "ae.pt")
    assert (
        cli.main(
            [str(tmp_path / "ae.pt"), str(tmp_path / "port.py"), "--arch", str(tmp_path / "ae.safetensors"), "--verify"]
        )
        == 0
    )
    assert "vs the generated PyTorch code" in capsys.readouterr().out
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "port.safetensors"))
    assert sorted(written) == sorted(state) and all(torch.equal(written[key], state[key]) for key in state)


def test_any_torch_nn_module_is_named_and_others_are_refused_in_one_line(monkeypatch):
    """Generated code names every `torch.nn` module without a list to keep; a module that is
    neither torch.nn's nor exchange.torch_modules' is an ExchangeError, not a traceback."""
    from torch import nn

    from exchange.errors import ExchangeError

    assert codegen._constructor(nn.Upsample(scale_factor=2.0)) == "nn.Upsample(scale_factor=2.0)"
    assert codegen._constructor(nn.PReLU(3)) == "nn.PReLU(num_parameters=3)"

    class Private(nn.Module):
        pass

    with pytest.raises(ExchangeError, match=r"no source form for torch module Private") as err:
        codegen._constructor(Private())
    assert "\n" not in str(err.value)
