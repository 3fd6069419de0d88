"""PReLU, Dot, the normalisations' wider options and the dot-product attentions, in both directions
with real Keras (TensorFlow backend) and real PyTorch, and as generated code.

Each case is a small Keras model around the layer, on non-square sizes (odd and even), with
every variable seeded to a non-trivial value (PReLU's alpha starts at 0, RMSNormalization's
scale at 1: such defaults hide layout bugs).
- Keras -> torch: the live model's tensors into the torch module; outputs compared.
- torch -> Keras: a random state_dict into both the torch module and the Keras model built from
  the graph; outputs compared, and the Keras weights read back equal the state_dict bit for bit.
- The model saved as `.keras`, converted to code by the CLI: the generated module, imported,
  computes what Keras computed.
"""

import importlib.util
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
from kerasmodels import batch, check_both_directions, max_difference, randomize

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import UnsupportedLayerError
from exchange.graph import Graph

L = keras.layers
# float32 rounding between TensorFlow and PyTorch on these small layers stays near 1e-6.
TOLERANCE = 1e-5
# Variables that `randomize` leaves at their initial value, seeded here.
SEEDED_HERE = ("alpha", "scale", "concat_score_weight")


def single(shape, *layers):
    return keras.Sequential([keras.Input(shape)] + list(layers))


def pair(first_shape, second_shape, layer):
    first, second = keras.Input(first_shape, name="first"), keras.Input(second_shape, name="second")
    return keras.Model([first, second], layer([first, second]))


def attention(layer, query=(7, 4), value=(6, 5), key_width=None, masked=False, **call):
    """Query (Tq, F) attends to value (Tv, Fv), optionally a key (Tv, key_width); `masked`: the
    query and value come from Embeddings with mask_zero (token ids in [0, 7): some are 0)."""
    if masked:
        tokens = [
            keras.Input((steps,), dtype="int32", name=name)
            for steps, name in ((query[0], "query_ids"), (value[0], "value_ids"))
        ]
        query_tensor = L.Embedding(9, query[1], mask_zero=True, name="query")(tokens[0])
        value_tensor = L.Embedding(9, value[1], mask_zero=True, name="value")(tokens[1])
        inputs = tokens
    else:
        inputs = [keras.Input(query, name="query"), keras.Input(value, name="value")]
        query_tensor, value_tensor = inputs
    arguments = [query_tensor, value_tensor]
    if key_width:
        inputs.append(keras.Input(value[:-1] + (key_width,), name="key"))
        arguments.append(inputs[-1])
    return keras.Model(inputs, layer(arguments, **call))


def grouped(query=(7, 12), value=(5, 12), key_width=None, mask=False, tokens=False, call=None, **options):
    """GroupedQueryAttention: query (T, F) attends to value (S, F); optionally a key, an int
    attention_mask (T, S) input, or query and value from Embeddings with mask_zero (`tokens`)."""
    layer = L.GroupQueryAttention(name="gqa", **options)
    if tokens:
        ids = [
            keras.Input((steps,), dtype="int32", name=name)
            for steps, name in ((query[0], "query_ids"), (value[0], "value_ids"))
        ]
        inputs = list(ids)
        query_tensor, value_tensor = (
            L.Embedding(9, width, mask_zero=True, name=name)(tensor)
            for tensor, width, name in ((ids[0], query[1], "query"), (ids[1], value[1], "value"))
        )
    else:
        inputs = [keras.Input(query, name="query"), keras.Input(value, name="value")]
        query_tensor, value_tensor = inputs
    call = dict(call or {})
    if key_width:
        call["key"] = keras.Input((value[0], key_width), name="key")
        inputs.append(call["key"])
    if mask:  # ids in [0, 7) from `batch`: about one in seven positions is 0, masked
        call["attention_mask"] = keras.Input((query[0], value[0]), dtype="int32", name="mask")
        inputs.append(call["attention_mask"])
    return keras.Model(inputs, layer(query_tensor, value_tensor, **call))


def multi_head(query=(7, 12), value=(5, 10), key_width=None, mask=False, call=None, **options):
    """MultiHeadAttention: query (T, F) attends to value (S, Fv); optionally a key and an int
    attention_mask (T, S) input."""
    inputs = [keras.Input(query, name="query"), keras.Input(value, name="value")]
    call = dict(call or {})
    if key_width:
        call["key"] = keras.Input(value[:-1] + (key_width,), name="key")
        inputs.append(call["key"])
    if mask:
        call["attention_mask"] = keras.Input((query[0], value[0]), dtype="int32", name="mask")
        inputs.append(call["attention_mask"])
    return keras.Model(inputs, L.MultiHeadAttention(name="mha", **options)(inputs[0], inputs[1], **call))


def adapted(shape, **options):
    """An adapted Normalization (its statistics seeded again by `seeded`), then a layer that mixes."""
    layer = L.Normalization(**options)
    layer.adapt(np.random.default_rng(5).normal(2.0, 3.0, (64,) + shape).astype(np.float32))
    return single(shape, layer, L.Dense(3))


CASES = {
    # PReLU: alpha per element (no shared axis), per channel, one value, and along one spatial axis
    "prelu_features": lambda: single((13,), L.Dense(6), L.PReLU()),
    "prelu_image_unshared": lambda: single((5, 6, 3), L.PReLU()),
    "prelu_image_per_channel": lambda: single((9, 12, 5), L.PReLU(shared_axes=[1, 2])),
    "prelu_image_single_value": lambda: single((9, 12, 5), L.PReLU(shared_axes=[1, 2, 3])),
    "prelu_image_per_row": lambda: single((9, 12, 5), L.PReLU(shared_axes=[2, 3])),
    "prelu_sequence_shared_steps": lambda: single((11, 4), L.PReLU(shared_axes=1), L.Conv1D(3, 2)),
    "prelu_volume_per_depth": lambda: single((3, 4, 5, 2), L.PReLU(shared_axes=[2, 4])),
    # Dot: features (output (batch, 1)), sequences on the channels and on the steps, an image
    # against a sequence, mixed ranks both ways, normalised
    "dot_features": lambda: pair((7,), (7,), L.Dot(axes=-1)),
    "dot_sequences_channels": lambda: pair((5, 4), (6, 4), L.Dot(axes=-1)),
    "dot_sequences_steps": lambda: pair((5, 4), (5, 3), L.Dot(axes=1)),
    "dot_cross_axes_normalized": lambda: pair((5, 4), (4, 3), L.Dot(axes=[2, 1], normalize=True)),
    "dot_image_sequence": lambda: pair((3, 4, 5), (6, 4), L.Dot(axes=[-2, 2])),
    "dot_features_sequence": lambda: pair((4,), (3, 4), L.Dot(axes=[1, 2])),
    "dot_sequence_features": lambda: pair((3, 4), (3,), L.Dot(axes=[1, -1], normalize=True)),
    # RMSNormalization, LayerNormalization(rms_scaling=True), several axes
    "rms_norm_features": lambda: single((13,), L.Dense(6), L.RMSNormalization()),
    "rms_norm_image": lambda: single((9, 12, 5), L.RMSNormalization(epsilon=1e-4)),
    "rms_norm_sequence_two_axes": lambda: single((11, 4), L.RMSNormalization(axis=[-1, -2])),
    "rms_norm_image_width_channels": lambda: single((9, 12, 5), L.RMSNormalization(axis=[-2, 3])),
    "layer_norm_rms_scaling_image": lambda: single((9, 12, 5), L.LayerNormalization(rms_scaling=True, epsilon=1e-4)),
    "layer_norm_rms_scaling_features": lambda: single((13,), L.Dense(6), L.LayerNormalization(rms_scaling=True)),
    "layer_norm_rms_scaling_two_axes": lambda: single((11, 4), L.LayerNormalization(axis=[1, 2], rms_scaling=True)),
    "layer_norm_all_axes": lambda: single((5, 6, 3), L.LayerNormalization(axis=[1, 2, 3])),
    "layer_norm_two_axes_no_center": lambda: single((11, 4), L.LayerNormalization(axis=[-1, -2], center=False)),
    "layer_norm_spatial_no_scale": lambda: single((9, 12, 5), L.LayerNormalization(axis=[1, 2], scale=False)),
    "layer_norm_height": lambda: single((9, 12, 5), L.LayerNormalization(axis=1, epsilon=1e-5)),
    "unit_norm_two_axes": lambda: single((9, 12, 5), L.UnitNormalization(axis=[1, 2])),
    "unit_norm_mixed_signs": lambda: single((5, 6, 3), L.UnitNormalization(axis=[-1, 1])),
    "normalization_two_axes": lambda: adapted((4, 3, 5), axis=[1, 2]),
    "normalization_height": lambda: adapted((9, 12, 5), axis=1),
    "normalization_none": lambda: adapted((2, 3), axis=None),
    "normalization_none_features": lambda: adapted((6,), axis=None, invert=True),
    "normalization_none_constants": lambda: single((2, 3), L.Normalization(axis=None, mean=3.0, variance=2.0)),
    # BatchNormalization on another axis than the channels, and with batch renormalisation
    "batch_norm_axis1_sequence": lambda: single((6, 7), L.BatchNormalization(axis=1)),
    "batch_norm_channels_first_image": lambda: single((3, 9, 12), L.BatchNormalization(axis=1, epsilon=1e-4)),
    "batch_norm_width": lambda: single((9, 12, 5), L.BatchNormalization(axis=-2, center=False)),
    "batch_norm_renorm": lambda: single(
        (9, 12, 5),
        L.BatchNormalization(renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}, renorm_momentum=0.8),
    ),
    "batch_norm_renorm_features": lambda: single((10,), L.BatchNormalization(renorm=True, scale=False)),
    # Attention, AdditiveAttention
    "attention_dot": lambda: attention(L.Attention(), query=(7, 5)),
    "attention_dot_scale_key_causal": lambda: attention(
        L.Attention(use_scale=True, dropout=0.3), query=(7, 3), key_width=3, use_causal_mask=True
    ),
    "attention_concat_scale": lambda: attention(L.Attention(score_mode="concat", use_scale=True), query=(7, 5)),
    "attention_concat_key_scores": lambda: attention(
        L.Attention(score_mode="concat"), query=(6, 3), key_width=3, return_attention_scores=True
    ),
    "attention_masked": lambda: attention(L.Attention(use_scale=True), query=(7, 5), masked=True),
    "attention_masked_causal": lambda: attention(L.Attention(), query=(6, 5), masked=True, use_causal_mask=True),
    "additive_attention": lambda: attention(L.AdditiveAttention(), query=(7, 5)),
    "additive_attention_no_scale_key": lambda: attention(L.AdditiveAttention(use_scale=False), key_width=4),
    "additive_attention_scores": lambda: attention(L.AdditiveAttention(), query=(6, 5), return_attention_scores=True),
    "attention_images_scores": lambda: attention(
        L.Attention(use_scale=True), query=(3, 6, 4), value=(3, 5, 2), key_width=4, return_attention_scores=True
    ),
    "additive_attention_images_causal": lambda: attention(
        L.AdditiveAttention(), query=(2, 5, 4), value=(2, 5, 3), key_width=4, use_causal_mask=True
    ),
    "gqa_cross": lambda: grouped(head_dim=3, num_query_heads=4, num_key_value_heads=2),
    "gqa_key_causal_no_bias": lambda: grouped(
        query=(6, 8),
        value=(6, 8),
        key_width=5,
        head_dim=5,
        num_query_heads=6,
        num_key_value_heads=3,
        use_bias=False,
        call={"use_causal_mask": True},
    ),
    "gqa_attention_mask_one_kv_head": lambda: grouped(mask=True, head_dim=4, num_query_heads=3, num_key_value_heads=1),
    "gqa_embedding_masks": lambda: grouped(
        tokens=True, query=(7, 6), value=(5, 6), head_dim=2, num_query_heads=4, num_key_value_heads=4
    ),
    "gqa_dropout": lambda: grouped(head_dim=3, num_query_heads=2, num_key_value_heads=1, dropout=0.2),
    "gqa_gate_sliding_window_causal": lambda: grouped(
        query=(7, 8),
        value=(7, 8),
        head_dim=3,
        num_query_heads=4,
        num_key_value_heads=2,
        use_gate=True,
        sliding_window=3,
        call={"use_causal_mask": True},
    ),
    "gqa_gate_no_bias_key": lambda: grouped(
        key_width=5, head_dim=2, num_query_heads=2, num_key_value_heads=1, use_gate=True, use_bias=False
    ),
    "gqa_scores_masked": lambda: grouped(
        mask=True, head_dim=3, num_query_heads=4, num_key_value_heads=2, call={"return_attention_scores": True}
    ),
    "gqa_dropout_embedding_masks_causal": lambda: grouped(
        tokens=True,
        query=(6, 6),
        value=(6, 6),
        head_dim=2,
        num_query_heads=2,
        num_key_value_heads=1,
        dropout=0.3,
        call={"use_causal_mask": True},
    ),
    "mha_gate_self": lambda: multi_head(query=(7, 16), value=(7, 16), num_heads=2, key_dim=8, use_gate=True),
    "mha_gate_cross_key_no_bias": lambda: multi_head(
        key_width=6, num_heads=3, key_dim=4, value_dim=2, use_gate=True, use_bias=False
    ),
    "mha_sliding_window_causal": lambda: multi_head(
        query=(7, 16), value=(7, 16), num_heads=2, key_dim=8, sliding_window=2, call={"use_causal_mask": True}
    ),
    "mha_scores_masked": lambda: multi_head(mask=True, num_heads=3, key_dim=4, call={"return_attention_scores": True}),
    "mha_scores_packable": lambda: multi_head(
        query=(7, 16), value=(5, 16), num_heads=2, key_dim=8, call={"return_attention_scores": True}
    ),
    "mha_gate_scores_dropout_window": lambda: multi_head(
        query=(6, 12),
        value=(6, 12),
        num_heads=2,
        key_dim=3,
        use_gate=True,
        dropout=0.2,
        sliding_window=3,
        call={"return_attention_scores": True},
    ),
    # MultiHeadAttention over other axes: the default (all but batch and features), one inner axis,
    # axes in another order, with gate, output_shape and scores
    "mha_image_default_axes": lambda: multi_head(query=(3, 4, 8), value=(2, 5, 6), num_heads=2, key_dim=3),
    "mha_image_width_scores": lambda: multi_head(
        query=(3, 4, 8),
        value=(3, 5, 8),
        num_heads=2,
        key_dim=4,
        attention_axes=2,
        call={"return_attention_scores": True},
    ),
    "mha_volume_axes_reversed_gate": lambda: multi_head(
        query=(2, 3, 4, 6),
        value=(2, 3, 5, 6),
        key_width=4,
        num_heads=2,
        key_dim=2,
        use_gate=True,
        output_shape=(3, 2),
        attention_axes=[3, -3],
    ),
    "mha_volume_two_axes_scores": lambda: multi_head(
        query=(5, 3, 4, 8),
        value=(5, 3, 2, 8),
        num_heads=2,
        key_dim=2,
        attention_axes=[2, 3],
        call={"return_attention_scores": True},
    ),
    "mha_sequence_axes_written": lambda: multi_head(num_heads=2, key_dim=3, attention_axes=-2),
    "additive_attention_masked": lambda: attention(L.AdditiveAttention(dropout=0.1), query=(7, 5), masked=True),
}


def seeded(model, seed=3):
    randomize(model, seed=seed)
    generator = np.random.default_rng(seed + 100)
    for variable in model.weights:
        if variable.name in SEEDED_HERE:
            variable.assign(generator.uniform(0.2, 1.5, tuple(variable.shape)).astype(variable.dtype))
    return model


def check_norm_both_directions(keras_model):
    graph = keras_adapter.architecture_of(keras_model)
    assert Graph.from_json(graph.to_json()) == graph  # every config value survives the exchange file
    checked = check_both_directions(keras_model, graph=graph, tolerance=TOLERANCE)
    return checked.to_torch, checked.to_keras


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_directions(case):
    keras.utils.set_random_seed(11)
    forward, backward = check_norm_both_directions(seeded(CASES[case]()))
    print(f"{case}: Keras -> torch {forward:.2e}, torch -> Keras {backward:.2e}")


def run_generated_code(keras_model, tmp_path):
    """Max difference between Keras and the CLI's generated code for the saved model."""
    keras_path = tmp_path / "model.keras"
    keras_model.save(keras_path)
    graph = cli.convert(keras_path, tmp_path / "model.py")
    lint = subprocess.run(
        [sys.executable, "-m", "pyflakes", str(tmp_path / "model.py")], capture_output=True, text=True
    )
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout
    spec = importlib.util.spec_from_file_location("generated_norm", tmp_path / "model.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = getattr(generated, torch_adapter.class_name(graph.name))()
    module.load_state_dict(generated.load(str(tmp_path / "model.safetensors")), strict=True)
    module.eval()
    inputs = batch(keras_model)
    expected = keras_adapter.predict(keras_model, inputs)
    torch_inputs = [
        torch.from_numpy(x).permute(0, x.ndim - 1, *range(1, x.ndim - 1)) if x.ndim > 2 else torch.from_numpy(x)
        for x in inputs
    ]
    with torch.no_grad():
        outputs = module(*torch_inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    outputs = [y.permute(0, *range(2, y.ndim), 1) if y.ndim > 2 else y for y in outputs]
    return max_difference([y.numpy() for y in outputs], expected), (tmp_path / "model.py").read_text()


@pytest.mark.parametrize(
    "case",
    [
        "prelu_image_per_channel",
        "prelu_image_per_row",
        "dot_image_sequence",
        "rms_norm_image_width_channels",
        "layer_norm_rms_scaling_image",
        "unit_norm_two_axes",
        "normalization_two_axes",
        "batch_norm_channels_first_image",
        "attention_images_scores",
        "attention_masked_causal",
        "gqa_attention_mask_one_kv_head",
        "gqa_gate_sliding_window_causal",
        "gqa_scores_masked",
        "mha_gate_scores_dropout_window",
        "mha_volume_axes_reversed_gate",
        "mha_image_width_scores",
    ],
)
def test_generated_code(case, tmp_path):
    keras.utils.set_random_seed(12)
    difference, source = run_generated_code(seeded(CASES[case]()), tmp_path)
    assert difference <= TOLERANCE
    print(f"{case}: generated code vs Keras {difference:.2e}")


def refusal(model_factory) -> str:
    with pytest.raises(UnsupportedLayerError) as error:
        keras_adapter.architecture_of(model_factory())
    message = str(error.value)
    assert "\n" not in message
    return message


def test_axes_sorting_to_another_order_are_refused():
    message = refusal(lambda: single((5, 6, 3), L.LayerNormalization(axis=[1, -1])))
    # Keras's build sorts the list as written, and its config keeps the sorted list
    assert "LayerNormalization: axis [-1, 1] sorts to another order" in message


def test_normalization_values_per_position_are_refused():
    message = refusal(
        lambda: single((4, 3), L.Normalization(axis=[1, 2], mean=[[1.0, 2.0, 3.0]] * 4, variance=[[1.0, 2.0, 3.0]] * 4))
    )
    assert "unsupported option mean" in message or "only one value" in message


def test_rms_normalization_off_the_last_axes_is_refused():
    """Keras multiplies the scale along the last axes whatever it normalised: (9, 5) over
    axis 1 of a (9, 5, 5) input scales the channels by the height's values."""
    message = refusal(lambda: single((5, 7, 5), L.RMSNormalization(axis=1)))
    assert "Keras multiplies its scale along the last 1 axes" in message


def test_attention_masks_given_as_tensors_are_refused():
    query, value = keras.Input((7, 4), name="query"), keras.Input((6, 4), name="value")
    query_mask, value_mask = (
        keras.Input((steps,), dtype="bool", name=name) for steps, name in ((7, "query_mask"), (6, "value_mask"))
    )
    message = refusal(
        lambda: keras.Model(
            [query, value, query_mask, value_mask],
            L.Attention(name="att")([query, value], mask=[query_mask, value_mask]),
        )
    )
    assert "'att' (Attention)" in message


@pytest.mark.parametrize("call, dropout", [({}, 0.0), ({"return_attention_scores": True}, 0.0), ({}, 0.2)])
def test_grouped_query_attention_fully_masked_rows(call, dropout):
    """Keras's two ways of masking differ on a query step that attends to nothing: its
    dot_product_attention averages the values, its explicit path (dropout, returned scores) gives 0."""
    keras.utils.set_random_seed(5)
    model = seeded(grouped(mask=True, head_dim=3, num_query_heads=4, num_key_value_heads=2, dropout=dropout, call=call))
    inputs = batch(model)
    inputs[-1][:, 2, :] = 0  # query step 2 attends to nothing
    inputs[-1][:, :, 1] = 0
    graph = keras_adapter.architecture_of(model)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
    expected = keras_adapter.predict(model, inputs)
    assert max_difference(torch_adapter.predict(torch_model, inputs), expected) <= TOLERANCE
    averaged = np.ptp(expected[0][:, 2, :], axis=0).max() > 1e-3  # differs across the batch: values averaged
    assert averaged == (not call and not dropout)


@pytest.mark.parametrize("call, dropout", [({}, 0.0), ({"return_attention_scores": True}, 0.0), ({}, 0.2)])
def test_multi_head_attention_fully_masked_rows(call, dropout):
    """As GroupedQueryAttention's: a query step that attends to nothing averages the values on
    Keras's dot_product_attention path and gives 0 on its explicit path."""
    keras.utils.set_random_seed(5)
    model = seeded(multi_head(mask=True, num_heads=2, key_dim=4, dropout=dropout, call=call))
    inputs = batch(model)
    inputs[-1][:, 2, :] = 0  # query step 2 attends to nothing
    graph = keras_adapter.architecture_of(model)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(model))
    expected = keras_adapter.predict(model, inputs)
    assert max_difference(torch_adapter.predict(torch_model, inputs), expected) <= TOLERANCE
    averaged = np.ptp(expected[0][:, 2, :], axis=0).max() > 1e-3  # differs across the batch: values averaged
    assert averaged == (not call and not dropout)
