"""The single-option refusals of issue 14 turned into exact conversions, in both directions with
real Keras (TensorFlow backend) and real PyTorch, and through generated code: CategoryEncoding and
Discretization on ids of any rank and with count weights, SpectralNormalization, Softmax over
several axes and with masks of lower rank, Flatten channels_first, GroupNormalization on any axis,
LoRA convolutions, BatchNormalization given a mask, MultiHeadAttention's causal masks with
attention_axes, ReversibleEmbedding's half-precision logits; and the refusals that remain.

Each case is a small Keras model on non-square sizes with seeded non-trivial weights:
- Keras -> torch: the live model's tensors into the torch module; outputs compared.
- torch -> Keras: a random state_dict into both the torch module and the Keras model built from
  the graph; outputs compared, and the Keras weights read back equal the state bit for bit.
- saved as `.keras` and converted to Python source: the generated module computes what Keras does.
"""

import importlib.util
import json

import keras
import numpy as np
import pytest
import torch
from generated_code import check_generated_file
from kerasmodels import batch, check_both_directions, max_difference

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import ExchangeError, UnsupportedLayerError

L = keras.layers
TOLERANCE = 1e-5


def single(shape, *layers, dtype="float32"):
    return keras.Sequential([keras.Input(shape, dtype=dtype)] + list(layers))


def seed_all(model, seed):
    """Every variable random; variances positive."""
    generator = np.random.default_rng(seed)
    for variable in model.weights:
        value = generator.standard_normal(tuple(variable.shape)) * 0.3
        if "variance" in variable.name:
            value = np.abs(value) + 0.5
        variable.assign(value.astype(variable.dtype))
    return model


def weighted_count(shape=(5,)):
    """CategoryEncoding(count) called with `count_weights=` a float tensor of the ids' shape."""
    ids, weights = keras.Input(shape, dtype="int32"), keras.Input(shape)
    return keras.Model(
        [ids, weights], L.Dense(3)(L.CategoryEncoding(7, output_mode="count")(ids, count_weights=weights))
    )


def bins(output_mode, *after):
    return [L.Discretization(bin_boundaries=[-0.5, 0.0, 0.4, 1.1], output_mode=output_mode)] + list(after)


CASES = {
    "category_encoding_one_hot_of_a_batch_of_ids": lambda: single(
        (), L.CategoryEncoding(6, output_mode="one_hot"), L.Dense(3), dtype="int32"
    ),
    "category_encoding_one_hot_rank3": lambda: single(
        (3, 4), L.CategoryEncoding(5, output_mode="one_hot"), L.Dense(2), dtype="int32"
    ),
    "category_encoding_multi_hot_rank3": lambda: single((4, 4), L.CategoryEncoding(6), L.Dense(2), dtype="int32"),
    "category_encoding_count_rank3": lambda: single((3, 3), L.CategoryEncoding(6, output_mode="count"), dtype="int32"),
    "category_encoding_count_weights": weighted_count,
    "category_encoding_count_weights_rank3": lambda: weighted_count((3, 3)),
    "discretization_one_hot_rank3": lambda: single((3, 4), *bins("one_hot", L.Conv2D(2, 2))),
    "discretization_one_hot_last_axis_1": lambda: single((5, 1), *bins("one_hot", L.Conv1D(2, 2))),
    "discretization_multi_hot_rank3": lambda: single((3, 4), *bins("multi_hot", L.Dense(2))),
    "discretization_count_rank4": lambda: single((3, 4, 5), *bins("count")),
    "discretization_one_hot_of_a_batch_of_values": lambda: single((), *bins("one_hot", L.Dense(2))),
}


def check_generated_code(keras_model, tmp_path):
    """The model saved as .keras, converted to Python: the generated module (which imports only
    torch), loaded with its weights file, computes Keras's outputs."""
    inputs = batch(keras_model, rows=5)
    expected = keras_adapter.predict(keras_model, inputs)
    keras_model.save(tmp_path / "model.keras")
    code_path = tmp_path / "model.py"
    graph = cli.convert(tmp_path / "model.keras", code_path)
    check_generated_file(code_path)
    spec = importlib.util.spec_from_file_location(f"generated_{tmp_path.name}", code_path)
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = getattr(generated, torch_adapter.class_name(graph.name))()
    module.load_state_dict(generated.load(str(tmp_path / "model.safetensors")), strict=True)
    with torch.no_grad():
        outputs = module.eval()(*torch_adapter.torch_inputs(graph, inputs))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    from exchange.kinds.axis_order import to_keras_order

    got = [
        output.permute(to_keras_order(len(graph.shapes[name]))).numpy() for name, output in zip(graph.outputs, outputs)
    ]
    scale = max(1.0, max(float(np.max(np.abs(array))) for array in expected))
    assert max_difference(expected, got) <= TOLERANCE * scale


def refused(model_function, message, error=UnsupportedLayerError):
    """Converting the model raises one `error` line matching `message`."""
    with pytest.raises(error, match=message) as caught:
        keras_adapter.architecture_of(model_function())
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("mode", ["multi_hot", "count"])
def test_encodings_of_a_batch_of_ids_are_refused(mode):
    """Keras counts ids of shape (batch,) over the whole batch: an output without a batch axis."""
    refused(
        lambda: single((), L.CategoryEncoding(6, output_mode=mode, name="bad"), dtype="int32"),
        rf"layer 'bad' \(category_encoding\): CategoryEncoding output_mode '{mode}' on ids of shape "
        r"\(batch,\) counts over the whole batch \(Keras's output \(6,\) has no batch axis\); not supported",
    )
    refused(
        lambda: single((), L.Discretization([0.0, 1.0], output_mode=mode, name="bad")),
        rf"Discretization output_mode '{mode}' on ids of shape \(batch,\) counts over the whole batch",
    )


def test_category_encoding_whose_declared_shape_differs_is_refused():
    """Keras declares (batch, 3, depth) for multi_hot on (batch, 3, 4) ids and computes (batch, 4, depth)."""
    refused(
        lambda: single((3, 4), L.CategoryEncoding(6, name="bad"), dtype="int32"),
        r"layer 'bad' \(category_encoding\): CategoryEncoding output_mode 'multi_hot' on ids of shape "
        r"\(batch, \(3, 4\)\): Keras declares \(batch, \(3, 6\)\) but computes \(batch, \(4, 6\)\)",
    )


# -- SpectralNormalization ------------------------------------------------------------------

SN = L.SpectralNormalization
SPECTRAL_CASES = {
    "spectral_dense_sequence": lambda: single((3, 4), SN(L.Dense(2, activation="tanh"), name="sn")),
    "spectral_dense_rank4_iterations": lambda: single((3, 4, 5), SN(L.Dense(3), power_iterations=3)),
    "spectral_conv2d_then_dense": lambda: single(
        (7, 6, 3), SN(L.Conv2D(4, (3, 2), padding="same")), L.Flatten(), SN(L.Dense(3, use_bias=False))
    ),
    "spectral_einsum_dense": lambda: single((5,), SN(L.EinsumDense("ab,bc->ac", 4, bias_axes="c"))),
    "spectral_conv1d_transpose": lambda: single((7, 3), SN(L.Conv1DTranspose(4, 3, strides=2))),
    "spectral_depthwise_conv2d": lambda: single((7, 8, 3), SN(L.DepthwiseConv2D(3, depth_multiplier=2))),
}
CASES.update(SPECTRAL_CASES)


def test_spectral_normalization_file_holds_the_kernel_twice(tmp_path):
    """A Keras 3 file stores the kernel in the wrapper's vars and in its layer's: the exchange
    file from it equals the live model's tensors bit for bit (kernel, vector_u, bias), and the
    torch module keeps vector_u as a buffer."""
    from exchange import fileformat

    keras.utils.set_random_seed(5)
    model = seed_all(single((4, 5), SN(L.Dense(3), name="sn")), seed=2)
    model.save(tmp_path / "sn.keras")
    cli.convert(tmp_path / "sn.keras", tmp_path / "sn.safetensors")
    stored = fileformat.materialize(fileformat.load(tmp_path / "sn.safetensors").tensors)
    live = keras_adapter.get_tensors(model)
    assert sorted(stored) == ["sn.layer.bias", "sn.layer.weight", "sn.vector_u"] == sorted(live)
    for key, value in live.items():
        np.testing.assert_array_equal(stored[key], value, err_msg=key)
    np.testing.assert_array_equal(stored["sn.vector_u"], model.get_layer("sn").vector_u.numpy())
    torch_model = torch_adapter.model_from_tensors(keras_adapter.architecture_of(model), stored)
    assert "sn.vector_u" in dict(torch_model.named_buffers())


@pytest.mark.parametrize(
    "model_function, message",
    [
        (
            lambda: single((), SN(L.Embedding(9, 3), name="bad")),
            r"layer 'bad' \(SpectralNormalization\): unsupported option layer='Embedding' \(only a Dense, EinsumDense or "
            r"convolution layer is supported inside it\)",
        ),
        (
            lambda: single((4,), SN(L.Dense(2, dtype="float64"), name="bad")),
            r"layer 'bad' \(SpectralNormalization\): the wrapped layer's dtype 'float64' differs from the wrapper's "
            r"'float32'; not supported",
        ),
    ],
)
def test_spectral_normalization_refusals(model_function, message):
    refused(model_function, message)


def test_spectral_normalization_of_a_lora_layer_is_refused():
    config = {"class_name": "Sequential", "config": single((4,), SN(L.Dense(2), name="bad")).get_config()}
    config["config"]["layers"][-1]["config"]["layer"]["config"]["lora_rank"] = 2
    config["config"]["layers"][-1]["config"]["layer"]["config"]["lora_alpha"] = 2
    from exchange.keras_config import parse_model_config

    with pytest.raises(
        UnsupportedLayerError,
        match=r"'bad' \(SpectralNormalization\).*SpectralNormalization of a "
        "layer with a LoRA adapter is not supported",
    ) as caught:
        parse_model_config(json.loads(json.dumps(config)), "hand-written")
    assert "\n" not in str(caught.value)


# -- Softmax: several axes, masks broadcast from the right -------------------------------------


def masked_softmax(shape, mask_shape, axis=-1, dtype="int32"):
    """Softmax(axis)(Dense(x), mask=m): an int mask keeps the positions where it is > 0. A mask of
    lower rank lines up with the input's last axes, its batch axis with an input axis (so the
    test batch, 5 rows, is that axis's size)."""
    values, mask = keras.Input(shape), keras.Input(mask_shape, dtype=dtype)
    return keras.Model([values, mask], L.Softmax(axis=axis)(L.Dense(shape[-1])(values), mask=mask))


CASES.update(
    {
        "softmax_two_spatial_axes": lambda: single((3, 4, 5), L.Conv2D(4, 1), L.Softmax(axis=[1, 2])),
        "softmax_channels_and_height": lambda: single((3, 4, 5), L.Conv2D(6, 1), L.Softmax(axis=(-1, 1))),
        "softmax_mask_of_a_batch": lambda: masked_softmax((5,), ()),
        "softmax_mask_of_lower_rank": lambda: masked_softmax((5, 4), (4,)),
        "softmax_mask_of_lower_rank_two_axes": lambda: masked_softmax((5, 3, 4), (3, 4), axis=(1, 3)),
        "softmax_mask_two_axes": lambda: masked_softmax((3, 4), (3, 4), axis=[1, 2], dtype="bool"),
    }
)


@pytest.mark.parametrize(
    "model_function, message, error",
    [
        (
            lambda: single((5,), L.Softmax(axis=[1, 0], name="bad")),
            r"layer 'bad' \(softmax\): axis \(1, 0\) is not a feature axis: a softmax over the batch axis makes each "
            r"row's output depend on the rows batched with it; not supported",
            UnsupportedLayerError,
        ),
        (
            lambda: single((5, 4), L.Softmax(axis=[1, -2], name="bad")),
            r"Softmax axis \(1, -2\) names an axis twice",
            ExchangeError,
        ),
        (
            lambda: masked_softmax((5, 3), (4,)),
            r"argument 'mask' of shape \(batch, 4\) for an input of shape "
            r"\(batch, 5, 3\) is not supported: it does not broadcast to it",
            ExchangeError,
        ),
    ],
)
def test_softmax_refusals(model_function, message, error):
    refused(model_function, message, error)


# -- Flatten with data_format="channels_first" ----------------------------------------------

CASES.update(
    {
        "flatten_channels_first_rank4_then_dense": lambda: single(
            (3, 4, 5), L.Conv2D(2, 1), L.Flatten(data_format="channels_first"), L.Dense(3)
        ),
        "flatten_channels_first_rank4_output": lambda: single(
            (3, 4, 5), L.Conv2D(2, 1), L.Flatten(data_format="channels_first")
        ),
        "flatten_channels_first_rank3": lambda: single((4, 5), L.Dense(3), L.Flatten(data_format="channels_first")),
        "flatten_channels_first_rank5": lambda: single(
            (2, 3, 4, 5), L.Dense(3), L.Flatten(data_format="channels_first"), L.Dense(2)
        ),
        "flatten_channels_first_of_a_batch": lambda: single((), L.Flatten(data_format="channels_first"), L.Dense(2)),
    }
)


# -- GroupNormalization on another axis than the channels -----------------------------------

GN = L.GroupNormalization
CASES.update(
    {
        "group_norm_axis1_of_an_image": lambda: single((4, 5, 3), L.Conv2D(2, 1), GN(groups=2, axis=1)),
        "group_norm_axis_minus2_of_an_image": lambda: single(
            (3, 6, 5), L.Conv2D(4, 1), GN(groups=3, axis=-2, epsilon=0.01)
        ),
        "group_norm_axis1_of_a_sequence_no_scale": lambda: single(
            (6, 5), L.Dense(3), GN(groups=2, axis=1, scale=False)
        ),
        "group_norm_axis1_of_vectors_no_affine": lambda: single(
            (8,), L.Dense(8), GN(groups=4, axis=1, center=False, scale=False), L.Dense(2)
        ),
    }
)


# -- LoRA on convolutions -------------------------------------------------------------------

CASES.update(
    {
        "conv2d_lora": lambda: single((7, 6, 4), L.Conv2D(5, 3, activation="sigmoid", lora_rank=2)),
        "conv2d_lora_alpha_groups_same": lambda: single(
            (7, 6, 4), L.Conv2D(6, (3, 2), padding="same", groups=2, lora_rank=3, lora_alpha=5)
        ),
        "conv1d_lora_strided_no_bias": lambda: single(
            (9, 3), L.Conv1D(4, 3, strides=2, use_bias=False, lora_rank=2, lora_alpha=1.5)
        ),
        "conv3d_lora": lambda: single((4, 5, 3, 2), L.Conv3D(3, 2, lora_rank=1)),
    }
)


def test_conv_lora_keras_file_holds_the_merged_kernel(tmp_path):
    """Keras saves a LoRA convolution's kernel merged and zeroes the adapter on load: the file
    converts to torch as weight = merged, lora_a = lora_b = 0, computing what Keras computes."""
    from exchange import fileformat

    keras.utils.set_random_seed(2)
    model = seed_all(single((7, 6, 4), L.Conv2D(5, 3, lora_rank=2, lora_alpha=3, name="conv")), seed=1)
    inputs = batch(model, rows=3)
    model.save(tmp_path / "lora.keras")
    cli.convert(tmp_path / "lora.keras", tmp_path / "lora.safetensors")
    state = fileformat.materialize(fileformat.load(tmp_path / "lora.safetensors").tensors)
    assert not state["conv.lora_a"].any() and not state["conv.lora_b"].any()
    torch_model = torch_adapter.model_from_tensors(keras_adapter.architecture_of(model), state)
    assert max_difference(torch_adapter.predict(torch_model, inputs), keras_adapter.predict(model, inputs)) <= TOLERANCE


# -- BatchNormalization given a mask --------------------------------------------------------


def masked_batch_norm(shape, mask_shape, dtype="float32", **options):
    """BatchNormalization(x, mask=m) at inference (the mask weighs training's moments only), then
    a Softmax reading the mask it passes on."""
    values, mask = keras.Input(shape), keras.Input(mask_shape, dtype=dtype)
    normalised = L.BatchNormalization(**options)(L.Dense(shape[-1])(values), mask=mask)
    return keras.Model([values, mask], normalised)


CASES.update(
    {
        "batch_norm_mask": lambda: masked_batch_norm((2, 3, 4), (2, 3), momentum=0.0),
        "batch_norm_mask_axis1_bool": lambda: masked_batch_norm((5, 4), (5,), dtype="bool", axis=1, center=False),
    }
)


# -- MultiHeadAttention: causal and sliding-window masks with attention_axes ----------------


def attention_over_axis1(shape, scores=False, **options):
    """Self-attention over axis 1 of (batch, steps, others, features) with a causal mask."""
    inputs = keras.Input(shape)
    layer = L.MultiHeadAttention(num_heads=2, key_dim=3, attention_axes=1, name="mha", **options)
    result = layer(inputs, inputs, use_causal_mask=True, return_attention_scores=scores)
    return keras.Model(inputs, list(result) if scores else result)


CASES.update(
    {
        "attention_axis1_causal": lambda: attention_over_axis1((5, 3, 4)),
        "attention_axis1_causal_scores": lambda: attention_over_axis1((5, 3, 4), scores=True),
        "attention_axis1_causal_window": lambda: attention_over_axis1((6, 3, 4), sliding_window=2),
    }
)


def test_causal_mask_over_other_attention_axes_is_refused():
    def model():
        inputs = keras.Input((4, 5, 6))
        layer = L.MultiHeadAttention(num_heads=2, key_dim=3, attention_axes=2, name="bad")
        return keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))

    refused(
        model,
        r"layer 'bad' \(multi_head_attention\): MultiHeadAttention: use_causal_mask or sliding_window "
        r"with attention over axes \[2\]: Keras builds these masks from axis 1's sizes",
    )


# -- ReversibleEmbedding: logits in half precision ------------------------------------------


def reverse_logits(**options):
    """`ReversibleEmbedding(x, reverse=True)`: vectors to logits over a vocabulary of 23."""
    inputs = keras.Input((6, 5))
    return keras.Model(inputs, L.ReversibleEmbedding(23, 5, **options)(L.Dense(5)(inputs), reverse=True))


CASES.update(
    {
        "reversible_embedding_float16_logits": lambda: reverse_logits(reverse_dtype="float16"),
        "reversible_embedding_bfloat16_logits": lambda: reverse_logits(reverse_dtype="bfloat16", tie_weights=False),
    }
)


def test_reverse_dtype_with_a_soft_cap_is_refused():
    refused(
        lambda: reverse_logits(reverse_dtype="float16", logit_soft_cap=0.7, name="bad"),
        r"layer 'bad' \(ReversibleEmbedding\): unsupported option reverse_dtype='float16' \(with a "
        r"logit_soft_cap: TensorFlow's half-precision tanh rounds some logits one unit apart from torch's\)",
    )


def test_reverse_dtype_of_a_half_precision_layer_is_refused():
    refused(
        lambda: reverse_logits(reverse_dtype="bfloat16", dtype="float16", name="bad"),
        r"layer 'bad': reverse_dtype 'bfloat16' of a float16 layer is not supported \(only of a float32 layer\)",
    )


# -- every case of CASES, both directions and generated code ---------------------------------

# The default run checks one case per conversion in both directions and four through generated
# code (about 10 s on 2 cores); `-m slow` checks every case both ways.
DEFAULT_BOTH = (
    "category_encoding_count_weights_rank3",
    "category_encoding_one_hot_of_a_batch_of_ids",
    "discretization_multi_hot_rank3",
    "spectral_conv2d_then_dense",
    "softmax_two_spatial_axes",
    "softmax_mask_of_lower_rank_two_axes",
    "flatten_channels_first_rank4_then_dense",
    "group_norm_axis1_of_an_image",
    "conv2d_lora_alpha_groups_same",
    "batch_norm_mask",
    "attention_axis1_causal_scores",
    "reversible_embedding_float16_logits",
)
DEFAULT_CODE = (
    "category_encoding_count_weights_rank3",
    "discretization_one_hot_rank3",
    "spectral_conv2d_then_dense",
    "softmax_mask_of_lower_rank_two_axes",
)


def _cases(default: tuple) -> list:
    return [pytest.param(case, marks=() if case in default else pytest.mark.slow) for case in sorted(CASES)]


@pytest.mark.parametrize("case", _cases(DEFAULT_BOTH))
def test_kind_both_directions(case):
    keras.utils.set_random_seed(11)
    keras_model = seed_all(CASES[case](), seed=3)
    check_both_directions(keras_model, batch(keras_model, rows=5), tolerance=TOLERANCE)


@pytest.mark.parametrize("case", _cases(DEFAULT_CODE))
def test_kind_generated_code(case, tmp_path):
    keras.utils.set_random_seed(11)
    check_generated_code(seed_all(CASES[case](), seed=3), tmp_path)
