"""Arithmetic operations recorded in a functional model: `x + 3.0`, `x * (1 / 6)`, `a * b`.

Keras 3 records `keras.ops` calls on symbolic tensors as operations (module `keras.src.ops.numpy`),
not layers: keras.applications' MobileNetV3 writes its hard-sigmoid this way. They have no
weights. An operand is either a tensor input or a number kept in the config; tensors broadcast
as in the merges (equal ranks, sizes equal or 1). A Keras 2 (tf.keras) model's TensorFlow
arithmetic (`tf.math.multiply(x, 2)`, `x + y`) is read as these operations (`exchange.tf_ops`).

Conventions that differ:
- An array constant (`x * np.array([1, 2, 3])`) broadcasts against the Keras tensor from the
  right, numpy's rule; the torch side holds the constant in the tensor's torch layout (padded to
  its rank with 1s, then moved as the tensor is: `x.new_tensor(values).reshape(...).permute(...)`,
  on the tensor's device and in its dtype, as TensorFlow converts constants to the tensor's type).
  Its values are kept as float32 (what both compute with); one of more than the tensor's rank is
  refused (it would add axes before the batch axis).
- maximum and minimum of a tensor and a number: torch's `maximum`/`minimum` take two tensors, so
  the torch side clamps (`torch.clamp(x, min=c)` is `maximum(x, c)`), the same values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_AXIS,
    OMIT_DEFAULT,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    _short,
    check_int,
    register,
)
from exchange.kinds.axis_order import to_torch_order
from exchange.kinds.merging import broadcast_shapes

if TYPE_CHECKING:
    from exchange.graph import NodeContext, Shape

ARRAY = "array"  # the operand that is the config's array constant
MAX_ARRAY_VALUES = 1 << 16  # an array constant's values: real ones are per-channel scales, a few thousand at most


@dataclass(frozen=True)
class OperandsConfig:
    # None: the next tensor input, in order; a number; "array": the array constant below
    operands: tuple[float | str | None, ...]
    array: tuple[float, ...] = field(default=(), metadata=OMIT_DEFAULT)  # its values, row-major, float32
    array_shape: tuple[int, ...] = field(default=(), metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        if len(self.operands) != 2 or None not in self.operands:
            raise ExchangeError(f"operands must be two, at least one a tensor (None), got {list(self.operands)}")
        for value in self.operands:
            if (isinstance(value, str) and value != ARRAY) or (isinstance(value, float) and not math.isfinite(value)):
                raise ExchangeError(f"operand {_short(value)} is not a tensor (None), a finite number or {ARRAY!r}")
        if (ARRAY in self.operands) != bool(self.array_shape) or (
            not 0 < len(self.array_shape) <= MAX_AXIS and self.array_shape
        ):
            raise ExchangeError(f"an {ARRAY!r} operand and array_shape go together (1 to {MAX_AXIS} sizes)")
        for size in self.array_shape:
            check_int(size, "array constant size", MAX_ARRAY_VALUES)
        if (
            len(self.array) != (math.prod(self.array_shape) if self.array_shape else 0)
            or len(self.array) > MAX_ARRAY_VALUES
            or not all(isinstance(value, float) and math.isfinite(value) for value in self.array)
        ):
            raise ExchangeError(
                f"array constant of shape {list(self.array_shape)} must hold as many finite "
                f"numbers (at most {MAX_ARRAY_VALUES:,}), found {len(self.array)}"
            )


def _array_constant(
    value: Any, where: Callable[[str, Any, str], UnsupportedLayerError]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, row-major float32 values) of a nested list of numbers (Keras 3's `__numpy__` value,
    tf.keras's list); ragged or non-numeric lists are refused."""
    shape: list[int] = []
    level = value
    while isinstance(level, list):
        if not level or len(shape) >= MAX_AXIS:
            raise where("argument", _short(value), f"an array of 1 to {MAX_AXIS} axes, none empty")
        shape.append(len(level))
        level = level[0]
    flat: list[float] = []
    rows = [value]
    for _ in shape:
        if not all(isinstance(row, list) and len(row) == len(rows[0]) for row in rows):
            raise where("argument", _short(value), "a rectangular array")
        rows = [item for row in rows for item in row]
        if len(rows) > MAX_ARRAY_VALUES:
            raise where("argument", _short(value), f"at most {MAX_ARRAY_VALUES:,} values")
    for item in rows:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise where("argument", _short(value), "finite numbers")
        flat.append(float(np.float32(item)))
    return tuple(shape), tuple(flat)


class _Arithmetic(LayerKind):
    Config = OperandsConfig
    torch_function = ""  # name of the torch function
    keras_operation = ""  # class name in keras.src.ops.numpy
    autocasts = False
    python_operator: Callable[..., Any]  # the numpy form, of two operands

    def from_keras(self, options: KerasOptions) -> OperandsConfig:
        operands: list[float | str | None] = []
        shape: tuple[int, ...] = ()
        values: tuple[float, ...] = ()
        for value in options.call_args:
            if isinstance(value, dict) and value.get("class_name") == "__numpy__" and not shape:
                array: Any = value.get("config") if isinstance(value.get("config"), dict) else {}
                if set(array) != {"value", "dtype"} or array["dtype"] != "float32":
                    raise options.unsupported("argument", value, "float32 arrays")
                shape, values = _array_constant(array["value"], options.unsupported)
                operands.append(ARRAY)
            elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise options.unsupported("argument", value, "tensors, numbers and a float32 array")
            else:
                operands.append(None if value is None else float(value))
        if len(operands) != 2:
            raise options.unsupported("arguments", operands, "two operands")
        return OperandsConfig(tuple(operands), values, shape)

    def output_shape(self, config: OperandsConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if config.operands.count(None) != len(input_shapes):
            raise ExchangeError(f"operands {config.operands} do not match {len(input_shapes)} inputs")
        if config.array_shape:
            rank = len(input_shapes[0])
            if len(config.array_shape) > rank:
                raise UnsupportedLayerError(
                    f"an array constant of shape {list(config.array_shape)} has more axes than "
                    f"the tensor's (batch, {_short(input_shapes[0])[1:-1]}); not supported"
                )
            return broadcast_shapes([input_shapes[0], (1,) * (rank - len(config.array_shape)) + config.array_shape])
        return input_shapes[0] if len(input_shapes) == 1 else broadcast_shapes(input_shapes)

    def _operands(self, context: NodeContext, inputs: list[Any], array: Any = None) -> list[Any]:
        tensors = iter(inputs)
        return [
            next(tensors) if value is None else array if value == ARRAY else value for value in context.config.operands
        ]

    def _torch_array(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        """The array constant as a tensor on the input's device, in its dtype and torch layout."""
        config, rank = context.config, len(context.output_shape)
        if not config.array_shape:
            return None
        value = builder.method(inputs[0], "new_tensor", list(config.array))
        value = builder.method(value, "reshape", (1,) * (rank + 1 - len(config.array_shape)) + config.array_shape)
        return value if rank < 2 else builder.call(builder.torch.permute, value, to_torch_order(rank))

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        operands = self._operands(context, inputs, self._torch_array(builder, context, inputs))
        return builder.call(getattr(builder.torch, self.torch_function), *operands)

    def _numpy_array(self, config: OperandsConfig) -> NDArray[np.float32] | None:
        return np.asarray(config.array, np.float32).reshape(config.array_shape) if config.array_shape else None

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        from keras.src.ops import numpy as keras_numpy_ops  # the operation classes Keras records

        return getattr(keras_numpy_ops, self.keras_operation)(name=context.node.name)

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        return keras_layer(*self._operands(context, arguments, self._numpy_array(context.config)))

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        return self.python_operator(*self._operands(context, inputs, self._numpy_array(context.config)))


@register
class AddOperation(_Arithmetic):
    kind, keras_classes = "op_add", ("ops.Add",)
    torch_function, keras_operation, python_operator = "add", "Add", operator.add


@register
class SubtractOperation(_Arithmetic):
    kind, keras_classes = "op_subtract", ("ops.Subtract",)
    torch_function, keras_operation, python_operator = "sub", "Subtract", operator.sub


@register
class MultiplyOperation(_Arithmetic):
    kind, keras_classes = "op_multiply", ("ops.Multiply",)
    torch_function, keras_operation, python_operator = "mul", "Multiply", operator.mul


@register
class DivideOperation(_Arithmetic):
    kind, keras_classes = "op_divide", ("ops.TrueDivide", "ops.Divide")
    torch_function, keras_operation, python_operator = "div", "TrueDivide", operator.truediv


class _Extremum(_Arithmetic):
    """maximum/minimum: of two tensors `torch.maximum`; of a tensor and a number a clamp."""

    clamp_bound = ""  # "min" for maximum (the result is at least the number), "max" for minimum

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        numbers = [value for value in context.config.operands if isinstance(value, float)]
        if not numbers:
            return super().torch_forward(builder, context, inputs)
        return builder.call(builder.torch.clamp, inputs[0], **{self.clamp_bound: numbers[0]})


@register
class MaximumOperation(_Extremum):
    kind, keras_classes = "op_maximum", ("ops.Maximum",)
    torch_function, keras_operation, python_operator, clamp_bound = "maximum", "Maximum", np.maximum, "min"


@register
class MinimumOperation(_Extremum):
    kind, keras_classes = "op_minimum", ("ops.Minimum",)
    torch_function, keras_operation, python_operator, clamp_bound = "minimum", "Minimum", np.minimum, "max"


@register
class PowerOperation(_Arithmetic):
    kind, keras_classes = "op_power", ("ops.Power",)
    torch_function, keras_operation, python_operator = "pow", "Power", operator.pow
