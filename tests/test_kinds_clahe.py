"""ContrastLimitedAdaptiveHistogramEqualization (CLAHE), in both directions with real Keras (TensorFlow
backend) and real PyTorch, and through generated code; Equalization's refusal.

Each case is a small Keras model on non-square images, some of whose sides do not divide into the
tile grid, with inputs spanning the layer's value_range and beyond it, a constant image (a
constant 0 one with no clipping divides by zero in Keras, which guards it) and a half-constant one.
The torch side reproduces TensorFlow's float32 roundings, so a CLAHE output equals Keras's bit for bit.
"""

import json

import keras
import numpy as np
import pytest
from generated_code import check_generated_file, run_generated
from kerasmodels import check_both_directions

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import UnsupportedLayerError

L = keras.layers
TOLERANCE = 1e-5
CLAHE = L.ContrastLimitedAdaptiveHistogramEqualization


def clahe_model(shape, *after, **options):
    return keras.Sequential([keras.Input(shape), CLAHE(name="clahe", **options)] + list(after))


# name: (model, value_range, whether its output is CLAHE's own: compared bit for bit)
CASES = {
    "tiles_divide": (lambda: clahe_model((16, 24, 3), tile_grid_size=(4, 6)), (0, 255), True),
    "tiles_padded_fractional_clip": (
        lambda: clahe_model((9, 14, 3), tile_grid_size=(2, 3), clip_limit=2.7),
        (0, 255),
        True,
    ),
    "unit_range": (
        lambda: clahe_model((13, 10, 4), value_range=(0, 1), clip_limit=1.3, tile_grid_size=(3, 4)),
        (0, 1),
        True,
    ),
    "signed_range_no_clip": (
        lambda: clahe_model((11, 17, 2), value_range=(-1.0, 1.0), clip_limit=0.0, tile_grid_size=(3, 5)),
        (-1.0, 1.0),
        True,
    ),
    "reversed_range_one_tile": (
        lambda: clahe_model((7, 12, 2), value_range=(255, 0), clip_limit=40.0, tile_grid_size=(1, 1)),
        (255, 0),
        True,
    ),
    "default_options_grayscale": (lambda: clahe_model((20, 12, 1)), (0, 255), True),
    "zero_image_no_clip": (lambda: clahe_model((10, 6, 3), clip_limit=-1.0, tile_grid_size=(2, 2)), (0, 255), True),
    "channels_first": (
        lambda: clahe_model(
            (3, 11, 7), data_format="channels_first", value_range=(0.25, 0.9), clip_limit=3.3, tile_grid_size=(3, 2)
        ),
        (0.25, 0.9),
        True,
    ),
    "channels_first_then_dense": (
        lambda: clahe_model(
            (2, 9, 8), L.Dense(3), data_format="channels_first", value_range=(0, 1), tile_grid_size=(2, 3)
        ),
        (0, 1),
        False,
    ),
    "float16_layer": (
        lambda: clahe_model((9, 13, 3), dtype="float16", value_range=(-1, 1), clip_limit=2.2, tile_grid_size=(2, 3)),
        (-1, 1),
        True,
    ),
    "then_conv": (
        lambda: clahe_model(
            (12, 9, 3), L.Conv2D(4, 1), value_range=(-7.5, 100.0), clip_limit=2.0, tile_grid_size=(5, 4)
        ),
        (-7.5, 100.0),
        False,
    ),
}
DEFAULT_CASES = ("channels_first_then_dense",)  # and generated code for "channels_first"


def images(shape, value_range, rows=5, seed=0):
    """Values across the range and 10% past each end; a constant image at the range's first end,
    one at its middle, one half constant."""
    low, high = min(value_range), max(value_range)
    margin = 0.1 * (high - low)
    values = np.random.default_rng(seed).uniform(low - margin, high + margin, (rows,) + shape).astype(np.float32)
    values[1] = value_range[0]
    values[2] = (low + high) / 2
    values[3, : shape[0] // 2] = low
    return values


def seeded(model, seed=3):
    generator = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign((generator.standard_normal(tuple(variable.shape)) * 0.3).astype(variable.dtype))
    return model


def case(name):
    build, value_range, exact = CASES[name]
    model = seeded(build())
    return model, [images(tuple(model.inputs[0].shape[1:]), value_range)], exact


def check_clahe_both_directions(name):
    """Differences relative to Keras's outputs where those exceed 1; cases marked exact compare
    Keras -> torch bit for bit."""
    model, inputs, exact = case(name)
    checked = check_both_directions(model, inputs, tolerance=TOLERANCE, relative_to="keras", must_vary=None)
    if exact:
        np.testing.assert_array_equal(checked.torch_outputs[0], checked.keras_outputs[0])
        assert float(np.ptp(checked.keras_outputs[0])) > 0.1 * abs(np.subtract(*CASES[name][1])), "outputs must vary"


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=() if name in DEFAULT_CASES else pytest.mark.slow) for name in sorted(CASES)]
)
def test_clahe_both_directions(name):
    check_clahe_both_directions(name)


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=() if name == "channels_first" else pytest.mark.slow) for name in sorted(CASES)]
)
def test_clahe_generated_code(name, tmp_path):
    """The model saved as .keras and converted to Python computes Keras's outputs, eagerly and
    through torch.export: bit for bit where the output is CLAHE's."""
    model, inputs, exact = case(name)
    (expected,) = keras_adapter.predict(model, inputs)
    model.save(tmp_path / "model.keras")
    graph = cli.convert(tmp_path / "model.keras", tmp_path / "model.py")
    check_generated_file(tmp_path / "model.py")
    outcome = run_generated(tmp_path / "model.py", torch_adapter.class_name(graph.name), inputs[0], expected, tmp_path)
    bound = 0.0 if exact else TOLERANCE * max(1.0, outcome["scale"])
    assert outcome["eager"] <= bound and outcome["exported"] <= bound, outcome


def test_clahe_module_grids_are_float32_as_keras_computes_them():
    """The interpolation's tile indices and weights, computed by torch at construction, equal
    Keras's float32 arithmetic (numpy float32 here), for a tile size that does not halve exactly."""
    from exchange.torch_modules import KerasCLAHE

    module = KerasCLAHE(13, 20, tile_grid_size=(3, 6))
    for size, tile, grid, prefix in ((13, 5, 3, "row"), (20, 4, 6, "column")):
        position = (np.arange(grid * tile, dtype=np.float32) - np.float32(tile / 2.0)) / np.float32(tile) + np.float32(
            1
        )
        first = np.floor(position)
        np.testing.assert_array_equal(getattr(module, f"{prefix}_weight").numpy(), (position - first)[:size])
        expected_first = np.clip(np.clip(first, 0, grid + 1) - 1, 0, grid - 1)[:size]
        np.testing.assert_array_equal(getattr(module, f"{prefix}_first").numpy(), expected_first)
        expected_second = np.clip(np.clip(first + 1, 0, grid + 1) - 1, 0, grid - 1)[:size]
        np.testing.assert_array_equal(getattr(module, f"{prefix}_second").numpy(), expected_second)


def test_tensorflow_cpu_sum_matches_tensorflow():
    """The excess of a clipped histogram is summed in TensorFlow's CPU order, bit for bit."""
    import tensorflow as tf
    import torch

    from exchange.torch_modules import tensorflow_cpu_sum

    generator = np.random.default_rng(5)
    values = (generator.standard_normal((64, 256)) * 10.0 ** generator.uniform(-3, 5, (64, 256))).astype(np.float32)
    expected = tf.reduce_sum(tf.constant(values), axis=-1, keepdims=True).numpy()
    np.testing.assert_array_equal(tensorflow_cpu_sum(torch.from_numpy(values)).numpy(), expected)


def config_with(shape, **changes):
    """A Sequential model's config around a CLAHE layer named 'bad' with options changed, as a
    file written by hand (or by another Keras version) may hold them."""
    model = clahe_model(shape, tile_grid_size=(2, 2))
    config = json.loads(json.dumps({"class_name": "Sequential", "config": model.get_config()}))
    layer = config["config"]["layers"][-1]
    layer["config"].update(changes, name="bad")
    layer["name"] = "bad"
    return config


@pytest.mark.parametrize(
    "shape, changes, message",
    [
        (
            (6, 8, 3),
            {"value_range": [2, 2]},
            r"'bad' \(ContrastLimitedAdaptiveHistogramEqualization\): unsupported option "
            r"value_range=\[2.0, 2.0\] \(Keras divides by its float32 width",
        ),
        ((6, 8, 3), {"value_range": [0, 1e39]}, r"unsupported option value_range=\[0, 1e\+39\] \(must be two finite"),
        ((6, 8, 3), {"value_range": "0-255"}, r"unsupported option value_range='0-255'"),
        ((6, 8, 3), {"clip_limit": "4"}, r"unsupported option clip_limit='4' \(must be a finite number\)"),
        ((6, 8, 3), {"clip_limit": 1e40}, r"unsupported option clip_limit=1e\+40 \(at most 1e\+30"),
        ((6, 8, 3), {"tile_grid_size": [0, 2]}, r"tile_grid_size must be an integer from 1"),
        ((6, 8, 3), {"tile_grid_size": [2, 2, 2]}, r"'tile_grid_size': expected 2 integers"),
        ((6, 8, 3), {"data_format": "channels_middle"}, "unsupported option data_format='channels_middle'"),
        (
            (3, 8, 3),
            {"tile_grid_size": [8, 2]},
            r"tile_grid_size \(8, 2\) on an image height of 3: Keras pads 5 "
            r"mirrored rows, more than the image has",
        ),
        ((6, 8, 3), {"factor": 0.5}, r"unknown option\(s\) 'factor'"),
        (
            (4097, 4097, 1),
            {"tile_grid_size": [1, 1]},
            r"tiles of 16,785,409 pixels are not supported \(Keras counts "
            r"them in float32, exact up to 16,777,216\)",
        ),
        (
            (6, 8, 3),
            {
                "dtype": {
                    "module": "keras",
                    "class_name": "DTypePolicy",
                    "config": {"name": "mixed_float16"},
                    "registered_name": None,
                }
            },
            r"unsupported option dtype='mixed_float16' \(Keras takes the histogram bins of the image cast to the half",
        ),
        (
            (None, None, 3),
            {},
            r"layer 'bad' \(clahe\): ContrastLimitedAdaptiveHistogramEqualization needs a channels_last "
            r"image of fixed height and width, found \(batch, \(None, None, 3\)\)",
        ),
    ],
)
def test_clahe_refusals_are_one_line(shape, changes, message):
    from exchange.keras_config import parse_model_config

    with pytest.raises(UnsupportedLayerError, match=message) as caught:
        parse_model_config(config_with(shape, **changes), "hand-written")
    assert "\n" not in str(caught.value)


def test_equalization_is_refused_with_its_reason():
    from exchange.keras_config import parse_model_config

    config = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "name": "x",
                    "config": {"batch_shape": [None, 4, 5, 3], "dtype": "float32", "name": "x"},
                    "inbound_nodes": [],
                },
                {
                    "class_name": "Equalization",
                    "name": "bad",
                    "config": {"name": "bad", "value_range": [0, 255]},
                    "inbound_nodes": [
                        {
                            "args": [
                                {
                                    "class_name": "__keras_tensor__",
                                    "config": {
                                        "shape": [None, 4, 5, 3],
                                        "dtype": "float32",
                                        "keras_history": ["x", 0, 0],
                                    },
                                }
                            ],
                            "kwargs": {},
                        }
                    ],
                },
            ],
            "input_layers": [["x", 0, 0]],
            "output_layers": [["bad", 0, 0]],
        },
    }
    message = (
        r"unsupported layer 'bad' \(Equalization\): Keras 3.15 cannot call it in a functional model \(its "
        r"symbolic output is its input"
    )
    with pytest.raises(UnsupportedLayerError, match=message) as caught:
        parse_model_config(config, "hand-written")
    assert "\n" not in str(caught.value)
