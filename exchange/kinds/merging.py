"""Merges: Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate, Dot.

Conventions that differ:
- Concatenate's axis is a Keras axis (channels last); it is remapped to the torch dim that holds
  the same axis in the channels-first layout (axis −1 of an image is dim 1). `keras.ops.concatenate`
  (an operation in the config) is the same node, without mask or autocast; its axis defaults to 0.
- Element-wise merges broadcast inputs of one rank whose sizes are equal or 1 (a squeeze-and-
  excitation block multiplies (H, W, C) by (1, 1, C)); the channels-first forms (C, H, W) and
  (C, 1, 1) broadcast the same way in torch.
- Dot's axes are Keras axes of each input (a negative one counts from that input's end); its
  output is the first input's other axes then the second's, in Keras order. The torch side is
  one `torch.einsum` whose subscripts name each Keras axis where the channels-first layout holds
  it, and which writes the output channels-first. Two rank-1 inputs give (batch, 1), as in Keras.
  `normalize` divides each input by its L2 norm along its axis, at least Keras's epsilon (1e-7).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from exchange.errors import ExchangeError
from exchange.kinds import MAX_AXIS, KerasOptions, LayerKind, TorchBuilder, TorchValue, check_axis, check_int, register
from exchange.kinds.axis_order import to_torch_order, torch_axis

if TYPE_CHECKING:
    from exchange.graph import NodeContext, Shape


def broadcast_shapes(input_shapes: Sequence[Shape]) -> Shape:
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
    torch_function = ""  # name of a two-argument torch function, folded over the inputs
    numpy_function: Callable[..., Any]  # two arrays -> one, folded over the inputs

    def output_shape(self, config: Any, input_shapes: tuple[Shape, ...]) -> Shape:
        if len(input_shapes) < 2:
            raise ExchangeError(f"needs two or more inputs, found {list(input_shapes)}")
        return broadcast_shapes(input_shapes)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        function = getattr(builder.torch, self.torch_function)
        return reduce(lambda left, right: builder.call(function, left, right), inputs)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return getattr(keras.layers, self.keras_classes[0])(**context.keras_identity)

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        return reduce(self.numpy_function, inputs)


@register
class Add(_ElementwiseMerge):
    kind, keras_classes, torch_function, numpy_function = "add", ("Add",), "add", operator.add


@register
class Subtract(_ElementwiseMerge):
    kind, keras_classes, torch_function, numpy_function = "subtract", ("Subtract",), "sub", operator.sub

    def output_shape(self, config: Any, input_shapes: tuple[Shape, ...]) -> Shape:
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

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        return builder.call(builder.torch.div, super().torch_forward(builder, context, inputs), float(len(inputs)))

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        return sum(inputs) / len(inputs)


@dataclass(frozen=True)
class ConcatenateConfig:
    axis: int = -1  # Keras axis, batch included

    def __post_init__(self) -> None:
        check_int(self.axis, "Concatenate axis", MAX_AXIS, -MAX_AXIS)


@register
class Concatenate(LayerKind):
    kind, keras_classes, Config = "concatenate", ("Concatenate",), ConcatenateConfig
    takes_list = True
    passes_mask = True

    def from_keras(self, options: KerasOptions) -> ConcatenateConfig:
        axis = options.take("axis", -1)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise options.unsupported("axis", axis)
        return ConcatenateConfig(axis)

    def output_shape(self, config: ConcatenateConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        rank = len(input_shapes[0])
        axis = check_axis(config.axis, rank) - 1
        if len(input_shapes) < 2 or any(
            len(shape) != rank
            or shape[:axis] + shape[axis + 1 :] != input_shapes[0][:axis] + input_shapes[0][axis + 1 :]
            for shape in input_shapes
        ):
            raise ExchangeError(f"cannot concatenate shapes {list(input_shapes)} on axis {config.axis}")
        sizes = [shape[axis] for shape in input_shapes]
        known = [size for size in sizes if size is not None]
        total = sum(known) if len(known) == len(sizes) else None
        return input_shapes[0][:axis] + (total,) + input_shapes[0][axis + 1 :]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        dim = torch_axis(context.config.axis, len(context.input_shape), context.node.name)
        return builder.call(builder.torch.cat, list(inputs), dim=dim)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.Concatenate(axis=context.config.axis, **context.keras_identity)

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        return np.concatenate(inputs, axis=context.config.axis)


@register
class ConcatenateOperation(Concatenate):
    """`keras.ops.concatenate([a, b], axis)` in a functional model (or a traced subclassed model's
    `call`): the Concatenate layer's computation, recorded as an operation. Operations take their
    inputs as given (no autocast) and carry no mask; the operation's axis defaults to 0 (the batch
    axis, refused), where the layer's is -1."""

    kind, keras_classes = "op_concatenate", ("ops.Concatenate",)
    passes_mask = False
    autocasts = False

    def from_keras(self, options: KerasOptions) -> ConcatenateConfig:
        axis = options.take("axis", 0)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise options.unsupported("axis", axis)
        return ConcatenateConfig(axis)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        from keras.src.ops import numpy as keras_numpy_ops  # the operation class Keras records

        return keras_numpy_ops.Concatenate(axis=context.config.axis, name=context.node.name)


# keras.config.epsilon(): the least norm Dot's `normalize` divides by.
KERAS_EPSILON = 1e-7


@dataclass(frozen=True)
class DotConfig:
    axes: tuple[int, int]  # a Keras axis (batch included, may be negative) of each input
    normalize: bool = False

    def __post_init__(self) -> None:
        for axis in self.axes:
            check_int(axis, "Dot axes", MAX_AXIS, -MAX_AXIS)


def _dot_axes(config: DotConfig, input_shapes: tuple[Shape, ...]) -> tuple[int, int]:
    """Each input's contracted axis as a positive Keras axis (1..rank), as Keras resolves it."""
    if len(input_shapes) != 2:
        raise ExchangeError(f"Dot needs exactly two inputs, found {len(input_shapes)}")
    first, second = (check_axis(axis, len(shape)) for axis, shape in zip(config.axes, input_shapes))
    return first, second


@register
class Dot(LayerKind):
    kind, keras_classes, Config = "dot", ("Dot",), DotConfig
    takes_list = True  # Keras's compute_mask returns None: no mask passes

    def from_keras(self, options: KerasOptions) -> DotConfig:
        axes = options.take("axes")
        if isinstance(axes, int) and not isinstance(axes, bool):
            axes = [axes, axes]
        if (
            not isinstance(axes, list)
            or len(axes) != 2
            or not all(isinstance(axis, int) and not isinstance(axis, bool) for axis in axes)
        ):
            raise options.unsupported("axes", axes, "one axis of each input")
        return DotConfig(tuple(axes), options.flag("normalize", False))

    def output_shape(self, config: DotConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        first, second = input_shapes
        first_axis, second_axis = _dot_axes(config, input_shapes)
        sizes = (first[first_axis - 1], second[second_axis - 1])
        if None not in sizes and sizes[0] != sizes[1]:
            raise ExchangeError(
                f"Dot axes {list(config.axes)}: sizes {sizes[0]} and {sizes[1]} differ "
                f"(input shapes {list(first)} and {list(second)})"
            )
        shape = first[: first_axis - 1] + first[first_axis:] + second[: second_axis - 1] + second[second_axis:]
        return shape or (1,)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, shapes = context.config, context.input_shapes
        axes = _dot_axes(config, shapes)
        letters = iter("bcdefghijklmnopqrstuvwxyz")
        contracted = next(letters)
        # Each input's Keras axes (batch is "a") by their letters; the contracted axis shares one.
        labels = [
            ["a"] + [contracted if axis == axes[index] else next(letters) for axis in range(1, len(shape) + 1)]
            for index, shape in enumerate(shapes)
        ]
        output = [
            label
            for index, keras in enumerate(labels)
            for axis, label in enumerate(keras)
            if axis != axes[index] and (axis or not index)
        ]
        if config.normalize:
            inputs = [
                builder.call(
                    builder.F.normalize,
                    value,
                    p=2.0,
                    dim=torch_axis(axes[index], len(shapes[index]), context.node.name),
                    eps=KERAS_EPSILON,
                )
                for index, value in enumerate(inputs)
            ]

        def torch_order(keras_labels: Sequence[str]) -> str:  # the letters in the order the torch layout holds the axes
            return "".join(keras_labels[axis] for axis in to_torch_order(len(keras_labels) - 1))

        equation = f"{torch_order(labels[0])},{torch_order(labels[1])}->{torch_order(output)}"
        value = builder.call(builder.torch.einsum, equation, inputs[0], inputs[1])
        return builder.method(value, "unsqueeze", 1) if len(output) == 1 else value

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.Dot(
            axes=list(context.config.axes), normalize=context.config.normalize, **context.keras_identity
        )


@dataclass(frozen=True)
class ScaleConfig:
    scale: float


@register
class CustomScaleLayer(LayerKind):
    """keras.applications' InceptionResNetV2 residual: inputs[0] + inputs[1] * scale."""

    kind, keras_classes, Config = "residual_scale", ("CustomScaleLayer",), ScaleConfig
    takes_list = True

    def from_keras(self, options: KerasOptions) -> ScaleConfig:
        scale = options.take("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise options.unsupported("scale", scale, "a number")
        return ScaleConfig(float(scale))

    def output_shape(self, config: ScaleConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if len(input_shapes) != 2:
            raise ExchangeError("needs two inputs")
        return broadcast_shapes(input_shapes)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        scaled = builder.call(builder.torch.mul, inputs[1], context.config.scale)
        return builder.call(builder.torch.add, inputs[0], scaled)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        from keras.src.applications.inception_resnet_v2 import CustomScaleLayer as KerasCustomScaleLayer

        return KerasCustomScaleLayer(context.config.scale, **context.keras_identity)
