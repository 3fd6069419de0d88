"""Convolutions and poolings over 1, 2 and 3 spatial axes, channels_last and channels_first, and
the refusal of quantized layers: each case in both directions, and through generated code.

Each case is a small real Keras model (TensorFlow backend) with seeded weights, on non-square
sizes with odd and even spatial sizes:
- Keras -> torch: the live model's tensors into the torch module; outputs compared.
- torch -> Keras: a random state_dict into the torch module and the Keras model built from the
  graph; outputs compared, and the Keras weights read back give the state_dict bit for bit.
- the model saved as `.keras`, converted to generated PyTorch code: the code runs and matches.
"""

import importlib.util

import keras
import numpy as np
import pytest
from kerasmodels import batch, check_both_directions, max_difference, random_torch_state, randomize

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import ExchangeError, UnsupportedLayerError

L = keras.layers
LAYER_TOLERANCE = 1e-5


def single(shape, *layers):
    return keras.Sequential([keras.Input(shape)] + list(layers))


def relative_difference(first, second) -> float:
    """Max difference, relative to the output's scale where that is above 1."""
    scale = max(1.0, max(float(np.max(np.abs(output))) for output in second))
    return max_difference(first, second) / scale


VOLUME = (5, 6, 7, 3)  # odd, even, odd depth/height/width; 3 channels
IMAGE = (9, 12, 5)
SEQUENCE = (11, 4)
CF_IMAGE = (5, 9, 12)  # channels_first: (C, H, W)
CF_VOLUME = (3, 5, 6, 7)
CF_SEQUENCE = (4, 11)


def channels_first_chain():
    """channels_first layers one after the other: permutes at the chain's ends only."""
    return single(
        CF_IMAGE,
        L.Conv2D(6, (3, 2), padding="same", strides=2, data_format="channels_first"),
        L.MaxPooling2D(2, padding="same", data_format="channels_first"),
        L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", data_format="channels_first"),
        L.Conv2DTranspose(3, 3, strides=2, padding="same", data_format="channels_first"),
        L.AveragePooling2D(3, strides=2, padding="same", data_format="channels_first"),
        L.GlobalAveragePooling2D(keepdims=True, data_format="channels_first"),
    )


def channels_first_masked_average():
    """GlobalAveragePooling1D over the steps (the last axis) of a channels_first (C, T) sequence,
    with a mask (T,) given as an input."""
    steps = keras.Input(CF_SEQUENCE, name="x")
    mask = keras.Input(CF_SEQUENCE[1:], dtype="int32", name="m")
    pooled = L.GlobalAveragePooling1D(keepdims=True, data_format="channels_first", name="gap")(steps, mask=mask)
    return keras.Model([steps, mask], L.Conv1D(2, 1, data_format="channels_first", name="after")(pooled))


CASES = {
    # Conv3D
    "conv3d_valid": lambda: single(VOLUME, L.Conv3D(4, (3, 2, 3))),
    "conv3d_same_stride2": lambda: single(VOLUME, L.Conv3D(5, (3, 4, 2), strides=2, padding="same", activation="relu")),
    "conv3d_dilated_no_bias": lambda: single(
        VOLUME, L.Conv3D(2, 2, dilation_rate=(1, 2, 3), padding="same", use_bias=False)
    ),
    "conv3d_groups": lambda: single((5, 6, 7, 4), L.Conv3D(6, (2, 3, 2), groups=2)),
    # transposed convolutions
    "conv1d_transpose_same": lambda: single(SEQUENCE, L.Conv1DTranspose(3, 3, strides=2, padding="same")),
    "conv1d_transpose_valid_even_kernel": lambda: single(SEQUENCE, L.Conv1DTranspose(3, 4, strides=3)),
    "conv1d_transpose_output_padding": lambda: single(SEQUENCE, L.Conv1DTranspose(2, 3, strides=3, output_padding=2)),
    "conv2d_transpose_same_output_padding": lambda: single(
        (5, 6, 4), L.Conv2DTranspose(3, (3, 4), strides=(2, 3), padding="same", output_padding=(1, 2))
    ),
    "conv2d_transpose_valid_output_padding": lambda: single(
        (5, 6, 4), L.Conv2DTranspose(2, (3, 2), strides=(2, 3), output_padding=(1, 2))
    ),
    "conv2d_transpose_same_even_kernel_output_padding": lambda: single(
        (5, 6, 4), L.Conv2DTranspose(2, 4, strides=3, padding="same", output_padding=2)
    ),
    "conv2d_transpose_dilated_same": lambda: single(
        (5, 6, 4), L.Conv2DTranspose(3, (3, 2), dilation_rate=(2, 3), padding="same")
    ),
    "conv2d_transpose_kernel_below_stride_same": lambda: single(
        (5, 6, 4), L.Conv2DTranspose(3, (1, 2), strides=3, padding="same")
    ),
    "conv1d_transpose_dilated_same": lambda: single((7, 4), L.Conv1DTranspose(3, 4, dilation_rate=2, padding="same")),
    "conv3d_transpose_same": lambda: single(
        (3, 4, 5, 2), L.Conv3DTranspose(3, (3, 2, 4), strides=2, padding="same", activation="tanh")
    ),
    "conv3d_transpose_valid_output_padding": lambda: single(
        (3, 4, 5, 2), L.Conv3DTranspose(2, 2, strides=(2, 3, 1), output_padding=(1, 2, 0))
    ),
    # depthwise and separable
    "depthwise1d": lambda: single(SEQUENCE, L.DepthwiseConv1D(3, depth_multiplier=2, strides=2, padding="same")),
    "depthwise1d_dilated": lambda: single(SEQUENCE, L.DepthwiseConv1D(2, dilation_rate=3, use_bias=False)),
    "separable1d": lambda: single(
        SEQUENCE, L.SeparableConv1D(5, 3, depth_multiplier=2, padding="same", activation="relu")
    ),
    "separable1d_valid_stride2": lambda: single((12, 3), L.SeparableConv1D(4, 4, strides=2, use_bias=False)),
    # 3-D pooling
    "max_pool3d_same": lambda: single(VOLUME, L.MaxPooling3D(3, strides=2, padding="same")),
    "max_pool3d_valid": lambda: single(VOLUME, L.MaxPooling3D((2, 3, 2))),
    "avg_pool3d_same_asymmetric": lambda: single(VOLUME, L.AveragePooling3D(2, strides=(1, 2, 1), padding="same")),
    "avg_pool3d_same_symmetric": lambda: single(VOLUME, L.AveragePooling3D(3, strides=1, padding="same")),
    "avg_pool3d_valid": lambda: single(VOLUME, L.AveragePooling3D((2, 2, 3), strides=(1, 2, 2))),
    "global_avg_pool3d": lambda: single(VOLUME, L.GlobalAveragePooling3D()),
    "global_max_pool3d_keepdims": lambda: single(VOLUME, L.GlobalMaxPooling3D(keepdims=True), L.Conv3D(2, 1)),
    # adaptive pooling
    "adaptive_avg1d_down": lambda: single(SEQUENCE, L.AdaptiveAveragePooling1D(4)),
    "adaptive_max1d_up": lambda: single((3, 4), L.AdaptiveMaxPooling1D(5)),
    "adaptive_avg2d": lambda: single(IMAGE, L.AdaptiveAveragePooling2D((4, 5))),
    "adaptive_max2d": lambda: single(IMAGE, L.AdaptiveMaxPooling2D((2, 7))),
    "adaptive_avg3d": lambda: single(VOLUME, L.AdaptiveAveragePooling3D((2, 4, 3))),
    "adaptive_max3d": lambda: single(VOLUME, L.AdaptiveMaxPooling3D((3, 2, 5))),
    # channels_first
    "cf_conv1d_causal": lambda: single(
        CF_SEQUENCE, L.Conv1D(3, 2, padding="causal", dilation_rate=2, data_format="channels_first")
    ),
    "cf_conv2d_same_stride2": lambda: single(
        CF_IMAGE, L.Conv2D(6, (3, 4), strides=2, padding="same", data_format="channels_first")
    ),
    "cf_conv3d": lambda: single(CF_VOLUME, L.Conv3D(4, (2, 3, 2), padding="same", data_format="channels_first")),
    "cf_conv2d_transpose": lambda: single(
        (4, 5, 6), L.Conv2DTranspose(3, (3, 4), strides=2, padding="same", data_format="channels_first")
    ),
    "cf_depthwise2d": lambda: single(
        CF_IMAGE, L.DepthwiseConv2D((3, 2), depth_multiplier=2, strides=2, padding="same", data_format="channels_first")
    ),
    "cf_separable2d": lambda: single(CF_IMAGE, L.SeparableConv2D(4, 3, padding="same", data_format="channels_first")),
    "cf_max_pool2d": lambda: single(
        CF_IMAGE, L.MaxPooling2D(3, strides=2, padding="same", data_format="channels_first")
    ),
    "cf_avg_pool1d": lambda: single(CF_SEQUENCE, L.AveragePooling1D(2, padding="same", data_format="channels_first")),
    "cf_avg_pool3d": lambda: single(CF_VOLUME, L.AveragePooling3D(2, padding="same", data_format="channels_first")),
    "cf_global_avg_pool2d": lambda: single(CF_IMAGE, L.GlobalAveragePooling2D(data_format="channels_first")),
    "cf_global_max_pool3d_keepdims": lambda: single(
        CF_VOLUME, L.GlobalMaxPooling3D(keepdims=True, data_format="channels_first")
    ),
    "cf_global_avg_pool1d_keepdims": lambda: single(
        CF_SEQUENCE, L.GlobalAveragePooling1D(keepdims=True, data_format="channels_first")
    ),
    "cf_adaptive_avg2d": lambda: single(CF_IMAGE, L.AdaptiveAveragePooling2D((4, 5), data_format="channels_first")),
    "cf_depthwise1d": lambda: single(
        CF_SEQUENCE, L.DepthwiseConv1D(3, depth_multiplier=3, strides=2, padding="same", data_format="channels_first")
    ),
    "cf_separable1d": lambda: single(
        CF_SEQUENCE, L.SeparableConv1D(5, 4, depth_multiplier=2, padding="same", data_format="channels_first")
    ),
    "cf_conv1d_transpose": lambda: single(
        CF_SEQUENCE, L.Conv1DTranspose(3, 3, strides=2, output_padding=1, data_format="channels_first")
    ),
    "cf_max_pool3d": lambda: single(
        CF_VOLUME, L.MaxPooling3D((2, 3, 2), strides=(1, 2, 2), padding="same", data_format="channels_first")
    ),
    "cf_max_pool1d_valid": lambda: single(CF_SEQUENCE, L.MaxPooling1D(3, strides=2, data_format="channels_first")),
    "cf_adaptive_max1d": lambda: single(CF_SEQUENCE, L.AdaptiveMaxPooling1D(4, data_format="channels_first")),
    "cf_adaptive_avg3d": lambda: single(CF_VOLUME, L.AdaptiveAveragePooling3D((3, 4, 2), data_format="channels_first")),
    "cf_global_max_pool1d": lambda: single(CF_SEQUENCE, L.GlobalMaxPooling1D(data_format="channels_first")),
    "cf_global_avg_pool1d_masked": channels_first_masked_average,
    "cf_chain": channels_first_chain,
    "cf_time_distributed_conv": lambda: single(
        (3, 5, 9, 8), L.TimeDistributed(L.Conv2D(4, 3, strides=2, padding="same", data_format="channels_first"))
    ),
    "cf_conv3d_transpose_dilated": lambda: single(
        (3, 4, 5, 2), L.Conv3DTranspose(3, 2, dilation_rate=(1, 2, 2), padding="same", data_format="channels_first")
    ),
    "cf_into_channels_last": lambda: single(
        CF_IMAGE, L.Conv2D(4, 3, data_format="channels_first"), L.Conv2D(3, 2, padding="same")
    ),
}


def check_generated_code(keras_model, tmp_path):
    import torch

    keras_model.save(tmp_path / "m.keras")
    cli.convert(tmp_path / "m.keras", tmp_path / "m.py")
    spec = importlib.util.spec_from_file_location("generated_conv", tmp_path / "m.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    class_name = torch_adapter.class_name(keras_model.name)
    module = getattr(generated, class_name)()
    module.load_state_dict(generated.load(str(tmp_path / "m.safetensors")), strict=True)
    inputs = batch(keras_model)
    torch_inputs = [torch.from_numpy(array) for array in inputs]
    torch_inputs = [
        value.permute(0, value.ndim - 1, *range(1, value.ndim - 1)) if value.ndim > 2 else value
        for value in torch_inputs
    ]
    with torch.no_grad():
        output = module.eval()(*torch_inputs)
    if output.ndim > 2:
        output = output.permute(0, *range(2, output.ndim), 1)
    assert relative_difference([output.numpy()], keras_adapter.predict(keras_model, inputs)) <= LAYER_TOLERANCE


@pytest.mark.parametrize("case", sorted(CASES))
def test_kind_both_directions(case):
    keras.utils.set_random_seed(11)
    # relative to the outputs of the side the weights came from, where those exceed 1
    check_both_directions(randomize(CASES[case](), seed=3), tolerance=LAYER_TOLERANCE, relative_to="source")


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_code(case, tmp_path):
    keras.utils.set_random_seed(12)
    check_generated_code(randomize(CASES[case](), seed=5), tmp_path)


# -- quantized layers ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_layer_is_refused_as_quantized(mode, tmp_path):
    model = keras.Sequential([keras.Input((8,)), L.Dense(4, name="dense"), L.Dense(3, name="head")])
    model.quantize(mode)
    model.save(tmp_path / "quantized.keras")
    with pytest.raises(
        UnsupportedLayerError,
        match=r"layer 'dense' \(Dense\): quantized dtype policy '"
        + mode
        + r"[^']*' is not supported \(its weights are not floats\)",
    ) as caught:
        cli.convert(tmp_path / "quantized.keras", tmp_path / "quantized.safetensors")
    message = str(caught.value)
    assert "\n" not in message and "'head' (Dense): quantized dtype policy" in message


def test_quantized_policy_named_by_a_string_is_refused():
    model = keras.Sequential([keras.Input((8,)), L.Dense(4, name="dense", dtype="int8_from_float32")])
    with pytest.raises(UnsupportedLayerError, match=r"'dense' \(Dense\): quantized dtype policy 'int8"):
        keras_adapter.architecture_of(model)
    from exchange.keras_config import _dtype

    for policy in ("gptq/4/128_from_float32", "float8_from_bfloat16"):
        with pytest.raises(UnsupportedLayerError, match=f"'dense' \\(Dense\\): quantized dtype policy '{policy}'"):
            _dtype(policy, "dense", "Dense")


# -- channels_first --------------------------------------------------------------------------


def test_channels_first_chain_permutes_only_at_its_ends():
    """Each channels_first layer permutes to torch's (N, C, H, W) and back; between two of them the
    two permutes cancel, so the chain reads its input once permuted and writes its output once."""
    keras.utils.set_random_seed(3)
    graph = keras_adapter.architecture_of(channels_first_chain())
    module = torch_adapter.model_from_tensors(graph, random_torch_state(graph, seed=1))
    import torch

    read = [node for node in module.graph.nodes if node.target is torch.permute and node.users]
    assert len(read) == 2, module.code  # a cancelled pair's first permute stays unread (a view, no copy)


def test_channels_first_kernels_have_the_channels_last_shapes():
    """Keras's kernels do not change layout with data_format: the same weights, either format."""
    keras.utils.set_random_seed(4)
    last = single((9, 12, 5), L.Conv2D(4, (3, 2), name="conv"))
    first = single((5, 9, 12), L.Conv2D(4, (3, 2), name="conv", data_format="channels_first"))
    assert [tuple(v.shape) for v in last.weights] == [tuple(v.shape) for v in first.weights]
    assert {key: value.shape for key, value in keras_adapter.get_tensors(last).items()} == {
        key: value.shape for key, value in keras_adapter.get_tensors(first).items()
    }


# -- refusals ----------------------------------------------------------------------------------


def test_adaptive_pooling_past_float32_exact_bins_is_refused():
    model = single((4000, 2), L.AdaptiveAveragePooling1D(5000, name="pool"))
    with pytest.raises(
        ExchangeError,
        match=r"layer 'pool' \(adaptive_avg_pool1d\): pooling 4000 cells into 5000: "
        r"Keras's float32 bin bounds may differ",
    ):
        keras_adapter.architecture_of(model)


def test_uneven_transposed_crop_of_unknown_size_is_refused():
    graph = keras_adapter.architecture_of(
        single((None, None, 2), L.Conv2DTranspose(3, 3, strides=2, padding="same", name="up"))
    )
    with pytest.raises(
        UnsupportedLayerError,
        match="layer 'up': this transposed convolution crops unevenly, which needs a fixed input size",
    ):
        torch_adapter.model_from_tensors(graph, random_torch_state(graph, seed=1))


def test_causal_padding_only_for_conv1d():
    from exchange.kinds import kind_of

    kind = kind_of("depthwise_conv1d")
    config = kind.config_from_dict({"filters": 1, "kernel_size": [2], "strides": [1], "padding": "causal"}, "dw")
    with pytest.raises(ExchangeError, match="only Conv1D takes causal padding"):
        kind.output_shape(config, ((11, 4),))


@pytest.mark.parametrize(
    "case",
    [
        "cf_chain",
        "conv2d_transpose_same_output_padding",
        "adaptive_max3d",
        "cf_global_avg_pool1d_masked",
        "separable1d",
        "cf_conv3d",
    ],
)
def test_exchange_file_round_trip(case, tmp_path):
    """Through the exchange file and back to Keras: the new options (data_format, output_padding,
    output_size) survive the file's JSON, and a second conversion gives the same bytes."""
    keras.utils.set_random_seed(13)
    model = randomize(CASES[case](), seed=6)
    model.save(tmp_path / "m.keras")
    cli.convert(tmp_path / "m.keras", tmp_path / "m.safetensors")
    torch_model = torch_adapter.model_from_file(tmp_path / "m.safetensors")
    inputs = batch(model)
    expected = keras_adapter.predict(model, inputs)
    assert relative_difference(torch_adapter.predict(torch_model, inputs), expected) <= LAYER_TOLERANCE
    cli.convert(tmp_path / "m.safetensors", tmp_path / "back.keras")
    rebuilt = keras.saving.load_model(tmp_path / "back.keras")
    assert relative_difference(keras_adapter.predict(rebuilt, inputs), expected) <= LAYER_TOLERANCE
    cli.convert(tmp_path / "back.keras", tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()
