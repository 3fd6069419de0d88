"""Every layer kind in both directions, with real Keras (TensorFlow backend) and real PyTorch.

Each case is a small Keras model around one layer, on non-square sizes (in != out, kh != kw, odd
and even spatial sizes with stride 2), with seeded non-trivial weights and statistics.
- Keras -> torch: the live model's tensors into the torch module; outputs compared.
- torch -> Keras: a random state_dict (as after training in torch) into both the torch module and
  the Keras model built from the graph; outputs compared, and the Keras weights read back give
  the same state_dict bit for bit.
"""

import keras
import numpy as np
import pytest
from kerasmodels import batch, check_both_directions, max_difference, random_torch_state, randomize

from exchange import keras_adapter, torch_adapter

L = keras.layers
# float32 rounding between TensorFlow and PyTorch on these small layers stays near 1e-6.
LAYER_TOLERANCE = 1e-5

IMAGE = (9, 12, 5)  # odd height, even width, channels unlike any filter count
EVEN_IMAGE = (10, 8, 3)
SEQUENCE = (11, 4)


def single(shape, *layers):
    return keras.Sequential([keras.Input(shape)] + list(layers))


def two_branches(merge, shape=IMAGE):
    inputs = keras.Input(shape, name="image")
    left = L.Conv2D(4, (3, 2), padding="same", name="left")(inputs)
    right = L.Conv2D(4, (1, 3), padding="same", activation="tanh", name="right")(inputs)
    return keras.Model(inputs, merge([left, right]))


def normalization():
    layer = L.Normalization(name="norm")
    layer.adapt(np.random.default_rng(5).normal(2.0, 3.0, (64,) + IMAGE).astype(np.float32))
    return single(IMAGE, layer, L.Conv2D(2, 1, name="after"))


def squeeze_excitation():
    inputs = keras.Input(IMAGE, name="image")
    features = L.Conv2D(6, 3, padding="same", name="conv")(inputs)
    weights = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(features)
    weights = L.Conv2D(6, 1, activation="sigmoid", name="excite")(L.Dense(3, activation="relu", name="reduce")(weights))
    return keras.Model(inputs, L.Multiply(name="scale")([features, weights]))


CASES = {
    "dense": lambda: single((13,), L.Dense(6, activation="relu")),
    "dense_rank3": lambda: single((5, 7), L.Dense(4, activation="tanh")),
    "dense_rank4_no_bias": lambda: single((3, 4, 5), L.Dense(6, use_bias=False)),
    "conv2d_valid": lambda: single(IMAGE, L.Conv2D(4, (3, 2))),
    "conv2d_same_stride2": lambda: single(IMAGE, L.Conv2D(6, (3, 4), strides=2, padding="same", activation="relu")),
    "conv2d_same_stride2_even": lambda: single(EVEN_IMAGE, L.Conv2D(5, 3, strides=2, padding="same")),
    "conv2d_dilated": lambda: single(IMAGE, L.Conv2D(3, (3, 2), dilation_rate=(2, 3), padding="same")),
    "conv2d_groups": lambda: single((9, 12, 6), L.Conv2D(9, 3, groups=3)),
    "conv2d_no_bias_strides": lambda: single(IMAGE, L.Conv2D(4, (2, 3), strides=(1, 2), use_bias=False)),
    "conv1d_same_stride2": lambda: single(SEQUENCE, L.Conv1D(5, 3, strides=2, padding="same")),
    "conv1d_causal_dilated": lambda: single(SEQUENCE, L.Conv1D(3, 2, padding="causal", dilation_rate=2)),
    "conv2d_transpose_same": lambda: single((5, 6, 4), L.Conv2DTranspose(3, 3, strides=2, padding="same")),
    "conv2d_transpose_same_even_kernel": lambda: single(
        (5, 6, 4), L.Conv2DTranspose(3, (4, 2), strides=2, padding="same")
    ),
    "conv2d_transpose_valid": lambda: single((5, 6, 4), L.Conv2DTranspose(2, (3, 2), strides=(2, 1))),
    "conv2d_transpose_kernel_below_stride": lambda: single((5, 6, 4), L.Conv2DTranspose(2, 2, strides=3)),
    "depthwise": lambda: single(IMAGE, L.DepthwiseConv2D((3, 2), depth_multiplier=2, strides=2, padding="same")),
    "separable": lambda: single(IMAGE, L.SeparableConv2D(7, 3, depth_multiplier=2, padding="same")),
    "separable_valid_stride2": lambda: single(EVEN_IMAGE, L.SeparableConv2D(4, (3, 2), strides=2, use_bias=False)),
    "batch_norm_image": lambda: single(IMAGE, L.BatchNormalization(epsilon=1.001e-5, momentum=0.9)),
    "batch_norm_no_center": lambda: single(IMAGE, L.BatchNormalization(center=False)),
    "batch_norm_no_scale": lambda: single((13,), L.BatchNormalization(scale=False)),
    "batch_norm_neither": lambda: single(SEQUENCE, L.BatchNormalization(center=False, scale=False)),
    "max_pool_same_stride2": lambda: single(IMAGE, L.MaxPooling2D(3, strides=2, padding="same")),
    "max_pool_valid": lambda: single(IMAGE, L.MaxPooling2D((2, 3))),
    "avg_pool_same_stride2": lambda: single(IMAGE, L.AveragePooling2D(3, strides=2, padding="same")),
    "avg_pool_same_even": lambda: single(EVEN_IMAGE, L.AveragePooling2D(2, strides=1, padding="same")),
    "avg_pool_same_symmetric": lambda: single(IMAGE, L.AveragePooling2D(3, strides=1, padding="same")),
    "avg_pool_valid": lambda: single(IMAGE, L.AveragePooling2D((3, 2), strides=(2, 1))),
    "pool1d": lambda: single(
        SEQUENCE, L.MaxPooling1D(3, strides=2, padding="same"), L.AveragePooling1D(2, padding="same")
    ),
    "global_pools": lambda: single(
        IMAGE, L.Conv2D(4, 3), L.GlobalAveragePooling2D(keepdims=True), L.Conv2D(3, 1), L.GlobalMaxPooling2D()
    ),
    "global_pools_1d": lambda: single(
        SEQUENCE, L.GlobalAveragePooling1D(keepdims=True), L.Conv1D(2, 1), L.GlobalMaxPooling1D()
    ),
    "zero_padding_and_cropping": lambda: single(
        IMAGE, L.ZeroPadding2D(((1, 2), (0, 3))), L.Conv2D(3, 2), L.Cropping2D(((1, 0), (2, 1)))
    ),
    "flatten_into_dense": lambda: single(
        IMAGE, L.Conv2D(3, 2), L.Flatten(), L.Dropout(0.5), L.Activation("relu"), L.Dense(7)
    ),
    "flatten_as_output": lambda: single(IMAGE, L.Conv2D(3, 2), L.Flatten()),
    "reshape": lambda: single(IMAGE, L.Reshape((12, 45)), L.Conv1D(3, 2), L.Reshape((-1,)), L.Dense(2)),
    "dropouts": lambda: single(IMAGE, L.SpatialDropout2D(0.3), L.Dropout(0.2), L.Conv2D(2, 1)),
    "activations": lambda: single(
        (13,),
        *[
            L.Dense(6, activation=name)
            for name in (
                "linear",
                "relu",
                "relu6",
                "tanh",
                "sigmoid",
                "hard_sigmoid",
                "silu",
                "gelu",
                "elu",
                "selu",
                "softplus",
                "softsign",
                "softmax",
            )
        ],
    ),
    "swish_and_softmax_on_images": lambda: single(IMAGE, L.Conv2D(4, 1, activation="swish"), L.Activation("softmax")),
    "relu_options": lambda: single(
        (13,),
        L.Dense(8),
        L.ReLU(max_value=6.0),
        L.Dense(8),
        L.ReLU(max_value=2.5, negative_slope=0.1, threshold=0.5),
        L.Dense(8),
        L.LeakyReLU(negative_slope=0.2),
        L.Dense(8),
        L.ELU(alpha=0.5),
    ),
    "softmax_axes": lambda: single(IMAGE, L.Softmax(axis=-1), L.Softmax(axis=2)),
    "add": lambda: two_branches(L.Add()),
    "subtract": lambda: two_branches(L.Subtract()),
    "multiply": lambda: two_branches(L.Multiply()),
    "average": lambda: two_branches(L.Average()),
    "maximum_minimum": lambda: two_branches(lambda x: L.Minimum()([L.Maximum()(x), x[0]])),
    "concatenate_channels": lambda: two_branches(L.Concatenate()),
    "concatenate_width": lambda: two_branches(L.Concatenate(axis=2)),
    "rescaling": lambda: single(IMAGE, L.Rescaling(1 / 255.0, offset=-0.5), L.Conv2D(2, 1)),
    "normalization": normalization,
    "normalization_constants": lambda: single(
        IMAGE, L.Normalization(mean=[0.1, 0.2, 0.3, 0.4, 0.5], variance=[1.0, 2.0, 0.5, 0.25, 4.0])
    ),
    "rescaling_per_channel": lambda: single(
        IMAGE, L.Rescaling([0.5, 1.0, 2.0, 3.0, 4.0], offset=[0.1, 0.0, -0.1, 0.2, 0.3])
    ),
    "squeeze_excitation_broadcast": squeeze_excitation,
    "layer_norm_features": lambda: single((13,), L.LayerNormalization(epsilon=1e-5), L.Dense(4)),
    "layer_norm_image_no_center": lambda: single(IMAGE, L.LayerNormalization(center=False)),
    "layer_norm_sequence_no_scale": lambda: single(SEQUENCE, L.LayerNormalization(scale=False)),
    "group_norm": lambda: single((9, 12, 6), L.GroupNormalization(groups=3, epsilon=1e-4)),
    "group_norm_no_center": lambda: single((9, 12, 6), L.GroupNormalization(groups=2, center=False)),
    "unit_norm": lambda: single(IMAGE, L.UnitNormalization(), L.Conv2D(3, 1), L.UnitNormalization(axis=2)),
    "embedding_conv1d_text_classifier": lambda: keras.Sequential(
        [
            keras.Input((13,), dtype="int32"),
            L.Embedding(11, 6),
            L.Conv1D(5, 3, padding="same", activation="relu"),
            L.GlobalMaxPooling1D(),
            L.Dense(3, activation="softmax"),
        ]
    ),
    "embedding_permute": lambda: keras.Sequential(
        [keras.Input((13,), dtype="int64"), L.Embedding(9, 4), L.Permute((2, 1)), L.Dense(5)]
    ),
    "permute_image": lambda: single(IMAGE, L.Permute((3, 1, 2)), L.Conv2D(2, 1)),
    "repeat_vector": lambda: single((5,), L.Dense(4), L.RepeatVector(3), L.Conv1D(2, 2)),
    # a per-element Rescaling ties the flat order: the Flatten must give Keras's order
    "flatten_rescaling_per_element_dense": lambda: single(
        (2, 3, 2), L.Flatten(), L.Rescaling([float(v) for v in range(1, 13)]), L.Dense(2)
    ),
    "names_that_are_not_python": lambda: names_that_are_not_python(),
}


def names_that_are_not_python():
    """Input and layer names that are keywords, torch.nn.Module attributes or invalid identifiers."""
    inputs = keras.Input((6, 5, 3), name="1st")
    x = L.Conv2D(4, 3, padding="same", name="self")(inputs)
    x = L.Conv2D(4, 1, name="F")(x)
    x = L.ReLU(name="class")(x)
    x = L.Flatten(name="torch")(x)
    x = L.Dense(3, name="compile")(x)
    return keras.Model(inputs, L.Dense(2, name="zero_grad")(x))


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_kind_both_directions(case):
    keras.utils.set_random_seed(11)
    check_both_directions(randomize(CASES[case](), seed=3), tolerance=LAYER_TOLERANCE)


def test_keras_layout_wrapper_is_a_drop_in_for_the_keras_model():
    keras.utils.set_random_seed(2)
    keras_model = randomize(CASES["conv2d_same_stride2"](), seed=1)
    graph = keras_adapter.architecture_of(keras_model)
    module = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(keras_model), keras_layout=True)
    import torch

    (inputs,) = batch(keras_model)
    with torch.no_grad():
        outputs = module(torch.from_numpy(inputs)).numpy()
    assert outputs.shape == (len(inputs), 5, 6, 6)
    assert max_difference([outputs], keras_adapter.predict(keras_model, [inputs])) <= LAYER_TOLERANCE


def test_torch_module_is_trainable():
    """Gradients reach every parameter of a converted model: it can be fine-tuned in PyTorch."""
    import torch

    keras.utils.set_random_seed(2)
    keras_model = randomize(CASES["flatten_into_dense"](), seed=1)
    graph = keras_adapter.architecture_of(keras_model)
    module = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(keras_model)).train()
    loss = module(torch.rand(4, 5, 9, 12)).square().mean()
    loss.backward()
    assert all(
        parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0
        for parameter in module.parameters()
    )
    assert "conv2d" in module.code and "torch.flatten" in module.code


def test_batch_norm_constant_that_keras_cannot_hold_is_refused():
    keras.utils.set_random_seed(2)
    graph = keras_adapter.architecture_of(CASES["batch_norm_no_center"]())
    state = random_torch_state(graph, seed=1)
    key = next(key for key in state if key.endswith(".bias"))
    state[key] = state[key] + 0.5
    from exchange.errors import ExchangeError

    with pytest.raises(ExchangeError, match=f"{key} must be 0.0 everywhere to go back to Keras"):
        keras_adapter.model_from_tensors(graph, state)


@pytest.mark.parametrize(
    "make_layer, message",
    [
        (lambda: L.Dense(3, activation="log_sigmoid"), "unsupported option activation='log_sigmoid'"),
        (lambda: L.Softmax(axis=0), "'bad' \\(softmax\\): axis 0 is not a feature axis: a softmax over the batch axis"),
        (lambda: L.SimpleRNN(3, activation="log_sigmoid"), "'bad' \\(SimpleRNN\\): unsupported option activation"),
    ],
)
def test_unsupported_options_are_named(make_layer, message):
    from exchange.errors import UnsupportedLayerError

    layer = make_layer()
    layer.name = "bad"
    shape = (7, 6) if "RNN" in type(layer).__name__ else (7, 6, 3)
    model = keras.Sequential([keras.Input(shape), layer])
    with pytest.raises(UnsupportedLayerError, match=message):
        keras_adapter.architecture_of(model)


def test_all_problems_of_a_model_in_one_error():
    from exchange.errors import UnsupportedLayerError

    model = keras.Sequential(
        [
            keras.Input((7, 6)),
            L.SimpleRNN(3, return_sequences=True, activation="log_sigmoid", name="first"),
            L.Dense(2, activation="log_sigmoid", name="second"),
            L.GRU(2, recurrent_activation="log_sigmoid", name="third"),
        ]
    )
    with pytest.raises(UnsupportedLayerError) as caught:
        keras_adapter.architecture_of(model)
    message = str(caught.value)
    assert "'first' (SimpleRNN)" in message and "'second' (Dense)" in message and "'third' (GRU)" in message


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-2), ("float64", 1e-12)])
def test_weights_keep_their_dtype_through_every_direction(dtype, tolerance, tmp_path):
    """A float16 or float64 Keras model: the file, the torch module and the rebuilt Keras model
    keep the dtype; outputs agree within that dtype's rounding."""
    import torch

    from exchange import cli, fileformat

    keras.utils.set_random_seed(6)
    inputs = keras.Input(IMAGE, dtype=dtype, name="image")
    x = L.Conv2D(4, 3, strides=2, padding="same", dtype=dtype, name="conv")(inputs)
    x = L.BatchNormalization(dtype=dtype, name="bn")(x)
    x = L.GlobalAveragePooling2D(dtype=dtype, name="gap")(x)
    model = randomize(keras.Model(inputs, L.Dense(3, dtype=dtype, name="out")(x)), seed=2)
    model.save(tmp_path / "typed.keras")
    cli.convert(tmp_path / "typed.keras", tmp_path / "typed.safetensors")
    exchange_file = fileformat.load(tmp_path / "typed.safetensors")
    assert {key: tensor.dtype.name for key, tensor in exchange_file.tensors.items()} == {
        key: "int64" if key.endswith("num_batches_tracked") else dtype for key in exchange_file.tensors
    }
    torch_model = torch_adapter.model_from_file(tmp_path / "typed.safetensors")
    assert {parameter.dtype for parameter in torch_model.parameters()} == {getattr(torch, dtype)}
    (image,) = batch(model)
    keras_outputs = keras_adapter.predict(model, [image.astype(dtype)])
    assert max_difference(keras_outputs, torch_adapter.predict(torch_model, [image.astype(dtype)])) <= tolerance
    cli.convert(tmp_path / "typed.safetensors", tmp_path / "rebuilt.keras")
    cli.convert(tmp_path / "rebuilt.keras", tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "typed.safetensors").read_bytes()


def test_keras2_depthwise_kernel_name_is_claimed():
    """Keras 2 calls DepthwiseConv2D's kernel `depthwise_kernel` (Keras 3: `kernel`)."""
    from exchange import weight_layout

    keras.utils.set_random_seed(3)
    model = randomize(single(IMAGE, L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")), seed=1)
    graph = keras_adapter.architecture_of(model)
    kernel, bias = (np.asarray(v.numpy()) for v in model.get_layer("dw").weights)
    from_keras2 = weight_layout.keras_to_file(graph, {"dw": [("depthwise_kernel", kernel), ("bias", bias)]})
    for key, tensor in keras_adapter.get_tensors(model).items():
        np.testing.assert_array_equal(from_keras2[key], tensor)


def test_keras3_h5_keeps_keras3_meanings(tmp_path):
    """A Keras 3 full-model `.h5` (legacy format) is read as Keras 3: hard_sigmoid is relu6(x+3)/6."""
    from exchange import cli

    keras.utils.set_random_seed(3)
    model = randomize(single((6,), L.Dense(4), L.Dense(3, activation="hard_sigmoid")), seed=1)
    model.save(tmp_path / "legacy.h5")
    cli.convert(tmp_path / "legacy.h5", tmp_path / "legacy.safetensors")
    torch_model = torch_adapter.model_from_file(tmp_path / "legacy.safetensors")
    inputs = [np.random.default_rng(0).normal(0, 3, (16, 6)).astype(np.float32)]
    assert max_difference(keras_adapter.predict(model, inputs), torch_adapter.predict(torch_model, inputs)) <= 1e-6


def test_generated_code_of_every_helper_module(tmp_path):
    """TF-style average pooling, separable convolution, Normalization, per-channel Rescaling,
    ReLU options and odd names: the generated file runs and matches Keras."""
    import importlib.util

    import torch

    from exchange import cli

    keras.utils.set_random_seed(5)
    norm = L.Normalization(name="norm")
    norm.adapt(np.random.default_rng(1).normal(1.0, 2.0, (32,) + IMAGE).astype(np.float32))
    inputs = keras.Input(IMAGE, name="1st")
    x = L.Rescaling([0.5, 1.0, 2.0, 3.0, 4.0], offset=0.1, name="scale")(norm(inputs))
    x = L.AveragePooling2D(3, strides=2, padding="same", name="pool")(x)
    x = L.SeparableConv2D(4, 3, padding="same", name="self")(x)
    x = L.ReLU(max_value=2.5, negative_slope=0.1, threshold=0.5, name="class")(x)
    model = randomize(keras.Model(inputs, L.GlobalAveragePooling2D(name="gap")(x), name="helpers"), seed=2)
    model.save(tmp_path / "helpers.keras")
    cli.convert(tmp_path / "helpers.keras", tmp_path / "helpers.py")
    spec = importlib.util.spec_from_file_location("generated_helpers", tmp_path / "helpers.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = generated.Helpers()
    module.load_state_dict(generated.load(str(tmp_path / "helpers.safetensors")), strict=True)
    (image,) = batch(model)
    with torch.no_grad():
        outputs = module.eval()(torch.from_numpy(image).permute(0, 3, 1, 2)).numpy()
    assert max_difference([outputs], keras_adapter.predict(model, [image])) <= LAYER_TOLERANCE
