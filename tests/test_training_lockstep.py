"""Continuing a Keras run in PyTorch: the models of `frameworks.resume_lockstep` (a CNN: Conv2D with
an L2 regularizer, BatchNormalization, Dense, Adam under ExponentialDecay; an LSTM text model:
Embedding, LSTM, Dense under centered RMSprop with momentum and PiecewiseConstantDecay) trained 5
steps in Keras, saved, converted with their optimizer state, then 200 more steps in both
frameworks."""

import numpy as np
import pytest
import torch

from exchange import optimizers
from frameworks import resume_lockstep

keras = pytest.importorskip("keras")

# Measured after 200 steps: CNN weights 1.2e-7 apart, optimizer slots 3.0e-8; text LSTM 4.2e-7
# and 1.1e-8 (float32 rounding).
LOCKSTEP_TOLERANCE = 1e-5
# Each of torch's own conventions in place of Keras's moves some weight by more than this.
NAIVE_DRIFT = 1e-3


def test_cnn_continues_in_torch_and_back_in_keras_in_lockstep():
    """200 steps on: the first 100 Keras -> torch, then Keras resumed from torch's state."""
    result = resume_lockstep.run(keras_steps=5, torch_steps=200, every=50, back_to_keras_at=100)
    assert result["iterations"] == (205, 205)
    assert max(difference for _, difference in result["weight_differences"]) < LOCKSTEP_TOLERANCE
    assert result["max_slot_difference"] < LOCKSTEP_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_kind, back_to_keras_at",
    [("cnn", None), ("lstm", None), ("lstm", 100)],
    ids=["cnn-keras-to-torch", "lstm-keras-to-torch", "lstm-and-back-at-100"],
)
def test_runs_continue_in_lockstep_for_200_steps(model_kind, back_to_keras_at):
    result = resume_lockstep.run(
        keras_steps=5, torch_steps=200, every=50, model_kind=model_kind, back_to_keras_at=back_to_keras_at
    )
    assert result["iterations"] == (205, 205)
    assert max(difference for _, difference in result["weight_differences"]) < LOCKSTEP_TOLERANCE
    assert result["max_slot_difference"] < LOCKSTEP_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_kind, variant",
    [
        ("cnn", "torch_adam"),
        ("cnn", "torch_batch_norm"),
        ("cnn", "no_regularizer"),
        ("lstm", "torch_rmsprop"),
        ("lstm", "summed_lookups"),
    ],
)
def test_torch_conventions_drift_from_keras(model_kind, variant):
    """torch's Adam or RMSprop (given Keras's hyperparameters and state), torch's BatchNorm
    (unbiased running variance), the loss without Keras's regularization penalty, or the
    Embedding's dense gradient (a token's lookups summed before RMSprop squares them): the runs
    drift apart."""
    result = resume_lockstep.run(keras_steps=5, torch_steps=200, variant=variant, model_kind=model_kind)
    assert result["weight_difference"] > NAIVE_DRIFT


def test_keras_batch_norm_moves_statistics_as_keras():
    """One training step of a BatchNormalization: Keras's moving variance uses the biased batch
    variance; `KerasBatchNorm` does too, torch's BatchNorm2d the unbiased one."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(3, 2, 3, 4)).astype(np.float32)  # n = 18 values per channel
    layer = keras.layers.BatchNormalization(momentum=0.5, epsilon=1e-3)
    keras_output = layer(x, training=True).numpy()
    torch_norm = torch.nn.BatchNorm2d(4, momentum=0.5, eps=1e-3)
    naive_variance = (torch_norm(torch.from_numpy(x).permute(0, 3, 1, 2)), torch_norm.running_var.detach().numpy())[1]
    ported = optimizers.use_keras_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(4, momentum=0.5, eps=1e-3)))
    ported_output = ported(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(ported_output, keras_output, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ported[0].running_var.numpy(), layer.moving_variance.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ported[0].running_mean.numpy(), layer.moving_mean.numpy(), rtol=0, atol=1e-6)
    assert np.max(np.abs(naive_variance - layer.moving_variance.numpy())) > NAIVE_DRIFT


def test_regularization_penalty_is_keras_regularization_loss():
    inputs = keras.Input((3,))
    layer = keras.layers.Dense(
        2,
        kernel_regularizer=keras.regularizers.L1L2(0.01, 0.02),
        bias_regularizer=keras.regularizers.L2(0.5),
        bias_initializer="ones",
    )
    model = keras.Model(inputs, layer(inputs))
    keras_penalty = float(sum(loss.numpy() for loss in model.losses))
    module = torch.nn.Module()
    module.dense = torch.nn.Linear(3, 2)
    with torch.no_grad():
        module.dense.weight.copy_(torch.from_numpy(layer.kernel.numpy().T))
        module.dense.bias.copy_(torch.from_numpy(layer.bias.numpy()))
    penalty = optimizers.regularization_penalty(
        module, {"dense.weight": {"l1": 0.01, "l2": 0.02}, "dense.bias": {"l2": 0.5}}
    )
    assert float(penalty.detach()) == pytest.approx(keras_penalty, rel=1e-6)


def test_resumed_runs_plot(tmp_path):
    from frameworks import plots

    results = [
        {"model": "cnn", "variant": "ported", "weight_differences": [(10, 1e-7), (20, 1.2e-7)]},
        {"model": "cnn", "variant": "torch_adam", "weight_differences": [(10, 1e-3), (20, 7e-3)]},
        {"model": "lstm", "variant": "ported", "weight_differences": [(10, 2e-7), (20, 3e-7)]},
    ]
    path = plots.plot_resumed_runs(results, tmp_path / "resumed.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
