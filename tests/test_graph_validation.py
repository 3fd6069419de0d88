"""Every layer config is checked the same way whichever source it comes from: a format-2 graph
(`Graph.from_dict`, as an exchange file's metadata holds it) is refused where the Keras reader
would refuse the same options, and where a size would crash or exhaust a framework (one row per
rule; each row was accepted before these checks)."""

from dataclasses import replace

import pytest

from exchange.errors import ExchangeError
from exchange.graph import Graph
from exchange.kinds import MAX_WINDOW, config_to_dict
from exchange.kinds.recurrent import RecurrentConfig


def graph(kind, config, shape=(4,), inputs=1, input_dtype="float32"):
    """A one-layer format-2 graph reading `inputs` inputs of `shape`."""
    names = [f"x{index}" for index in range(inputs)]
    return {
        "name": "m",
        "inputs": [{"name": name, "shape": list(shape), "dtype": input_dtype} for name in names],
        "nodes": [{"name": "n", "kind": kind, "inputs": names, "dtype": "float32", "config": config}],
        "outputs": ["n"],
    }


def conv(**changes):
    return {
        "filters": 4,
        "kernel_size": [3, 3],
        "strides": [1, 1],
        "padding": "valid",
        "dilation_rate": [1, 1],
        **changes,
    }


def pool(**changes):
    return {"pool_size": [2, 2], "strides": [2, 2], "padding": "valid", **changes}


FORWARD = RecurrentConfig(units=3, return_sequences=True, zero_output_for_mask=True)
BACKWARD = replace(FORWARD, go_backwards=True)


def bidirectional(forward=FORWARD, backward=BACKWARD, **changes):
    return graph(
        "bidirectional",
        {
            "layer": "lstm",
            "forward": config_to_dict(forward),
            "backward": config_to_dict(backward),
            "merge_mode": "concat",
            **changes,
        },
        (5, 4),
    )


def time_distributed(**changes):
    return graph("time_distributed", {"layer": "dense", "config": {"units": 3}, "layer_name": "d", **changes}, (5, 4))


IMAGE = (8, 8, 3)
HUGE = 10**9

VALID = {
    "dense": graph("dense", {"units": 3}),
    "conv2d": graph("conv2d", conv(), IMAGE),
    "max_pool2d": graph("max_pool2d", pool(), IMAGE),
    "bidirectional": bidirectional(),
    "time_distributed": time_distributed(),
    "permute": graph("permute", {"dims": [2, 1]}, (4, 5)),
    "softmax": graph("softmax", {"axis": -1}, (4, 5)),
    "zero_padding2d": graph("zero_padding2d", {"amounts": [[1, 1], [3, 0]]}, IMAGE),
}

REFUSED = {
    # activations
    "ReLU negative max_value": (graph("relu", {"max_value": -1.0}), "ReLU max_value must be a non-negative"),
    "ReLU negative threshold": (graph("relu", {"threshold": -0.5}), "ReLU threshold must be a non-negative"),
    "LeakyReLU negative slope": (graph("leaky_relu", {"negative_slope": -0.1}), "negative_slope must be"),
    "Softmax axis 10**18": (graph("softmax", {"axis": 10**18}), "Softmax axis must be an integer from -9 to 9"),
    "Softmax axis beyond the rank": (graph("softmax", {"axis": 5}), "axis 5 is not a feature axis of a rank-2"),
    "Softmax axis 0 (the batch)": (graph("softmax", {"axis": 0}), "axis 0 is not a feature axis"),
    # arithmetic
    "operation of three operands": (graph("op_add", {"operands": [None, 1.0, 2.0]}), "operands must be two"),
    # convolution
    "kernel size 10**9": (
        graph("conv2d", conv(kernel_size=[HUGE, 3]), IMAGE),
        f"convolution kernel size must be an integer from 1 to {MAX_WINDOW:,}",
    ),
    "dilated kernel over the cap": (
        graph("conv1d", conv(kernel_size=[3], strides=[1], dilation_rate=[5000]), (100, 3)),
        "dilated kernel size must be",
    ),
    "strides 10**9": (graph("conv2d", conv(strides=[HUGE, 1]), IMAGE), "convolution strides must be"),
    "strides and dilation both > 1": (
        graph("conv2d", conv(strides=[2, 2], dilation_rate=[2, 2]), IMAGE),
        "together with dilation_rate",
    ),
    "filters 10**9": (graph("conv2d", conv(filters=HUGE), IMAGE), "convolution filters must be"),
    "filters not split into groups": (
        graph("conv2d", conv(filters=3, groups=2), (8, 8, 4)),
        "filters 3 do not split into 2 groups",
    ),
    "input channels not split into groups": (
        graph("conv2d", conv(groups=2), IMAGE),
        "3 input channels do not split into 2 groups",
    ),
    "1-D kernel on a Conv2D": (
        graph("conv2d", conv(kernel_size=[3], strides=[1], dilation_rate=[1]), IMAGE),
        r"kernel size \[3\] has not 2 spatial axes",
    ),
    "grouped Conv2DTranspose": (graph("conv2d_transpose", conv(groups=2), (8, 8, 4)), "groups must be 1"),
    "grouped DepthwiseConv2D": (graph("depthwise_conv2d", conv(filters=2, groups=2), (8, 8, 4)), "groups must be 1"),
    "SeparableConv2D depth_multiplier 0": (
        graph("separable_conv2d", conv(depth_multiplier=0), IMAGE),
        "depth_multiplier must be",
    ),
    "valid window larger than the input": (graph("conv2d", conv(kernel_size=[9, 3]), IMAGE), "smaller than the kernel"),
    "same window padding far past the input": (
        graph("conv2d", conv(kernel_size=[4000, 4000], padding="same"), IMAGE),
        "cells to input",
    ),
    # dense
    "Dense units 10**9": (graph("dense", {"units": HUGE}), "Dense units must be an integer from 1 to 1,048,576"),
    "Dense on a rank-0 input": (graph("dense", {"units": 3}, ()), "needs a known feature axis"),
    # merging
    "Concatenate axis 10**18": (graph("concatenate", {"axis": 10**18}, inputs=2), "Concatenate axis must be"),
    "Concatenate axis beyond the rank": (graph("concatenate", {"axis": 3}, inputs=2), "axis 3 is not a feature axis"),
    # normalization
    "BatchNormalization axis 10**18": (graph("batch_norm", {"axis": 10**18}), "axis must be an integer"),
    "BatchNormalization of rank 7": (graph("batch_norm", {}, (2, 2, 2, 2, 2)), "expects an input of rank 2 to 5"),
    "LayerNormalization axis 10**18": (graph("layer_norm", {"axis": -(10**18)}), "axis must be an integer"),
    "GroupNormalization groups 0": (graph("group_norm", {"groups": 0}), "GroupNormalization groups must be"),
    "Normalization mean without variance": (graph("normalization", {"mean": [0.0]}), "given together"),
    "UnitNormalization axis beyond the rank": (graph("unit_norm", {"axis": 7}), "axis 7 is not a feature axis"),
    # pooling
    "pool size 10**9, same padding": (
        graph("max_pool2d", pool(pool_size=[HUGE, HUGE], padding="same"), IMAGE),
        "pooling kernel size must be an integer from 1 to",
    ),
    "pool strides 10**9": (graph("avg_pool2d", pool(strides=[HUGE, 1]), IMAGE), "pooling strides must be"),
    "same pool padding far past the input": (
        graph("max_pool2d", pool(pool_size=[4000, 4000], padding="same"), IMAGE),
        "adds 16,047,972 cells",
    ),
    "1-D pool size on a 2-D pooling": (
        graph("max_pool2d", pool(pool_size=[2], strides=[2]), IMAGE),
        r"pool size \[2\] has not 2 spatial axes",
    ),
    # recurrent
    "LSTM units 10**9": (graph("lstm", {"units": HUGE}, (5, 4)), "recurrent units must be"),
    "Bidirectional merge_mode 'bogus'": (bidirectional(merge_mode="bogus"), "merge_mode 'bogus' is not one of"),
    "Bidirectional backward not go_backwards": (
        bidirectional(backward=FORWARD),
        "different go_backwards, got False for both",
    ),
    "Bidirectional both go_backwards": (bidirectional(forward=BACKWARD), "different go_backwards, got True for both"),
    "Bidirectional return_sequences differ": (
        bidirectional(backward=replace(BACKWARD, return_sequences=False)),
        "differ in return_sequences",
    ),
    "Bidirectional return_state differs": (
        bidirectional(forward=replace(FORWARD, return_state=True)),
        "differ in return_state",
    ),
    "Bidirectional zero_output_for_mask off": (
        bidirectional(backward=replace(BACKWARD, zero_output_for_mask=False)),
        "zero_output_for_mask = return_sequences",
    ),
    # reshaping
    "Permute dims out of range": (graph("permute", {"dims": [1, 3]}, (4, 5)), "not a permutation of 1..2"),
    "Permute dims duplicated": (graph("permute", {"dims": [1, 1]}, (4, 5)), "not a permutation of 1..2"),
    "Permute dims of another rank": (graph("permute", {"dims": [1, 2, 3]}, (4, 5)), "do not match input shape"),
    "Reshape target of 0": (graph("reshape", {"target_shape": [0, 4]}), "invalid Reshape target shape"),
    "ZeroPadding2D 10**9": (
        graph("zero_padding2d", {"amounts": [[HUGE, 0], [0, 0]]}, IMAGE),
        "padding or cropping amounts must be an integer from 0 to",
    ),
    "ZeroPadding2D negative": (
        graph("zero_padding2d", {"amounts": [[-1, 0], [0, 0]]}, IMAGE),
        "padding or cropping amounts must be",
    ),
    "Cropping2D leaving nothing": (graph("cropping2d", {"amounts": [[4, 4], [0, 0]]}, IMAGE), "leaves nothing"),
    "RepeatVector n 10**9": (graph("repeat_vector", {"n": HUGE}), "RepeatVector n must be"),
    "Dropout rate 1.5": (graph("dropout", {"rate": 1.5}), "dropout rate must be from 0 to 1"),
    "Embedding vocabulary 0": (
        graph("embedding", {"input_dim": 0, "output_dim": 3}, input_dtype="int32"),
        "Embedding input_dim",
    ),
    "Embedding width 10**9": (
        graph("embedding", {"input_dim": 10, "output_dim": HUGE}, input_dtype="int32"),
        "Embedding output_dim",
    ),
    # wrappers
    "TimeDistributed unknown key": (time_distributed(bogus=1), r"unknown option\(s\) 'bogus'"),
    "TimeDistributed of a merge": (time_distributed(layer="add", config={}), "cannot wrap a 'add' layer"),
    "TimeDistributed of an output node": (
        time_distributed(layer="output", config={"index": 0}),
        "cannot wrap a 'output' layer",
    ),
    "TimeDistributed layer_name with '/'": (time_distributed(layer_name="a/b"), "is not a Keras layer name"),
    # attention
    "MultiHeadAttention num_heads 10**9": (
        graph("multi_head_attention", {"num_heads": HUGE, "key_dim": 2, "value_dim": 2}, (5, 4), inputs=2),
        "num_heads must be an integer from 1 to 4,096",
    ),
    "MultiHeadAttention key_dim 10**9": (
        graph("multi_head_attention", {"num_heads": 2, "key_dim": HUGE, "value_dim": 2}, (5, 4), inputs=2),
        "key_dim must be an integer",
    ),
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_the_valid_bases_of_the_refused_rows_are_accepted(kind):
    Graph.from_dict(VALID[kind]).shapes


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_bad_config_is_refused_naming_the_layer(name):
    description, message = REFUSED[name]
    with pytest.raises(ExchangeError, match=message) as caught:
        Graph.from_dict(description)
    text = str(caught.value)
    assert "'n'" in text and len(text.splitlines()) == 1, text


@pytest.mark.parametrize(
    "config, echoed",
    [
        ({"units": 3, "bad\nkey": 1}, r"'bad\nkey'"),
        ({"units": 3, "\x1b[2J": 1}, r"'\x1b[2J'"),
    ],
)
def test_control_characters_in_a_config_key_stay_on_one_line(config, echoed):
    with pytest.raises(ExchangeError) as caught:
        Graph.from_dict(graph("dense", config))
    text = str(caught.value)
    assert echoed in text and text.isprintable(), text


def test_control_characters_in_a_wrapped_name_stay_on_one_line():
    with pytest.raises(ExchangeError) as caught:
        Graph.from_dict(time_distributed(layer_name="d\nerror: forged"))
    text = str(caught.value)
    assert "is not a Keras layer name" in text and text.isprintable(), text
