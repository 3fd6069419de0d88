"""Layers that act only in training, built to continue a Keras run in torch
(`training_state.training_module`, generated code with `train_step`): in `train()` mode they draw
from the same distribution as Keras's layer called with `training=True` (the draws differ), in
`eval()` they are the identity. Each statistic is measured on a large tensor in both frameworks
and compared with the exact value within a bound of several standard errors.

Measured (torch / Keras, exact value): dropped fraction of Dropout(0.3) 0.3004 / 0.2995 (256,000
draws), of Dropout(0.4, noise_shape=(None, 1, 30)) 0.397 / 0.401, of the spatial dropouts within
0.004 of the rate in torch and 0.005 in Keras (10,240-12,800 channels), StochasticDepth(0.3)
0.302 / 0.310 (4,096 samples); every shared draw all-or-nothing in both; kept values x / (1 - rate)
within 1.2e-7 relative in both. GaussianNoise(0.5): noise mean -0.0019 / -0.0013, std 0.5001 /
0.5003. GaussianDropout(0.3): factor mean 0.9975 / 1.0011, std 0.6548 / 0.6543 (0.6547).
AlphaDropout(0.2): dropped 0.2006 / 0.2003, kept values a * x + b exactly; on N(0, 1) input mean
-0.002 / -0.002, std 0.998 / 0.999.
"""

import numpy as np
import pytest
import torch

from exchange import cli, codegen, keras_adapter, torch_adapter, training_state
from exchange.errors import UnsupportedLayerError
from exchange.kinds.axis_order import to_keras_order

keras = pytest.importorskip("keras")
L = keras.layers

# Each tensor holds thousands of draws (a spatial dropout's: samples x channels): a fraction's
# standard error is at most 0.006, and every bound below is 4 standard errors or more. Both
# frameworks' draws are seeded, so the run is the same each time.
SAMPLES = 256


def _both(layer, shape, low=1.0, high=2.0, seed=0, samples=SAMPLES):
    """(input, torch's train() output, torch's eval() output, Keras's `training=True` output), all
    in Keras layout, for a model `Input(shape) -> layer`; inputs drawn from [low, high)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape)
    model = keras.Model(inputs, layer(inputs))
    x = np.random.default_rng(seed).uniform(low, high, (samples, *shape)).astype(np.float32)
    graph = keras_adapter.architecture_of(model)
    module = training_state.training_module(graph, keras_adapter.get_tensors(model))
    (torch_x,) = torch_adapter.torch_inputs(graph, [x])
    order = to_keras_order(len(shape))
    torch.manual_seed(seed)
    with torch.no_grad():
        trained = module.train()(torch_x).permute(order).numpy()
        evaluated = module.eval()(torch_x).permute(order).numpy()
    keras_out = keras.ops.convert_to_numpy(model.layers[1](x, training=True))
    return x, trained, evaluated, keras_out


def _check_dropped(x, outputs, rate, shared_axes, tolerance=0.025):
    """Each output zeroes a fraction `rate` of the draws (within `tolerance`), one draw shared
    along `shared_axes` (all-or-nothing there) and keeps the rest as x / (1 - rate)."""
    fractions = []
    for out in outputs:
        dropped = out == 0
        per_draw = dropped.mean(axis=shared_axes) if shared_axes else dropped
        assert np.all((per_draw == 0) | (per_draw == 1)), "a draw not shared along its axes"
        fractions.append(float(per_draw.mean()))
        assert abs(fractions[-1] - rate) < tolerance
        np.testing.assert_allclose(out[~dropped], x[~dropped] / (1 - rate), rtol=2.4e-7)
    return fractions


@pytest.mark.parametrize(
    "make, shape, rate, shared_axes, torch_type",
    [
        (lambda: L.Dropout(0.3, seed=1), (1000,), 0.3, (), torch.nn.Dropout),
        (lambda: L.Dropout(0.4, noise_shape=(None, 1, 30)), (11, 30), 0.4, (1,), "KerasDropout"),
        (lambda: L.SpatialDropout1D(0.4), (9, 50), 0.4, (1,), torch.nn.Dropout1d),
        (lambda: L.SpatialDropout2D(0.25), (5, 6, 40), 0.25, (1, 2), torch.nn.Dropout2d),
        (lambda: L.SpatialDropout2D(0.25, data_format="channels_first"), (40, 5, 6), 0.25, (2, 3), "KerasDropout"),
        (lambda: L.SpatialDropout3D(0.5), (3, 4, 5, 40), 0.5, (1, 2, 3), torch.nn.Dropout3d),
        (lambda: L.SpatialDropout3D(0.5, data_format="channels_first"), (40, 3, 4, 5), 0.5, (2, 3, 4), "KerasDropout"),
    ],
)
def test_dropouts_drop_as_keras_does_in_training(make, shape, rate, shared_axes, torch_type):
    """The fraction dropped, the draw shared along Keras's axes (a spatial dropout's whole
    channels), the kept values' scale: as Keras's; eval() is the identity."""
    layer = make()
    x, trained, evaluated, keras_out = _both(layer, shape)
    torch_fraction, keras_fraction = _check_dropped(x, [trained, keras_out], rate, shared_axes)
    assert abs(torch_fraction - keras_fraction) < 0.03
    np.testing.assert_array_equal(evaluated, x)
    graph = keras_adapter.architecture_of(keras.Model(*_io(layer, shape)))
    module = torch_adapter.build_module(graph, training=True)
    (submodule,) = module.children()
    assert type(submodule).__name__ == torch_type if isinstance(torch_type, str) else type(submodule) is torch_type


def _io(layer, shape):
    inputs = keras.Input(shape)
    return inputs, layer(inputs)


def test_stochastic_depth_drops_whole_samples():
    """keras.applications' ConvNeXt StochasticDepth: one draw per sample, kept samples / (1 - rate)."""
    from keras.src.applications.convnext import StochasticDepth

    x, trained, evaluated, keras_out = _both(StochasticDepth(0.3), (5, 4, 6), samples=4096)
    _check_dropped(x, [trained, keras_out], 0.3, (1, 2, 3), tolerance=0.04)
    np.testing.assert_array_equal(evaluated, x)


def test_gaussian_noise_and_dropout_draw_keras_noise():
    """GaussianNoise adds N(0, stddev^2); GaussianDropout multiplies by N(1, rate / (1 - rate))."""
    x, trained, evaluated, keras_out = _both(L.GaussianNoise(0.5), (1000,))
    for out in (trained, keras_out):
        noise = out - x
        assert abs(noise.mean()) < 0.005 and abs(noise.std() - 0.5) < 0.005
    np.testing.assert_array_equal(evaluated, x)
    x, trained, evaluated, keras_out = _both(L.GaussianDropout(0.3), (1000,))
    for out in (trained, keras_out):
        factor = out / x
        assert abs(factor.mean() - 1) < 0.006 and abs(factor.std() - np.sqrt(0.3 / 0.7)) < 0.01
    np.testing.assert_array_equal(evaluated, x)


def test_alpha_dropout_keeps_selu_statistics_as_keras_does():
    """AlphaDropout (nn.AlphaDropout, Keras's formula): dropped values are one constant, kept ones
    `a * x + b`; on N(0, 1) input the output keeps mean 0 and variance 1."""
    rate, alpha_p = 0.2, -1.6732632423543772 * 1.0507009873554805
    a = ((1 - rate) * (1 + rate * alpha_p**2)) ** -0.5
    b = -a * alpha_p * rate
    x, trained, evaluated, keras_out = _both(L.AlphaDropout(rate), (1000,), low=-3, high=3)
    normal = np.random.default_rng(1).standard_normal((SAMPLES, 1000)).astype(np.float32)
    keras.utils.set_random_seed(2)
    for out in (trained, keras_out):
        dropped = np.isclose(out, a * alpha_p + b, rtol=0, atol=1e-6)
        assert abs(dropped.mean() - rate) < 0.005
        np.testing.assert_allclose(out[~dropped], a * x[~dropped] + b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(evaluated, x)
    torch.manual_seed(2)
    torch_out = torch.nn.AlphaDropout(rate).train()(torch.from_numpy(normal)).numpy()
    keras_out = keras.ops.convert_to_numpy(L.AlphaDropout(rate)(normal, training=True))
    for out in (torch_out, keras_out):
        assert abs(out.mean()) < 0.01 and abs(out.std() - 1) < 0.01


def test_training_module_state_dict_and_inference_code_are_unchanged():
    """The training module has the inference module's state_dict; code generated without a
    training state has no dropout (byte-identical files: tests/test_codegen.py's golden files)."""
    inputs = keras.Input((6,))
    x = L.Dense(5, name="hidden")(inputs)
    x = L.GaussianNoise(0.1, name="noise")(L.Dropout(0.3, name="drop")(x))
    model = keras.Model(inputs, L.Dense(2, name="out")(x), name="dropper")
    graph, tensors = keras_adapter.architecture_of(model), keras_adapter.get_tensors(model)
    inference = torch_adapter.model_from_tensors(graph, tensors)
    trained = training_state.training_module(graph, tensors)
    assert inference.state_dict().keys() == trained.state_dict().keys()
    assert isinstance(trained.drop, torch.nn.Dropout) and not hasattr(inference, "drop")
    source = codegen.generate(graph, "dropper.safetensors", "dropper.keras")
    assert "Dropout" not in source and "Noise" not in source
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_allclose(torch_adapter.predict(trained, [x])[0], keras_adapter.predict(model, [x])[0], atol=1e-6)


def test_generated_training_code_drops_and_trains(tmp_path):
    """A compiled `.keras` with a Dropout: the generated `.py` builds `nn.Dropout(p=0.3)`, its
    `train_step` runs (dropping), and in eval mode the module is Keras's inference."""
    inputs = keras.Input((6,))
    x = L.Dropout(0.3, name="drop")(L.Dense(16, activation="relu", name="hidden")(inputs))
    model = keras.Model(inputs, L.Dense(2, name="out")(x), name="dropper")
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    model.train_on_batch(x, y)
    keras_adapter.save_keras_file(model, tmp_path / "dropper.keras")
    notes = []
    cli.convert(tmp_path / "dropper.keras", tmp_path / "dropper.py", notes=notes)
    assert notes == []
    source = (tmp_path / "dropper.py").read_text()
    assert "self.drop = nn.Dropout(p=0.3)" in source
    from test_training_codegen import _import

    generated = _import(tmp_path / "dropper.py")
    module = generated.Dropper()
    weights = str(tmp_path / "dropper.safetensors")
    module.load_state_dict(generated.load(weights), strict=True)
    module.eval()
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), model.predict(x, verbose=0), atol=1e-6)
    optimizer = generated.make_optimizer(module, weights)
    losses = [float(generated.train_step(module, optimizer, torch.from_numpy(x), torch.from_numpy(y)))]
    assert module.training and np.isfinite(losses).all()
    module.train()
    with torch.no_grad():
        assert not torch.equal(module(torch.from_numpy(x)), module(torch.from_numpy(x)))  # it drops


@pytest.mark.parametrize(
    "layer, message",
    [
        (
            L.Dropout(0.3, noise_shape=(None, 2, 5), name="d"),
            "layer 'd' (Dropout): noise_shape (None, 2, 5) does not fit its input (batch, (3, 5)) (each size "
            "None, 1 or the input's): Keras's training fails on it",
        ),
        (
            L.GaussianDropout(1.0, name="g"),
            "layer 'g' (gaussian_dropout): rate 1.0 is not trained: Keras's training divides by 1 - rate",
        ),
        (
            L.AlphaDropout(0.2, noise_shape=(None, 1, 5), name="a"),
            "layer 'a' (AlphaDropout): noise_shape (None, 1, 5) is not trained (torch's AlphaDropout draws per value)",
        ),
    ],
)
def test_dropouts_it_cannot_train_are_refused(layer, message):
    inputs = keras.Input((3, 5))
    graph = keras_adapter.architecture_of(keras.Model(inputs, layer(inputs)))
    torch_adapter.build_module(graph)  # inference: the identity
    with pytest.raises(UnsupportedLayerError) as caught:
        torch_adapter.build_module(graph, training=True)
    assert str(caught.value) == message


def test_activity_regularization_penalty_trains_as_keras(tmp_path):
    """ActivityRegularization's penalty, `(l1 * sum(|x|) + l2 * sum(x^2)) / batch`, is added by the
    generated `train_step` and by `training_state.torch_loss`: no randomness, so Keras's
    `train_on_batch` and torch's steps give the same losses (measured 1.2e-7 apart, the penalty
    0.10 of them) and weights."""
    inputs = keras.Input((6,))
    x = L.Dense(5, activation="tanh", name="hidden")(inputs)
    x = L.ActivityRegularization(l1=0.01, l2=0.05, name="act")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(x), name="penalized")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((8, 6), np.float32), rng.standard_normal((8, 2), np.float32)) for _ in range(4)]
    model.train_on_batch(*batches[0])
    keras_adapter.save_keras_file(model, tmp_path / "penalized.keras")
    notes = []
    graph = cli.convert(tmp_path / "penalized.keras", tmp_path / "penalized.py", notes=notes)
    assert notes == []
    source = (tmp_path / "penalized.py").read_text()
    assert "self.act = KerasActivityRegularization(0.01, 0.05)" in source
    assert "loss = loss_fn(model(x), y) + activity_penalty(model)" in source
    from test_training_codegen import _import

    generated = _import(tmp_path / "penalized.py")
    module, weights = generated.Penalized(), str(tmp_path / "penalized.safetensors")
    module.load_state_dict(generated.load(weights), strict=True)
    optimizer = generated.make_optimizer(module, weights)
    state = training_state.read_keras_training(
        tmp_path / "penalized.keras", graph, training_state.parameter_keys_of(graph)
    )
    fx_module = training_state.training_module(graph, torch_adapter.get_tensors(module))
    fx_optimizer = training_state.torch_optimizer(fx_module, state)
    forward, loss_fn = training_state.torch_loss(fx_module, state)
    differences = []
    for x, y in batches[1:]:
        keras_loss = float(model.train_on_batch(x, y))
        torch_loss = float(generated.train_step(module, optimizer, torch.from_numpy(x), torch.from_numpy(y)))
        fx_module.train()
        fx_optimizer.zero_grad()
        fx_loss = loss_fn(forward(torch.from_numpy(x)), torch.from_numpy(y))
        fx_loss.backward()
        fx_optimizer.step()
        differences.append(max(abs(keras_loss - torch_loss), abs(keras_loss - float(fx_loss.detach()))))
    assert max(differences) < 1e-6
    keras_kernel = keras.ops.convert_to_numpy(model.get_layer("hidden").kernel)
    np.testing.assert_allclose(module.hidden.weight.detach().numpy().T, keras_kernel, atol=1e-6)
    np.testing.assert_allclose(fx_module.hidden.weight.detach().numpy().T, keras_kernel, atol=1e-6)


def test_a_shared_activity_regularization_is_refused_in_training():
    first, second = keras.Input((3,)), keras.Input((3,))
    shared = L.ActivityRegularization(l1=0.1, name="act")
    model = keras.Model([first, second], L.Add()([shared(first), shared(second)]))
    graph = keras_adapter.architecture_of(model)
    torch_adapter.build_module(graph)
    with pytest.raises(UnsupportedLayerError) as caught:
        torch_adapter.build_module(graph, training=True)
    assert str(caught.value).endswith(
        "(ActivityRegularization): a shared layer's penalty is not trained (its torch module keeps one call's)"
    )
