"""Layers that move or pass data: Flatten, Reshape, Permute, RepeatVector, ZeroPadding, Cropping and
UpSampling (1D/2D/3D), Dropout and SpatialDropout (no-ops at inference), Embedding (token ids
to vectors) and Masking (the two layers that make masks).

Conventions that differ:
- Flatten: Keras flattens an image in (H, W, C) order; `torch.flatten` on a channels-first tensor
  gives (C, H, W) order. When everything after the Flatten is a Dense (through activations and
  dropout), torch flattens its own way and the Dense permutes its weight rows instead (see
  `Graph.channels_first_flattens`); elsewhere the torch side moves the channels last first.
  With `data_format="channels_first"` Keras flattens (N, a1, ..., ak) in (a2, ..., ak, a1) order:
  the torch side, holding (N, ak, a1, ..., ak-1), permutes to that order (nothing to do for k = 2).
- Reshape works on Keras's channels-last element order, so the torch side moves the channels last
  before and back to the front after.
- Padding and cropping amounts are (before, after) per axis in Keras's axis order ((top, bottom),
  (left, right)); `F.pad` / `nn.ZeroPad2d` take them from the last axis backwards (left, right,
  top, bottom).
- ZeroPadding, Cropping and UpSampling with `data_format="channels_first"`: Keras's spatial axes
  are then its axes 2.. (its last one is torch's dim 1, where the torch side keeps Keras's last
  axis); the torch side pads, crops or repeats those dims where they are.
- Dropout, SpatialDropout and StochasticDepth are the identity at inference in both frameworks:
  the torch module holds nothing for them (its dropout would act in `train()` mode). Built to
  continue training (`builder.training`) they are torch modules that drop in `train()` mode as
  Keras does in training (the same distribution; the random draws differ): Dropout is
  `nn.Dropout(rate)` (both zero each value with probability `rate` and scale the kept ones by
  1 / (1 - rate)); SpatialDropout1D/2D/3D channels-last are `nn.Dropout1d/2d/3d`, which draw
  once per (sample, channel) on torch's channels-first tensor, as Keras does along its last axis.
  Keras's `noise_shape` (its 1s share a draw; a size must be 1 or the input's) and channels_first
  spatial dropouts (channels on Keras's axis 1, not torch's dim 1) are `KerasDropout`, the same
  draw shared along the torch dims holding those axes; StochasticDepth (one draw per sample, kept
  samples divided by 1 - rate) is `KerasDropout` shared along every dim but the batch. Their
  seed only matters to Keras's draws and is kept for the Keras side.
- UpSampling repeats cells (Keras's `ops.repeat`): `torch.repeat_interleave`, exact; torch's
  `nn.Upsample(mode="nearest")` computes source indices in float32 and is not used.
  UpSampling2D with another interpolation resizes to size x input size with TensorFlow's
  `tf.image.resize` (no antialias), as keras.layers.Resizing does: the torch side is the same
  `KerasResize` (see `exchange.kinds.preprocessing`), with `scale_factor`, on any input size.
  TensorFlow returns that resize in float32 and UpSampling2D does not cast it back: refused on
  other dtypes.
- An Embedding with a LoRA adapter is `LoRAEmbedding` (see `exchange.kinds.dense` for LoRA's
  conventions; its tables keep Keras's layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from math import prod
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_AXIS,
    MAX_FEATURES,
    MAX_PADDING,
    MAX_REPEATS,
    MAX_VOCABULARY,
    MAX_WINDOW,
    OMIT_DEFAULT,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    check_choice,
    check_int,
    check_ints,
    register,
)
from exchange.ports import Port

if TYPE_CHECKING:
    from exchange.graph import Node, NodeContext, Shape
    from exchange.ports import AnyPort


@dataclass(frozen=True)
class FlattenConfig:
    data_format: str = field(default="channels_last", metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_choice(self.data_format, ("channels_last", "channels_first"), "Flatten data_format")


@register
class Flatten(LayerKind):
    """Flattens every axis after the batch (see the module docstring for the order). A rank-1
    input (`keras.Input(shape=())`, (N,)) becomes (N, 1), as in Keras (`unsqueeze(1)`)."""

    kind, keras_classes, Config = "flatten", ("Flatten",), FlattenConfig
    moves_values = True
    may_flatten_channels_first = True

    def may_keep_channels_first(self, config: FlattenConfig) -> bool:
        return config.data_format == "channels_last"

    def from_keras(self, options: KerasOptions) -> FlattenConfig:
        data_format = options.take("data_format", None)
        if data_format not in ("channels_last", "channels_first", None):
            raise options.unsupported("data_format", data_format)
        return FlattenConfig(data_format or "channels_last")

    def output_shape(self, config: FlattenConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        return (None if None in shape else prod(cast("tuple[int, ...]", shape)),)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        value = inputs[0]
        if not context.input_shape:  # Keras flattens (N,) to (N, 1)
            return builder.method(value, "unsqueeze", 1)
        if len(context.input_shape) < 2:
            return value
        if context.config.data_format == "channels_first":
            # Keras's (N, a1, ..., ak) flattens in (a2, ..., ak, a1) order; torch holds (N, ak, a1, ..., ak-1)
            rank = len(context.input_shape)
            order = (0,) + tuple(range(3, rank + 1)) + (1, 2)
            if order != tuple(range(rank + 1)):
                value = builder.call(builder.torch.permute, value, order)
        elif not context.channels_first_flatten:
            value = builder.call(builder.torch.movedim, value, 1, -1)
        return builder.call(builder.torch.flatten, value, 1)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.Flatten(data_format=context.config.data_format, **context.keras_identity)

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        if len(context.input_shape) > 1:
            raise UnsupportedLayerError(f"no numpy forward for a Flatten of an image ({context.node.name!r})")
        return inputs[0].reshape(len(inputs[0]), -1)  # (N,) -> (N, 1), as Keras


@dataclass(frozen=True)
class ReshapeConfig:
    target_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        target = self.target_shape
        if (
            len(target) >= MAX_AXIS
            or target.count(-1) > 1
            or any(not isinstance(size, int) or isinstance(size, bool) or size < -1 or size == 0 for size in target)
        ):
            raise ExchangeError(
                f"invalid Reshape target shape {list(target)}: up to {MAX_AXIS - 1} sizes, each positive or one -1"
            )


@register
class Reshape(LayerKind):
    kind, keras_classes, Config = "reshape", ("Reshape",), ReshapeConfig
    moves_values = True

    def from_keras(self, options: KerasOptions) -> ReshapeConfig:
        target = options.take("target_shape")
        if not isinstance(target, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in target
        ):
            raise options.unsupported("target_shape", target)
        return ReshapeConfig(tuple(target))

    def output_shape(self, config: ReshapeConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape, target = input_shapes[0], list(config.target_shape)
        if None in shape:
            raise ExchangeError("Reshape needs a fixed input size")
        size = prod(cast("tuple[int, ...]", shape))
        if -1 in target:
            known = prod(s for s in target if s != -1)
            if size % known:
                raise ExchangeError(f"cannot reshape {shape} to {config.target_shape}")
            target[target.index(-1)] = size // known
        if prod(target) != size:
            raise ExchangeError(f"cannot reshape {shape} to {config.target_shape}")
        return tuple(target)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        value = inputs[0]
        if len(context.input_shape) > 1:
            value = builder.call(builder.torch.movedim, value, 1, -1)
        value = builder.call(builder.torch.reshape, value, (-1,) + tuple(context.output_shape))
        if len(context.output_shape) > 1:
            value = builder.call(builder.torch.movedim, value, -1, 1)
        return value

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.Reshape(context.config.target_shape, **context.keras_identity)


DATA_FORMATS = ("channels_last", "channels_first")


def _amounts(options: KerasOptions, key: str, spatial: int, default: Any = 1) -> tuple[tuple[int, int], ...]:
    """Keras's padding/cropping spellings, as (before, after) per spatial axis. 1-D: `1` or
    `(1, 2)` (before, after); 2-D and 3-D: `1`, `(1, 2)` (one per axis) or `((1, 0), (2, 1))`."""
    value = options.take(key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * spatial
    if spatial == 1 and isinstance(value, (list, tuple)) and len(value) == 2:
        value = [value]
    try:
        pairs = tuple((item, item) if isinstance(item, int) else tuple(item) for item in value)
        if len(pairs) == spatial and all(
            len(pair) == 2
            and all(isinstance(amount, int) and not isinstance(amount, bool) and amount >= 0 for amount in pair)
            for pair in pairs
        ):
            return pairs
    except TypeError:
        pass
    raise options.unsupported(key, value)


def _data_format(options: KerasOptions) -> str:
    value = options.take("data_format", None)
    if value is None:  # Keras's default: keras.config.image_data_format(), channels_last
        return "channels_last"
    if value not in DATA_FORMATS:
        raise options.unsupported("data_format", value)
    return cast(str, value)


def _spatial_indices(shape: Sequence[int | None], spatial: int, data_format: str) -> range:
    """The positions in a Keras shape (no batch axis) of its `spatial` axes."""
    if len(shape) != spatial + 1:
        raise ExchangeError(f"expects rank-{spatial + 2} input, found shape (batch, {shape})")
    return range(1, spatial + 1) if data_format == "channels_first" else range(spatial)


def _torch_dims(shape: Shape, indices: range) -> list[int]:
    """The torch dims holding the Keras axes at `indices` (positions without the batch axis)."""
    from exchange.kinds.axis_order import to_keras_order

    return [to_keras_order(len(shape))[index + 1] for index in indices]


@dataclass(frozen=True)
class PaddingConfig:
    amounts: tuple[tuple[int, int], ...]  # (before, after) per spatial axis, in Keras's axis order
    data_format: str = field(default="channels_last", metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        if not 1 <= len(self.amounts) <= 3:
            raise ExchangeError(f"padding or cropping amounts for 1 to 3 axes, got {len(self.amounts)}")
        for pair in self.amounts:
            check_ints(pair, "padding or cropping amounts", MAX_PADDING, minimum=0, count=(2,))
        check_choice(self.data_format, DATA_FORMATS, "data_format")


class _Padding(LayerKind):
    """ZeroPadding1D/2D/3D: channels-last, the spatial axes are torch's trailing dims and
    `nn.ZeroPad{1,2,3}d` pads them; channels-first Keras's last axis is torch's dim 1 and `F.pad`
    pads every spatial dim where it is."""

    Config, spatial = PaddingConfig, 2
    has_data_format = True
    default_amount = 1  # Keras's default padding or cropping on each side

    def from_keras(self, options: KerasOptions) -> PaddingConfig:
        data_format = _data_format(options) if self.has_data_format else "channels_last"
        return PaddingConfig(_amounts(options, "padding", self.spatial, self.default_amount), data_format)

    def output_shape(self, config: PaddingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = list(input_shapes[0])
        indices = _spatial_indices(shape, self.spatial, config.data_format)
        if len(config.amounts) != self.spatial:
            raise ExchangeError(f"padding {config.amounts} has not {self.spatial} spatial axes")
        for index, (before, after) in zip(indices, config.amounts):
            size = shape[index]
            shape[index] = None if size is None else size + before + after
        return tuple(shape)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, shape = context.config, context.input_shape
        by_dim = dict(
            zip(_torch_dims(shape, _spatial_indices(shape, self.spatial, config.data_format)), config.amounts)
        )
        # F.pad's argument: (before, after) for the last dim, then the one before it, ...
        pads = tuple(amount for dim in range(len(shape), min(by_dim) - 1, -1) for amount in by_dim.get(dim, (0, 0)))
        if len(pads) == 2 * self.spatial:  # the spatial axes are the trailing dims
            pad_class = (builder.nn.ZeroPad1d, builder.nn.ZeroPad2d, builder.nn.ZeroPad3d)[self.spatial - 1]
            return builder.module(context, pad_class(pads), inputs[0])
        return builder.call(builder.F.pad, inputs[0], pads)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        amounts = config.amounts[0] if self.spatial == 1 else config.amounts
        data_format = {"data_format": config.data_format} if self.has_data_format else {}
        return getattr(keras.layers, self.keras_classes[0])(amounts, **data_format, **context.keras_identity)


@register
class ZeroPadding1D(_Padding):
    kind, keras_classes, spatial = "zero_padding1d", ("ZeroPadding1D",), 1


@register
class ZeroPadding2D(_Padding):
    kind, keras_classes = "zero_padding2d", ("ZeroPadding2D",)


@register
class ZeroPadding3D(_Padding):
    kind, keras_classes, spatial = "zero_padding3d", ("ZeroPadding3D",), 3


class _Cropping(_Padding):
    """Cropping1D/2D/3D: `narrow` on each spatial torch dim (the sizes must be known)."""

    def from_keras(self, options: KerasOptions) -> PaddingConfig:
        data_format = _data_format(options) if self.has_data_format else "channels_last"
        return PaddingConfig(_amounts(options, "cropping", self.spatial, self.default_amount), data_format)

    def output_shape(self, config: PaddingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = list(input_shapes[0])
        indices = _spatial_indices(shape, self.spatial, config.data_format)
        if len(config.amounts) != self.spatial:
            raise ExchangeError(f"cropping {config.amounts} has not {self.spatial} spatial axes")
        for index, (before, after) in zip(indices, config.amounts):
            size = shape[index]
            if size is None:
                raise ExchangeError(f"{self.keras_classes[0]} needs a fixed input size")
            if size <= before + after:
                raise ExchangeError(f"cropping {config.amounts} leaves nothing of {input_shapes[0]}")
            shape[index] = size - (before + after)
        return tuple(shape)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, shape = context.config, context.input_shape
        indices = _spatial_indices(shape, self.spatial, config.data_format)
        value = inputs[0]
        for dim, index, (before, _) in zip(_torch_dims(shape, indices), indices, config.amounts):
            value = builder.method(value, "narrow", dim, before, context.output_shape[index])
        return value


@register
class Cropping1D(_Cropping):
    kind, keras_classes, spatial = "cropping1d", ("Cropping1D",), 1
    moves_values = True
    has_data_format = False  # Keras's Cropping1D crops axis 1 of (batch, steps, features)


@register
class Cropping2D(_Cropping):
    kind, keras_classes = "cropping2d", ("Cropping2D",)
    default_amount = 0


@register
class Cropping3D(_Cropping):
    kind, keras_classes, spatial = "cropping3d", ("Cropping3D",), 3


# UpSampling2D's interpolations: Keras's `ops.image.resize` methods (see exchange.kinds.preprocessing).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "lanczos3", "lanczos5")


@dataclass(frozen=True)
class UpSamplingConfig:
    size: tuple[int, ...]  # the repeat count per spatial axis, in Keras's axis order
    data_format: str = "channels_last"
    interpolation: str = field(default="nearest", metadata=OMIT_DEFAULT)  # UpSampling2D's

    def __post_init__(self) -> None:
        check_ints(self.size, "UpSampling size", MAX_WINDOW, count=(1, 2, 3))
        check_choice(self.data_format, DATA_FORMATS, "data_format")
        check_choice(self.interpolation, INTERPOLATIONS, "UpSampling interpolation")
        if self.interpolation != "nearest" and len(self.size) != 2:
            raise ExchangeError(f"UpSampling interpolation {self.interpolation!r} is UpSampling2D's only")


class _UpSampling(LayerKind):
    """Keras repeats each cell `size` times along each spatial axis (`ops.repeat`, also for
    UpSampling2D's `nearest`): `torch.repeat_interleave` on the torch dim of each axis."""

    Config, spatial = UpSamplingConfig, 2
    has_data_format = True

    def from_keras(self, options: KerasOptions) -> UpSamplingConfig:
        data_format = _data_format(options) if self.has_data_format else "channels_last"
        return UpSamplingConfig(options.sizes("size", self.spatial, 2), data_format)

    def output_shape(self, config: UpSamplingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = list(input_shapes[0])
        if len(config.size) != self.spatial:
            raise ExchangeError(f"size {list(config.size)} has not {self.spatial} spatial axes")
        for index, factor in zip(_spatial_indices(shape, self.spatial, config.data_format), config.size):
            size = shape[index]
            shape[index] = None if size is None else size * factor
        return tuple(shape)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, shape = context.config, context.input_shape
        value = inputs[0]
        for dim, factor in zip(
            _torch_dims(shape, _spatial_indices(shape, self.spatial, config.data_format)), config.size
        ):
            if factor > 1:
                value = builder.call(builder.torch.repeat_interleave, value, factor, dim=dim)
        return value

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        size = config.size[0] if self.spatial == 1 else config.size
        data_format = {"data_format": config.data_format} if self.has_data_format else {}
        return getattr(keras.layers, self.keras_classes[0])(size, **data_format, **context.keras_identity)


@register
class UpSampling1D(_UpSampling):
    kind, keras_classes, spatial = "upsampling1d", ("UpSampling1D",), 1
    has_data_format = False  # Keras's UpSampling1D repeats axis 1 of (batch, steps, features)


@register
class UpSampling2D(_UpSampling):
    kind, keras_classes = "upsampling2d", ("UpSampling2D",)

    def from_keras(self, options: KerasOptions) -> UpSamplingConfig:
        interpolation = options.take("interpolation", "nearest")
        if not isinstance(interpolation, str) or interpolation.lower() not in INTERPOLATIONS:
            raise options.unsupported("interpolation", interpolation)
        return replace(super().from_keras(options), interpolation=interpolation.lower())

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        if config.interpolation == "nearest":
            return super().torch_forward(builder, context, inputs)
        if context.node.dtype != "float32":
            raise UnsupportedLayerError(
                f"UpSampling2D interpolation {config.interpolation!r} on dtype "
                f"{context.node.dtype} is not supported (TensorFlow resizes to float32 and "
                "UpSampling2D does not cast back)"
            )
        from exchange.kinds.preprocessing import torch_image

        module = builder.helpers.KerasResize(scale_factor=config.size, interpolation=config.interpolation)
        value = builder.module(context, module, torch_image(builder, inputs[0], config.data_format, 3))
        return torch_image(builder, value, config.data_format, 3, back=True)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.UpSampling2D(
            config.size, data_format=config.data_format, interpolation=config.interpolation, **context.keras_identity
        )


@register
class UpSampling3D(_UpSampling):
    kind, keras_classes, spatial = "upsampling3d", ("UpSampling3D",), 3


@dataclass(frozen=True)
class DropoutConfig:
    rate: float = 0.0
    # Only training reads these; kept so that the rebuilt Keras layer is the same (written when set).
    noise_shape: tuple[int | None, ...] | None = field(default=None, metadata=OMIT_DEFAULT)  # Dropout's
    seed: int | None = field(default=None, metadata=OMIT_DEFAULT)
    data_format: str = field(default="channels_last", metadata=OMIT_DEFAULT)  # SpatialDropout2D's

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:  # Keras's Dropout refuses a rate outside [0, 1]
            raise ExchangeError(f"dropout rate must be from 0 to 1, got {self.rate!r}")
        if self.noise_shape is not None:
            if len(self.noise_shape) > MAX_AXIS:
                raise ExchangeError(f"noise_shape has more than {MAX_AXIS} sizes")
            for size in self.noise_shape:
                if size is not None:
                    check_int(size, "noise_shape size", MAX_FEATURES)
        if self.seed is not None:
            check_int(self.seed, "seed", (1 << 62) - 1, minimum=-(1 << 62))
        check_choice(self.data_format, DATA_FORMATS, "data_format")


class _Dropout(LayerKind):
    """Random only in training; at inference the identity, in both frameworks. Built for training,
    the module of `training_module`."""

    Config = DropoutConfig
    keeps_element_order = True
    passes_mask = True
    input_rank: int | None = None  # the rank (batch excluded) Keras's layer takes; None any

    def output_shape(self, config: DropoutConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if self.input_rank is not None and len(input_shapes[0]) != self.input_rank:
            raise ExchangeError(
                f"expects rank-{self.input_rank + 1} input (batch included), found shape (batch, {input_shapes[0]})"
            )
        return input_shapes[0]

    def from_keras(self, options: KerasOptions) -> DropoutConfig:
        noise_shape = options.take("noise_shape", None)
        if noise_shape is not None and (
            not isinstance(noise_shape, (list, tuple))
            or not all(size is None or (isinstance(size, int) and not isinstance(size, bool)) for size in noise_shape)
        ):
            raise options.unsupported("noise_shape", noise_shape, "sizes or null")
        seed = options.take("seed", None)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise options.unsupported("seed", seed, "must be an integer or null")
        return DropoutConfig(options.number("rate", 0.0), None if noise_shape is None else tuple(noise_shape), seed)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        if not builder.training or context.config.rate == 0:
            return inputs[0]
        return builder.module(context, self.training_module(builder, context), inputs[0])

    def training_module(self, builder: TorchBuilder, context: NodeContext) -> Any:
        """The torch module that drops in `train()` mode as the Keras layer does in training."""
        return spatial_dropout(builder, context)

    def passes_input_in_training(self, config: DropoutConfig) -> bool:
        return config.rate == 0  # Keras's dropouts return their input itself at rate 0

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return getattr(keras.layers, self.keras_classes[0])(config.rate, seed=config.seed, **context.keras_identity)

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        return inputs[0]


def spatial_dropout(builder: TorchBuilder, context: NodeContext) -> Any:
    """SpatialDropout1D/2D/3D's training module: one draw per (sample, channel), shared along the
    spatial axes: torch's channel dropout where the channels are torch's dim 1 (channels-last)."""
    config, rank = context.config, len(context.input_shape)
    if config.data_format == "channels_last":
        return getattr(builder.nn, f"Dropout{rank - 1}d")(config.rate)
    return builder.helpers.KerasDropout(config.rate, shared_dims(rank, range(2, rank + 1)))


def shared_dims(rank: int, keras_axes: Sequence[int]) -> tuple[int, ...]:
    """The torch dims holding Keras axes `keras_axes` (batch included) of a rank-`rank` tensor."""
    from exchange.kinds.axis_order import to_keras_order

    return tuple(sorted(to_keras_order(rank)[axis] for axis in keras_axes))


@register
class Dropout(_Dropout):
    kind, keras_classes = "dropout", ("Dropout",)

    def training_module(self, builder: TorchBuilder, context: NodeContext) -> Any:
        config, shape = context.config, context.input_shape
        if config.noise_shape is None:
            return builder.nn.Dropout(config.rate)
        sizes = (None, *shape)
        if len(config.noise_shape) != len(sizes) or any(
            size not in (None, 1, known) or (index == 0 and size not in (None, 1))
            for index, (size, known) in enumerate(zip(config.noise_shape, sizes))
        ):
            raise UnsupportedLayerError(
                f"layer {context.node.name!r} (Dropout): noise_shape {config.noise_shape} does not fit its input "
                f"(batch, {shape}) (each size None, 1 or the input's): Keras's training fails on it"
            )
        shared = [axis for axis, size in enumerate(config.noise_shape) if size == 1 and sizes[axis] != 1]
        return builder.helpers.KerasDropout(config.rate, shared_dims(len(shape), shared))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.Dropout(
            config.rate, noise_shape=config.noise_shape, seed=config.seed, **context.keras_identity
        )


@register
class SpatialDropout1D(_Dropout):
    kind, keras_classes, input_rank = "spatial_dropout1d", ("SpatialDropout1D",), 2


@register
class StochasticDepth(_Dropout):
    """keras.applications' ConvNeXt: drops whole residual branches in training only."""

    kind, keras_classes = "stochastic_depth", ("StochasticDepth",)
    passes_mask = False  # ConvNeXt's own layer, without `supports_masking`

    def training_module(self, builder: TorchBuilder, context: NodeContext) -> Any:
        rank = len(context.input_shape)
        return builder.helpers.KerasDropout(context.config.rate, shared_dims(rank, range(1, rank + 1)))

    def passes_input_in_training(self, config: DropoutConfig) -> bool:
        return False  # not measured at rate 0

    def from_keras(self, options: KerasOptions) -> DropoutConfig:
        return DropoutConfig(options.number("drop_path_rate", 0.0))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        from keras.src.applications.convnext import StochasticDepth as KerasStochasticDepth

        return KerasStochasticDepth(context.config.rate, **context.keras_identity)


@register
class SpatialDropout2D(_Dropout):
    kind, keras_classes, input_rank = "spatial_dropout2d", ("SpatialDropout2D",), 3

    def from_keras(self, options: KerasOptions) -> DropoutConfig:
        return replace(super().from_keras(options), data_format=_data_format(options))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.SpatialDropout2D(
            config.rate, data_format=config.data_format, seed=config.seed, **context.keras_identity
        )


@dataclass(frozen=True)
class PermuteConfig:
    dims: tuple[int, ...]  # Keras's: 1-based axes after the batch axis, in Keras layout

    def __post_init__(self) -> None:
        # as Keras's Permute: a permutation of 1..n, n the input's rank without the batch axis
        if len(self.dims) >= MAX_AXIS or sorted(self.dims) != list(range(1, len(self.dims) + 1)):
            raise ExchangeError(f"Permute dims {list(self.dims)} are not a permutation of 1..{len(self.dims)}")


@register
class Permute(LayerKind):
    """Keras permutes its own (channels-last) axes; the torch side composes that with the two
    layout changes into one `permute`."""

    kind, keras_classes, Config = "permute", ("Permute",), PermuteConfig
    moves_values = True

    def from_keras(self, options: KerasOptions) -> PermuteConfig:
        dims = options.take("dims")
        if not isinstance(dims, list) or not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in dims):
            raise options.unsupported("dims", dims)
        return PermuteConfig(tuple(dims))

    def output_shape(self, config: PermuteConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        if len(config.dims) != len(shape):
            raise ExchangeError(f"dims {config.dims} do not match input shape {shape}")
        return tuple(shape[dim - 1] for dim in config.dims)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        from exchange.kinds.axis_order import to_keras_order, to_torch_order

        rank = len(context.input_shape)
        keras_permutation = (0,) + tuple(context.config.dims)
        # torch input -> Keras layout -> Keras's permutation -> torch layout, as one permutation
        combined = tuple(to_keras_order(rank)[keras_permutation[axis]] for axis in to_torch_order(rank))
        return builder.method(inputs[0], "permute", *combined)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.Permute(context.config.dims, **context.keras_identity)


@dataclass(frozen=True)
class RepeatVectorConfig:
    n: int

    def __post_init__(self) -> None:
        check_int(self.n, "RepeatVector n", MAX_REPEATS)


@register
class RepeatVector(LayerKind):
    """(N, F) -> (N, n, F) in Keras; torch holds the result channels-first, (N, F, n)."""

    kind, keras_classes, Config = "repeat_vector", ("RepeatVector",), RepeatVectorConfig
    moves_values = True

    def from_keras(self, options: KerasOptions) -> RepeatVectorConfig:
        return RepeatVectorConfig(options.integer("n"))

    def output_shape(self, config: RepeatVectorConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if len(input_shapes[0]) != 1:
            raise ExchangeError(f"repeats a (batch, features) input, found (batch, {input_shapes[0]})")
        return (config.n, input_shapes[0][0])

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        return builder.method(builder.method(inputs[0], "unsqueeze", 2), "repeat", 1, 1, context.config.n)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.RepeatVector(context.config.n, **context.keras_identity)


@dataclass(frozen=True)
class EmbeddingConfig:
    input_dim: int
    output_dim: int
    mask_zero: bool = False
    lora_rank: int | None = field(default=None, metadata=OMIT_DEFAULT)  # see exchange.kinds.dense
    lora_alpha: float | None = field(default=None, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        from exchange.kinds.dense import check_lora

        check_int(self.input_dim, "Embedding input_dim (the vocabulary)", MAX_VOCABULARY)
        check_int(self.output_dim, "Embedding output_dim", MAX_FEATURES)
        check_lora(self.lora_rank, self.lora_alpha, "Embedding")
        if self.lora_rank is not None and self.lora_alpha != self.lora_rank:
            raise ExchangeError(
                f"Embedding lora_alpha must equal lora_rank (Keras 3.15's Embedding scales by 1), "
                f"got {self.lora_alpha!r} for rank {self.lora_rank}"
            )


@register
class Embedding(LayerKind):
    """Token ids -> vectors: Keras's `embeddings` (vocabulary, dim) is `nn.Embedding`'s weight as it
    is. Keras casts float ids to int; the torch side calls `.long()`. The result is held
    channels-first, (N, dim, T), like a Conv1D's. With `mask_zero=True` it makes the mask
    `ids != 0`, which Keras passes along to the layers that use it (see `Graph.masks`): recurrent
    layers skip masked steps, GlobalAveragePooling1D leaves them out of the mean. Integer ids
    (int32, int64) keep their dtype; `--verify` draws ids below the vocabulary size."""

    kind, keras_classes, Config = "embedding", ("Embedding",), EmbeddingConfig

    def dense_lookup_gradient(self, config: EmbeddingConfig) -> bool:
        return config.lora_rank is not None  # a plain nn.Embedding is made sparse; LoRAEmbedding is not

    def reads_integers(self, node: Node, position: int) -> bool:
        return True  # token ids

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        return node.inputs[0] if node.config.mask_zero else None  # `ids != 0`, named by the ids

    def from_keras(self, options: KerasOptions) -> EmbeddingConfig:
        from exchange.kinds.dense import read_lora

        mask_zero = options.flag("mask_zero", False)
        rank, alpha = read_lora(options, honours_alpha=False)
        options.expect("sparse", False)
        options.expect("quantization_config", None)
        options.take("input_length", None)  # Keras 2: the sequence length, known from the input shape
        return EmbeddingConfig(options.integer("input_dim"), options.integer("output_dim"), mask_zero, rank, alpha)

    def merged_when_saved(self, config: EmbeddingConfig) -> tuple[str, ...]:
        return () if config.lora_rank is None else ("lora_embeddings_a", "lora_embeddings_b")

    def output_shape(self, config: EmbeddingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return tuple(input_shapes[0]) + (config.output_dim,)

    def ports(self, context: NodeContext) -> list[AnyPort]:
        from exchange.kinds.dense import check_lora_dtype

        config = context.config
        ports: list[AnyPort] = [Port("embeddings", "weight", shape=(config.input_dim, config.output_dim))]
        if config.lora_rank is not None:
            check_lora_dtype(context)
            ports += [
                Port("lora_embeddings_a", "lora_a", shape=(config.input_dim, config.lora_rank)),
                Port("lora_embeddings_b", "lora_b", shape=(config.lora_rank, config.output_dim)),
            ]
        return ports

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        # Given its (meta) weight, nn.Embedding skips its random init: normal_ on `meta` imports
        # torch._dynamo, measured at 1.9 s of a 2 s model_from_file.
        weight = builder.torch.empty(config.input_dim, config.output_dim, device="meta", dtype=builder.dtype(context))
        if config.lora_rank is None:
            module = builder.nn.Embedding(config.input_dim, config.output_dim, _weight=builder.nn.Parameter(weight))
        else:
            module = builder.helpers.LoRAEmbedding(
                config.input_dim,
                config.output_dim,
                config.lora_rank,
                config.lora_alpha / config.lora_rank,
                device="meta",
                dtype=builder.dtype(context),
            )
        ids = builder.method(inputs[0], "long")
        if config.mask_zero and context.node.inputs[0] not in builder.masks:  # one per ids tensor
            builder.masks[context.node.inputs[0]] = builder.call(builder.torch.ne, ids, 0)
        value = builder.module(context, module, ids)
        return builder.call(builder.torch.movedim, value, -1, 1) if len(context.input_shape) >= 1 else value

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        from exchange.kinds.dense import lora_keras_args

        return keras.layers.Embedding(
            config.input_dim,
            config.output_dim,
            mask_zero=config.mask_zero,
            **lora_keras_args(config),
            **context.keras_identity,
        )


@dataclass(frozen=True)
class MaskingConfig:
    mask_value: float = 0.0


@register
class Masking(LayerKind):
    """Masks the steps of a (batch, steps, features) sequence whose features all equal
    `mask_value`: Keras's mask is `any(x != mask_value, axis=-1)`, its output `where(mask, x, 0)`.
    The layers after it that take masks (recurrent layers, GlobalAveragePooling1D, attention)
    read that mask, named `<name>:mask`, as they read an Embedding's; the torch side computes it
    here, over torch's dim 1 (the features), into `builder.masks`."""

    kind, keras_classes, Config = "masking", ("Masking",), MaskingConfig

    def from_keras(self, options: KerasOptions) -> MaskingConfig:
        return MaskingConfig(options.number("mask_value", 0.0))

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str:
        return f"{node.name}:mask"  # Keras's compute_mask ignores any mask the input carries

    def mask_source(self, node: Node) -> tuple[str, float] | None:
        return node.inputs[0], node.config.mask_value

    def output_shape(self, config: MaskingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if len(input_shapes[0]) != 2:
            raise ExchangeError(
                f"Masking is supported on (batch, steps, features) sequences, found shape (batch, {input_shapes[0]})"
            )
        return input_shapes[0]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        torch = builder.torch
        differs = builder.call(torch.ne, inputs[0], context.config.mask_value)
        keep = builder.call(torch.any, differs, dim=1, keepdim=True)  # (N, 1, T)
        builder.masks[self.output_mask(context.node, ())] = builder.call(torch.squeeze, keep, 1)
        return builder.call(torch.where, keep, inputs[0], 0.0)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.Masking(mask_value=context.config.mask_value, **context.keras_identity)
