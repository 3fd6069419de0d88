"""Merges: Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate.

Conventions that differ:
- Concatenate's axis is a Keras axis (channels last); it is remapped to the torch dim that holds
  the same axis in the channels-first layout (axis −1 of an image is dim 1).
- Element-wise merges broadcast inputs of one rank whose sizes are equal or 1 (a squeeze-and-
  excitation block multiplies (H, W, C) by (1, 1, C)); the channels-first forms (C, H, W) and
  (C, 1, 1) broadcast the same way in torch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import reduce

import numpy as np

from exchange.errors import ExchangeError
from exchange.kinds import MAX_AXIS, LayerKind, check_axis, check_int, register
from exchange.kinds.layout import torch_axis


def broadcast_shapes(input_shapes) -> tuple:
    """Keras layout shapes of one rank, sizes equal or 1 -> the broadcast shape."""
    rank = len(input_shapes[0])
    if any(len(shape) != rank for shape in input_shapes):
        raise ExchangeError(f"needs inputs of one rank, found {list(input_shapes)}")
    merged = []
    for sizes in zip(*input_shapes):
        known = {size for size in sizes if size not in (1, None)}
        if len(known) > 1:
            raise ExchangeError(f"cannot broadcast shapes {list(input_shapes)}")
        merged.append(known.pop() if known else (None if None in sizes else 1))
    return tuple(merged)


class _ElementwiseMerge(LayerKind):
    takes_list = True
    passes_mask = True
    torch_function = ""      # name of a two-argument torch function, folded over the inputs
    numpy_function = None

    def output_shape(self, config, input_shapes):
        if len(input_shapes) < 2:
            raise ExchangeError(f"needs two or more inputs, found {list(input_shapes)}")
        return broadcast_shapes(input_shapes)

    def torch_forward(self, builder, context, inputs):
        function = getattr(builder.torch, self.torch_function)
        return reduce(lambda left, right: builder.call(function, left, right), inputs)

    def keras_layer(self, keras, context):
        return getattr(keras.layers, self.keras_classes[0])(**context.keras_identity)

    def numpy_forward(self, context, tensors, inputs):
        return reduce(self.numpy_function, inputs)


@register
class Add(_ElementwiseMerge):
    kind, keras_classes, torch_function, numpy_function = "add", ("Add",), "add", operator.add


@register
class Subtract(_ElementwiseMerge):
    kind, keras_classes, torch_function, numpy_function = "subtract", ("Subtract",), "sub", operator.sub

    def output_shape(self, config, input_shapes):
        if len(input_shapes) != 2:
            raise ExchangeError("Subtract needs exactly two inputs")
        return super().output_shape(config, input_shapes)


@register
class Multiply(_ElementwiseMerge):
    kind, keras_classes, torch_function, numpy_function = "multiply", ("Multiply",), "mul", operator.mul


@register
class Maximum(_ElementwiseMerge):
    kind, keras_classes, torch_function, numpy_function = "maximum", ("Maximum",), "maximum", np.maximum


@register
class Minimum(_ElementwiseMerge):
    kind, keras_classes, torch_function, numpy_function = "minimum", ("Minimum",), "minimum", np.minimum


@register
class Average(_ElementwiseMerge):
    kind, keras_classes, torch_function = "average", ("Average",), "add"

    def torch_forward(self, builder, context, inputs):
        return builder.call(builder.torch.div, super().torch_forward(builder, context, inputs), float(len(inputs)))

    def numpy_forward(self, context, tensors, inputs):
        return sum(inputs) / len(inputs)


@dataclass(frozen=True)
class ConcatenateConfig:
    axis: int = -1      # Keras axis, batch included

    def __post_init__(self) -> None:
        check_int(self.axis, "Concatenate axis", MAX_AXIS, -MAX_AXIS)


@register
class Concatenate(LayerKind):
    kind, keras_classes, Config = "concatenate", ("Concatenate",), ConcatenateConfig
    takes_list = True
    passes_mask = True

    def from_keras(self, options):
        axis = options.take("axis", -1)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise options.unsupported("axis", axis)
        return ConcatenateConfig(axis)

    def output_shape(self, config, input_shapes):
        rank = len(input_shapes[0])
        axis = check_axis(config.axis, rank) - 1
        if len(input_shapes) < 2 or any(len(shape) != rank or shape[:axis] + shape[axis + 1:]
                                        != input_shapes[0][:axis] + input_shapes[0][axis + 1:]
                                        for shape in input_shapes):
            raise ExchangeError(f"cannot concatenate shapes {list(input_shapes)} on axis {config.axis}")
        sizes = [shape[axis] for shape in input_shapes]
        return input_shapes[0][:axis] + (None if None in sizes else sum(sizes),) + input_shapes[0][axis + 1:]

    def torch_forward(self, builder, context, inputs):
        dim = torch_axis(context.config.axis, len(context.input_shape), context.node.name)
        return builder.call(builder.torch.cat, list(inputs), dim=dim)

    def keras_layer(self, keras, context):
        return keras.layers.Concatenate(axis=context.config.axis, **context.keras_identity)

    def numpy_forward(self, context, tensors, inputs):
        return np.concatenate(inputs, axis=context.config.axis)


@dataclass(frozen=True)
class ScaleConfig:
    scale: float


@register
class CustomScaleLayer(LayerKind):
    """keras.applications' InceptionResNetV2 residual: inputs[0] + inputs[1] * scale."""

    kind, keras_classes, Config = "residual_scale", ("CustomScaleLayer",), ScaleConfig
    takes_list = True

    def from_keras(self, options):
        scale = options.take("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise options.unsupported("scale", scale, "a number")
        return ScaleConfig(float(scale))

    def output_shape(self, config, input_shapes):
        if len(input_shapes) != 2:
            raise ExchangeError("needs two inputs")
        return broadcast_shapes(input_shapes)

    def torch_forward(self, builder, context, inputs):
        scaled = builder.call(builder.torch.mul, inputs[1], context.config.scale)
        return builder.call(builder.torch.add, inputs[0], scaled)

    def keras_layer(self, keras, context):
        from keras.src.applications.inception_resnet_v2 import CustomScaleLayer as KerasCustomScaleLayer

        return KerasCustomScaleLayer(context.config.scale, **context.keras_identity)
