"""Every Keras image resize, converted exactly (TensorFlow backend the reference): Resizing (every
interpolation, antialias on and off, crop_to_aspect_ratio / pad_to_aspect_ratio, channels_first),
CenterCrop (crop or smart_resize) and UpSampling2D with an interpolation, on fixed and unknown
image sizes, in both directions and through generated code.

Each case is a small Keras model (a 1x1 convolution to carry weights, then the resize) on
non-square, odd and even sizes:
- Keras -> torch: the live model's tensors into the torch module; outputs compared.
- torch -> Keras: a random state_dict into both the torch module and the Keras model built from
  the graph; outputs compared, and the Keras weights read back equal the state bit for bit.
- saved as `.keras` and converted to Python source: the generated module computes what Keras does.
`KerasResize` is also checked against `tf.image.resize` directly over many sizes and ratios.
"""

import keras
import numpy as np
import pytest
import torch
from generated_code import check_generated_code
from kerasmodels import check_both_directions, config_with, max_difference, seed_all

from exchange import keras_adapter, torch_adapter
from exchange.errors import UnsupportedLayerError
from exchange.torch_modules import KerasResize

L = keras.layers
TOLERANCE = 1e-5
IMAGE = (9, 12, 3)  # odd height, even width
METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5")


def image(*layers, shape=IMAGE):
    """An image through a 1x1 convolution (weights to carry) and then `layers`."""
    return keras.Sequential([keras.Input(shape), L.Conv2D(4, 1)] + list(layers))


def resizing(height, width, **options):
    return lambda: image(L.Resizing(height, width, **options))


# Sizes from IMAGE's 9x12: down, up, non-integral both ways, one axis each way, to 1.
CASES = {
    f"resizing_{method}_{'aa_' if antialias else ''}{height}x{width}": resizing(
        height, width, interpolation=method, antialias=antialias
    )
    for method in METHODS
    for antialias in (False, True)
    for height, width in ((4, 5), (13, 20), (6, 17))
}
CASES.update(
    {
        "resizing_lanczos3_to_one_row": resizing(1, 7, interpolation="lanczos3"),
        "resizing_bicubic_same_size": resizing(9, 12, interpolation="bicubic"),
        "resizing_area_whole_factors": resizing(3, 24, interpolation="area"),
        "resizing_lanczos5_crop": resizing(8, 3, interpolation="lanczos5", crop_to_aspect_ratio=True),
        "resizing_bicubic_crop_aa": resizing(4, 4, interpolation="bicubic", crop_to_aspect_ratio=True, antialias=True),
        "resizing_lanczos3_pad": resizing(7, 4, interpolation="lanczos3", pad_to_aspect_ratio=True, fill_value=0.5),
        "resizing_area_pad_wide": resizing(3, 9, interpolation="area", pad_to_aspect_ratio=True, fill_value=-1.0),
        "resizing_bicubic_channels_first": lambda: image(
            L.Resizing(5, 7, interpolation="bicubic", data_format="channels_first")
        ),
        "resizing_lanczos5_channels_first_crop": lambda: image(
            L.Resizing(2, 9, interpolation="lanczos5", crop_to_aspect_ratio=True, data_format="channels_first")
        ),
        "center_crop_smaller_one_side": lambda: image(L.CenterCrop(12, 5)),
        "center_crop_smaller_channels_first": lambda: image(L.CenterCrop(11, 14, data_format="channels_first")),
    }
)
for _method in METHODS[1:]:
    for _size, _format_name in (((2, 3), "channels_last"), ((3, 2), "channels_first")):
        CASES[f"upsampling2d_{_method}_{_format_name}"] = lambda method=_method, size=_size, data_format=_format_name: (
            image(L.UpSampling2D(size, interpolation=method, data_format=data_format))
        )
# The default run: one case of each interpolation and each special path; `-m slow` runs them all.
DEFAULT = {
    "resizing_lanczos3_4x5",
    "resizing_bicubic_13x20",
    "resizing_area_6x17",
    "resizing_lanczos5_aa_6x17",
    "resizing_bilinear_aa_4x5",
    "resizing_lanczos3_pad",
    "resizing_lanczos5_channels_first_crop",
    "center_crop_smaller_channels_first",
    "upsampling2d_bicubic_channels_first",
    "upsampling2d_area_channels_last",
}
CODE_DEFAULT = {"resizing_lanczos5_channels_first_crop"}


def _marks(names):
    return [pytest.param(name, marks=() if name in names else pytest.mark.slow) for name in sorted(CASES)]


@pytest.mark.parametrize("case", _marks(DEFAULT))
def test_resize_both_directions(case):
    keras.utils.set_random_seed(11)
    check_both_directions(seed_all(CASES[case](), seed=3), tolerance=TOLERANCE)


@pytest.mark.parametrize("case", _marks(CODE_DEFAULT))
def test_resize_generated_code(case, tmp_path):
    from kerasmodels import batch

    keras.utils.set_random_seed(11)
    keras_model = seed_all(CASES[case](), seed=3)
    check_generated_code(keras_model, batch(keras_model), tmp_path)


# -- unknown image sizes: Input((None, None, 3)), fed two different sizes --------------------------

UNKNOWN = {
    "resizing_bicubic": lambda: L.Resizing(5, 7, interpolation="bicubic"),
    "resizing_lanczos3_crop": lambda: L.Resizing(6, 4, interpolation="lanczos3", crop_to_aspect_ratio=True),
    "resizing_bilinear_aa_pad": lambda: L.Resizing(4, 9, antialias=True, pad_to_aspect_ratio=True, fill_value=0.25),
    "resizing_area_channels_first": lambda: L.Resizing(4, 5, interpolation="area", data_format="channels_first"),
    "center_crop": lambda: L.CenterCrop(5, 6),
}
# (Keras cannot run UpSampling2D with an interpolation on sizes unknown when traced: it converts a
# symbolic size to a Python bool.)
UNKNOWN_DEFAULT = {"resizing_lanczos3_crop", "center_crop"}
SIZES = ((9, 12), (14, 7))  # two images of different sizes through the same model


def unknown_size_model(layer):
    """Channels-last: a 1x1 convolution (weights to carry) then `layer`; channels-first (TensorFlow
    has no channels-first convolution on CPU) `layer` alone."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        inputs = keras.Input((3, None, None))
        return keras.Model(inputs, layer(inputs))
    inputs = keras.Input((None, None, 3))
    return seed_all(keras.Model(inputs, layer(L.Conv2D(4, 1)(inputs))), seed=3)


def images(model, height, width, seed=0):
    channels_last = model.inputs[0].shape[-1] == 3
    shape = (4, height, width, 3) if channels_last else (4, 3, height, width)
    return [np.random.default_rng(seed).standard_normal(shape).astype(np.float32)]


@pytest.mark.parametrize(
    "case", [pytest.param(name, marks=() if name in UNKNOWN_DEFAULT else pytest.mark.slow) for name in sorted(UNKNOWN)]
)
def test_unknown_image_sizes(case, tmp_path):
    keras.utils.set_random_seed(11)
    model = unknown_size_model(UNKNOWN[case]())
    graph = keras_adapter.architecture_of(model)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
    for height, width in SIZES:
        inputs = images(model, height, width)
        expected = keras_adapter.predict(model, inputs)
        difference = max_difference(expected, torch_adapter.predict(torch_model, inputs))
        assert difference <= TOLERANCE * max(1.0, float(np.abs(expected[0]).max())), (height, width, difference)
    rebuilt = keras_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
    inputs = images(model, *SIZES[1], seed=1)
    assert (
        max_difference(keras_adapter.predict(rebuilt, inputs), torch_adapter.predict(torch_model, inputs))
        <= TOLERANCE * 10
    )


@pytest.mark.slow
def test_unknown_image_sizes_generated_code(tmp_path):
    model = unknown_size_model(L.Resizing(6, 4, interpolation="lanczos5", crop_to_aspect_ratio=True))
    check_generated_code(model, images(model, 11, 8), tmp_path)


# -- KerasResize against tf.image.resize directly ---------------------------------------------------


def _against_tensorflow(methods, image_sizes, target_sizes):
    import tensorflow as tf

    generator = np.random.default_rng(0)
    worst = 0.0
    for height, width in image_sizes:
        pixels = generator.standard_normal((2, height, width, 3)).astype(np.float32) * 3
        for method in methods:
            for antialias in (False, True):
                for size in target_sizes:
                    expected = tf.image.resize(pixels, size, method=method, antialias=antialias).numpy()
                    got = (
                        KerasResize(size, interpolation=method, antialias=antialias)(
                            torch.from_numpy(pixels).permute(0, 3, 1, 2)
                        )
                        .permute(0, 2, 3, 1)
                        .numpy()
                    )
                    assert got.shape == expected.shape
                    difference = float(np.abs(got - expected).max()) / max(1.0, float(np.abs(expected).max()))
                    assert difference <= 2e-6, (method, antialias, (height, width), size, difference)
                    worst = max(worst, difference)
    return worst


def test_keras_resize_matches_tensorflow():
    print(f"worst {_against_tensorflow(METHODS, ((5, 7), (16, 16)), ((1, 1), (3, 24), (5, 7), (13, 20), (31, 8)))}")


@pytest.mark.slow
def test_keras_resize_matches_tensorflow_many_sizes():
    sizes = ((1, 1), (1, 3), (3, 1), (2, 2), (9, 12), (12, 9), (4, 5), (6, 17), (100, 37), (224, 224))
    print(f"worst {_against_tensorflow(METHODS, ((1, 3), (31, 8), (100, 37), (300, 410)), sizes)}")


def test_float32_quotient_is_tensorflows():
    generator = np.random.default_rng(2)
    pairs = [
        (a, b) for a in list(range(40)) + [16777217, 16777219, 2**25 + 3, 123456789] for b in (1, 2, 3, 7, 10, 16777217)
    ]
    pairs += [(int(a), int(b)) for a, b in zip(generator.integers(0, 2**31, 3000), generator.integers(1, 2**20, 3000))]
    for a, b in pairs:
        assert KerasResize.float32_quotient(a, b) == int(np.float32(a) / np.float32(b)), (a, b)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, shape, changes, message",
    [
        (
            lambda: L.UpSampling2D(interpolation="bilinear"),
            IMAGE,
            {"interpolation": "gaussian"},
            r"'bad' \(UpSampling2D\): unsupported option interpolation='gaussian'$",
        ),
        (
            lambda: L.Resizing(4, 5),
            IMAGE,
            {"interpolation": "mitchellcubic"},
            r"'bad' \(Resizing\): unsupported option interpolation='mitchellcubic'$",
        ),
    ],
)
def test_refusals_are_one_line(layer, shape, changes, message):
    from exchange.keras_config import parse_model_config

    made = layer()
    made.name = "bad"
    with pytest.raises(UnsupportedLayerError, match=message):
        parse_model_config(config_with(made, shape, **changes), "hand-written")


@pytest.mark.parametrize(
    "layer, shape, message",
    [
        (
            lambda: L.Resizing(4, 5),
            (9, 12),
            r"layer 'bad' \(resizing\): Resizing takes a channels_last image, found "
            r"\(batch, \(9, 12\)\) \(Keras takes a rank-3 channels_last input for one image whose height is the "
            r"batch axis\)$",
        ),
        (lambda: L.CenterCrop(4, 5), (9, 12), r"CenterCrop takes a channels_last image, found \(batch, \(9, 12\)\)"),
        (
            lambda: L.UpSampling2D(interpolation="lanczos3", dtype="float16"),
            IMAGE,
            r"UpSampling2D interpolation 'lanczos3' on dtype float16 is not supported \(TensorFlow resizes to float32 and "
            r"UpSampling2D does not cast back\)$",
        ),
    ],
)
def test_refused_models(layer, shape, message):
    made = layer()
    made.name = "bad"
    model = keras.Sequential([keras.Input(shape), made])
    with pytest.raises(UnsupportedLayerError, match=message):
        graph = keras_adapter.architecture_of(model)
        torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
