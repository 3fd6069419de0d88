"""TensorFlow ops in Keras 2 (tf.keras) models: `TFOpLambda` and `SlicingOpLambda` layers, read
as the Keras 3 layers and operations that compute the same (`exchange.tf_ops`).

The fixtures were written by tf-keras 2.21 (`scripts/make_keras2_fixtures.py --tfop`) with what it
computed on a fixed batch (tfop_expected.npz); each converts to torch (`.safetensors`), to Keras 3
(`.keras`) and to PyTorch source code, all within 1e-5 of tf-keras. Ops with no converter, and
ops that would touch the batch axis, are refused in one line naming the layer and the op; a
malformed op call is one line naming the file.
"""

import copy
import json
import shutil
from pathlib import Path

import h5py
import keras
import layer_suite
import numpy as np
import pytest

from exchange import cli, keras_adapter, keras_config, tf_ops
from exchange.errors import ExchangeError, ExchangeFileError, UnsupportedLayerError
from exchange.graph import Graph

KERAS2 = Path(__file__).parent / "fixtures" / "keras2"
# tf-keras 2.21 against the torch module and Keras 3: float32 rounding of a small net.
TOLERANCE = 1e-5


def expected_of(name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The fixture's inputs and what tf-keras computed on them, each in order."""
    expected = np.load(KERAS2 / "tfop_expected.npz")

    def numbered(what):
        keys = [key for key in expected if key.startswith(f"{name}_{what}_")]
        return [expected[key] for key in sorted(keys, key=lambda key: int(key.rsplit("_", 1)[1]))]

    return numbered("inputs"), numbered("outputs")


@pytest.mark.parametrize("name", ["tfop_unet", "tfop_reduce", "tfop_every_op"])
def test_tf_keras_model_with_tensorflow_ops_in_every_direction(name, tmp_path):
    """.h5 -> .safetensors -> torch, -> .keras (Keras 3), .keras -> file bit-identical, -> model.py."""
    shutil.copy(KERAS2 / f"{name}.h5", tmp_path / "model.h5")
    inputs, reference = expected_of(name)
    result = layer_suite.CaseResult(name, "tfop", "Model", "pass")
    layer_suite.conversions(tmp_path / "model.h5", inputs, reference, result)
    assert len(result.diffs) == 4 and max(result.diffs.values()) <= TOLERANCE, result.diffs


def test_every_op_of_the_table_is_in_the_fixtures():
    """The fixtures call each op the table reads (but an alias tf-keras does not record)."""
    recorded = set()
    for name in ("tfop_unet", "tfop_reduce", "tfop_every_op"):
        with h5py.File(KERAS2 / f"{name}.h5", "r") as h5:
            config = json.loads(h5.attrs["model_config"])
        recorded |= {
            layer["config"]["function"] for layer in config["config"]["layers"] if "function" in layer["config"]
        }
    assert set(tf_ops.OPS) - recorded == {"math.divide"}  # tf.math.divide is recorded as math.truediv


def test_ops_become_keras3_layers_and_operations(tmp_path):
    """Reshape, transpose and concat become Keras layers; the rest `keras.ops` operations."""
    graph = cli.convert(KERAS2 / "tfop_unet.h5", tmp_path / "model.safetensors")
    kinds = {node.name: node.kind for node in graph.nodes}
    assert {kinds[name] for name in ("tf.reshape", "tf.compat.v1.transpose", "tf.concat", "tf.nn.softmax")} == {
        "reshape",
        "permute",
        "concatenate",
        "softmax",
    }
    assert kinds["tf.math.multiply"] == "op_multiply" and kinds["tf.expand_dims"] == "op_expand_dims"
    rebuilt = keras.saving.load_model(
        cli.convert(tmp_path / "model.safetensors", tmp_path / "model.keras") and tmp_path / "model.keras"
    )
    classes = {operation.name: type(operation).__name__ for operation in rebuilt.operations}
    assert classes["tf.math.exp"] == "Exp" and classes["tf.reshape"] == "Reshape"


def test_unsupported_op_is_refused_naming_layer_and_op(tmp_path):
    with pytest.raises(UnsupportedLayerError) as err:
        cli.convert(KERAS2 / "tfop_unsupported.h5", tmp_path / "model.safetensors")
    message = str(err.value)
    assert "\n" not in message and not (tmp_path / "model.safetensors").exists()
    assert message.startswith(
        f"{KERAS2 / 'tfop_unsupported.h5'}: layer 'tf.math.cumsum' (TFOpLambda): "
        "TensorFlow op 'math.cumsum' has no converter; supported: __operators__.add, "
    ), message
    assert "math.reduce_mean" in message and "reshape" in message


def _model_config(function: str, node, class_name: str = "TFOpLambda") -> dict:
    """A tf.keras functional config: input `x` (4, 6, 3) -> one TF op layer `op` (the output)."""
    return {
        "class_name": "Functional",
        "config": {
            "name": "model",
            "input_layers": [["x", 0, 0]],
            "output_layers": [["op", 0, 0]],
            "layers": [
                {
                    "class_name": "InputLayer",
                    "name": "x",
                    "inbound_nodes": [],
                    "config": {"batch_input_shape": [None, 4, 6, 3], "dtype": "float32", "name": "x"},
                },
                {
                    "class_name": class_name,
                    "name": "op",
                    "inbound_nodes": [node],
                    "config": {"name": "op", "trainable": True, "dtype": "float32", "function": function},
                },
            ],
        },
    }


@pytest.mark.parametrize(
    "function, node, message",
    [
        (
            "reshape",
            ["x", 0, 0, {"shape": [2, 36, 3]}],
            (
                r"with shape \[2, 36, 3\] is not supported: the shape must "
                r"keep the batch axis first as -1"
            ),
        ),
        (
            "compat.v1.transpose",
            ["x", 0, 0, {"perm": [1, 0, 2, 3], "conjugate": False}],
            r"with perm \[1, 0, 2, 3\] is not supported: the permutation must keep the batch axis first",
        ),
        ("concat", [["x", 0, 0, {"axis": 0}], ["x", 0, 0, {"axis": 0}]], r"along the batch axis \(axis 0\)"),
        (
            "math.reduce_mean",
            ["x", 0, 0, {}],
            (
                r"unsupported option axis=None \(mean over every axis includes "
                r"the batch axis\)"
            ),
        ),
        ("math.reduce_sum", ["x", 0, 0, {"axis": [0, 1]}], r"sum over the batch axis \(axis 0\)"),
        ("compat.v1.squeeze", ["x", 0, 0, {"axis": None}], r"squeeze over every axis includes the batch axis"),
        (
            "math.multiply",
            ["x", 0, 0, {"y": [[[[1.0]]]]}],
            r"an array constant of shape \[1, 1, 1, 1\] has more axes "
            r"than the tensor's",
        ),
        ("math.multiply", ["x", 0, 0, {"y": [[1.0], [2.0, 3.0]]}], r"unsupported option argument=.* \(a rectangular"),
        ("reshape", ["x", 0, 0, {"shape": ["x", 0, 0]}], r"with a tensor as argument 'shape' is not supported"),
        (
            "math.reduce_max",
            ["x", 0, 0, {"axis": 1, "keep_dims": True}],
            r"argument\(s\) 'keep_dims' are not supported",
        ),
        ("nn.softmax", ["x", 0, 0, {"axis": 0}], r"axis 0 is not a feature axis"),
        (
            "math.exp",
            [["x", 0, 0, {}], ["x", 0, 0, {}]],
            r"'math.exp' on a list is not supported \(one tensor expected\)",
        ),
        ("math.exp", ["_CONSTANT_VALUE", -1, 2.0, {}], r"'math.exp' on 2.0 is not supported"),
        ("math.add", ["x", 0, 0, {"y": True}], r"'math.add' on True is not supported \(tensors, numbers and arrays"),
    ],
)
def test_ops_touching_the_batch_axis_or_unsupported_arguments_are_refused(function, node, message):
    with pytest.raises(UnsupportedLayerError, match=message) as err:
        keras_config.parse_model_config(_model_config(function, node), "model.h5", keras2=True)
    assert "\n" not in str(err.value) and "layer 'op'" in str(err.value)


def test_slicing_the_batch_axis_is_refused():
    node = ["x", 0, 0, {"slice_spec": [{"start": 1, "stop": None, "step": None}]}]
    with pytest.raises(UnsupportedLayerError, match=r"does not keep the batch axis whole first"):
        keras_config.parse_model_config(
            _model_config("__operators__.getitem", node, "SlicingOpLambda"), "model.h5", keras2=True
        )


@pytest.mark.parametrize(
    "node, message",
    [
        (["x", 0, 0, [1, 2]], r"malformed call: keyword arguments are a list, not an object"),
        (["x", "n", 0, {}], r"malformed tensor reference \['x', 'n', 0\]"),
        (["_CONSTANT_VALUE", 0, 2.0, {"y": ["x", 0, 0]}], r"malformed constant"),
        ("x", r"malformed call 'x'"),
        (["x", 0, 0, {"y": ["x", -1, 0]}], r"malformed tensor reference \['x', -1, 0\]"),
    ],
)
def test_malformed_op_call_is_one_line_naming_the_file(node, message):
    with pytest.raises(ExchangeFileError, match=r"^model\.h5: layer 'op' \(TFOpLambda\): " + message) as err:
        keras_config.parse_model_config(_model_config("math.multiply", node), "model.h5", keras2=True)
    assert "\n" not in str(err.value)


def test_malformed_op_in_a_file_exits_with_one_line(tmp_path, capsys):
    """The fixture with one TFOpLambda's keyword arguments written as a list: exit code 2, one
    `error:` line naming the file, nothing written."""
    path = tmp_path / "model.h5"
    shutil.copy(KERAS2 / "tfop_unet.h5", path)
    with h5py.File(path, "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        layer = next(layer for layer in config["config"]["layers"] if layer["name"] == "tf.math.multiply")
        broken = copy.deepcopy(layer["inbound_nodes"][0])
        broken[3] = list(broken[3].items())
        layer["inbound_nodes"][0] = broken
        h5.attrs["model_config"] = json.dumps(config)
    assert cli.main([str(path), str(tmp_path / "out.safetensors")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines
    assert "layer 'tf.math.multiply' (TFOpLambda): malformed call: keyword arguments are a list" in lines[0]
    assert not (tmp_path / "out.safetensors").exists()


def keras3_ops_model() -> keras.Model:
    """The same operations written with keras.ops in Keras 3: read from a .keras as they are."""
    ops = keras.ops
    x = keras.Input((5, 4, 3), name="x")
    h = keras.layers.Conv2D(3, 3, padding="same", name="conv")(x)
    a = ops.mean(h, axis=(1, 2), keepdims=True) + ops.sum(h, axis=-1, keepdims=True)
    b = ops.squeeze(ops.expand_dims(ops.max(h, axis=1), 1), 1) * ops.min(h, axis=1) + ops.prod(h, axis=1)
    c = ops.maximum(ops.exp(-ops.abs(h)), 0.3) + ops.minimum(h, ops.sqrt(ops.square(h) + 1.0))
    d = ops.power(ops.sigmoid(h), 2.0) + ops.log(ops.relu(h) + 1.0)
    return keras.Model(x, [a, b, c[..., 0], d, ops.tanh(h)[:, 1:4, ::2]], name="keras3_ops")


@pytest.mark.slow
def test_keras3_operations_in_every_direction(tmp_path):
    keras.utils.set_random_seed(5)
    model = keras3_ops_model()
    model.save(tmp_path / "model.keras")
    values = [np.random.default_rng(1).standard_normal((3, 5, 4, 3)).astype(np.float32)]
    reference = keras_adapter.predict(model, values)
    result = layer_suite.CaseResult("keras3_ops", "tfop", "Model", "pass")
    layer_suite.conversions(tmp_path / "model.keras", values, reference, result)
    assert len(result.diffs) == 4 and max(result.diffs.values()) <= layer_suite.tolerance(reference), result.diffs


@pytest.mark.parametrize(
    "kind, config",
    [
        ("op_exp", {}),
        ("op_get_item", {"key": [["index", 1, None, None]]}),
        ("op_mean", {"axis": [1], "keepdims": False}),
    ],
)
def test_an_exchange_file_operation_reading_two_tensors_is_refused(kind, config):
    """An operation's other arguments are constants of its config: a second input is refused,
    never silently left unread."""
    description = {
        "name": "m",
        "inputs": [{"name": name, "shape": [3, 2], "dtype": "float32"} for name in "xy"],
        "nodes": [{"name": "op", "kind": kind, "inputs": ["x", "y"], "dtype": "float32", "config": config}],
        "outputs": ["op"],
    }
    with pytest.raises(ExchangeError, match=r"takes one tensor input, found 2"):
        Graph.from_dict(description).shapes


@pytest.mark.parametrize(
    "config, message",
    [
        ({"operands": [None, "array"], "array": [1.0], "array_shape": [2]}, r"must hold as many finite numbers"),
        ({"operands": [None, "array"]}, r"an 'array' operand and array_shape go together"),
        ({"operands": [None, "code"]}, r"operand 'code' is not a tensor"),
    ],
)
def test_an_exchange_file_array_constant_is_checked(config, message):
    description = {
        "name": "m",
        "inputs": [{"name": "x", "shape": [3, 2], "dtype": "float32"}],
        "nodes": [{"name": "op", "kind": "op_multiply", "inputs": ["x"], "dtype": "float32", "config": config}],
        "outputs": ["op"],
    }
    with pytest.raises(ExchangeError, match=message):
        Graph.from_dict(description)
