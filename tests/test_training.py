"""Training with the seed recipe in both frameworks, on real MNIST."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from support import ROOT, random_file_tensors

from exchange import fileformat, keras_adapter, torch_adapter
from frameworks import keras_mlp, torch_mlp, train_job
from frameworks.recipe import SEED_ARCHITECTURE, Recipe

OUTPUT_TOLERANCE = 1e-6  # float32 rounding between TensorFlow and PyTorch, as elsewhere
LOSS_RELATIVE_TOLERANCE = 1e-5


def test_main_job_two_epochs_improves_both_frameworks(mnist, tmp_path):
    out_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), "--epochs", "2", "--no-lockstep", "--out-dir", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MNIST_DIR": os.environ["MNIST_DIR"]},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for role, inputs, biases in (("Input", 784, 50), ("Hidden", 50, 50), ("Output", 50, 10)):
        assert lines.count(f"Number of Input Values for {role} layer is: {inputs}") == 2
        assert lines.count(f"Number of Biases for {role} layer is: {biases}") == 2
    assert lines.count("Total parameters of the model: 42,310") == 2

    report = json.loads((out_dir / "report.json").read_text())
    assert report["lockstep"] is False
    initial_model = torch_adapter.model_from_file(out_dir / "initial.safetensors")
    initial_accuracy = train_job.accuracy(torch_mlp.predict(initial_model, mnist.x_test), mnist.y_test)
    for name in ("keras", "torch"):
        summary = report["frameworks"][name]
        assert summary["parameters"] == 42_310
        history = summary["history"]
        assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
        assert history[1]["val_accuracy"] > history[0]["val_accuracy"]
        assert summary["test_accuracy"] > initial_accuracy + 0.2, (name, initial_accuracy)
        assert fileformat.load(out_dir / f"{name}.safetensors").source_framework == name
    for direction in ("keras_to_torch", "torch_to_keras"):
        assert report["cross_load"][direction]["max_abs_diff"] <= OUTPUT_TOLERANCE
        assert report["cross_load"][direction]["argmax_agreement"] == 1.0


@pytest.mark.parametrize("scale", [0.2, 30.0], ids=["ordinary", "saturated-softmax"])
def test_torch_loss_is_keras_categorical_crossentropy(mnist, scale):
    """Same weights, same batch: Keras's loss value and PyTorch's agree, even where the softmax
    saturates (probabilities below 1e-7, where clipping would change the value)."""
    tensors = {
        key: value * np.float32(scale / 0.2) for key, value in random_file_tensors(SEED_ARCHITECTURE, seed=5).items()
    }
    keras_model = keras_mlp.build_keras_model(SEED_ARCHITECTURE)
    keras_adapter.set_tensors(keras_model, tensors)
    keras_mlp.compile_with_recipe(keras_model, Recipe())
    x, y = mnist.x_test[:300], mnist.y_test[:300]
    keras_loss = keras_model.evaluate(x, y, batch_size=300, verbose=0, return_dict=True)["loss"]
    torch_model = torch_mlp.TorchMLP(SEED_ARCHITECTURE)
    torch_adapter.set_tensors(torch_model, tensors)
    with torch.no_grad():
        torch_loss = float(
            torch_mlp.keras_categorical_crossentropy(torch_model, torch.from_numpy(x), torch.from_numpy(y))
        )
    assert torch_loss == pytest.approx(keras_loss, rel=LOSS_RELATIVE_TOLERANCE)
    if scale > 1:
        probabilities = torch_mlp.predict(torch_model, x)
        assert (probabilities[y.astype(bool)] < 1e-7).any(), "the case must exercise saturation"


def test_keras_sgd_matches_keras_optimizer_over_decayed_steps():
    """Five updates with a large decay, so that lr_t changes visibly: identical to Keras's SGD."""
    recipe = Recipe(learning_rate=0.1, decay=0.5, momentum=0.9)
    import keras

    start = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    keras_variable = keras.Variable(start)
    keras_optimizer = keras.optimizers.SGD(
        learning_rate=keras.optimizers.schedules.InverseTimeDecay(0.1, 1, 0.5), momentum=0.9
    )
    torch_parameter = torch.nn.Parameter(torch.from_numpy(start.copy()))
    torch_optimizer = torch_mlp.KerasSGD([torch_parameter], recipe)
    for step in range(5):
        gradient = np.full((3, 4), step + 1.0, dtype=np.float32) * start
        keras_optimizer.apply_gradients([(keras.ops.convert_to_tensor(gradient), keras_variable)])
        torch_parameter.grad = torch.from_numpy(gradient)
        torch_optimizer.step()
    np.testing.assert_allclose(torch_parameter.detach().numpy(), keras_variable.numpy(), rtol=0, atol=1e-7)
    plain = torch.nn.Parameter(torch.from_numpy(start.copy()))
    plain_optimizer = torch.optim.SGD([plain], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(plain_optimizer, lambda t: 1 / (1 + 0.5 * t))
    for step in range(5):
        plain.grad = torch.from_numpy(np.full((3, 4), step + 1.0, dtype=np.float32) * start)
        plain_optimizer.step()
        scheduler.step()
    assert np.max(np.abs(plain.detach().numpy() - keras_variable.numpy())) > 1e-3, (
        "PyTorch's own SGD form differs under decay; KerasSGD exists for that reason"
    )
