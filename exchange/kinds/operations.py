"""Keras 3 operations on one tensor recorded in a functional model: `ops.exp(x)`, `ops.mean(x,
axis=1)`, `ops.expand_dims(x, 1)`, `x[:, 1:]`. They have no weights.

Keras 3 records `keras.ops` calls on symbolic tensors as operations (module `keras.src.ops.numpy`,
`.nn` or `.math`), not layers; a Keras 2 (tf.keras) model's TensorFlow ops (`TFOpLambda` layers)
are read as these operations (`exchange.tf_ops`).

Conventions that differ:
- Axes: an operation's axes are Keras's (channels-last, batch included); the torch side holds a
  tensor of rank 3 or more channels-first. Operations that name axes (expand_dims, squeeze, the
  reductions, slicing) move the torch tensor to Keras's order, apply the operation with Keras's
  axes and move the result back (consecutive moves cancel in the built module).
- The batch axis: an operation that reads across rows or changes the batch axis (a reduction
  over axis 0 or over all axes, expand_dims at 0, squeeze without axes, slicing the batch) makes
  one row's output depend on how rows are batched; refused.
- Prod over several axes: torch's `prod` takes one dim; the axes are reduced one after another.
- Types: operations do not cast their inputs (`autocasts = False`), as keras.ops calls do not.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_AXIS,
    KerasOptions,
    LayerKind,
    NoConfig,
    TorchBuilder,
    TorchValue,
    _short,
    check_int,
    register,
)
from exchange.kinds.axis_order import to_keras_order, to_torch_order

if TYPE_CHECKING:
    from exchange.graph import NodeContext, Shape

KERAS_MODULES = {"numpy": "keras.src.ops.numpy", "nn": "keras.src.ops.nn", "math": "keras.src.ops.math"}
# A slice bound or an index: real slices are at most a tensor's size (graph sizes fit in 2**31).
MAX_INDEX = (1 << 31) - 1


def _keras_operation(module: str, class_name: str) -> Any:
    """The Keras 3 operation class `keras.src.ops.<module>.<class_name>` (imported when rebuilding)."""
    import importlib

    return getattr(importlib.import_module(KERAS_MODULES[module]), class_name)


def _to_keras_layout(builder: TorchBuilder, value: TorchValue, rank: int) -> TorchValue:
    """A torch tensor of Keras rank `rank` (no batch axis) in Keras's axis order."""
    return value if rank < 2 else builder.call(builder.torch.permute, value, to_keras_order(rank))


def _to_torch_layout(builder: TorchBuilder, value: TorchValue, rank: int) -> TorchValue:
    return value if rank < 2 else builder.call(builder.torch.permute, value, to_torch_order(rank))


def _feature_axes(axes: tuple[int, ...], rank: int, what: str) -> tuple[int, ...]:
    """Keras axes (batch included, may be negative) of a rank-`rank` tensor (no batch axis) as
    positive feature axes in 1..rank; the batch axis is refused (see the module docstring)."""
    positive = []
    for axis in axes:
        value = axis + rank + 1 if axis < 0 else axis
        if value == 0:
            raise UnsupportedLayerError(
                f"{what} over the batch axis (axis {axis}) makes each row's output "
                "depend on the rows batched with it; not supported"
            )
        if not 1 <= value <= rank:
            raise ExchangeError(f"{what}: axis {axis} is out of range for a rank-{rank + 1} input (batch included)")
        positive.append(value)
    if len(set(positive)) != len(positive):
        raise ExchangeError(f"{what}: axes {list(axes)} name an axis twice")
    return tuple(positive)


def _read_axes(options: KerasOptions, key: str, what: str, required: bool = True) -> tuple[int, ...]:
    """An axis option, one int or a list of ints, as a tuple; None (all axes) is refused."""
    value = options.take(key, None)
    if value is None:
        raise options.unsupported(key, value, f"{what} over every axis includes the batch axis")
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, (list, tuple))
        or not values
        or not all(isinstance(axis, int) and not isinstance(axis, bool) for axis in values)
    ):
        raise options.unsupported(key, value, "one axis or a list of axes")
    return tuple(values)


def _check_axes(axes: tuple[int, ...], what: str) -> None:
    if not isinstance(axes, tuple) or not 1 <= len(axes) <= MAX_AXIS:
        raise ExchangeError(f"{what} axes must be 1 to {MAX_AXIS} integers, got {_short(axes)}")
    for axis in axes:
        check_int(axis, f"{what} axis", MAX_AXIS, -MAX_AXIS)


class _Operation(LayerKind):
    """An operation on one tensor: no weights, no cast of its input."""

    autocasts = False
    keras_module, keras_operation = "numpy", ""

    @staticmethod
    def check_call(options: KerasOptions, count: int = 1) -> None:
        """The call gives the tensor first and `count` arguments in all (a key after it: GetItem)."""
        if len(options.call_args) != count or options.call_args[0] is not None:
            raise options.unsupported("arguments", options.call_args, "a tensor" + (" and a key" if count == 2 else ""))

    @staticmethod
    def input_shape(input_shapes: tuple[Shape, ...]) -> Shape:
        """The one input's shape: every other value of the call is a constant of the config."""
        if len(input_shapes) != 1:
            raise UnsupportedLayerError(
                f"takes one tensor input, found {len(input_shapes)} (a tensor where a "
                "constant is expected is not supported)"
            )
        return input_shapes[0]

    def keras_options(self, config: Any) -> dict[str, Any]:
        """The Keras operation's constructor arguments (its config's values)."""
        return {}

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return _keras_operation(self.keras_module, self.keras_operation)(
            **self.keras_options(context.config), name=context.node.name
        )


# -- element-wise functions -------------------------------------------------------------------


class _Elementwise(_Operation):
    """`ops.exp(x)` and the like: one torch function of the same meaning, element by element."""

    keeps_element_order = True
    torch_namespace, torch_function = "torch", ""

    def output_activation(self, config: Any) -> str | None:
        return "sigmoid" if self.kind == "op_sigmoid" else None  # `ops.sigmoid` attaches its logits

    def from_keras(self, options: KerasOptions) -> Any:
        self.check_call(options)
        return NoConfig()

    def output_shape(self, config: Any, input_shapes: tuple[Shape, ...]) -> Shape:
        return self.input_shape(input_shapes)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        namespace = builder.F if self.torch_namespace == "F" else builder.torch
        return builder.call(getattr(namespace, self.torch_function), inputs[0])


def _elementwise(
    kind: str, keras_module: str, keras_operation: str, torch_namespace: str, torch_function: str
) -> type[LayerKind]:
    cls = type(
        keras_operation + "Operation",
        (_Elementwise,),
        {
            "kind": kind,
            "keras_classes": ("ops." + keras_operation,),
            "keras_module": keras_module,
            "keras_operation": keras_operation,
            "torch_namespace": torch_namespace,
            "torch_function": torch_function,
            "__doc__": f"`keras.ops` {keras_operation}: `{torch_namespace}.{torch_function}` element by element.",
        },
    )
    return register(cls)


# (kind, Keras module, Keras class, torch namespace, torch function): equal functions element by element.
ELEMENTWISE = (
    ("op_exp", "numpy", "Exp", "torch", "exp"),
    ("op_log", "numpy", "Log", "torch", "log"),
    ("op_sqrt", "numpy", "Sqrt", "torch", "sqrt"),
    ("op_rsqrt", "math", "Rsqrt", "torch", "rsqrt"),
    ("op_square", "numpy", "Square", "torch", "square"),
    ("op_abs", "numpy", "Absolute", "torch", "abs"),
    ("op_negative", "numpy", "Negative", "torch", "neg"),
    ("op_reciprocal", "numpy", "Reciprocal", "torch", "reciprocal"),
    ("op_floor", "numpy", "Floor", "torch", "floor"),
    ("op_ceil", "numpy", "Ceil", "torch", "ceil"),
    ("op_sin", "numpy", "Sin", "torch", "sin"),
    ("op_cos", "numpy", "Cos", "torch", "cos"),
    ("op_tanh", "numpy", "Tanh", "torch", "tanh"),
    ("op_sigmoid", "nn", "Sigmoid", "torch", "sigmoid"),
    ("op_relu", "nn", "Relu", "F", "relu"),
    ("op_relu6", "nn", "Relu6", "F", "relu6"),
    ("op_softplus", "nn", "Softplus", "F", "softplus"),
    ("op_softsign", "nn", "Softsign", "F", "softsign"),
    ("op_silu", "nn", "Silu", "F", "silu"),
)
for _row in ELEMENTWISE:
    _elementwise(*_row)


@dataclass(frozen=True)
class ClipConfig:
    x_min: float
    x_max: float

    def __post_init__(self) -> None:
        for value in (self.x_min, self.x_max):
            if not isinstance(value, float) or not math.isfinite(value):
                raise ExchangeError(f"clip bounds must be finite numbers, got {_short(value)}")


@register
class ClipOperation(_Operation):
    """`ops.clip(x, x_min, x_max)`: `torch.clamp`, min then max as both apply them (x_min > x_max
    gives x_max everywhere in both)."""

    kind, keras_classes, Config = "op_clip", ("ops.Clip",), ClipConfig
    keeps_element_order = True
    keras_operation = "Clip"

    def from_keras(self, options: KerasOptions) -> ClipConfig:
        self.check_call(options)
        return ClipConfig(options.number("x_min"), options.number("x_max"))

    def keras_options(self, config: Any) -> dict[str, Any]:
        return {"x_min": config.x_min, "x_max": config.x_max}

    def output_shape(self, config: ClipConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return self.input_shape(input_shapes)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        return builder.call(builder.torch.clamp, inputs[0], min=context.config.x_min, max=context.config.x_max)


# -- axes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpandDimsConfig:
    axis: int  # Keras axis of the output, batch included

    def __post_init__(self) -> None:
        check_int(self.axis, "expand_dims axis", MAX_AXIS, -MAX_AXIS)


@register
class ExpandDimsOperation(_Operation):
    kind, keras_classes, Config = "op_expand_dims", ("ops.ExpandDims",), ExpandDimsConfig
    keras_operation = "ExpandDims"

    def from_keras(self, options: KerasOptions) -> ExpandDimsConfig:
        self.check_call(options)
        axis = options.take("axis")
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise options.unsupported("axis", axis, "one axis")
        return ExpandDimsConfig(axis)

    def keras_options(self, config: Any) -> dict[str, Any]:
        return {"axis": config.axis}

    def output_shape(self, config: ExpandDimsConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = self.input_shape(input_shapes)
        position = _feature_axes((config.axis,), len(shape) + 1, "expand_dims")[0]
        return shape[: position - 1] + (1,) + shape[position - 1 :]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        rank = len(context.input_shape)
        position = _feature_axes((context.config.axis,), rank + 1, "expand_dims")[0]
        value = builder.method(_to_keras_layout(builder, inputs[0], rank), "unsqueeze", position)
        return _to_torch_layout(builder, value, rank + 1)


@dataclass(frozen=True)
class SqueezeConfig:
    axis: tuple[int, ...]  # Keras axes, batch included, each of size 1

    def __post_init__(self) -> None:
        _check_axes(self.axis, "squeeze")


@register
class SqueezeOperation(_Operation):
    """Squeezing every axis of size 1 (no `axis`) would squeeze a one-row batch too: refused."""

    kind, keras_classes, Config = "op_squeeze", ("ops.Squeeze",), SqueezeConfig
    keras_operation = "Squeeze"

    def from_keras(self, options: KerasOptions) -> SqueezeConfig:
        self.check_call(options)
        return SqueezeConfig(_read_axes(options, "axis", "squeeze"))

    def keras_options(self, config: Any) -> dict[str, Any]:
        return {"axis": config.axis[0] if len(config.axis) == 1 else config.axis}

    def output_shape(self, config: SqueezeConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = self.input_shape(input_shapes)
        axes = _feature_axes(config.axis, len(shape), "squeeze")
        if any(shape[axis - 1] != 1 for axis in axes):
            raise ExchangeError(
                f"squeeze: axes {list(config.axis)} of shape (batch, {_short(shape)[1:-1]}) are not all of size 1"
            )
        return tuple(size for axis, size in enumerate(shape, 1) if axis not in axes)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        rank = len(context.input_shape)
        axes = _feature_axes(context.config.axis, rank, "squeeze")
        value = builder.method(_to_keras_layout(builder, inputs[0], rank), "squeeze", tuple(sorted(axes)))
        return _to_torch_layout(builder, value, rank - len(axes))


# -- reductions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReductionConfig:
    axis: tuple[int, ...]  # Keras axes, batch included
    keepdims: bool = False

    def __post_init__(self) -> None:
        _check_axes(self.axis, "reduction")
        if not isinstance(self.keepdims, bool):
            raise ExchangeError(f"keepdims must be true or false, got {_short(self.keepdims)}")


class _Reduction(_Operation):
    Config = ReductionConfig
    torch_function = ""
    empty_options: tuple[str, ...] = ()  # options that must be None (Max's `initial`, Prod's `dtype`)

    def from_keras(self, options: KerasOptions) -> ReductionConfig:
        self.check_call(options)
        for key in self.empty_options:
            value = options.take(key, None)
            if value is not None:
                raise options.unsupported(key, value, "only None")
        return ReductionConfig(
            _read_axes(options, "axis", self.keras_operation.lower()), options.flag("keepdims", False)
        )

    def keras_options(self, config: Any) -> dict[str, Any]:
        axis = config.axis[0] if len(config.axis) == 1 else config.axis
        return {"axis": axis, "keepdims": config.keepdims, **{key: None for key in self.empty_options}}

    def output_shape(self, config: ReductionConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = self.input_shape(input_shapes)
        axes = _feature_axes(config.axis, len(shape), self.keras_operation.lower())
        if config.keepdims:
            return tuple(1 if axis in axes else size for axis, size in enumerate(shape, 1))
        return tuple(size for axis, size in enumerate(shape, 1) if axis not in axes)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        rank = len(context.input_shape)
        axes = _feature_axes(context.config.axis, rank, self.keras_operation.lower())
        value = _to_keras_layout(builder, inputs[0], rank)
        keepdim = context.config.keepdims
        if self.torch_function == "prod":  # one dim per call, the last first so the others stay put
            for axis in sorted(axes, reverse=True):
                value = builder.call(builder.torch.prod, value, dim=axis, keepdim=keepdim)
        else:
            value = builder.call(
                getattr(builder.torch, self.torch_function), value, dim=tuple(sorted(axes)), keepdim=keepdim
            )
        return _to_torch_layout(builder, value, len(context.output_shape))


@register
class MeanOperation(_Reduction):
    kind, keras_classes, keras_operation, torch_function = "op_mean", ("ops.Mean",), "Mean", "mean"


@register
class SumOperation(_Reduction):
    kind, keras_classes, keras_operation, torch_function = "op_sum", ("ops.Sum",), "Sum", "sum"


@register
class MaxOperation(_Reduction):
    kind, keras_classes, keras_operation, torch_function = "op_max", ("ops.Max",), "Max", "amax"
    empty_options = ("initial",)


@register
class MinOperation(_Reduction):
    kind, keras_classes, keras_operation, torch_function = "op_min", ("ops.Min",), "Min", "amin"
    empty_options = ("initial",)


@register
class ProdOperation(_Reduction):
    kind, keras_classes, keras_operation, torch_function = "op_prod", ("ops.Prod",), "Prod", "prod"
    empty_options = ("dtype",)


# -- slicing ----------------------------------------------------------------------------------

SLICE, INDEX, NEWAXIS, ELLIPSIS = "slice", "index", "newaxis", "ellipsis"
KEY_ITEMS = (SLICE, INDEX, NEWAXIS, ELLIPSIS)


# One item of a GetItem key: (what, start, stop, step), see GetItemConfig.
KeyItem = tuple[str, int | None, int | None, int | None]


@dataclass(frozen=True)
class GetItemConfig:
    # `x[key]`, one item per entry of the key: ("slice", start, stop, step), ("index", i, None,
    # None), ("newaxis", None, None, None) or ("ellipsis", None, None, None); Keras's axes.
    key: tuple[tuple[str, int | None, int | None, int | None], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.key, tuple) or not 1 <= len(self.key) <= 2 * MAX_AXIS:
            raise ExchangeError(f"slice key must be 1 to {2 * MAX_AXIS} items, got {_short(self.key)}")
        for item in self.key:
            if not isinstance(item, tuple) or len(item) != 4 or item[0] not in KEY_ITEMS:
                raise ExchangeError(f"slice key item {_short(item)} is not one of {', '.join(KEY_ITEMS)}")
            what, *numbers = item
            for number in numbers:
                if number is not None:
                    check_int(number, f"slice key {what}", MAX_INDEX, -MAX_INDEX)
            if (what in (NEWAXIS, ELLIPSIS) and numbers != [None] * 3) or (
                what == INDEX and (numbers[0] is None or numbers[1:] != [None, None])
            ):
                raise ExchangeError(f"slice key item {_short(item)} is malformed")
            if what == SLICE and numbers[2] is not None and numbers[2] < 1:
                raise UnsupportedLayerError(
                    f"slice step {numbers[2]}: only positive steps are supported "
                    "(torch tensors have no negative strides)"
                )
        if sum(item[0] == ELLIPSIS for item in self.key) > 1:
            raise ExchangeError("slice key has more than one ellipsis")


def _python_key(config: GetItemConfig) -> tuple[Any, ...]:
    """The key as Python writes it: slices, ints, None (newaxis) and Ellipsis."""
    items: list[Any] = []
    for what, start, stop, step in config.key:
        items.append(
            slice(start, stop, step)
            if what == SLICE
            else start
            if what == INDEX
            else None
            if what == NEWAXIS
            else Ellipsis
        )
    return tuple(items)


def _expanded_key(config: GetItemConfig, rank: int) -> list[KeyItem]:
    """The key with its ellipsis (or the implicit one at the end) as full slices, for a tensor
    of `rank` axes after the batch axis."""
    consumed = sum(item[0] in (SLICE, INDEX) for item in config.key)
    if consumed > rank + 1:
        raise ExchangeError(f"slice key of {consumed} axes for a rank-{rank + 1} input (batch included)")
    full: KeyItem = (SLICE, None, None, None)
    items: list[KeyItem] = (
        list(config.key)
        if any(item[0] == ELLIPSIS for item in config.key)
        else list(config.key) + [(ELLIPSIS, None, None, None)]
    )
    at = next(index for index, item in enumerate(items) if item[0] == ELLIPSIS)
    return items[:at] + [full] * (rank + 1 - consumed) + items[at + 1 :]


def _sliced_shape(config: GetItemConfig, shape: Shape) -> Shape:
    """The output shape (no batch axis); the batch axis must be taken whole and first."""
    items = _expanded_key(config, len(shape))
    if items[0][0] != SLICE or items[0][1:] not in ((None, None, None), (None, None, 1), (0, None, None), (0, None, 1)):
        raise UnsupportedLayerError(
            f"slice key {_short(_python_key(config))} does not keep the batch axis whole first; not supported"
        )
    output: list[int | None] = []
    sizes = iter((None,) + tuple(shape))
    next(sizes)  # the batch axis, kept whole
    for what, start, stop, step in items[1:]:
        if what == NEWAXIS:
            output.append(1)
            continue
        size = next(sizes)
        if what == INDEX:
            index = cast(int, start)  # an index item holds an int (GetItemConfig checks it)
            if size is not None and not -size <= index < size:
                raise ExchangeError(f"index {start} is out of range for an axis of size {size}")
            continue
        if size is None:
            output.append(None)
        else:
            output.append(len(range(*slice(start, stop, step).indices(size))))
    if 0 in output:
        raise ExchangeError(f"slice key {_short(_python_key(config))} leaves an empty axis")
    return tuple(output)


@register
class GetItemOperation(_Operation):
    """`x[key]`: slices, indices, newaxis and an ellipsis on Keras's axes; the batch axis is
    taken whole (see the module docstring)."""

    kind, keras_classes, Config = "op_get_item", ("ops.GetItem",), GetItemConfig
    keras_operation = "GetItem"

    def from_keras(self, options: KerasOptions) -> GetItemConfig:
        self.check_call(options, 2)
        key = options.call_args[1]
        items = key if isinstance(key, list) else [key]
        return GetItemConfig(tuple(_key_item(options, item) for item in items))

    def output_shape(self, config: GetItemConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return _sliced_shape(config, self.input_shape(input_shapes))

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        rank = len(context.input_shape)
        key: list[Any] = []
        for what, start, stop, step in _expanded_key(context.config, rank):
            key.append(slice(start, stop, step) if what == SLICE else start if what == INDEX else None)
        while len(key) > 1 and key[-1] == slice(None, None, None):  # `x[:, 1]`, not `x[:, 1, :, :]`
            key.pop()
        value = builder.call(operator.getitem, _to_keras_layout(builder, inputs[0], rank), tuple(key))
        return _to_torch_layout(builder, value, len(context.output_shape))

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        return keras_layer(arguments[0], _python_key(context.config))


def _key_item(options: KerasOptions, item: Any) -> KeyItem:
    """One item of a Keras 3 GetItem key as recorded: a `__slice__` object, an int, None
    (newaxis) or an `__ellipsis__` object."""
    if item is None:
        return (NEWAXIS, None, None, None)
    if isinstance(item, int) and not isinstance(item, bool):
        return (INDEX, item, None, None)
    if isinstance(item, dict) and item.get("class_name") == "__ellipsis__":
        return (ELLIPSIS, None, None, None)
    if isinstance(item, dict) and item.get("class_name") == "__slice__" and isinstance(item.get("config"), dict):
        bounds = item["config"]
        values = [bounds.get(part) for part in ("start", "stop", "step")]
        if set(bounds) <= {"start", "stop", "step"} and all(
            value is None or (isinstance(value, int) and not isinstance(value, bool)) for value in values
        ):
            return (SLICE, *values)
    raise options.unsupported("key", item, "slices, integers, None and an ellipsis")
