"""MultiHeadAttention in both directions, with real Keras (TensorFlow backend) and real PyTorch.

Sizes are non-square on purpose: query, key and value widths differ from each other and from
heads·key_dim where the layer cannot be `nn.MultiheadAttention`, sequences are odd (7) and the
query is longer than the key in cross-attention, so a transposed or mis-ordered kernel cannot
load silently. Each convention is also shown to matter: `test_each_convention_matters` breaks one
at a time and checks the outputs then disagree far beyond the tolerance.
"""

import importlib.util
import re

import keras
import numpy as np
import pytest
import torch
from kerasmodels import batch, check_both_directions, keras_vs_torch, max_difference, random_torch_state, randomize

from exchange import codegen, keras_adapter, keras_files, torch_adapter, torch_modules, weight_layout
from exchange.errors import UnsupportedLayerError
from exchange.keras_config import parse_model_config
from exchange.tensors import materialize

L = keras.layers
# float32 rounding between TensorFlow and PyTorch on these small layers stays near 1e-6.
TOLERANCE = 1e-5
# A broken convention moves outputs by about the size of the outputs themselves (order 0.1-1).
BROKEN = 1e-2


def self_attention(shape, *args, call=None, **options):
    sequence = keras.Input(shape, name="sequence")
    return keras.Model(sequence, L.MultiHeadAttention(*args, name="mha", **options)(sequence, sequence, **(call or {})))


def cross_attention(query_shape, value_shape, *args, key_width=None, mask=False, call=None, **options):
    """Query (T, Fq) attends to value (S, Fv), optionally a key (S, key_width) and an int mask (T, S)."""
    query, value = keras.Input(query_shape, name="query"), keras.Input(value_shape, name="value")
    inputs, call = [query, value], dict(call or {})
    if key_width:
        call["key"] = keras.Input((value_shape[0], key_width), name="key")
        inputs.append(call["key"])
    if mask:  # ids in [0, 7) from `batch`: about one in seven positions is 0, masked
        call["attention_mask"] = keras.Input((query_shape[0], value_shape[0]), dtype="int32", name="mask")
        inputs.append(call["attention_mask"])
    return keras.Model(inputs, L.MultiHeadAttention(*args, name="mha", **options)(query, value, **call))


def transformer_block(width, heads, key_dim, steps=7):
    """Post-norm encoder block: attention, Add, LayerNorm, a rank-3 Dense feed-forward, pooled."""
    inputs = keras.Input((steps, width), name="tokens")
    attended = L.MultiHeadAttention(heads, key_dim, name="attention")(inputs, inputs)
    x = L.LayerNormalization(epsilon=1e-6, name="norm_1")(L.Add(name="residual_1")([inputs, attended]))
    hidden = L.Dense(2 * width + 3, activation="relu", name="feed_forward_1")(x)
    x = L.LayerNormalization(epsilon=1e-6, name="norm_2")(
        L.Add(name="residual_2")([x, L.Dense(width, name="feed_forward_2")(hidden)])
    )
    return keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D(name="pool")(x)), name="encoder")


# Case -> (model, the torch module the layer becomes).
MHA, KERAS_MHA = torch.nn.MultiheadAttention, torch_modules.KerasMultiHeadAttention
CASES = {
    # heads·key_dim = width, value_dim = key_dim: nn.MultiheadAttention, packed in_proj_weight
    "self_packable": (lambda: self_attention((7, 32), 4, 8), MHA),
    "self_packable_causal_no_bias": (
        lambda: self_attention((7, 16), 2, 8, use_bias=False, call={"use_causal_mask": True}),
        MHA,
    ),
    # query, key and value widths all differ: q_proj_weight, k_proj_weight, v_proj_weight
    "cross_kdim_vdim": (lambda: cross_attention((7, 12), (5, 10), 3, 4, key_width=6), MHA),
    "cross_packable_mask_and_causal": (
        lambda: cross_attention((7, 12), (5, 12), 3, 4, mask=True, call={"use_causal_mask": True}),
        MHA,
    ),
    # 4·8 = 32 != 16: heads wider than width / heads; nn.MultiheadAttention would scale by 1/sqrt(4)
    "self_heads_wider_than_width": (lambda: self_attention((7, 16), 4, 8), KERAS_MHA),
    "self_heads_narrower_causal": (lambda: self_attention((7, 12), 2, 3, call={"use_causal_mask": True}), KERAS_MHA),
    "cross_value_dim_output_width": (
        lambda: cross_attention((7, 10), (9, 6), 3, 5, value_dim=4, output_shape=7),
        KERAS_MHA,
    ),
    "cross_key_output_2d_mask_dropout": (
        lambda: cross_attention((7, 10), (5, 6), 2, 3, key_width=4, mask=True, output_shape=(4, 5), dropout=0.1),
        KERAS_MHA,
    ),
    "cross_no_bias_output_width": (
        lambda: cross_attention((7, 8), (5, 8), 2, 4, use_bias=False, output_shape=5),
        KERAS_MHA,
    ),
    "transformer_block_packable": (lambda: transformer_block(32, 4, 8), MHA),
    "transformer_block_heads_wider": (lambda: transformer_block(16, 4, 8), KERAS_MHA),
}


def _attention_module(torch_model):
    return next(module for module in torch_model.modules() if isinstance(module, (MHA, KERAS_MHA)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_directions(case):
    make, torch_form = CASES[case]
    keras.utils.set_random_seed(11)
    keras_model = randomize(make(), seed=3)
    checked = check_both_directions(keras_model, tolerance=TOLERANCE)
    graph = checked.graph
    keras_tensors = keras_adapter.get_tensors(keras_model)
    assert type(_attention_module(torch_adapter.model_from_tensors(graph, keras_tensors))) is torch_form
    assert keras_adapter.architecture_of(checked.rebuilt).differences(graph) == []


def test_fully_masked_rows_attend_uniformly_as_in_keras():
    """Keras puts a large negative number (not -inf) at masked logits: a query row with nothing to
    attend to averages all values. torch's own boolean masks would give NaN there."""
    keras.utils.set_random_seed(2)
    keras_model = randomize(CASES["cross_packable_mask_and_causal"][0](), seed=1)
    graph = keras_adapter.architecture_of(keras_model)
    query, value, mask = batch(keras_model)
    mask[:, 0, 0] = 0  # causal: row 0 may only see step 0, now masked too
    mask[1] = 0  # example 1: nothing at all
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(keras_model))
    torch_outputs = torch_adapter.predict(torch_model, [query, value, mask])
    assert np.isfinite(torch_outputs[0]).all()
    assert max_difference(keras_adapter.predict(keras_model, [query, value, mask]), torch_outputs) <= TOLERANCE


def embedding_attention(heads, key_dim, width=16, pool=False, cross=False):
    """Token ids -> Embedding(mask_zero=True) -> self-attention (or a plain query attending to the
    masked tokens) -> the sequence, or its masked mean."""
    ids = keras.Input((9,), dtype="int32", name="ids")
    tokens = L.Embedding(11, width, mask_zero=True, name="embed")(ids)
    inputs = [ids]
    if cross:
        query = keras.Input((7, width), name="query")
        inputs.insert(0, query)
    else:
        query = tokens
    x = L.MultiHeadAttention(heads, key_dim, name="mha")(query, tokens)
    if pool:
        x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, x)


def padded_ids(rows=6, steps=9, seed=0):
    """Token ids with 2, 4, … steps of padding (0) at the end of rows 1, 2, …, a gap at the start
    of row 2, the last row all padding and the first none."""
    ids = np.random.default_rng(seed).integers(1, 11, (rows, steps)).astype(np.int32)
    for row in range(1, rows):
        ids[row, max(steps - 2 * row, 0) :] = 0
    ids[2, 0] = 0
    ids[rows - 1] = 0
    return ids


@pytest.mark.parametrize(
    "heads, key_dim, pool, cross", [(4, 4, False, False), (4, 4, True, False), (3, 5, False, False), (2, 8, True, True)]
)
def test_embedding_masks(heads, key_dim, pool, cross):
    """The query's and value's Keras masks join into the attention mask; the output carries the
    query's mask on (the pooled mean leaves those steps out)."""
    keras.utils.set_random_seed(4)
    keras_model = randomize(embedding_attention(heads, key_dim, pool=pool, cross=cross), seed=2)
    graph = keras_adapter.architecture_of(keras_model)
    ids = padded_ids()
    if pool:  # Keras's masked mean of a row with no step left is 0 / 0 (NaN): leave that row out
        ids = ids[:-1]
    inputs = ([np.random.default_rng(1).standard_normal((len(ids), 7, 16)).astype(np.float32)] if cross else []) + [ids]
    torch_state = random_torch_state(graph, seed=5)
    for reference, tensors in (
        (keras_model, keras_adapter.get_tensors(keras_model)),
        (keras_adapter.model_from_tensors(graph, torch_state), torch_state),
    ):
        torch_model = torch_adapter.model_from_tensors(graph, tensors)
        torch_outputs = torch_adapter.predict(torch_model, inputs)
        assert all(np.isfinite(output).all() for output in torch_outputs)
        assert max_difference(keras_adapter.predict(reference, inputs), torch_outputs) <= TOLERANCE
    assert graph.masks["mha"] == (None if cross else "ids")  # the mask is `ids != 0`


@pytest.mark.parametrize("key_dim", [8, 6])
def test_sequences_of_unknown_length(key_dim):
    """Input (None, 32): the causal mask's size is read off the tensors."""
    keras.utils.set_random_seed(6)
    keras_model = randomize(self_attention((None, 32), 4, key_dim, call={"use_causal_mask": True}), seed=3)
    graph = keras_adapter.architecture_of(keras_model)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(keras_model))
    for steps in (7, 4):
        inputs = [np.random.default_rng(steps).standard_normal((5, steps, 32)).astype(np.float32)]
        assert (
            max_difference(keras_adapter.predict(keras_model, inputs), torch_adapter.predict(torch_model, inputs))
            <= TOLERANCE
        )


@pytest.mark.parametrize("case", ["cross_kdim_vdim", "cross_key_output_2d_mask_dropout", "transformer_block_packable"])
def test_keras_file_round_trip(case, tmp_path):
    """The `.keras` file keeps the four projections in sub-groups (`query_dense/vars`, …): the
    file gives the live model's tensors, and the torch module built from it computes Keras's outputs."""
    keras.utils.set_random_seed(7)
    keras_model = randomize(CASES[case][0](), seed=8)
    keras_model.save(tmp_path / "attention.keras")
    expected = keras_adapter.get_tensors(keras_model)
    with keras_files.open_keras_file(tmp_path / "attention.keras") as stored:
        assert stored.architecture.differences(keras_adapter.architecture_of(keras_model)) == []
        tensors = {key: materialize(tensor) for key, tensor in stored.tensors.items()}
    assert sorted(tensors) == sorted(expected)
    for key, tensor in expected.items():
        np.testing.assert_array_equal(tensors[key], tensor, err_msg=key)
    inputs = batch(keras_model)
    assert keras_vs_torch(keras_model, stored.architecture, tensors, inputs) <= TOLERANCE


def test_keras2_config_and_weight_names():
    """Keras 2 (tf-keras) records every argument but the first as a keyword, tensors as
    [layer, node, tensor], and names the variables `mha/query/kernel:0`, …: the same graph and
    tensors as Keras 3's (written by hand after tf-keras's format, as tf-keras is not installed)."""
    keras.utils.set_random_seed(9)
    keras_model = randomize(
        cross_attention((7, 10), (5, 6), 2, 3, key_width=4, mask=True, output_shape=5, call={"use_causal_mask": True}),
        seed=1,
    )
    layer = keras_model.get_layer("mha")
    config = {
        key: value for key, value in layer.get_config().items() if key not in ("use_gate", "sliding_window", "seed")
    }
    # tf-keras, as Keras 3, saves the attention axes its build resolved: [1] for sequences
    config.update(attention_axes=[1], query_shape=[None, 7, 10], value_shape=[None, 5, 6], key_shape=[None, 5, 4])

    def keras2_input(name, shape, dtype="float32"):
        return {
            "class_name": "InputLayer",
            "name": name,
            "inbound_nodes": [],
            "config": {"batch_input_shape": [None, *shape], "dtype": dtype, "name": name},
        }

    model_config = {
        "class_name": "Functional",
        "config": {
            "name": "keras2",
            "layers": [
                keras2_input("query", (7, 10)),
                keras2_input("value", (5, 6)),
                keras2_input("key", (5, 4)),
                keras2_input("mask", (7, 5), "int32"),
                {
                    "class_name": "MultiHeadAttention",
                    "name": "mha",
                    "config": config,
                    "inbound_nodes": [
                        [
                            [
                                "query",
                                0,
                                0,
                                {
                                    "value": ["value", 0, 0],
                                    "key": ["key", 0, 0],
                                    "attention_mask": ["mask", 0, 0],
                                    "use_causal_mask": True,
                                },
                            ]
                        ]
                    ],
                },
            ],
            "input_layers": [["query", 0, 0], ["value", 0, 0], ["key", 0, 0], ["mask", 0, 0]],
            "output_layers": [["mha", 0, 0]],
        },
    }
    graph = parse_model_config(model_config, "keras2 config", keras2=True).graph
    assert graph.differences(keras_adapter.architecture_of(keras_model)) == []
    names = ("query", "key", "value", "attention_output")
    stored = [
        (weight_name.split("/")[-1], np.asarray(variable.numpy()))
        for weight_name, variable in zip(
            [f"mha/{name}/{part}" for name in names for part in ("kernel", "bias")], layer.weights
        )
    ]
    tensors = weight_layout.keras_to_file(graph, {"mha": stored})
    for key, tensor in keras_adapter.get_tensors(keras_model).items():
        np.testing.assert_array_equal(tensors[key], tensor, err_msg=key)


@pytest.mark.parametrize(
    "make_model, message",
    [
        (
            lambda: self_attention((5, 6, 8), 2, 4, call={"use_causal_mask": True}),
            "use_causal_mask or sliding_window with attention over axes \\[1, 2\\]: Keras builds these masks from axis 1",
        ),
    ],
)
def test_unsupported_options_are_named(make_model, message):
    with pytest.raises(UnsupportedLayerError, match=message) as caught:
        keras_adapter.architecture_of(make_model())
    assert "'mha'" in str(caught.value) or "MultiHeadAttention" in str(caught.value)


def _naive_in_proj(keras_model, graph, tensors):
    """Kernels (D, heads, key_dim) flattened key_dim-major instead of head-major."""
    layer, tensors = keras_model.get_layer("mha"), dict(tensors)
    kernels = [np.asarray(variable.numpy()) for variable in layer.weights[0:6:2]]
    tensors["mha.in_proj_weight"] = np.concatenate(
        [kernel.transpose(0, 2, 1).reshape(kernel.shape[0], -1).T for kernel in kernels]
    )
    return tensors


def _untransposed_out_proj(keras_model, graph, tensors):
    """The output kernel (heads, value_dim, D) flattened but not transposed (square: loads silently)."""
    tensors = dict(tensors)
    kernel = np.asarray(keras_model.get_layer("mha").weights[6].numpy())
    tensors["mha.out_proj.weight"] = np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]))
    return tensors


def _packed_in_wrong_order(keras_model, graph, tensors):
    """in_proj_weight packed as key, query, value."""
    tensors = dict(tensors)
    query, key, value = np.split(tensors["mha.in_proj_weight"], 3)
    tensors["mha.in_proj_weight"] = np.concatenate([key, query, value])
    return tensors


@pytest.mark.parametrize(
    "case, break_it",
    [
        ("self_packable", _naive_in_proj),
        ("self_packable", _untransposed_out_proj),
        ("self_packable", _packed_in_wrong_order),
    ],
)
def test_each_convention_matters(case, break_it):
    """Each rule, broken alone, moves the outputs far beyond the tolerance: the tests above would
    catch a converter that got it wrong."""
    keras.utils.set_random_seed(11)
    keras_model = randomize(CASES[case][0](), seed=3)
    graph = keras_adapter.architecture_of(keras_model)
    inputs = batch(keras_model)
    tensors = keras_adapter.get_tensors(keras_model)
    assert keras_vs_torch(keras_model, graph, tensors, inputs) <= TOLERANCE
    assert keras_vs_torch(keras_model, graph, break_it(keras_model, graph, tensors), inputs) > BROKEN


def test_scaling_by_key_dim_matters():
    """Keras scales by 1/sqrt(key_dim); a module that took the head width as width / heads (as
    nn.MultiheadAttention does) would be wrong wherever heads·key_dim != width."""
    keras.utils.set_random_seed(11)
    keras_model = randomize(CASES["self_heads_wider_than_width"][0](), seed=3)
    graph = keras_adapter.architecture_of(keras_model)
    inputs = batch(keras_model)
    torch_model = torch_adapter.model_from_tensors(graph, keras_adapter.get_tensors(keras_model))
    expected = keras_adapter.predict(keras_model, inputs)
    assert max_difference(expected, torch_adapter.predict(torch_model, inputs)) <= TOLERANCE
    attention = _attention_module(torch_model)
    attention.scale = (attention.query_features // attention.num_heads) ** -0.5
    assert max_difference(expected, torch_adapter.predict(torch_model, inputs)) > BROKEN


def two_attentions():
    """Both torch forms, masks of every source, three inputs: the generated code must rebuild all."""
    ids = keras.Input((9,), dtype="int32", name="ids")
    context = keras.Input((5, 12), name="context")
    mask = keras.Input((9, 5), dtype="int32", name="mask")
    tokens = L.Embedding(11, 16, mask_zero=True, name="embed")(ids)
    x = L.MultiHeadAttention(4, 4, name="self_attention")(tokens, tokens, use_causal_mask=True)
    x = L.MultiHeadAttention(3, 5, value_dim=2, name="cross_attention")(x, context, attention_mask=mask)
    return keras.Model(
        [ids, context, mask], L.Dense(3, name="head")(L.GlobalAveragePooling1D(name="pool")(x)), name="two_attentions"
    )


def test_generated_code(tmp_path):
    keras.utils.set_random_seed(12)
    keras_model = randomize(two_attentions(), seed=6)
    graph = keras_adapter.architecture_of(keras_model)
    tensors = keras_adapter.get_tensors(keras_model)
    code = codegen.generate(graph, "two_attentions.safetensors", "two_attentions.keras")
    assert "nn.MultiheadAttention(16, 4, kdim=16, vdim=16, batch_first=True)" in code
    assert "class KerasMultiHeadAttention(nn.Module)" in code
    assert (
        "KerasMultiHeadAttention(16, 12, value_features=12, num_heads=3, key_dim=5, value_dim=2, output_shape=(16,))"
    ) in code
    # nn.MultiheadAttention returns (output, weights): its output is the first item
    assert re.search(r"\n +(\w+) = self\.self_attention\(.*\n(?: +del .*\n)? +\w+ = \1\[0\]\n", code)
    (tmp_path / "generated_attention.py").write_text(code)
    spec = importlib.util.spec_from_file_location("generated_attention", tmp_path / "generated_attention.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = generated.TwoAttentions()
    module.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in tensors.items()}, strict=True)
    ids = padded_ids()[:-1]  # a row of padding only would pool to 0 / 0 in Keras too
    generator = np.random.default_rng(3)
    context = generator.standard_normal((len(ids), 5, 12)).astype(np.float32)
    mask = generator.integers(0, 4, (len(ids), 9, 5)).astype(np.int32)
    with torch.no_grad():
        outputs = module.eval()(
            torch.from_numpy(ids), torch.from_numpy(context).permute(0, 2, 1), torch.from_numpy(mask).permute(0, 2, 1)
        ).numpy()
    assert max_difference([outputs], keras_adapter.predict(keras_model, [ids, context, mask])) <= TOLERANCE


def test_key_and_value_masks_join():
    """A key with its own Embedding mask: Keras ANDs the value's and the key's masks."""
    keras.utils.set_random_seed(8)
    query = keras.Input((7, 12), name="query")
    value_ids, key_ids = (
        keras.Input((9,), dtype="int32", name="value_ids"),
        keras.Input((9,), dtype="int32", name="key_ids"),
    )
    value = L.Embedding(11, 10, mask_zero=True, name="value_embed")(value_ids)
    key = L.Embedding(11, 6, mask_zero=True, name="key_embed")(key_ids)
    attended = L.MultiHeadAttention(3, 4, name="mha")(query, value, key=key)
    keras_model = randomize(keras.Model([query, value_ids, key_ids], attended), seed=2)
    graph = keras_adapter.architecture_of(keras_model)
    value_ids, key_ids = padded_ids(), np.flip(padded_ids(seed=1), axis=1).copy()  # padding at the start
    inputs = [np.random.default_rng(2).standard_normal((6, 7, 12)).astype(np.float32), value_ids, key_ids]
    assert keras_vs_torch(keras_model, graph, keras_adapter.get_tensors(keras_model), inputs) <= TOLERANCE


@pytest.mark.parametrize(
    "dtype, tolerance",
    [
        # TensorFlow's Keras rounds the 1/sqrt(key_dim) scale to float32 even for float64 (measured:
        # Keras is 2e-8 from a float64 reference, torch 1e-15), so float64 agrees to about 1e-8.
        ("float64", 1e-7),
        ("float16", 2e-2),
    ],
)
@pytest.mark.parametrize("key_dim", [8, 5])
def test_weights_keep_their_dtype(dtype, tolerance, key_dim):
    keras.utils.set_random_seed(6)
    model = randomize(self_attention((7, 32), 4, key_dim, dtype=dtype, call={"use_causal_mask": True}), seed=1)
    graph = keras_adapter.architecture_of(model)
    tensors = keras_adapter.get_tensors(model)
    assert {tensor.dtype.name for tensor in tensors.values()} == {dtype}
    inputs = [array.astype(dtype) for array in batch(model)]
    assert keras_vs_torch(model, graph, tensors, inputs) <= tolerance


def test_generated_code_alone_and_exported(tmp_path):
    """Both torch forms in one encoder, written as code by the CLI: the file runs in a process
    where keras and this project cannot be imported, and through `torch.export`."""
    from generated_code import run_generated

    from exchange import cli
    from exchange.torch_adapter import class_name

    keras.utils.set_random_seed(13)
    tokens = keras.Input((7, 32), name="tokens")
    x = L.Add(name="residual")([tokens, L.MultiHeadAttention(4, 8, name="packable")(tokens, tokens)])
    x = L.MultiHeadAttention(3, 6, value_dim=5, name="heads_narrower")(x, x, use_causal_mask=True)
    model = randomize(
        keras.Model(tokens, L.Dense(3, name="head")(L.GlobalAveragePooling1D(name="pool")(x)), name="two_forms"), seed=4
    )
    model.save(tmp_path / "two_forms.keras")
    graph = cli.convert(tmp_path / "two_forms.keras", tmp_path / "two_forms.py")
    (inputs,) = batch(model, rows=8)
    result = run_generated(
        tmp_path / "two_forms.py",
        class_name(graph.name),
        inputs,
        np.asarray(model.predict(inputs, verbose=0)),
        tmp_path,
    )
    assert result["loaded"] == []
    assert result["eager"] <= TOLERANCE and result["exported"] <= TOLERANCE
