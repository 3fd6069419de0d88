"""Generated code that continues a Keras run: the lockstep models of `frameworks.resume_lockstep`
(a CNN: Conv2D with an L2 regularizer, BatchNormalization, Dense, Adam under ExponentialDecay; an
LSTM under centered RMSprop with momentum and PiecewiseConstantDecay), trained 5 steps in Keras,
saved as `.keras`, converted to `.py`; then Keras's `train_on_batch` and the generated module's
`make_optimizer` / `train_step` take the same batches: the losses, weights and slots agree."""

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from generated_code import check_generated_file

from exchange import cli, codegen, keras_adapter, torch_adapter
from frameworks import resume_lockstep

keras = pytest.importorskip("keras")

# Measured after 20 steps (200 with -m slow): CNN losses 4.8e-7 apart (4.8e-7), weights 6.0e-8
# (1.2e-7), slots 4.5e-8 (3.0e-8); LSTM losses 1.2e-7 (2.4e-7), weights 1.8e-7 (3.9e-7), slots
# 8.4e-9 (9.6e-9): float32 rounding.
TOLERANCE = 1e-5


def _import(path):
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _continue_in_both(model_kind: str, steps: int, tmp_path, lint: bool = False) -> dict:
    """Keras trains 5 steps and saves; the generated code goes on from the file, beside Keras.
    The generated module imports only torch (and json, and safetensors in `load`/`make_optimizer`)."""
    model = resume_lockstep.MODELS[model_kind](0)
    for x, y in resume_lockstep.batches(5, 0, model_kind):
        model.train_on_batch(x, y)
    keras_path, code_path = tmp_path / f"{model_kind}.keras", tmp_path / f"{model_kind}.py"
    keras_adapter.save_keras_file(model, keras_path)
    notes = []
    graph = cli.convert(keras_path, code_path, notes=notes)
    assert notes == []
    if lint:
        check_generated_file(code_path)
    source = code_path.read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert set(imports) <= {"import json", "import math", "import torch", "import torch.nn.functional as F"} | {
        "from torch import nn"
    }
    assert "exchange" not in source.split('"""', 2)[2]
    generated = _import(code_path)
    weights = str(code_path.with_suffix(".safetensors"))
    module = getattr(generated, torch_adapter.class_name(graph.name))()
    module.load_state_dict(generated.load(weights), strict=True)
    optimizer = generated.make_optimizer(module, weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as resume_lockstep: threads only wait on TensorFlow's here
    try:
        loss_differences = []
        for x, y in resume_lockstep.batches(steps, 1, model_kind):
            model.reset_metrics()  # train_on_batch's loss: this batch's, not a running mean
            keras_loss = float(np.asarray(model.train_on_batch(x, y)))
            (inputs,) = torch_adapter.torch_inputs(graph, [x])
            torch_loss = float(generated.train_step(module, optimizer, inputs, torch.from_numpy(y)))
            loss_differences.append(abs(keras_loss - torch_loss))
    finally:
        torch.set_num_threads(threads)
    _, _, keras_after = resume_lockstep.keras_state(model, tmp_path)
    parameters = dict(module.named_parameters())
    slot_difference = max(
        float(np.max(np.abs(value - optimizer.state[parameters[key]][slot].numpy())))
        for key, slots in keras_after.slots.items()
        for slot, value in slots.items()
    )
    torch_state = {key: value.detach().numpy() for key, value in module.state_dict().items()}
    return {
        "iterations": (keras_after.iteration, optimizer.iterations),
        "loss": max(loss_differences),
        "weights": resume_lockstep._max_difference(keras_adapter.get_tensors(model), torch_state),
        "slots": slot_difference,
        "slot_count": sum(len(slots) for slots in keras_after.slots.values()),
        "source": source,
    }


def _check(result, steps):
    assert result["iterations"] == (5 + steps, 5 + steps)
    assert result["slot_count"] > 0
    assert result["loss"] < TOLERANCE
    assert result["weights"] < TOLERANCE
    assert result["slots"] < TOLERANCE


def test_generated_cnn_continues_the_keras_run(tmp_path):
    result = _continue_in_both("cnn", 20, tmp_path, lint=True)
    _check(result, 20)
    source = result["source"]
    assert "self.norm = KerasBatchNorm(4, eps=0.001, momentum=0.01)" in source
    assert "    return 0.01 * torch.sum(torch.square(model.conv.weight))\n" in source
    assert "learning_rate=ExponentialDecay(initial_learning_rate=0.01, decay_steps=20" in source


def test_generated_lstm_continues_the_keras_run(tmp_path):
    result = _continue_in_both("lstm", 20, tmp_path)
    _check(result, 20)
    source = result["source"]
    assert "    untrained = {'lstm.bias_hh_l0'}\n" in source  # Keras's one bias trains as bias_ih
    assert "sparse=True)" in source  # the Embedding steps lookup by lookup, as Keras 3's
    assert "regularization_penalty" not in source
    assert "PiecewiseConstantDecay(boundaries=[20.0, 100.0], values=[0.01, 0.005, 0.002])" in source


@pytest.mark.slow
@pytest.mark.parametrize("model_kind", ["cnn", "lstm"])
def test_generated_code_continues_the_keras_run_for_200_steps(model_kind, tmp_path):
    _check(_continue_in_both(model_kind, 200, tmp_path), 200)


def _dense_model(compiled: bool):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs), name="small")
    if compiled:
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5), loss="mse")
        model.train_on_batch(np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32))
    return model


@pytest.fixture(scope="module")
def compiled_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "small.keras"
    keras_adapter.save_keras_file(_dense_model(compiled=True), path)
    return path


def test_a_model_without_compile_config_gets_no_training_functions(tmp_path):
    path = tmp_path / "small.keras"
    keras_adapter.save_keras_file(_dense_model(compiled=False), path)
    notes = []
    graph = cli.convert(path, tmp_path / "small.py", notes=notes)
    source = (tmp_path / "small.py").read_text()
    assert notes == []
    assert source == codegen.generate(graph, "small.safetensors", "small.keras")  # as before training code
    assert "make_optimizer" not in source and "train_step" not in source and "json" not in source


def _rewritten(path, tmp_path, change) -> object:
    """A copy of a `.keras` file whose config.json's compile config `change` edited."""
    hostile = tmp_path / "hostile.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(hostile, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                change(config["compile_config"])
                data = json.dumps(config).encode()
            target.writestr(item, data)
    return hostile


INJECTED = "x')\nimport os; os.system('echo owned')  #\"\"\""


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda config: config.update(loss=INJECTED), "loss 'x\\')\\nimport os; os.system("),
        (
            lambda config: config.update(loss={"class_name": "MeanSquaredError", "config": {INJECTED: 1}}),
            "loss mean_squared_error option 'x\\')\\nimport os;",
        ),
        (
            lambda config: config.update(
                loss={"class_name": "BinaryCrossentropy", "config": {"from_logits": INJECTED}}
            ),
            "loss binary_crossentropy from_logits must be true or false",
        ),
        (lambda config: config["optimizer"].update(class_name=INJECTED), "optimizer 'x\\')\\nimport os;"),
        (
            lambda config: config["optimizer"]["config"].update(momentum=INJECTED),
            "optimizer SGD momentum must be a number",
        ),
    ],
    ids=["loss-name", "loss-option-name", "loss-option-value", "optimizer-name", "optimizer-option-value"],
)
def test_a_hostile_compile_config_cannot_reach_the_generated_code(change, message, compiled_file, tmp_path):
    """Names and values of a compile config are checked before code is written: anything else is
    refused (a note; the weights and the inference code convert as without training state)."""
    hostile = _rewritten(compiled_file, tmp_path, change)
    notes = []
    cli.convert(hostile, tmp_path / "small.py", notes=notes)
    assert len(notes) == 1 and notes[0].startswith("optimizer state and training functions left out: ")
    assert message in notes[0] and "\n" not in notes[0]
    source = (tmp_path / "small.py").read_text()
    assert "os.system" not in source and "make_optimizer" not in source


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda config: config.update(loss={"class_name": "MeanSquaredError", "config": {"reduction": "sum"}}),
            "loss mean_squared_error reduction='sum' is not supported (only 'sum_over_batch_size' is reproduced)",
        ),
        (lambda config: config.update(loss=None), "the compile config has no loss to train with"),
        (lambda config: config.update(loss="hinge"), "loss 'hinge' is not supported for training (supported: "),
        (
            lambda config: config.update(loss={"class_name": "BinaryCrossentropy", "config": {"label_smoothing": 2}}),
            "loss binary_crossentropy label_smoothing must be between 0 and 1, found 2.0",
        ),
    ],
    ids=["reduction", "no-loss", "other-loss", "label-smoothing"],
)
def test_a_loss_generated_code_cannot_reproduce_is_refused(change, message, compiled_file, tmp_path):
    from exchange import filekinds, training_state

    path, notes = _rewritten(compiled_file, tmp_path, change), []
    graph = cli.load_architecture(path)
    assert training_state.for_conversion(path, filekinds.KERAS, filekinds.CODE, graph, notes) is None
    prefix = f"optimizer state and training functions left out: {path}: "
    assert len(notes) == 1 and notes[0].startswith(prefix + message) and "\n" not in notes[0]


def test_models_generated_training_does_not_reproduce_are_refused():
    """Several outputs (Keras's loss per output is not one `loss_fn`), a renormalising BatchNorm."""
    from exchange import training_state
    from exchange.errors import UnsupportedLayerError

    state = training_state.TrainingState(training_state.OptimizerSpec("SGD", {}), 0, {}, "mse")
    inputs = keras.Input((3,))
    two = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(1)(inputs)])
    renorm = keras.Model(inputs, keras.layers.BatchNormalization(renorm=True, name="norm")(inputs))
    with pytest.raises(UnsupportedLayerError, match="^m.keras: training a model of 2 outputs is not supported$"):
        training_state.check_trainable_in_code(keras_adapter.architecture_of(two), state, "m.keras")
    with pytest.raises(
        UnsupportedLayerError,
        match="^m.keras: layer 'norm' BatchNormalization renorm=True trains with batch renormalisation, which is "
        "not reproduced in torch$",
    ):
        training_state.check_trainable_in_code(keras_adapter.architecture_of(renorm), state, "m.keras")


def test_the_small_model_trains_from_its_generated_code(compiled_file, tmp_path):
    """The file the hostile ones were made from: SGD with momentum, mean squared error."""
    shutil.copy(compiled_file, tmp_path / "small.keras")
    graph = cli.convert(tmp_path / "small.keras", tmp_path / "small.py")
    generated = _import(tmp_path / "small.py")
    module = getattr(generated, torch_adapter.class_name(graph.name))()
    module.load_state_dict(generated.load(str(tmp_path / "small.safetensors")), strict=True)
    optimizer = generated.make_optimizer(module, str(tmp_path / "small.safetensors"))
    assert optimizer.iterations == 1 and set(optimizer.state[module.dense.weight]) == {"momentum"}
    loss = generated.train_step(module, optimizer, torch.ones(4, 3), torch.zeros(4, 2))
    assert loss.shape == () and optimizer.iterations == 2


def test_nadam_continues_from_generated_code(tmp_path):
    """Nadam's `u_product` (one scalar for the whole optimizer) is read from the weights file's
    metadata by `make_optimizer`, so the generated run goes on as Keras's."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs), name="small")
    model.compile(optimizer=keras.optimizers.Nadam(0.05), loss="mse")
    rng = np.random.default_rng(3)
    batches = [
        (rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)) for _ in range(9)
    ]
    for x, y in batches[:4]:
        model.train_on_batch(x, y)
    path = tmp_path / "small.keras"
    keras_adapter.save_keras_file(model, path)
    notes = []
    cli.convert(path, tmp_path / "small.py", notes=notes)
    assert notes == []
    source = (tmp_path / "small.py").read_text()
    assert "optimizer.scalars[name] = torch.tensor(value, dtype=torch.float32)" in source
    generated = _import(tmp_path / "small.py")
    module = generated.Small()
    weights = str(tmp_path / "small.safetensors")
    module.load_state_dict(generated.load(weights), strict=True)
    optimizer = generated.make_optimizer(module, weights)
    assert float(optimizer.scalars["u_product"]) != 1.0  # where Keras's run left it
    for x, y in batches[4:]:
        model.reset_metrics()
        keras_loss = float(np.asarray(model.train_on_batch(x, y)))
        torch_loss = float(generated.train_step(module, optimizer, torch.from_numpy(x), torch.from_numpy(y)))
        assert abs(keras_loss - torch_loss) < TOLERANCE
    kernel = model.get_layer("dense").kernel.numpy()
    np.testing.assert_allclose(module.dense.weight.detach().numpy(), kernel.T, rtol=0, atol=TOLERANCE)


def test_keras2_training_continues_from_generated_code(tmp_path):
    """A Keras 2 `.h5` with its optimizer state (tf-keras sums a token's Embedding lookups
    before the update) converts to code whose `train_step` goes on as tf-keras's own run did
    (tests/fixtures/keras2/training_expected.npz)."""
    fixtures = Path(__file__).parent / "fixtures" / "keras2"
    batch = 8  # as make_keras2_fixtures.py --training trained it
    notes = []
    graph = cli.convert(fixtures / "training_adam.h5", tmp_path / "m.py", notes=notes)
    assert notes == []
    source = (tmp_path / "m.py").read_text()
    assert "sparse=True" not in source  # Keras 2's steps: a dense Embedding gradient
    generated = _import(tmp_path / "m.py")
    module = getattr(generated, torch_adapter.class_name(graph.name))()
    weights = str(tmp_path / "m.safetensors")
    module.load_state_dict(generated.load(weights), strict=True)
    optimizer = generated.make_optimizer(module, weights)
    expected = np.load(fixtures / "training_expected.npz")
    for first in range(0, len(expected["x"]), batch):
        x, y = expected["x"][first : first + batch], expected["y"][first : first + batch]
        generated.train_step(module, optimizer, torch.from_numpy(x), torch.from_numpy(y))
    assert optimizer.iterations == int(expected["optimizer/iteration:0"])
    np.testing.assert_allclose(
        module.tokens.weight.detach().numpy(), expected["weight/tokens/embeddings:0"], rtol=0, atol=TOLERANCE
    )


def test_layers_that_act_only_in_training_are_named_in_a_note(tmp_path):
    """An augmentation is the identity in torch: a run continued there trains without it, and the
    conversion says so; a Dropout is `nn.Dropout` in the trained code (tests/test_training_layers.py),
    a rate-0 Dropout does nothing anyway."""
    inputs = keras.Input((4, 5, 3))
    x = keras.layers.RandomFlip(name="flip")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.0, name="no_drop")(x)
    x = keras.layers.Dropout(0.25, name="drop")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(x), name="small")
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(np.ones((2, 4, 5, 3), np.float32), np.zeros((2, 2), np.float32))
    path = tmp_path / "small.keras"
    keras_adapter.save_keras_file(model, path)
    notes = []
    cli.convert(path, tmp_path / "small.py", notes=notes)
    assert notes == [
        "training in torch goes on without what 1 layer(s) do only in Keras training, the identity in the "
        "torch module: 'flip' (random in Keras training)"
    ]
    source = (tmp_path / "small.py").read_text()
    assert "def train_step" in source and "self.drop = nn.Dropout(p=0.25)" in source
