"""Layers that reshape (UpSampling, ZeroPadding, Cropping 1D/3D), layers that are the identity at
inference (noise, dropout, image augmentations), and Masking: each in both directions with real
Keras (TensorFlow backend) and real PyTorch, through the files, and through generated code.
"""

import importlib.util
import json

import keras
import numpy as np
import pytest
from kerasmodels import batch, check_both_directions, max_difference, randomize

from exchange import cli, keras_adapter, torch_adapter, weight_layout
from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.graph import Graph

L = keras.layers
TOLERANCE = 1e-5
IMAGE = (9, 12, 3)  # odd height, even width; 3 channels, as the colour augmentations expect
SEQUENCE = (11, 4)
VOLUME = (5, 4, 7, 3)


def single(shape, *layers):
    return keras.Sequential([keras.Input(shape)] + list(layers))


def image_then_conv(*layers):
    """The layers between two convolutions: their output feeds weights, the graph is not trivial."""
    return single(IMAGE, L.Conv2D(3, (3, 2), padding="same", name="before"), *layers, L.Conv2D(2, 1, name="after"))


# Identity at inference: one model per Keras class, with non-default options.
TRAINING_ONLY = {
    "identity": lambda: single((13,), L.Dense(5), L.Identity(), L.Dense(3)),
    "gaussian_noise": lambda: single(SEQUENCE, L.GaussianNoise(0.3, seed=7), L.Conv1D(2, 2)),
    "gaussian_dropout": lambda: single((13,), L.GaussianDropout(0.4, seed=3), L.Dense(3)),
    "alpha_dropout": lambda: single(SEQUENCE, L.AlphaDropout(0.5, noise_shape=(None, 1, 4), seed=2), L.Dense(3)),
    "activity_regularization": lambda: single((13,), L.Dense(4), L.ActivityRegularization(l1=0.1, l2=0.02)),
    "dropout_noise_shape_seed": lambda: single(SEQUENCE, L.Dropout(0.3, noise_shape=(None, 1, 4), seed=5), L.Dense(2)),
    "spatial_dropout1d_seed": lambda: single(SEQUENCE, L.SpatialDropout1D(0.2, seed=8), L.Conv1D(2, 3)),
    "spatial_dropout2d_channels_first": lambda: single(
        IMAGE, L.SpatialDropout2D(0.4, data_format="channels_first", seed=1), L.Conv2D(2, 1)
    ),
    "spatial_dropout3d": lambda: single(VOLUME, L.SpatialDropout3D(0.3, seed=4), L.Dense(2)),
    "spatial_dropout3d_channels_first": lambda: single(
        VOLUME, L.SpatialDropout3D(0.3, data_format="channels_first"), L.Dense(2)
    ),
    "random_flip": lambda: image_then_conv(L.RandomFlip("horizontal", seed=5)),
    "random_rotation": lambda: image_then_conv(
        L.RandomRotation((-0.2, 0.4), fill_mode="constant", interpolation="nearest", fill_value=0.5, seed=1)
    ),
    "random_zoom": lambda: image_then_conv(L.RandomZoom(0.2, width_factor=(-0.3, 0.1), fill_mode="wrap")),
    "random_translation": lambda: image_then_conv(L.RandomTranslation((-0.5, 0.4), 0.2, fill_mode="nearest")),
    "random_shear": lambda: image_then_conv(L.RandomShear(x_factor=(0.5, 1), y_factor=(0.1, 0.3), seed=9)),
    "random_perspective": lambda: image_then_conv(L.RandomPerspective(factor=0.5, scale=0.7, fill_value=1.0)),
    "random_elastic_transform": lambda: image_then_conv(
        L.RandomElasticTransform(factor=1.0, scale=0.5, value_range=(0, 1))
    ),
    "random_contrast": lambda: image_then_conv(L.RandomContrast(0.75, value_range=(0, 1), seed=1)),
    "random_brightness": lambda: image_then_conv(L.RandomBrightness([-0.5, 0.25], value_range=[20, 200])),
    "random_grayscale": lambda: image_then_conv(L.RandomGrayscale(factor=0.25)),
    "random_hue": lambda: image_then_conv(L.RandomHue(0.2, value_range=(0, 1.0))),
    "random_saturation": lambda: image_then_conv(L.RandomSaturation([0.5, 0.5], value_range=(0, 1))),
    "random_sharpness": lambda: image_then_conv(L.RandomSharpness(0.75, value_range=(0, 1), seed=1)),
    "random_color_degeneration": lambda: image_then_conv(L.RandomColorDegeneration(0.2, value_range=(0, 1))),
    "random_color_jitter": lambda: image_then_conv(
        L.RandomColorJitter(value_range=(0, 1), brightness_factor=0.1, contrast_factor=(0.1, 0.2), hue_factor=0.1)
    ),
    "random_posterization": lambda: image_then_conv(L.RandomPosterization((1, 4), value_range=(0, 1))),
    "random_invert": lambda: image_then_conv(L.RandomInvert(0.75, value_range=(20, 200))),
    "random_erasing": lambda: image_then_conv(L.RandomErasing(factor=0.5, scale=0.5, fill_value=0)),
    "random_gaussian_blur": lambda: image_then_conv(L.RandomGaussianBlur(kernel_size=(3, 5), sigma=(0.5, 1.5))),
    "solarization": lambda: image_then_conv(
        L.Solarization(addition_factor=0.75, threshold_factor=(0, 1), value_range=(20, 200), seed=1)
    ),
    "aug_mix": lambda: image_then_conv(
        L.AugMix(
            value_range=(0, 1),
            num_chains=2,
            chain_depth=(1, 2),
            factor=1,
            all_ops=False,
            interpolation="nearest",
            seed=43,
        )
    ),
    "rand_augment": lambda: image_then_conv(L.RandAugment(value_range=(0, 1), num_ops=3, factor=0.7)),
    "cut_mix": lambda: image_then_conv(L.CutMix(factor=0.5, seed=1)),
    "mix_up": lambda: image_then_conv(L.MixUp(alpha=0.4)),
    "max_num_bounding_boxes": lambda: image_then_conv(L.MaxNumBoundingBoxes(max_number=40)),
    "augmentation_pipeline_channels_first": lambda: image_then_conv(
        L.RandomFlip(data_format="channels_first"), L.RandomContrast(0.3, data_format="channels_first")
    ),
}

RESHAPING = {
    "upsampling1d": lambda: single(SEQUENCE, L.UpSampling1D(3), L.Conv1D(2, 2)),
    "upsampling2d": lambda: single(IMAGE, L.UpSampling2D((2, 3)), L.Conv2D(2, (3, 2))),
    "upsampling2d_channels_first": lambda: single(
        IMAGE, L.UpSampling2D((3, 2), data_format="channels_first"), L.Conv2D(2, 1)
    ),
    "upsampling3d": lambda: single(VOLUME, L.UpSampling3D((2, 1, 3)), L.Dense(2)),
    "upsampling3d_channels_first": lambda: single(
        VOLUME, L.UpSampling3D((1, 3, 2), data_format="channels_first"), L.Dense(2)
    ),
    "zero_padding1d": lambda: single(SEQUENCE, L.ZeroPadding1D((1, 2)), L.Conv1D(2, 2)),
    "zero_padding1d_channels_first": lambda: single(
        SEQUENCE, L.ZeroPadding1D(3, data_format="channels_first"), L.Dense(2)
    ),
    # (a Conv2D right after this padding fails in TensorFlow, for Keras's own model too)
    "zero_padding2d_channels_first": lambda: single(
        IMAGE, L.ZeroPadding2D(((1, 2), (0, 3)), data_format="channels_first"), L.Dense(2)
    ),
    "zero_padding3d": lambda: single(VOLUME, L.ZeroPadding3D(((1, 2), (0, 1), (2, 0))), L.Dense(2)),
    "zero_padding3d_channels_first": lambda: single(
        VOLUME, L.ZeroPadding3D((2, 1, 0), data_format="channels_first"), L.Dense(2)
    ),
    "cropping1d": lambda: single(SEQUENCE, L.Cropping1D((2, 3)), L.Conv1D(2, 2)),
    "cropping2d_channels_first": lambda: single(
        (5, 8, 7), L.Cropping2D(((1, 2), (2, 1)), data_format="channels_first"), L.Conv2D(2, 1)
    ),
    "cropping3d": lambda: single(VOLUME, L.Cropping3D(((1, 2), (0, 1), (2, 3))), L.Dense(2)),
    "cropping3d_channels_first": lambda: single(
        VOLUME, L.Cropping3D(((0, 2), (1, 1), (1, 0)), data_format="channels_first"), L.Dense(2)
    ),
}

CASES = TRAINING_ONLY | RESHAPING


def folded_biases_add_up(graph, torch_state, back):
    """The weights read back bit for bit, but a recurrent layer's bias_hh: Keras has one bias, the sum."""
    folded = weight_layout.folded_tensors(graph, torch_state)
    for key, tensor in torch_state.items():
        if key in folded:
            summed = key.replace("bias_hh", "bias_ih")
            np.testing.assert_allclose(back[summed], torch_state[summed] + tensor, rtol=0, atol=1e-6)
            assert not back[key].any()
        elif key.replace("bias_ih", "bias_hh") not in folded:
            np.testing.assert_array_equal(back[key], tensor, err_msg=key)


def both_directions(keras_model, inputs=None):
    """`check_both_directions` with the caller bounding the difference. Returns the largest
    difference seen and the rebuilt Keras model."""
    checked = check_both_directions(keras_model, inputs, tolerance=None, same_weights=folded_biases_add_up)
    return max(checked.to_torch, checked.to_keras), checked.rebuilt


def layer_configs(model) -> dict:
    """Every layer's Keras config, as a file stores it (JSON: tuples are lists)."""
    return {
        layer.name: json.loads(json.dumps(layer.get_config()))
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_kind_both_directions(case):
    keras.utils.set_random_seed(11)
    keras_model = randomize(CASES[case](), seed=3)
    difference, rebuilt = both_directions(keras_model)
    print(f"{case}: {difference:.2e}")
    assert difference <= TOLERANCE
    if case in TRAINING_ONLY:  # the rebuilt model holds the same layers, every option kept
        assert layer_configs(rebuilt) == layer_configs(keras_model)


@pytest.mark.parametrize("case", sorted(TRAINING_ONLY))
def test_training_only_layer_is_identity_at_inference(case):
    """The torch module computes what `model.predict` does: the layer passes its input on."""
    keras.utils.set_random_seed(11)
    keras_model = CASES[case]()
    layer = next(
        layer
        for layer in keras_model.layers
        if layer.name not in ("before", "after") and type(layer).__name__ not in ("Dense", "Conv1D")
    )
    probe = keras.Model(keras_model.inputs, layer.output)
    inputs = batch(keras_model)
    expected = keras.Model(keras_model.inputs, layer.input).predict(inputs[0], verbose=0)
    np.testing.assert_array_equal(probe.predict(inputs[0], verbose=0), expected)


def test_training_only_configs_go_through_the_files(tmp_path):
    """.keras -> exchange file -> .keras keeps every option; the graph's JSON reads back the same."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input(IMAGE, name="image")
    x = L.RandomFlip("vertical", seed=3, name="flip")(inputs)
    x = L.RandomRotation(0.1, fill_mode="constant", fill_value=0.25, name="rotate")(x)
    x = L.AugMix(value_range=(0, 1), num_chains=2, chain_depth=(1, 2), factor=1, name="augmix")(x)
    x = L.Conv2D(4, 3, name="conv")(x)
    x = L.GaussianNoise(0.2, seed=5, name="noise")(x)
    x = L.SpatialDropout2D(0.1, name="spatial")(x)
    model = randomize(keras.Model(inputs, L.ActivityRegularization(l1=0.5, name="regular")(x)), seed=1)
    model.save(tmp_path / "model.keras")
    graph = cli.convert(tmp_path / "model.keras", tmp_path / "model.safetensors")
    assert Graph.from_json(graph.to_json()) == graph
    cli.convert(tmp_path / "model.safetensors", tmp_path / "back.keras")
    back = keras.saving.load_model(tmp_path / "back.keras")
    assert layer_configs(back) == layer_configs(model)
    (image,) = batch(model)
    assert max_difference(keras_adapter.predict(back, [image]), keras_adapter.predict(model, [image])) == 0.0


def run_generated_code(model, tmp_path, name="generated", inputs=None):
    """Save `model` as .keras, convert it to PyTorch source, run that source on a batch (channels
    first), and return its largest difference from Keras."""
    import torch

    from exchange.kinds.axis_order import to_keras_order, to_torch_order
    from exchange.torch_adapter import class_name

    model.save(tmp_path / f"{name}.keras")
    graph = cli.convert(tmp_path / f"{name}.keras", tmp_path / f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"generated_{name}", tmp_path / f"{name}.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = getattr(generated, class_name(graph.name))()
    module.load_state_dict(generated.load(str(tmp_path / f"{name}.safetensors")), strict=True)
    inputs = batch(model) if inputs is None else inputs
    torch_inputs = [torch.from_numpy(array).permute(*to_torch_order(array.ndim - 1)) for array in inputs]
    with torch.no_grad():
        outputs = module.eval()(*torch_inputs)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    outputs = [output.permute(*to_keras_order(output.ndim - 1)).numpy() for output in outputs]
    return max_difference(outputs, keras_adapter.predict(model, inputs))


def test_generated_code_of_training_only_layers(tmp_path):
    keras.utils.set_random_seed(5)
    inputs = keras.Input(IMAGE, name="image")
    x = L.RandomZoom(0.2, name="zoom")(L.RandomContrast(0.3, name="contrast")(inputs))
    x = L.Conv2D(4, 3, name="conv")(L.MixUp(name="mixup")(x))
    x = L.Reshape((7 * 10, 4), name="steps")(L.GaussianDropout(0.3, name="noise")(x))
    x = L.AlphaDropout(0.2, name="alpha")(L.Identity(name="same")(x))
    model = randomize(keras.Model(inputs, L.Dense(3, name="out")(x), name="noops"), seed=2)
    assert run_generated_code(model, tmp_path) <= TOLERANCE


def test_generated_code_of_reshaping_layers(tmp_path):
    """nn.ZeroPad*d, F.pad, narrow and repeat_interleave in generated code, both data formats."""
    keras.utils.set_random_seed(5)
    image = keras.Input(IMAGE, name="image")
    x = L.UpSampling2D((2, 3), name="up")(image)
    x = L.ZeroPadding2D(((1, 2), (0, 3)), data_format="channels_first", name="pad")(x)
    x = L.Cropping2D(((1, 0), (2, 1)), data_format="channels_first", name="crop")(x)
    x = L.GlobalAveragePooling2D(name="pool")(L.Conv2D(3, 2, name="conv")(x))
    volume = keras.Input(VOLUME, name="volume")
    y = L.UpSampling3D((1, 3, 2), data_format="channels_first", name="up3")(volume)
    y = L.Cropping3D(((1, 2), (0, 1), (2, 3)), name="crop3")(L.ZeroPadding3D(1, name="pad3")(y))
    y = L.Reshape((-1, 3), name="steps")(y)
    y = L.Cropping1D((2, 3), name="crop1")(L.UpSampling1D(2, name="up1")(L.ZeroPadding1D((1, 2), name="pad1")(y)))
    y = L.GlobalMaxPooling1D(name="max")(L.Conv1D(3, 2, name="conv1")(y))
    model = randomize(keras.Model([image, volume], L.Add(name="sum")([x, y]), name="reshapes"), seed=2)
    assert run_generated_code(model, tmp_path) <= TOLERANCE


@pytest.mark.parametrize(
    "make_layer, message",
    [
        (lambda: L.RandomFlip(bounding_box_format="xyxy"), "unsupported option bounding_box_format='xyxy'"),
    ],
)
def test_refusals_are_named(make_layer, message):
    layer = make_layer()
    layer.name = "bad"
    model = keras.Sequential([keras.Input(IMAGE), layer])
    with pytest.raises(UnsupportedLayerError, match=f"layer 'bad' \\({type(layer).__name__}\\): {message}"):
        keras_adapter.architecture_of(model)


def test_training_only_config_from_a_file_is_checked():
    """An exchange file's config is data: a string outside Keras's choices, a number where a
    range goes, a seed that is not an integer are refused, naming the layer and the option."""
    keras.utils.set_random_seed(1)
    graph = keras_adapter.architecture_of(image_then_conv(L.RandomRotation(0.2, name="rotate")))
    document = json.loads(graph.to_json())
    node = next(node for node in document["nodes"] if node["name"] == "rotate")
    for key, value, expected in [
        ("interpolation", "__import__('os')", "is not one of"),
        ("factor", "0.2", "is not a"),
        ("seed", 1.5, "is not a"),
        ("factor", [0.1, 0.2, 0.3], "is not a"),
    ]:
        original = node["config"][key]
        node["config"][key] = value
        with pytest.raises(ExchangeError, match=f"layer 'rotate'.*{key}.*{expected}"):
            Graph.from_json(json.dumps(document))
        node["config"][key] = original
    assert Graph.from_json(json.dumps(document)) == graph


def masked_sequences(shape, mask_value, rows=6, seed=0):
    """Random sequences with whole steps equal to `mask_value` (masked): one step everywhere,
    trailing padding of several lengths, a leading step; a step with only some features equal
    stays unmasked. Every row keeps unmasked steps."""
    sequences = np.random.default_rng(seed).standard_normal((rows,) + shape).astype(np.float32)
    sequences[:, 2] = mask_value
    for row, padding in enumerate(range(rows)):
        if padding:
            sequences[row, -padding:] = mask_value
    sequences[3, 0] = mask_value
    sequences[4, 5, :2] = mask_value
    return sequences


def masking_model():
    """Masking feeding LSTM, GRU (backwards), Bidirectional and GlobalAveragePooling1D, directly and
    through a Dense, which passes the mask on."""
    inputs = keras.Input(SEQUENCE, name="steps")
    masked = L.Masking(0.5, name="masking")(inputs)
    features = L.Dense(5, activation="tanh", name="dense")(masked)
    sequence = L.LSTM(4, return_sequences=True, name="lstm")(features)
    pooled = L.GlobalAveragePooling1D(name="pool")(sequence)
    last = L.GRU(3, go_backwards=True, name="gru")(masked)
    both = L.Bidirectional(L.LSTM(2), name="both")(masked)
    direct = L.GlobalAveragePooling1D(name="direct")(masked)
    return keras.Model(inputs, L.Concatenate(name="joined")([pooled, last, both, direct]), name="masked")


def masking_attention():
    inputs = keras.Input(SEQUENCE, name="steps")
    masked = L.Masking(0.5, name="masking")(inputs)
    attended = L.MultiHeadAttention(2, 3, name="attention")(masked, masked)
    return keras.Model(inputs, L.GlobalAveragePooling1D(name="pool")(attended))


MASKING = {
    "masking_attention": (masking_attention, 0.5),
    "masking_lstm": (lambda: single(SEQUENCE, L.Masking(0.5), L.LSTM(3)), 0.5),
    "masking_lstm_sequences": (lambda: single(SEQUENCE, L.Masking(), L.LSTM(3, return_sequences=True)), 0.0),
    "masking_global_average": (lambda: single(SEQUENCE, L.Masking(-1.0), L.GlobalAveragePooling1D()), -1.0),
    "masking_output": (lambda: single(SEQUENCE, L.Masking(2.0)), 2.0),
    "masking_model": (masking_model, 0.5),
}


@pytest.mark.parametrize("case", sorted(MASKING))
def test_masking_both_directions(case):
    make_model, mask_value = MASKING[case]
    keras.utils.set_random_seed(11)
    keras_model = randomize(make_model(), seed=3)
    inputs = [masked_sequences(SEQUENCE, mask_value)]
    difference, _ = both_directions(keras_model, inputs)
    print(f"{case}: {difference:.2e}")
    assert difference <= TOLERANCE


def test_masking_masks_what_keras_masks():
    """Keras's mask and output: masked steps are zeros, GlobalAveragePooling1D leaves them out."""
    keras.utils.set_random_seed(1)
    model = single(SEQUENCE, L.Masking(0.5), L.GlobalAveragePooling1D())
    (sequences,) = inputs = [masked_sequences(SEQUENCE, 0.5)]
    keep = np.any(sequences != 0.5, axis=-1, keepdims=True)
    expected = (sequences * keep).sum(axis=1) / keep.sum(axis=1)
    graph = keras_adapter.architecture_of(model)
    (outputs,) = torch_adapter.predict(torch_adapter.model_from_tensors(graph, {}), inputs)
    np.testing.assert_allclose(outputs, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(keras_adapter.predict(model, inputs)[0], expected, rtol=1e-6, atol=1e-6)


def test_masking_through_files_and_generated_code(tmp_path):
    """The saved model records the mask as NotEqual and Any operations given as `mask=`: read,
    checked against the Masking, and the generated code computes it."""
    keras.utils.set_random_seed(4)
    model = randomize(masking_model(), seed=2)
    inputs = [masked_sequences(SEQUENCE, 0.5)]
    difference = run_generated_code(model, tmp_path, "masked", inputs)
    print(f"masking generated code: {difference:.2e}")
    assert difference <= TOLERANCE
    cli.convert(tmp_path / "masked.keras", tmp_path / "masked.safetensors")
    cli.convert(tmp_path / "masked.safetensors", tmp_path / "back.keras")
    back = keras.saving.load_model(tmp_path / "back.keras")
    assert max_difference(keras_adapter.predict(back, inputs), keras_adapter.predict(model, inputs)) <= TOLERANCE


def test_mask_recorded_with_another_value_is_refused():
    """A `mask=` that Keras's config records as `x != 0.25` where the Masking masks 0.5 is not the
    graph's mask: refused, naming the layer."""
    from exchange.keras_config import parse_model_config

    model = single(SEQUENCE, L.Masking(0.5, name="masking"), L.LSTM(3, name="lstm"))
    config = json.loads(json.dumps({"class_name": "Sequential", "config": model.get_config()}))
    assert parse_model_config(config, "model").graph.masks["masking"] == "masking:mask"
    functional = keras.Model(model.inputs, model.outputs)
    config = json.loads(json.dumps({"class_name": "Functional", "config": functional.get_config()}))
    parse_model_config(config, "model")
    (not_equal,) = [layer for layer in config["config"]["layers"] if layer["class_name"] == "NotEqual"]
    not_equal["inbound_nodes"][0]["args"][1] = 0.25
    with pytest.raises(
        UnsupportedLayerError,
        match="layer 'lstm' is given a mask .* not the mask of an Embedding with mask_zero=True or of a Masking layer",
    ):
        parse_model_config(config, "model")


def test_masking_of_an_image_is_refused():
    with pytest.raises(
        ExchangeError,
        match="layer 'masking' \\(masking\\): Masking is supported on \\(batch, steps, features\\) sequences",
    ):
        keras_adapter.architecture_of(single(IMAGE, L.Masking(name="masking")))


@pytest.mark.parametrize(
    "layer, key, value, expected",
    [
        (L.ZeroPadding3D(1, name="edited"), "data_format", "channels_middle", "is not one of"),
        (L.ZeroPadding3D(1, name="edited"), "amounts", [[1, 1], [1, 1]], "has not 3 spatial axes"),
        (L.Cropping1D((1, 2), name="edited"), "amounts", [[1, -1]], "from 0 to"),
        (L.UpSampling3D((1, 2, 3), name="edited"), "size", [1, 0, 3], "from 1 to"),
        (L.UpSampling1D(2, name="edited"), "size", [10**9], "from 1 to"),
        (L.Dropout(0.5, name="edited"), "seed", "7", "is not a"),
        (L.Masking(name="edited"), "mask_value", "0", "is not a"),
    ],
)
def test_reshaping_config_from_a_file_is_checked(layer, key, value, expected):
    """An exchange file's config for these kinds is checked field by field, naming the layer."""
    shape = {"ZeroPadding3D": VOLUME, "UpSampling3D": VOLUME}.get(type(layer).__name__, SEQUENCE)
    graph = keras_adapter.architecture_of(single(shape, layer))
    document = json.loads(graph.to_json())
    (node,) = [node for node in document["nodes"] if node["name"] == "edited"]
    node["config"][key] = value
    with pytest.raises(ExchangeError, match=f"layer 'edited'.*{expected}"):
        Graph.from_json(json.dumps(document))


def test_verification_inputs_mask_some_steps_of_a_masking():
    """--verify's random batch gives a Masking on an input whole steps equal to its mask_value."""
    from exchange.verify import verification_inputs

    graph = keras_adapter.architecture_of(single(SEQUENCE, L.Masking(0.25), L.LSTM(2)))
    (sequences,), _ = verification_inputs(graph, None)
    masked = np.all(sequences == 0.25, axis=-1)
    assert 0.1 < masked.mean() < 0.5 and np.all(np.any(sequences != 0.25, axis=-1) == ~masked)
