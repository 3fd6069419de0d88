"""EinsumDense, LoRA adapters (Dense, EinsumDense, Embedding) and the preprocessing layers, in both
directions with real Keras (TensorFlow backend) and real PyTorch, and through generated code.

Each case is a small Keras model on non-square sizes with seeded non-trivial weights:
- Keras -> torch: the live model's tensors into the torch module; outputs compared.
- torch -> Keras: a random state_dict into both the torch module and the Keras model built from
  the graph; outputs compared, and the Keras weights read back equal the state bit for bit.
- saved as `.keras` and converted to Python source: the generated module computes what Keras does.
"""

import json

import keras
import pytest
from generated_code import check_generated_code
from kerasmodels import batch, check_both_directions, config_with, max_difference, seed_all

from exchange import cli, keras_adapter, torch_adapter
from exchange.errors import UnsupportedLayerError

L = keras.layers
TOLERANCE = 1e-5


def single(shape, *layers, dtype="float32"):
    return keras.Sequential([keras.Input(shape, dtype=dtype)] + list(layers))


IMAGE = (9, 12, 3)  # odd height, even width


def image(*layers):
    """An image through a 1x1 convolution (weights to carry) and then `layers`."""
    return single(IMAGE, L.Conv2D(4, 1), *layers)


def ids(*layers, steps=6):
    """Integer ids (batch, steps) in [0, 7) through `layers`."""
    return single((steps,), *layers, dtype="int64")


def reverse_call(layer, shape=(6, 5)):
    """`layer(x, reverse=True)`: vectors to logits over the vocabulary."""
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(L.Dense(5)(inputs), reverse=True))


def lora_embedding():
    inputs = keras.Input((7,), dtype="int32")
    x = L.Embedding(11, 6, lora_rank=3, name="emb")(inputs)
    return keras.Model(inputs, L.Dense(4, lora_rank=2, name="head")(x))


CASES = {
    "einsum_plain": lambda: single((6,), L.EinsumDense("ab,bcd->acd", (3, 5), bias_axes="d", activation="relu")),
    "einsum_sequence_bias_be": lambda: single((7, 3), L.EinsumDense("abc,cde->abde", (7, 2, 4), bias_axes="be")),
    "einsum_heads": lambda: single(
        (5, 2, 3), L.EinsumDense("BFNH,NHD->BFD", (5, 4), bias_axes="D", activation="softmax")
    ),
    "einsum_left_ellipsis": lambda: single((5, 4, 3), L.EinsumDense("...c,cde->...de", (2, 6), bias_axes="d")),
    "einsum_left_ellipsis_rank2": lambda: single((9,), L.EinsumDense("...b,bc->...c", 4, bias_axes="c")),
    "einsum_right_ellipsis": lambda: single((3, 5, 4), L.EinsumDense("bc...,cde->bde...", (2, 6), bias_axes="de")),
    "einsum_none_size": lambda: single(
        (5, 8), L.EinsumDense("abc,cd->abd", (None, 4), bias_axes="d", activation="tanh")
    ),
    "einsum_contract_two": lambda: single((4, 6), L.EinsumDense("bnh,nhd->bd", 5, bias_axes="d")),
    "einsum_lora": lambda: single((6,), L.EinsumDense("ab,bcd->acd", (3, 5), bias_axes="d", lora_rank=2, lora_alpha=5)),
    "einsum_lora_sequence": lambda: single((7, 3), L.EinsumDense("abc,cde->abde", (7, 2, 4), lora_rank=3)),
    "dense_lora": lambda: single((9,), L.Dense(5, activation="relu", lora_rank=2)),
    "dense_lora_sequence_no_bias": lambda: single((6, 4), L.Dense(3, use_bias=False, lora_rank=3)),
    "dense_lora_after_flatten": lambda: single((3, 4, 2), L.Conv2D(3, 2), L.Flatten(), L.Dense(4, lora_rank=2)),
    "embedding_lora": lora_embedding,
    "reversible_embedding_forward_masked": lambda: keras.Sequential(
        [
            keras.Input((7,), dtype="int32"),
            L.ReversibleEmbedding(11, 5, mask_zero=True, tie_weights=False),
            L.GlobalAveragePooling1D(),
        ]
    ),
    "reversible_embedding_reverse_tied": lambda: reverse_call(L.ReversibleEmbedding(11, 5)),
    "reversible_embedding_reverse_untied_soft_cap": lambda: reverse_call(
        L.ReversibleEmbedding(11, 5, tie_weights=False, logit_soft_cap=0.4)
    ),
    "reversible_embedding_reverse_flat": lambda: reverse_call(
        L.ReversibleEmbedding(9, 5, logit_soft_cap=2), shape=(5,)
    ),
    "resizing_bilinear_down": lambda: image(L.Resizing(5, 7)),
    "resizing_bilinear_up_antialias": lambda: image(L.Resizing(13, 20, antialias=True)),
    "resizing_bilinear_down_antialias": lambda: image(L.Resizing(4, 5, antialias=True)),
    "resizing_nearest": lambda: image(L.Resizing(6, 17, interpolation="nearest")),
    "resizing_bicubic_antialias": lambda: image(L.Resizing(5, 16, interpolation="bicubic", antialias=True)),
    "resizing_area_whole_factors": lambda: image(L.Resizing(3, 24, interpolation="area")),
    "resizing_crop_to_aspect_ratio": lambda: image(L.Resizing(4, 4, crop_to_aspect_ratio=True)),
    "resizing_crop_to_aspect_ratio_tall": lambda: image(
        L.Resizing(8, 3, crop_to_aspect_ratio=True, interpolation="nearest")
    ),
    "resizing_pad_to_aspect_ratio": lambda: image(L.Resizing(7, 4, pad_to_aspect_ratio=True, fill_value=0.5)),
    "resizing_pad_to_aspect_ratio_wide": lambda: image(L.Resizing(3, 9, pad_to_aspect_ratio=True, fill_value=-1.0)),
    "resizing_channels_first": lambda: image(L.Resizing(5, 7, data_format="channels_first")),
    "resizing_channels_first_crop": lambda: image(
        L.Resizing(2, 9, data_format="channels_first", crop_to_aspect_ratio=True)
    ),
    "center_crop_channels_first": lambda: image(L.CenterCrop(3, 2, data_format="channels_first")),
    "center_crop_channels_first_larger": lambda: image(L.CenterCrop(6, 8, data_format="channels_first")),
    "category_encoding_one_hot": lambda: ids(L.CategoryEncoding(5, output_mode="one_hot"), L.Dense(3)),
    "category_encoding_one_hot_single": lambda: ids(L.CategoryEncoding(9, output_mode="one_hot"), steps=1),
    "category_encoding_multi_hot": lambda: ids(L.CategoryEncoding(6), L.Dense(2)),
    "category_encoding_count": lambda: ids(L.CategoryEncoding(8, output_mode="count"), L.Dense(2)),
    "discretization_int": lambda: single((5,), L.Discretization(bin_boundaries=[-0.5, 0.0, 0.3, 1.2])),
    "discretization_into_embedding": lambda: single(
        (5,), L.Discretization(bin_boundaries=[-1.0, 0.25, 0.5]), L.Embedding(4, 3)
    ),
    "discretization_one_hot": lambda: single(
        (4,), L.Discretization(bin_boundaries=[0.0, 0.7], output_mode="one_hot"), L.Conv1D(2, 2)
    ),
    "discretization_count": lambda: single(
        (6,), L.Discretization(bin_boundaries=[-0.3, 0.1, 0.9], output_mode="count")
    ),
    "integer_lookup": lambda: ids(L.IntegerLookup(vocabulary=[4, 1, 6, 2])),
    "integer_lookup_mask_and_oov_buckets": lambda: ids(
        L.IntegerLookup(vocabulary=[5, 3, 2], mask_token=0, num_oov_indices=3), L.Embedding(7, 3)
    ),
    "integer_lookup_invert": lambda: ids(
        L.IntegerLookup(vocabulary=[40, 10, 60], mask_token=0, num_oov_indices=2, oov_token=-7, invert=True)
    ),
    "integer_lookup_invert_no_oov": lambda: ids(
        L.IntegerLookup(vocabulary=[8, 9, 3, 1], num_oov_indices=0, invert=True)
    ),
    "center_crop": lambda: image(L.CenterCrop(4, 7)),
    "center_crop_odd_margins": lambda: image(L.CenterCrop(6, 9)),
    "center_crop_larger_than_input": lambda: image(L.CenterCrop(11, 15)),
    "center_crop_one_side_larger": lambda: image(L.CenterCrop(12, 5)),
}


# Generated code runs in a fresh process and through torch.export, about 4 s a case on 2 cores:
# the default run checks every CODE_EVERY-th case, `-m slow` every case (and the slow coverage
# suite, tests/test_keras_layer_suite.py, runs generated code for every harvested case).
CODE_EVERY = 12


@pytest.mark.parametrize("case", sorted(CASES))
def test_kind_both_directions(case):
    keras.utils.set_random_seed(11)
    check_both_directions(seed_all(CASES[case](), seed=3), tolerance=TOLERANCE)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=() if index % CODE_EVERY == 0 else pytest.mark.slow)
        for index, case in enumerate(sorted(CASES))
    ],
)
def test_kind_generated_code(case, tmp_path):
    keras.utils.set_random_seed(11)
    keras_model = seed_all(CASES[case](), seed=3)
    check_generated_code(keras_model, batch(keras_model), tmp_path)


def test_lora_keras_file_holds_the_merged_kernel(tmp_path):
    """Keras saves a LoRA layer's kernel merged and zeroes the adapter on load: the file converts
    to torch as kernel = merged, lora_a = lora_b = 0, computing what Keras computes from it."""
    keras.utils.set_random_seed(2)
    model = seed_all(
        single((6,), L.EinsumDense("ab,bc->ac", 4, bias_axes="c", lora_rank=2, lora_alpha=3, name="proj")), seed=1
    )
    (inputs,) = batch(model)
    model.save(tmp_path / "lora.keras")
    cli.convert(tmp_path / "lora.keras", tmp_path / "lora.pt")
    import torch

    state = torch.load(tmp_path / "lora.pt")
    assert not state["proj.lora_a"].any() and not state["proj.lora_b"].any()
    graph = keras_adapter.architecture_of(model)
    torch_model = torch_adapter.model_from_tensors(graph, {key: value.numpy() for key, value in state.items()})
    assert (
        max_difference(torch_adapter.predict(torch_model, [inputs]), keras_adapter.predict(model, [inputs]))
        <= TOLERANCE
    )


@pytest.mark.parametrize(
    "layer, shape, changes, message",
    [
        (
            lambda: L.Dense(3, lora_rank=2),
            (5,),
            {"lora_alpha": 4},
            r"'bad' \(Dense\): unsupported option lora_alpha=4 \(Keras 3.15's Dense ignores it",
        ),
        (
            lambda: L.Embedding(9, 3, lora_rank=2),
            (5,),
            {"lora_alpha": 1.5},
            r"'bad' \(Embedding\): unsupported option lora_alpha=1.5",
        ),
        (lambda: L.Dense(3), (5,), {"lora_rank": 0}, "unsupported option lora_rank=0"),
        (lambda: L.EinsumDense("ab,bc->ac", 3), (5,), {"bias_axes": "q"}, "bias_axes 'q' must be distinct letters"),
        (lambda: L.EinsumDense("ab,bc->ac", 3), (5,), {"equation": "ab,ac->bc"}, "the first letter is the batch axis"),
        (lambda: L.EinsumDense("ab,bc->ac", 3), (5,), {"equation": "ab,bc->ac; import os"}, "is not of the form"),
        (lambda: L.EinsumDense("ab,bc->ac", 3), (5,), {"equation": "ab,bc->a1"}, "is not of the form"),
        (
            lambda: L.EinsumDense("ab,bc->ac", 3),
            (5,),
            {"quantization_config": {"mode": "int8"}},
            "unsupported option quantization_config",
        ),
        (lambda: L.Resizing(4, 5), IMAGE, {"fill_mode": "reflect"}, "unsupported option fill_mode='reflect'"),
        (lambda: L.IntegerLookup(vocabulary=[1, 2]), (3,), {"invert": "yes"}, "unsupported option invert='yes'"),
        (
            lambda: L.IntegerLookup(vocabulary=[1, 2]),
            (3,),
            {"output_mode": "one_hot", "invert": True},
            "unsupported option output_mode='one_hot' \\(Keras inverts to values",
        ),
        (
            lambda: L.IntegerLookup(vocabulary=[1, 2]),
            (3,),
            {"vocabulary": None},
            "unsupported option vocabulary=None \\(a list of integers in the config is needed",
        ),
        (
            lambda: L.IntegerLookup(vocabulary=[1, 2]),
            (3,),
            {"num_oov_indices": 0},
            "unsupported option num_oov_indices=0 \\(Keras raises on an unknown value",
        ),
        (
            lambda: L.Discretization(bin_boundaries=[0.0]),
            (3,),
            {"bin_boundaries": None},
            "unsupported option bin_boundaries=None \\(not adapted",
        ),
        (
            lambda: L.CategoryEncoding(4),
            (3, 2),
            {},
            r"layer 'bad' \(category_encoding\): CategoryEncoding output_mode 'multi_hot' on ids of shape "
            r"\(batch, \(3, 2\)\): Keras declares",
        ),
        (lambda: L.Resizing(4, 5), IMAGE, {"data_format": "channels_middle"}, "unsupported option data_format"),
        (lambda: L.CenterCrop(4, 5), IMAGE, {"data_format": "channels_middle"}, "unsupported option data_format"),
    ],
)
def test_refusals_are_one_line(layer, shape, changes, message):
    from exchange.keras_config import parse_model_config

    made = layer()
    made.name = "bad"
    with pytest.raises(UnsupportedLayerError, match=message) as caught:
        parse_model_config(config_with(made, shape, **changes), "hand-written")
    assert "\n" not in str(caught.value)


def test_lora_on_a_float16_layer_is_refused():
    model = single((5,), L.Dense(3, lora_rank=2, dtype="float16", name="bad"))
    with pytest.raises(UnsupportedLayerError, match="'bad': LoRA on a float16 layer is not supported"):
        keras_adapter.get_tensors(model)


def test_string_layers_are_refused_with_their_reason():
    from exchange.keras_config import parse_model_config

    text = keras.Input((1,), dtype="string", name="text")
    ids = L.StringLookup(vocabulary=["a", "b"], name="lookup")(text)
    model = keras.Model(text, L.Embedding(4, 2, name="emb")(ids))
    config = json.loads(json.dumps({"class_name": "Functional", "config": model.get_config()}))
    with pytest.raises(UnsupportedLayerError) as caught:
        parse_model_config(config, "strings")
    message = str(caught.value)
    assert "input 'text': unsupported dtype 'string' (torch has no string tensors)" in message
    assert (
        "unsupported layer 'lookup' (StringLookup): it maps strings to ids and torch has no string tensors" in message
        and "\n" not in message
    )


@pytest.mark.parametrize(
    "layer, reason",
    [
        (lambda: L.TextVectorization(name="bad"), "splits and looks up strings"),
    ],
)
def test_hashing_and_text_layers_are_refused(layer, reason):
    from exchange.keras_config import parse_model_config

    inputs = keras.Input((3,), dtype="int64" if "Hashing" in type(layer()).__name__ else "string")
    made = layer()
    config = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "name": "x",
                    "config": {"batch_shape": [None, 3], "dtype": inputs.dtype, "name": "x"},
                    "inbound_nodes": [],
                },
                {
                    "class_name": type(made).__name__,
                    "name": "bad",
                    "config": {"name": "bad"},
                    "inbound_nodes": [
                        {
                            "args": [
                                {
                                    "class_name": "__keras_tensor__",
                                    "config": {"shape": [None, 3], "dtype": inputs.dtype, "keras_history": ["x", 0, 0]},
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
    with pytest.raises(UnsupportedLayerError, match=f"unsupported layer 'bad' \\({type(made).__name__}\\): .*{reason}"):
        parse_model_config(config, "hand-written")


def test_integer_outputs_are_read_only_by_layers_that_take_integers():
    from exchange.errors import ExchangeError
    from exchange.verify import check_integer_inputs

    model = single((5,), L.Discretization(bin_boundaries=[0.0, 1.0], name="buckets"), L.Activation("relu", name="relu"))
    graph = keras_adapter.architecture_of(model)
    with pytest.raises(
        ExchangeError, match="layer 'relu' \\(activation\\) reads the integer input 'buckets' \\(int32\\)"
    ):
        check_integer_inputs(graph)
