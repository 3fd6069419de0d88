"""Arithmetic operations recorded in a functional model: `x + 3.0`, `x * (1 / 6)`, `a * b`.

Keras 3 records `keras.ops` calls on symbolic tensors as operations (module `keras.src.ops.numpy`),
not layers: keras.applications' MobileNetV3 writes its hard-sigmoid this way. They have no
weights. An operand is either a tensor input or a number kept in the config; tensors broadcast
as in the merges (equal ranks, sizes equal or 1). A Keras 2 (tf.keras) model's TensorFlow
arithmetic (`tf.math.multiply(x, 2)`, `x + y`) is read as these operations (`exchange.tf_ops`).

Conventions that differ:
- maximum and minimum of a tensor and a number: torch's `maximum`/`minimum` take two tensors, so
  the torch side clamps (`torch.clamp(x, min=c)` is `maximum(x, c)`), the same values.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from exchange.errors import ExchangeError
from exchange.kinds import LayerKind, register
from exchange.kinds.merging import broadcast_shapes


@dataclass(frozen=True)
class OperandsConfig:
    operands: tuple[float | None, ...]   # None: the next tensor input, in order; else a number

    def __post_init__(self) -> None:
        if len(self.operands) != 2 or None not in self.operands:
            raise ExchangeError(f"operands must be two, at least one a tensor (None), got {list(self.operands)}")


class _Arithmetic(LayerKind):
    Config = OperandsConfig
    torch_function = ""          # name of the torch function
    keras_operation = ""         # class name in keras.src.ops.numpy
    autocasts = False
    python_operator = None

    def from_keras(self, options):
        operands = []
        for value in options.call_args:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise options.unsupported("argument", value, "tensors and numbers")
            operands.append(None if value is None else float(value))
        if len(operands) != 2:
            raise options.unsupported("arguments", operands, "two operands")
        return OperandsConfig(tuple(operands))

    def output_shape(self, config, input_shapes):
        if config.operands.count(None) != len(input_shapes):
            raise ExchangeError(f"operands {config.operands} do not match {len(input_shapes)} inputs")
        return input_shapes[0] if len(input_shapes) == 1 else broadcast_shapes(input_shapes)

    def _operands(self, context, inputs: list) -> list:
        tensors = iter(inputs)
        return [next(tensors) if value is None else value for value in context.config.operands]

    def torch_forward(self, builder, context, inputs):
        return builder.call(getattr(builder.torch, self.torch_function), *self._operands(context, inputs))

    def keras_layer(self, keras, context):
        from keras.src.ops import numpy as keras_numpy_ops   # the operation classes Keras records

        return getattr(keras_numpy_ops, self.keras_operation)(name=context.node.name)

    def keras_call(self, keras_layer, arguments, context):
        return keras_layer(*self._operands(context, arguments))

    def numpy_forward(self, context, tensors, inputs):
        return self.python_operator(*self._operands(context, inputs))


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

    clamp_bound = ""   # "min" for maximum (the result is at least the number), "max" for minimum

    def torch_forward(self, builder, context, inputs):
        numbers = [value for value in context.config.operands if value is not None]
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
