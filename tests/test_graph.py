"""The framework-neutral graph, the registry of layer kinds and the ports (no framework)."""

import numpy as np
import pytest

from exchange import weight_layout
from exchange.errors import ExchangeError, TensorMismatchError, UnsupportedLayerError
from exchange.graph import Graph, dense_chain
from exchange.kinds import KERAS_CLASSES, KINDS, LayerKind, register
from exchange.ports import Blocks, Packed, Permute, Port, Reshape, Stacked, Summed
from exchange.tensors import LazyTensor
from frameworks.recipe import SEED_ARCHITECTURE, seed_initial_tensors


def test_seed_parameter_counts():
    assert SEED_ARCHITECTURE.node_parameter_counts() == {
        "dense_0": 784 * 50 + 50,
        "dense_1": 50 * 50 + 50,
        "dense_2": 50 * 10 + 10,
    }
    assert SEED_ARCHITECTURE.parameter_count() == 42_310
    assert SEED_ARCHITECTURE.tensor_shapes() == {
        "dense_0.weight": (50, 784),
        "dense_0.bias": (50,),
        "dense_1.weight": (50, 50),
        "dense_1.bias": (50,),
        "dense_2.weight": (10, 50),
        "dense_2.bias": (10,),
    }


def test_json_round_trip_and_no_bias_layer():
    graph = dense_chain("m", 20, [(7, "relu"), (3, "sigmoid"), (2, "linear", False)])
    assert Graph.from_json(graph.to_json()) == graph
    assert "dense_2.bias" not in graph.tensor_shapes()
    assert graph.parameter_count() == 20 * 7 + 7 + 7 * 3 + 3 + 3 * 2


def _node(kind="dense", config=None, inputs=("x",), name="d"):
    return {
        "name": "m",
        "inputs": [{"name": "x", "shape": [4]}],
        "outputs": [name],
        "nodes": [
            {"name": name, "kind": kind, "inputs": list(inputs), "config": {"units": 3} if config is None else config}
        ],
    }


@pytest.mark.parametrize(
    "description, message",
    [
        (_node(kind="conv4d"), "unsupported layer kind 'conv4d'"),
        (_node(config={"units": 3, "activation": "swishy"}), "unsupported activation 'swishy'"),
        (_node(config={"units": 3, "use_bias": "no"}), "option 'use_bias': 'no' is not a bool"),
        (_node(config={"units": 3, "lora_dropout": 0.1}), "unknown option"),
        (_node(config={}), "option 'units' is missing"),
        (_node(inputs=("y",)), "reads \\['y'\\]"),
        ({"inputs": []}, "malformed architecture"),
    ],
)
def test_bad_architecture_descriptions(description, message):
    with pytest.raises(ExchangeError, match=message):
        Graph.from_dict(description)


def test_bad_json_is_one_error():
    with pytest.raises(ExchangeError, match="not valid JSON"):
        Graph.from_json("not json")
    with pytest.raises(ExchangeError, match="not valid JSON"):
        Graph.from_json("[" * 100_000 + "]" * 100_000)


def test_registry_refuses_a_second_registration():
    with pytest.raises(ExchangeError, match="registered twice"):

        @register
        class AnotherDense(LayerKind):
            kind, keras_classes = "dense_again", ("Dense",)

    assert "dense_again" not in KINDS and KERAS_CLASSES["Dense"].kind == "dense"


def test_dense_port_transposes_and_inverts():
    graph = dense_chain("m", 3, [(4, "linear")])
    kernel = np.arange(12, dtype=np.float32).reshape(3, 4)  # Keras (in=3, out=4)
    tensors = weight_layout.keras_to_file(graph, {"dense_0": [("kernel", kernel), ("bias", np.zeros(4, np.float32))]})
    np.testing.assert_array_equal(tensors["dense_0.weight"], kernel.T)
    assert tensors["dense_0.weight"].flags.c_contiguous
    back = weight_layout.file_to_keras(graph, tensors)
    np.testing.assert_array_equal(back["dense_0"][0], kernel)
    assert kernel[0, 1] == 1.0  # the input was not modified


def test_unclaimed_keras_variable_is_an_error_naming_it():
    """A Dense with LoRA variables must not export its base kernel alone."""
    graph = dense_chain("m", 3, [(4, "linear")])
    stored = [
        ("kernel", np.zeros((3, 4), np.float32)),
        ("bias", np.zeros(4, np.float32)),
        ("lora_kernel_a", np.zeros((3, 2), np.float32)),
    ]
    with pytest.raises(TensorMismatchError, match="no port claims \\['lora_kernel_a'\\]"):
        weight_layout.keras_to_file(graph, {"dense_0": stored}, class_names={"dense_0": "Dense"})


def test_ports_map_shapes_exactly_both_ways():
    port = Port("kernel", "weight", (Permute((2, 3, 0, 1)), Reshape((5, 2, 3, 4), (10, 1, 3, 4))))
    keras_kernel = np.random.default_rng(0).random((3, 4, 5, 2)).astype(np.float32)
    torch_weight = port.to_torch({"kernel": keras_kernel})["weight"]
    assert torch_weight.shape == port.torch_shape(keras_kernel.shape) == (10, 1, 3, 4)
    np.testing.assert_array_equal(torch_weight[2 * 2 + 1, 0], keras_kernel[:, :, 2, 1])
    np.testing.assert_array_equal(port.to_keras({"weight": torch_weight}, {})["kernel"], keras_kernel)
    with pytest.raises(ExchangeError, match="changes the size"):
        Reshape((2, 3), (7,))


def test_multi_tensor_ports_split_pack_and_sum():
    """GRU's (2, 3H) bias with its gate blocks reordered, MultiHeadAttention's packed kernels and
    an LSTM's summed biases: each maps shapes and arrays both ways (the sum canonically)."""
    rng = np.random.default_rng(1)
    bias = rng.random((2, 6)).astype(np.float32)  # two rows, 3 gate blocks of 2
    stacked = Stacked("bias", ("bias_ih", "bias_hh"), (Blocks(0, (1, 0, 2)),))
    torch_biases = stacked.to_torch({"bias": bias})
    assert stacked.torch_shapes({"bias": (2, 6)}) == {"bias_ih": (6,), "bias_hh": (6,)}
    np.testing.assert_array_equal(torch_biases["bias_hh"], np.concatenate([bias[1, 2:4], bias[1, :2], bias[1, 4:]]))
    np.testing.assert_array_equal(stacked.to_keras(torch_biases, {"bias": (2, 6)})["bias"], bias)

    kernels = {name: rng.random((4, 2, 3)).astype(np.float32) for name in ("q", "k", "v")}
    to_rows = (Reshape((4, 2, 3), (4, 6)), Permute((1, 0)))
    packed = Packed(("q", "k", "v"), "in_proj_weight", (to_rows,) * 3)
    shapes = {name: (4, 2, 3) for name in kernels}
    weight = packed.to_torch(kernels)["in_proj_weight"]
    assert weight.shape == packed.torch_shapes(shapes)["in_proj_weight"] == (18, 4)
    np.testing.assert_array_equal(weight[6:12], kernels["k"].reshape(4, 6).T)
    for name, array in packed.to_keras({"in_proj_weight": weight}, shapes).items():
        np.testing.assert_array_equal(array, kernels[name])

    summed = Summed("bias", ("bias_ih", "bias_hh"))
    halves = {"bias_ih": np.full(4, 0.25, np.float32), "bias_hh": np.full(4, 0.5, np.float32)}
    np.testing.assert_array_equal(summed.to_keras(halves, {"bias": (4,)})["bias"], np.full(4, 0.75, np.float32))
    canonical = summed.to_torch({"bias": np.full(4, 0.75, np.float32)})
    np.testing.assert_array_equal(canonical["bias_hh"], np.zeros(4, np.float32))
    assert summed.lossy and not stacked.lossy


def test_lazy_tensor_never_broadcasts():
    """A stored (3,) array must not fill a declared (2, 3) tensor."""
    lazy = LazyTensor((2, 3), np.dtype(np.float32), lambda: np.ones(3, np.float32))
    with pytest.raises(ExchangeError, match="stored tensor is \\(3,\\), declared \\(2, 3\\)"):
        lazy.load()


def test_flatten_of_an_image_into_dense_permutes_the_weight_rows():
    """Keras flattens (H, W, C); torch flattens (C, H, W): the Dense weight absorbs the order."""
    graph = Graph.from_dict(
        {
            "name": "m",
            "inputs": [{"name": "x", "shape": [2, 3, 4]}],
            "outputs": ["d"],
            "nodes": [
                {"name": "f", "kind": "flatten", "inputs": ["x"], "config": {}},
                {"name": "d", "kind": "dense", "inputs": ["f"], "config": {"units": 5}},
            ],
        }
    )
    assert graph.channels_first_flattens == {"f": (2, 3, 4)}
    kernel = np.random.default_rng(1).random((24, 5)).astype(np.float32)
    weight = weight_layout.keras_to_file(graph, {"d": [("kernel", kernel), ("bias", np.zeros(5, np.float32))]})[
        "d.weight"
    ]
    image = np.random.default_rng(2).random((2, 3, 4)).astype(np.float32)  # (H, W, C)
    np.testing.assert_allclose(weight @ image.transpose(2, 0, 1).reshape(-1), image.reshape(-1) @ kernel, rtol=1e-6)
    output_graph = Graph.from_dict({**graph.to_dict(), "outputs": ["f"], "nodes": graph.to_dict()["nodes"][:1]})
    assert output_graph.channels_first_flattens == {}, "a Flatten that is an output keeps Keras's order"


def test_unknown_layer_kind_is_named():
    with pytest.raises(UnsupportedLayerError, match="unsupported layer kind 'conv4d'"):
        Graph.from_dict(_node(kind="conv4d"))


def test_seed_initialisation_is_old_keras_normal():
    """np.random.seed(0), then N(0, 0.05) per kernel in Keras layout (in, out), biases zero."""
    tensors = seed_initial_tensors(SEED_ARCHITECTURE)
    np.random.seed(0)
    first_kernel = np.random.normal(0.0, 0.05, size=(784, 50)).astype(np.float32)
    second_kernel = np.random.normal(0.0, 0.05, size=(50, 50)).astype(np.float32)
    np.testing.assert_array_equal(tensors["dense_0.weight"], first_kernel.T)
    np.testing.assert_array_equal(tensors["dense_1.weight"], second_kernel.T)
    assert not tensors["dense_2.bias"].any()
    assert abs(float(tensors["dense_0.weight"].std()) - 0.05) < 0.001


def test_reserved_names_cover_every_torch_module_attribute():
    """A layer named like a torch.fx.GraphModule attribute (`compile`, `zero_grad`) would clobber
    it; the list is static so keys do not depend on the installed torch: this checks it is whole."""
    import torch.fx

    from exchange.graph import RESERVED_NAMES, python_name

    public = {name for name in dir(torch.fx.GraphModule) if not name.startswith("_")}
    assert public <= RESERVED_NAMES, sorted(public - RESERVED_NAMES)
    assert [python_name(name) for name in ("conv-1", "1st", "_x", "class", "compile", "self", "ok")] == [
        "conv_1",
        "layer_1st",
        "layer_x",
        "class_layer",
        "compile_layer",
        "self_layer",
        "ok",
    ]
