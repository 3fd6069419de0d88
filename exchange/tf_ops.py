"""TensorFlow ops in a Keras 2 (tf.keras) functional model: `TFOpLambda` and `SlicingOpLambda` layers.

tf.keras records `tf.math.multiply(x, 2)`, `tf.reshape(x, ...)`, `x + y`, `x[:, 1:]` on Keras
tensors as layers whose config names the TensorFlow symbol (`"function": "math.multiply"`) and
whose call is recorded in a form of its own (tf_keras `Node.serialize`): the first argument as
the call's structure of entries `[layer, node, tensor, kwargs]` (a constant as
`["_CONSTANT_VALUE", -1, value, kwargs]`; a list of tensors, as `tf.concat` takes, as a list of
entries), every other argument as a keyword in `kwargs`, a tensor there as `[layer, node, tensor]`.

Each op this exchange reads is translated here into the Keras 3 layer or operation that computes
the same (`tf.reshape(x, [-1, 24, 3])` is `Reshape((24, 3))`, `tf.math.exp` is `ops.Exp`,
`tf.math.reduce_mean(x, 1)` is `ops.Mean(axis=1)`), in Keras 3's config form, so the layer kinds
read it as they read a Keras 3 model, and a model converted to Keras 3 holds those layers and
operations. The op's name is looked up in a table, never imported or evaluated; any other op is
refused naming it.

Conventions that differ:
- A TensorFlow op may touch the batch axis (`tf.reshape(x, [2, -1])`, `tf.transpose` with a
  permutation that moves axis 0, `tf.concat(..., axis=0)`); Keras 3's layers keep it: refused.
- Constants, numbers and arrays, are float32 in both (TensorFlow converts `2` and `[1, 2]` to the
  tensor's type); an array constant is broadcast as `exchange.kinds.arithmetic` says.
"""

from __future__ import annotations

from exchange.errors import ExchangeError, UnsupportedLayerError

LAYER_CLASSES = ("TFOpLambda", "SlicingOpLambda")
CONSTANT_VALUE = "_CONSTANT_VALUE"  # tf_keras's marker of a constant first argument
REFUSED = "<refused TensorFlow op>"  # the class of a refused op's stand-in (see `refused`)
OPS_MODULE = "keras.src.ops."
CONFIG_KEYS = {"name", "trainable", "dtype", "function"}
MAX_NODE_INDEX = 1 << 20

_NUMBER = "number"  # an argument that is a tensor or a number (the binary ops)


class _Call:
    """A TF op's recorded call: its first argument (a tensor, a constant or a list of them) and
    its keyword arguments, each tensor as Keras 3's `__keras_tensor__` form."""

    def __init__(self, layer_name: str, function: str, first, kwargs: dict):
        self.layer_name, self.function, self.first, self.kwargs = layer_name, function, first, kwargs
        self.taken = {"name"}  # the op's name argument names a TensorFlow op: nothing computed

    def refuse(self, why: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(f"layer {self.layer_name!r} (TFOpLambda): TensorFlow op {self.function!r} {why}")

    def take(self, key: str, default=None, constant: bool = True):
        self.taken.add(key)
        value = self.kwargs.get(key, default)
        if constant and _has_tensor(value):
            raise self.refuse(f"with a tensor as argument {key!r} is not supported (only constants)")
        return value

    def integers(self, key: str, default=None) -> list[int] | None:
        value = self.take(key, default)
        if value is None:
            return None
        values = [value] if _is_int(value) else value
        if not isinstance(values, list) or not all(_is_int(item) for item in values):
            raise self.refuse(f"argument {key}={_short(value)} is not supported (integers expected)")
        return values

    def expect(self, key: str, *allowed) -> None:
        value = self.take(key, allowed[0])
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise self.refuse(f"argument {key}={_short(value)} is not supported (only {allowed[0]!r})")

    def tensor(self):
        """The first argument, which must be one tensor."""
        if not _is_tensor(self.first):
            what = "a list" if isinstance(self.first, list) else _short(self.first)
            raise self.refuse(f"on {what} is not supported (one tensor expected)")
        return self.first

    def finish(self) -> None:
        unknown = sorted(key for key in self.kwargs if key not in self.taken)
        if unknown:
            raise self.refuse(f"argument(s) {', '.join(map(_short, unknown))} are not supported")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_tensor(value) -> bool:
    return isinstance(value, dict) and value.get("class_name") == "__keras_tensor__"


def _has_tensor(value) -> bool:
    if _is_tensor(value):
        return True
    if isinstance(value, list):
        return any(_has_tensor(item) for item in value)
    if isinstance(value, dict):
        return any(_has_tensor(item) for item in value.values())
    return False


# -- the ops ------------------------------------------------------------------------------------


def _operation(module: str, class_name: str, args: list, **config) -> tuple:
    return (OPS_MODULE + module, class_name, config, args)


def _layer(class_name: str, args: list, **config) -> tuple:
    return ("keras.layers", class_name, config, args)


def _binary(class_name: str):
    def translate(call: _Call):
        operands = [call.first, call.take("y", constant=False)]
        for index, operand in enumerate(operands):
            if isinstance(operand, list) and not _has_tensor(operand):  # TensorFlow makes it a tensor of x's type
                operands[index] = {"class_name": "__numpy__", "config": {"value": operand, "dtype": "float32"}}
            elif not _is_tensor(operand) and (isinstance(operand, bool) or not isinstance(operand, (int, float))):
                raise call.refuse(f"on {_short(operand)} is not supported (tensors, numbers and arrays of numbers)")
        if not any(_is_tensor(operand) for operand in operands):
            raise call.refuse("on two constants is not supported")
        return _operation("numpy", class_name, operands)

    return translate


def _elementwise(module: str, class_name: str):
    def translate(call: _Call):
        return _operation(module, class_name, [call.tensor()])

    return translate


def _reshape(call: _Call):
    shape = call.integers("shape")
    if not shape or shape[0] != -1 or len(shape) < 2:
        raise call.refuse(
            f"with shape {_short(shape)} is not supported: the shape must keep the batch "
            "axis first as -1 (e.g. [-1, 24, 3])"
        )
    return _layer("Reshape", [call.tensor()], target_shape=shape[1:])


def _transpose(call: _Call):
    perm = call.integers("perm")
    call.expect("conjugate", False)
    if not perm or perm[0] != 0:
        raise call.refuse(
            f"with perm {_short(perm)} is not supported: the permutation must keep the batch axis first (perm[0] == 0)"
        )
    return _layer("Permute", [call.tensor()], dims=perm[1:])


def _expand_dims(call: _Call):
    axis = call.take("axis")
    call.expect("dim", None)
    return _operation("numpy", "ExpandDims", [call.tensor()], axis=axis)


def _squeeze(call: _Call):
    axis = call.take("axis")
    call.expect("squeeze_dims", None)
    return _operation("numpy", "Squeeze", [call.tensor()], axis=axis)


def _concat(call: _Call):
    tensors = call.first
    if not isinstance(tensors, list) or len(tensors) < 2 or not all(_is_tensor(item) for item in tensors):
        raise call.refuse("is supported on a list of two or more tensors only")
    axis = call.take("axis")
    if axis == 0:
        raise call.refuse("along the batch axis (axis 0) is not supported")
    return _layer("Concatenate", [tensors], axis=axis)


def _reduction(class_name: str):
    def translate(call: _Call):
        return _operation(
            "numpy", class_name, [call.tensor()], axis=call.take("axis"), keepdims=call.take("keepdims", False)
        )

    return translate


def _add_n(call: _Call):
    tensors = call.first
    if not isinstance(tensors, list) or len(tensors) < 2 or not all(_is_tensor(item) for item in tensors):
        raise call.refuse("is supported on a list of two or more tensors only")
    return _layer("Add", [tensors])


def _clip(call: _Call):
    bounds = [call.take("clip_value_min"), call.take("clip_value_max")]
    if not all(isinstance(bound, (int, float)) and not isinstance(bound, bool) for bound in bounds):
        raise call.refuse(f"with bounds {_short(bounds)} is not supported (numbers only)")
    return _operation("numpy", "Clip", [call.tensor()], x_min=bounds[0], x_max=bounds[1])


def _resize(call: _Call):
    """tf.image.resize is what Keras 3's Resizing computes on TensorFlow."""
    size = call.integers("size")
    call.expect("preserve_aspect_ratio", False)
    if not size or len(size) != 2:
        raise call.refuse(f"with size {_short(size)} is not supported (two integers)")
    return _layer(
        "Resizing",
        [call.tensor()],
        height=size[0],
        width=size[1],
        interpolation=call.take("method", "bilinear"),
        antialias=call.take("antialias", False),
    )


def _softmax(call: _Call):
    axis = call.take("axis")
    return _layer("Softmax", [call.tensor()], axis=-1 if axis is None else axis)


def _getitem(call: _Call):
    spec = call.take("slice_spec")
    items = spec if isinstance(spec, list) else [spec]
    key = []
    for item in items:
        if isinstance(item, dict) and item.get("class_name") != "__ellipsis__":
            if set(item) != {"start", "stop", "step"}:
                raise call.refuse(f"slice {_short(item)} is malformed")
            item = {"class_name": "__slice__", "config": dict(item)}
        key.append(item)
    return _operation("numpy", "GetItem", [call.tensor(), key])


# TensorFlow symbol (as tf.keras records it) -> its translation.
OPS = {
    **{name: _binary("Add") for name in ("__operators__.add", "math.add")},
    "math.subtract": _binary("Subtract"),
    "math.multiply": _binary("Multiply"),
    **{name: _binary("TrueDivide") for name in ("math.truediv", "math.divide")},
    "math.maximum": _binary("Maximum"),
    "math.minimum": _binary("Minimum"),
    "math.pow": _binary("Power"),
    "math.exp": _elementwise("numpy", "Exp"),
    "math.log": _elementwise("numpy", "Log"),
    "math.sqrt": _elementwise("numpy", "Sqrt"),
    "math.rsqrt": _elementwise("math", "Rsqrt"),
    "math.square": _elementwise("numpy", "Square"),
    "math.abs": _elementwise("numpy", "Absolute"),
    "math.negative": _elementwise("numpy", "Negative"),
    "math.reciprocal": _elementwise("numpy", "Reciprocal"),
    "math.floor": _elementwise("numpy", "Floor"),
    "math.ceil": _elementwise("numpy", "Ceil"),
    "math.sin": _elementwise("numpy", "Sin"),
    "math.cos": _elementwise("numpy", "Cos"),
    "math.tanh": _elementwise("numpy", "Tanh"),
    "math.sigmoid": _elementwise("nn", "Sigmoid"),
    "nn.relu": _elementwise("nn", "Relu"),
    "nn.relu6": _elementwise("nn", "Relu6"),
    "math.softplus": _elementwise("nn", "Softplus"),
    "nn.softsign": _elementwise("nn", "Softsign"),
    "nn.silu": _elementwise("nn", "Silu"),
    "math.add_n": _add_n,
    "clip_by_value": _clip,
    "image.resize": _resize,
    "nn.softmax": _softmax,
    "reshape": _reshape,
    "compat.v1.transpose": _transpose,
    "expand_dims": _expand_dims,
    "compat.v1.squeeze": _squeeze,
    "concat": _concat,
    "math.reduce_mean": _reduction("Mean"),
    "math.reduce_sum": _reduction("Sum"),
    "math.reduce_max": _reduction("Max"),
    "math.reduce_min": _reduction("Min"),
    "math.reduce_prod": _reduction("Prod"),
    "__operators__.getitem": _getitem,
}


# -- reading a call ------------------------------------------------------------------------------


def _is_entry(value) -> bool:
    """tf_keras's test for node data (`convert_inner_node_data`): a list of 3 or 4 items, a string first."""
    return isinstance(value, list) and len(value) in (3, 4) and isinstance(value[0], str)


def _reference(entry: list, where: str) -> dict:
    """A tensor entry [layer, node, tensor(, kwargs)] as Keras 3's `__keras_tensor__` form."""
    name, node_index, tensor_index = entry[:3]
    if not (
        _is_int(node_index)
        and _is_int(tensor_index)
        and 0 <= node_index < MAX_NODE_INDEX
        and 0 <= tensor_index < MAX_NODE_INDEX
    ):
        raise ExchangeError(f"{where}: malformed tensor reference {_short(entry[:3])}")
    return {"class_name": "__keras_tensor__", "config": {"keras_history": [name, node_index, tensor_index]}}


def _first_argument(data, where: str):
    """The first argument and the recorded keyword arguments (those of the last entry, as tf_keras reads them)."""
    kwargs = None

    def read(entry):
        nonlocal kwargs
        if len(entry) == 4:
            if not isinstance(entry[3], dict):
                raise ExchangeError(
                    f"{where}: malformed call: keyword arguments are a {type(entry[3]).__name__}, not an object"
                )
            kwargs = entry[3]
        if entry[0] == CONSTANT_VALUE:
            if entry[1] != -1:
                raise ExchangeError(f"{where}: malformed constant {_short(entry[:3])}")
            return entry[2]
        return _reference(entry, where)

    if _is_entry(data):
        first = read(data)
    elif isinstance(data, list) and data and all(_is_entry(item) for item in data):
        first = [read(item) for item in data]
    else:
        raise ExchangeError(f"{where}: malformed call {_short(data)}")
    return first, kwargs if kwargs is not None else {}


def _keyword(value, where: str):
    """A recorded keyword argument with each tensor reference in Keras 3's form (tf_keras's rule:
    any list of 3 or 4 items with a string first is one)."""
    if _is_entry(value):
        return _reference(value, where)
    if isinstance(value, list):
        return [_keyword(item, where) for item in value]
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ExchangeError(f"{where}: expected a name, found {type(value).__name__}")
    return value


def keras3_layer(layer: dict) -> dict:
    """A TFOpLambda/SlicingOpLambda layer of a Keras 2 config as the Keras 3 layer or operation
    computing the same, in Keras 3's config form (module, class_name, config, inbound_nodes).
    Raises UnsupportedLayerError for an op not supported, ExchangeError for a malformed layer."""
    config = layer.get("config")
    if not isinstance(config, dict):
        raise ExchangeError(f"TFOpLambda layer {_short(layer.get('name'))}: config is not an object")
    name = _text(config.get("name", layer.get("name")), "TFOpLambda layer")
    where = f"layer {name!r} ({_text(layer.get('class_name'), name)})"
    function = _text(config.get("function"), f"{where} function")
    inbound = layer.get("inbound_nodes")
    if not isinstance(inbound, list) or len(inbound) != 1:
        count = len(inbound) if isinstance(inbound, list) else 0
        raise UnsupportedLayerError(f"{where}: a TensorFlow op called {count} times is not supported (once)")
    first, kwargs = _first_argument(inbound[0], where)
    kwargs = {_text(key, where): _keyword(value, where) for key, value in kwargs.items()}
    call = _Call(name, function, first, kwargs)
    translate = OPS.get(function)
    if translate is None:
        raise call.refuse(f"has no converter; supported: {', '.join(sorted(OPS))}")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ExchangeError(f"{where}: unknown option(s) {', '.join(map(_short, unknown))}")
    if config.get("dtype") not in (None, "float32") and not isinstance(config.get("dtype"), dict):
        raise call.refuse(f"with dtype {_short(config.get('dtype'))} is not supported (float32)")
    module, class_name, options, args = translate(call)
    call.finish()
    return {
        "module": module,
        "class_name": class_name,
        "name": name,
        "config": {"name": name, **options},
        "inbound_nodes": [{"args": args, "kwargs": {}}],
    }


def refused(layer: dict) -> dict:
    """A stand-in for a refused op (its refusal already reported): an operation of no kind reading
    the tensors the op reads, so the model's other layers are still read and their problems reported."""
    config = layer.get("config")
    name = config.get("name", layer.get("name")) if isinstance(config, dict) else layer.get("name")
    refs = []

    def collect(value):
        if _is_entry(value) and value[0] != CONSTANT_VALUE and _is_int(value[1]) and _is_int(value[2]):
            refs.append({"class_name": "__keras_tensor__", "config": {"keras_history": list(value[:3])}})
            if len(value) == 4:
                collect(value[3])
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    collect(layer.get("inbound_nodes"))
    return {
        "module": OPS_MODULE + "tf",
        "class_name": REFUSED,
        "name": name,
        "config": {"name": name},
        "inbound_nodes": [{"args": refs, "kwargs": {}}],
    }
