"""Pooling: MaxPooling and AveragePooling 1D/2D/3D, GlobalAveragePooling and GlobalMaxPooling
1D/2D/3D, AdaptiveAveragePooling and AdaptiveMaxPooling 1D/2D/3D.

Conventions that differ:
- `same` padding is TensorFlow's (extra cell at the end, see convolution.py). Max pooling pads
  with −inf. Average pooling does not count the padded cells: torch's `count_include_pad=False`
  does that for symmetric padding; for asymmetric padding the torch side uses `KerasAvgPool`,
  which divides by the number of real cells in each window.
- Global pooling reduces the spatial axes where the torch side holds them: dims 2, … for
  channels_last; for channels_first (Keras (N, C, d1, …, dk), held (N, dk, C, d1, …)) dims 1, 3, …,
  so the result (kept dims included) is already in the torch side's layout.
- Adaptive pooling: Keras's bins along an axis of length L into n are [floor(i·L/n),
  ceil((i+1)·L/n)), torch's `nn.Adaptive*Pool` bins. Keras computes the bounds in float32, exact
  while L·n < 2**24; beyond, the bounds might differ and the layer is refused. Keras averages a 2-D
  or 3-D bin one axis after the other, torch at once: the same mean, up to float rounding.
- `data_format="channels_first"` for windowed and adaptive pooling: permuted to torch's
  (N, C, d…) and back, as for convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

from exchange.errors import ExchangeError
from exchange.kinds import (
    MAX_WINDOW,
    OMIT_DEFAULT,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    check_choice,
    check_ints,
    check_step_mask,
    mask_name,
    register,
    torch_mask,
)
from exchange.kinds.axis_order import to_keras_order
from exchange.kinds.convolution import (
    DATA_FORMATS,
    SPATIAL_AXES,
    check_window,
    from_torch_layout,
    join_channels,
    read_data_format,
    split_channels,
    tf_padding,
    to_torch_layout,
    torch_pad_argument,
    window_output_sizes,
)

if TYPE_CHECKING:
    from exchange.graph import NodeContext, Shape

# Keras computes adaptive bins in float32: exact while input length × output length < 2**24.
MAX_ADAPTIVE_PRODUCT = 1 << 24


@dataclass(frozen=True)
class PoolConfig:
    pool_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str = "valid"
    data_format: str = field(default="channels_last", metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_window(
            self.pool_size,
            self.strides,
            (1,) * len(self.pool_size),
            self.padding,
            SPATIAL_AXES,
            "pooling",
            paddings=("valid", "same"),
        )
        check_choice(self.data_format, DATA_FORMATS, "pooling data_format")


class _Pooling(LayerKind):
    spatial = 2
    average = False

    def from_keras(self, options: KerasOptions) -> Any:
        pool_size = options.sizes("pool_size", self.spatial, 2, keras2="pool_length")
        strides = (
            options.sizes("strides", self.spatial, None, keras2="stride")
            if options.take("strides", None, keras2="stride") is not None
            else pool_size
        )
        padding = options.take("padding", "valid")
        if padding not in ("valid", "same"):
            raise options.unsupported("padding", padding)
        return PoolConfig(pool_size, strides, padding, read_data_format(options))

    def output_shape(self, config: Any, input_shapes: tuple[Shape, ...]) -> Shape:
        if len(config.pool_size) != self.spatial:
            raise ExchangeError(f"pool size {list(config.pool_size)} has not {self.spatial} spatial axes")
        sizes, channels = split_channels(input_shapes[0], self.spatial, config.data_format)
        out_sizes = window_output_sizes(sizes, config.pool_size, config.strides, (1,) * self.spatial, config.padding)
        return join_channels(out_sizes, channels, config.data_format)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, nn = context.config, builder.nn
        sizes, _ = split_channels(context.input_shape, self.spatial, config.data_format)
        pads = [
            tf_padding(size, k, s, 1, config.padding, context.node.name)
            for size, k, s in zip(sizes, config.pool_size, config.strides)
        ]
        symmetric = all(before == after for before, after in pads)
        value = to_torch_layout(builder, inputs[0], config.data_format, len(context.input_shape))
        if self.average:
            if symmetric:
                pool_class = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[self.spatial - 1]
                module = pool_class(
                    config.pool_size, config.strides, padding=tuple(b for b, _ in pads), count_include_pad=False
                )
            else:
                module = builder.helpers.KerasAvgPool(config.pool_size, config.strides, torch_pad_argument(pads))
        else:
            if not symmetric:
                value = builder.call(builder.F.pad, value, torch_pad_argument(pads), value=float("-inf"))
                pads = [(0, 0)] * self.spatial
            pool_class = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[self.spatial - 1]
            module = pool_class(config.pool_size, config.strides, padding=tuple(b for b, _ in pads))
        value = builder.module(context, module, value)
        return from_torch_layout(builder, value, config.data_format, len(context.output_shape))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        layer_class = getattr(keras.layers, self.keras_classes[0])
        return layer_class(
            pool_size=config.pool_size,
            strides=config.strides,
            padding=config.padding,
            data_format=config.data_format,
            **context.keras_identity,
        )


@register
class MaxPooling2D(_Pooling):
    kind, keras_classes, Config = "max_pool2d", ("MaxPooling2D", "MaxPool2D"), PoolConfig


@register
class MaxPooling1D(_Pooling):
    kind, keras_classes, Config = "max_pool1d", ("MaxPooling1D", "MaxPool1D"), PoolConfig
    spatial = 1


@register
class MaxPooling3D(_Pooling):
    kind, keras_classes, Config = "max_pool3d", ("MaxPooling3D", "MaxPool3D"), PoolConfig
    spatial = 3


@register
class AveragePooling2D(_Pooling):
    kind, keras_classes, Config = "avg_pool2d", ("AveragePooling2D", "AvgPool2D"), PoolConfig
    average = True


@register
class AveragePooling1D(_Pooling):
    kind, keras_classes, Config = "avg_pool1d", ("AveragePooling1D", "AvgPool1D"), PoolConfig
    spatial, average = 1, True


@register
class AveragePooling3D(_Pooling):
    kind, keras_classes, Config = "avg_pool3d", ("AveragePooling3D", "AvgPool3D"), PoolConfig
    spatial, average = 3, True


@dataclass(frozen=True)
class GlobalPoolConfig:
    keepdims: bool = False
    mask_input: bool = field(default=False, metadata=OMIT_DEFAULT)  # GlobalAveragePooling1D(x, mask)
    data_format: str = field(default="channels_last", metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_choice(self.data_format, DATA_FORMATS, "global pooling data_format")


class _GlobalPooling(LayerKind):
    spatial = 2
    average = True
    Config = GlobalPoolConfig

    def from_keras(self, options: KerasOptions) -> GlobalPoolConfig:
        return GlobalPoolConfig(options.flag("keepdims", False), data_format=read_data_format(options))

    def output_shape(self, config: GlobalPoolConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        _, channels = split_channels(input_shapes[0], self.spatial, config.data_format)
        if config.mask_input and self.mask_position is None:
            raise ExchangeError("takes no mask input")
        if config.data_format == "channels_first" and config.mask_input:  # a mask (T,) of an input (C, T)
            input_shapes = (tuple(reversed(input_shapes[0])),) + tuple(input_shapes[1:])
        check_step_mask(config, input_shapes)
        if not config.keepdims:
            return (channels,)
        return join_channels((1,) * self.spatial, channels, config.data_format)

    def spatial_dims(self, context: NodeContext) -> tuple[int, ...]:
        """The torch dims holding the spatial axes (see the module docstring)."""
        rank = len(context.input_shape)
        first = 2 if context.config.data_format == "channels_first" else 1  # Keras's first spatial axis
        return tuple(sorted(to_keras_order(rank)[axis] for axis in range(first, first + self.spatial)))

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        reduce = builder.torch.mean if self.average else builder.torch.amax
        return builder.call(reduce, inputs[0], dim=self.spatial_dims(context), keepdim=context.config.keepdims)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return getattr(keras.layers, self.keras_classes[0])(
            keepdims=context.config.keepdims, data_format=context.config.data_format, **context.keras_identity
        )


@register
class GlobalAveragePooling2D(_GlobalPooling):
    kind, keras_classes = "global_avg_pool2d", ("GlobalAveragePooling2D", "GlobalAvgPool2D")


@register
class GlobalAveragePooling1D(_GlobalPooling):
    """On a masked sequence Keras averages the unmasked steps only (and drops the mask)."""

    kind, keras_classes, spatial = "global_avg_pool1d", ("GlobalAveragePooling1D", "GlobalAvgPool1D"), 1
    mask_position = 1  # call(inputs, mask=None); a mask tensor is kept where != 0 (Keras casts it to bool)

    def from_keras(self, options: KerasOptions) -> GlobalPoolConfig:
        return replace(super().from_keras(options), mask_input=options.take_mask_input())

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        if mask_name(context) is None:
            return super().torch_forward(builder, context, inputs)
        torch, keepdims = builder.torch, context.config.keepdims
        (steps,) = self.spatial_dims(context)  # 2 for channels_last (N, C, T), 1 for channels_first (N, T, C)
        keep = builder.call(torch.unsqueeze, torch_mask(builder, context, inputs), 3 - steps)  # beside the steps
        total = builder.call(torch.sum, builder.call(torch.where, keep, inputs[0], 0.0), dim=steps, keepdim=keepdims)
        return builder.call(torch.div, total, builder.call(torch.sum, keep, dim=steps, keepdim=keepdims))

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        if context.config.mask_input:
            return keras_layer(arguments[0], mask=arguments[-1])
        return keras_layer(arguments[0])


@register
class GlobalAveragePooling3D(_GlobalPooling):
    kind, keras_classes, spatial = "global_avg_pool3d", ("GlobalAveragePooling3D", "GlobalAvgPool3D"), 3


@register
class GlobalMaxPooling2D(_GlobalPooling):
    kind, keras_classes, average = "global_max_pool2d", ("GlobalMaxPooling2D", "GlobalMaxPool2D"), False


@register
class GlobalMaxPooling1D(_GlobalPooling):
    kind, keras_classes, spatial, average = "global_max_pool1d", ("GlobalMaxPooling1D", "GlobalMaxPool1D"), 1, False


@register
class GlobalMaxPooling3D(_GlobalPooling):
    kind, keras_classes, spatial, average = "global_max_pool3d", ("GlobalMaxPooling3D", "GlobalMaxPool3D"), 3, False


@dataclass(frozen=True)
class AdaptivePoolConfig:
    output_size: tuple[int, ...]
    data_format: str = "channels_last"

    def __post_init__(self) -> None:
        check_ints(self.output_size, "adaptive pooling output_size", MAX_WINDOW, count=SPATIAL_AXES)
        check_choice(self.data_format, DATA_FORMATS, "adaptive pooling data_format")


class _AdaptivePooling(LayerKind):
    spatial = 2
    average = True
    Config = AdaptivePoolConfig

    def from_keras(self, options: KerasOptions) -> AdaptivePoolConfig:
        return AdaptivePoolConfig(options.sizes("output_size", self.spatial), read_data_format(options))

    def output_shape(self, config: AdaptivePoolConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if len(config.output_size) != self.spatial:
            raise ExchangeError(f"output_size {list(config.output_size)} has not {self.spatial} spatial axes")
        sizes, channels = split_channels(input_shapes[0], self.spatial, config.data_format)
        for size, out in zip(sizes, config.output_size):
            if size is None:
                raise ExchangeError(
                    f"needs fixed spatial sizes (Keras does too), found input shape (batch, {input_shapes[0]})"
                )
            if size * out >= MAX_ADAPTIVE_PRODUCT:
                raise ExchangeError(
                    f"pooling {size} cells into {out}: Keras's float32 bin bounds may differ "
                    f"from exact ones (input × output length must be below {MAX_ADAPTIVE_PRODUCT:,})"
                )
        return join_channels(config.output_size, channels, config.data_format)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, nn = context.config, builder.nn
        modules = (
            (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
            if self.average
            else (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
        )
        value = to_torch_layout(builder, inputs[0], config.data_format, len(context.input_shape))
        value = builder.module(context, modules[self.spatial - 1](config.output_size), value)
        return from_torch_layout(builder, value, config.data_format, len(context.output_shape))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return getattr(keras.layers, self.keras_classes[0])(
            config.output_size, data_format=config.data_format, **context.keras_identity
        )


@register
class AdaptiveAveragePooling1D(_AdaptivePooling):
    kind, keras_classes, spatial = "adaptive_avg_pool1d", ("AdaptiveAveragePooling1D",), 1


@register
class AdaptiveAveragePooling2D(_AdaptivePooling):
    kind, keras_classes, spatial = "adaptive_avg_pool2d", ("AdaptiveAveragePooling2D",), 2


@register
class AdaptiveAveragePooling3D(_AdaptivePooling):
    kind, keras_classes, spatial = "adaptive_avg_pool3d", ("AdaptiveAveragePooling3D",), 3


@register
class AdaptiveMaxPooling1D(_AdaptivePooling):
    kind, keras_classes, spatial, average = "adaptive_max_pool1d", ("AdaptiveMaxPooling1D",), 1, False


@register
class AdaptiveMaxPooling2D(_AdaptivePooling):
    kind, keras_classes, spatial, average = "adaptive_max_pool2d", ("AdaptiveMaxPooling2D",), 2, False


@register
class AdaptiveMaxPooling3D(_AdaptivePooling):
    kind, keras_classes, spatial, average = "adaptive_max_pool3d", ("AdaptiveMaxPooling3D",), 3, False
