"""AutoContrast, RandomCrop (where Keras's predict and its declared shape agree) and
MelSpectrogram, in both directions with real Keras (TensorFlow backend) and real PyTorch, and
through generated code.

- Keras -> torch: the live model's tensors into the torch module; outputs compared.
- torch -> Keras: a random state_dict into both the torch module and the Keras model built from
  the graph; outputs compared, and the Keras weights read back equal the state bit for bit.
- saved as `.keras` and converted to Python source: the generated module computes what Keras does.
Outputs are compared relative to their scale where it is above 1 (a mel spectrogram in dB spans
up to 80).
"""

import json

import keras
import numpy as np
import pytest
from generated_code import check_generated_code
from kerasmodels import check_both_directions, max_difference, seed_all

from exchange import keras_adapter, torch_adapter
from exchange.errors import UnsupportedLayerError

L = keras.layers
TOLERANCE = 1e-5
IMAGE = (7, 10, 4)  # odd height, even width, 4 channels


def single(shape, *layers):
    return keras.Sequential([keras.Input(shape)] + list(layers))


def images(shape=IMAGE, rows=3, low=30.0, high=180.0):
    """Images with values in [low, high); one channel of one image flat (AutoContrast keeps it)."""
    values = np.random.default_rng(0).uniform(low, high, (rows,) + shape).astype(np.float32)
    values[1, ..., 2] = 50.0
    return [values]


def signal(length, rows=3, scale=1.0):
    return [(np.random.default_rng(1).standard_normal((rows, length)) * scale).astype(np.float32)]


def _signals(shape, rows=3):
    return (np.random.default_rng(2).standard_normal((rows,) + shape)).astype(np.float32)


# name -> (model, inputs)
CASES = {
    "auto_contrast_value_range": lambda: (single(IMAGE, L.AutoContrast(value_range=(20, 200))), images()),
    "auto_contrast_default_range": lambda: (single(IMAGE, L.AutoContrast()), images()),
    "auto_contrast_unsorted_float_range_channels_first": lambda: (
        single(IMAGE, L.AutoContrast(value_range=(1.5, -0.5), data_format="channels_first")),
        images(low=-0.4, high=1.2),
    ),
    "auto_contrast_after_conv": lambda: (
        single((9, 6, 3), L.Conv2D(4, 3, padding="same"), L.AutoContrast()),
        images((9, 6, 3)),
    ),
    "mel_spectrogram": lambda: (
        single((4001,), L.MelSpectrogram(fft_length=512, sequence_stride=64, num_mel_bins=40, sampling_rate=16000)),
        signal(4001),
    ),
    "mel_spectrogram_many_bins_for_the_fft": lambda: (
        single((2000,), L.MelSpectrogram(fft_length=512, sequence_stride=64, num_mel_bins=128, sampling_rate=32000)),
        signal(2000),
    ),
    "mel_spectrogram_hamming_odd_fft_short_window": lambda: (
        single(
            (1001,),
            L.MelSpectrogram(
                fft_length=255,
                sequence_stride=37,
                sequence_length=200,
                window="hamming",
                num_mel_bins=21,
                sampling_rate=11025,
                min_freq=50.0,
                max_freq=4000.0,
                top_db=40.0,
                mag_exp=1.0,
                ref_power=3.0,
                min_power=1e-6,
            ),
        ),
        signal(1001, scale=5.0),
    ),
    "mel_spectrogram_no_window_no_db": lambda: (
        single(
            (301,),
            L.MelSpectrogram(
                fft_length=64,
                sequence_stride=16,
                sequence_length=33,
                window=None,
                num_mel_bins=12,
                sampling_rate=800,
                power_to_db=False,
                mag_exp=1.5,
            ),
        ),
        signal(301),
    ),
    "mel_spectrogram_top_db_across_the_batch": lambda: (
        single(
            (777,),
            L.MelSpectrogram(fft_length=128, sequence_stride=50, num_mel_bins=16, sampling_rate=8000, top_db=6.0),
        ),
        [signal(777)[0] * np.float32([[1.0], [0.05], [0.3]])],
    ),
    "mel_spectrogram_between_dense_layers": lambda: (
        keras.Sequential(
            [
                keras.Input((40,)),
                L.Dense(299),
                L.MelSpectrogram(fft_length=32, sequence_stride=9, num_mel_bins=10, sampling_rate=4000, min_freq=0.0),
                L.Dense(5),
            ]
        ),
        signal(40),
    ),
    # window=None: Keras draws the kernels from scipy windows otherwise, and scipy is not installed
    # here; the kernels are weights, seeded at random like every weight of these tests.
    "stft_log_channels_last": lambda: (
        single((101, 3), L.STFTSpectrogram(mode="log", frame_length=16, frame_step=5, fft_length=32, window=None)),
        [_signals((101, 3))],
    ),
    "stft_magnitude_same_expand_dims": lambda: (
        single(
            (99, 2),
            L.STFTSpectrogram(
                mode="magnitude", frame_length=15, frame_step=4, window=None, padding="same", expand_dims=True
            ),
        ),
        [_signals((99, 2))],
    ),
    "stft_psd_channels_first": lambda: (
        single(
            (3, 120),
            L.STFTSpectrogram(
                mode="psd", frame_length=20, frame_step=7, fft_length=64, window=None, data_format="channels_first"
            ),
        ),
        [_signals((3, 120))],
    ),
    "stft_real_channels_first_expand_dims_same": lambda: (
        single(
            (2, 77),
            L.STFTSpectrogram(
                mode="real",
                frame_length=12,
                frame_step=12,
                window=None,
                padding="same",
                expand_dims=True,
                data_format="channels_first",
            ),
        ),
        [_signals((2, 77))],
    ),
    "stft_imag": lambda: (
        single((64, 1), L.STFTSpectrogram(mode="imag", frame_length=9, window=None)),
        [_signals((64, 1))],
    ),
    "stft_angle_same": lambda: (
        single((50, 3), L.STFTSpectrogram(mode="angle", frame_length=8, frame_step=3, window=None, padding="same")),
        [_signals((50, 3))],
    ),
    "stft_stft_into_dense": lambda: (
        keras.Sequential(
            [
                keras.Input((81, 2)),
                L.STFTSpectrogram(mode="stft", frame_length=10, frame_step=6, fft_length=16, window=None),
                L.Dense(3),
            ]
        ),
        [_signals((81, 2))],
    ),
    "pipeline_auto_contrast_random_brightness": lambda: (
        single(IMAGE, L.Pipeline([L.AutoContrast(), L.RandomBrightness(0.1)])),
        images(),
    ),
    "pipeline_auto_contrast_center_crop_channels_first": lambda: (
        single(
            (9, 12, 3),
            L.Pipeline(
                [
                    L.AutoContrast(value_range=(20, 200), data_format="channels_first"),
                    L.CenterCrop(8, 7, data_format="channels_first"),
                ]
            ),
        ),
        images((9, 12, 3)),
    ),
    "pipeline_between_convolutions": lambda: (
        keras.Sequential(
            [
                keras.Input((11, 8, 3)),
                L.Conv2D(4, 3),
                L.Pipeline([L.Rescaling(0.5, offset=0.25), L.CenterCrop(5, 4), L.RandomFlip()]),
                L.Conv2D(2, 1),
            ]
        ),
        images((11, 8, 3)),
    ),
    "random_crop_same_size": lambda: (single(IMAGE, L.Conv2D(3, 1), L.RandomCrop(7, 10)), images()),
    "random_crop_same_size_channels_first": lambda: (
        single(IMAGE, L.RandomCrop(10, 4, data_format="channels_first")),
        images(),
    ),
}


def difference_allowed(outputs):
    return TOLERANCE * max(1.0, max(float(np.max(np.abs(output))) for output in outputs))


# Cases in the default run (about a second each; generated code, run in a fresh process through
# torch.export, takes several): `-m slow` runs all of them.
DEFAULT = {
    "auto_contrast_value_range",
    "random_crop_same_size",
    "mel_spectrogram_hamming_odd_fft_short_window",
    "pipeline_between_convolutions",
    "stft_log_channels_last",
    "stft_real_channels_first_expand_dims_same",
}
CODE_DEFAULT = {"mel_spectrogram_between_dense_layers"}


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=() if case in DEFAULT else pytest.mark.slow) for case in sorted(CASES)]
)
def test_kind_both_directions(case):
    keras.utils.set_random_seed(11)
    model, inputs = CASES[case]()
    # relative to the outputs of the side the weights came from, where those exceed 1
    check_both_directions(seed_all(model, seed=3), inputs, tolerance=TOLERANCE, relative_to="source")


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=() if case in CODE_DEFAULT else pytest.mark.slow) for case in sorted(CASES)]
)
def test_kind_generated_code(case, tmp_path):
    keras.utils.set_random_seed(11)
    model, inputs = CASES[case]()
    check_generated_code(seed_all(model, seed=3), inputs, tmp_path, TOLERANCE)


def test_auto_contrast_keeps_a_flat_channel():
    """255 / (max - min) is inf on a flat channel: Keras keeps the input there (NaN -> input)."""
    model, inputs = CASES["auto_contrast_value_range"]()
    graph = keras_adapter.architecture_of(model)
    (output,) = torch_adapter.predict(torch_adapter.model_from_tensors(graph, {}), inputs)
    np.testing.assert_array_equal(output[1, ..., 2], inputs[0][1, ..., 2])


def config_with(layer, shape, **changes):
    """A Sequential model's config around `layer` with some of its options changed, as a file
    written by hand (or by another Keras version) may hold them."""
    model = single(shape, layer)
    config = json.loads(json.dumps({"class_name": "Sequential", "config": model.get_config()}))
    config["config"]["layers"][-1]["config"].update(changes)
    return config


REFUSALS = [
    (
        lambda: L.RandomCrop(5, 8),
        IMAGE,
        {},
        r"layer 'bad' \(random_crop\): RandomCrop to 5x8 of a \(batch, \(7, 10, 4\)\) input is not supported "
        r"\(Keras 3.15's predict returns the input unchanged but declares the cropped shape",
    ),
    (
        lambda: L.AutoContrast(),
        IMAGE,
        {"value_range": [3, 3]},
        r"'bad' \(AutoContrast\): unsupported option value_range=\[3, 3\] \(an empty range divides by zero\)",
    ),
    (lambda: L.AutoContrast(), IMAGE, {"value_range": "0-255"}, "unsupported option value_range='0-255'"),
    (lambda: L.AutoContrast(), (5, 4), {}, r"AutoContrast needs a batch of images \(rank 4"),
    (
        lambda: L.MelSpectrogram(fft_length=64, sequence_stride=64),
        (127,),
        {},
        r"layer 'bad' \(mel_spectrogram\): MelSpectrogram of 127 samples is not supported \(Keras declares 3 frames "
        r"but computes 2\)",
    ),
    (
        lambda: L.MelSpectrogram(fft_length=64),
        (32,),
        {},
        r"MelSpectrogram of 32 samples is not supported \(reflect padding by fft_length // 2 = 32 needs more",
    ),
    (
        lambda: L.MelSpectrogram(fft_length=64),
        (3, 100),
        {},
        r"MelSpectrogram needs signals of a fixed length, shape \(batch, samples\); found \(batch, \(3, 100\)\)",
    ),
    (
        lambda: L.MelSpectrogram(fft_length=64),
        (100,),
        {"window": "blackman"},
        r"'bad' \(MelSpectrogram\): unsupported option window='blackman' \(Keras's stft takes 'hann', 'hamming'",
    ),
    (
        lambda: L.MelSpectrogram(fft_length=64),
        (100,),
        {"min_power": 0.0},
        r"'bad' \(MelSpectrogram\): MelSpectrogram min_power must be positive \(log10 of 0 is -inf\)",
    ),
    (
        lambda: L.MelSpectrogram(fft_length=64),
        (100,),
        {"top_db": None},
        r"'bad' \(MelSpectrogram\): unsupported option top_db=None \(must be a number\)",
    ),
    (
        lambda: L.Pipeline([L.AutoContrast()]),
        IMAGE,
        {"layers": [{"class_name": "Concatenate", "config": {}}]},
        r"'bad' \(Pipeline\): unsupported option layers='Concatenate' \(a layer without weights, with one input",
    ),
    (
        lambda: L.Pipeline([L.AutoContrast(dtype="float16", name="half")]),
        IMAGE,
        {},
        r"'bad' \(Pipeline\): unsupported option layers='half with dtype float16' \(only float32 layers\)",
    ),
    (
        lambda: L.Pipeline([L.AutoContrast(name="contrast")]),
        IMAGE,
        {"layers": [{"class_name": "AutoContrast", "config": {"value_range": 3}}]},
        r"layer 'bad/layer_0' \(AutoContrast\): unsupported option value_range=3 \(must be 2 numbers\)",
    ),
    (
        lambda: L.STFTSpectrogram(frame_length=16, window=None),
        (100, 2),
        {"window": [0.5] * 16},
        r"'bad' \(STFTSpectrogram\): unsupported option window=\[0.5, .* \(window values in the config: only a",
    ),
    (
        lambda: L.STFTSpectrogram(frame_length=16, window=None),
        (100, 2),
        {"mode": "phase"},
        r"'bad' \(STFTSpectrogram\): unsupported option mode='phase'",
    ),
    (
        lambda: L.STFTSpectrogram(frame_length=16, window=None),
        (100, 2),
        {"frame_step": 17},
        r"'bad' \(STFTSpectrogram\): STFTSpectrogram frame_step must be an integer from 1 to 16, got 17",
    ),
    (
        lambda: L.MelSpectrogram(fft_length=64),
        (100,),
        {"sequence_length": 65},
        r"MelSpectrogram sequence_length must be an integer from 1 to 64, got 65",
    ),
]


@pytest.mark.parametrize("layer, shape, changes, message", REFUSALS)
def test_refusals_are_one_line(layer, shape, changes, message):
    from exchange.keras_config import parse_model_config

    made = layer()
    made.name = "bad"
    with pytest.raises(UnsupportedLayerError, match=message) as caught:
        parse_model_config(config_with(made, shape, **changes), "hand-written")
    assert "\n" not in str(caught.value)


def test_mel_spectrogram_top_db_clamps_against_the_whole_batch():
    """Keras's top_db floor is the maximum over every row less top_db: the quiet rows sit on it."""
    model, inputs = CASES["mel_spectrogram_top_db_across_the_batch"]()
    (expected,) = keras_adapter.predict(model, inputs)
    graph = keras_adapter.architecture_of(model)
    (output,) = torch_adapter.predict(torch_adapter.model_from_tensors(graph, {}), inputs)
    floor = float(expected.max()) - 6.0
    assert np.isclose(float(expected[1].min()), floor, atol=1e-5) and float(expected[1].max()) < floor + 1
    assert max_difference([output], [expected]) <= difference_allowed([expected])


def test_pipeline_of_layers_with_weights_is_refused():
    model = single((6, 5, 3), L.Pipeline([L.Conv2D(2, 1, name="inner")], name="bad"))
    with pytest.raises(
        UnsupportedLayerError,
        match=r"layer 'bad' \(Pipeline\): layer 'inner' \(conv2d\) has "
        r"weights, which a Pipeline keeps under paths of its own",
    ):
        keras_adapter.get_tensors(model)


def test_pipeline_round_trips_to_the_same_keras_config():
    """The Keras model rebuilt from the exchange graph holds the same Pipeline (same layers, names
    and options)."""
    model, _ = CASES["pipeline_auto_contrast_center_crop_channels_first"]()
    rebuilt = keras_adapter.model_from_tensors(keras_adapter.architecture_of(model), {})
    assert rebuilt.layers[-1].get_config() == model.layers[-1].get_config()


def test_stft_spectrogram_with_a_scipy_window_converts_from_its_config():
    """The window only chose the kernels' first values: a file's config naming one converts (Keras
    itself needs scipy to build such a layer, which this environment lacks)."""
    from exchange.keras_config import parse_model_config

    layer = L.STFTSpectrogram(frame_length=16, frame_step=4, window=None, name="spectrogram")
    graph = parse_model_config(config_with(layer, (90, 2), window="hann", periodic=True), "hand-written").graph
    assert graph.shapes["spectrogram"] == (19, 18) and graph.tensor_specs["spectrogram.real_weight"][0] == (9, 1, 16)


def test_stft_spectrogram_shorter_than_a_frame_is_refused():
    from exchange.keras_config import parse_model_config

    config = config_with(L.STFTSpectrogram(frame_length=16, window=None, name="bad"), (100, 2))
    config["config"]["layers"][0]["config"]["batch_shape"] = [None, 10, 2]
    with pytest.raises(
        UnsupportedLayerError,
        match=r"layer 'bad' \(stft_spectrogram\): STFTSpectrogram of 10 "
        r"samples is shorter than its frame_length 16",
    ):
        parse_model_config(config, "hand-written")
