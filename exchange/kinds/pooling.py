"""Pooling: MaxPooling and AveragePooling 1D/2D, GlobalAveragePooling and GlobalMaxPooling 1D/2D.

Conventions that differ:
- `same` padding is TensorFlow's (extra cell at the bottom/right, see convolution.py). Max pooling
  pads with −inf. Average pooling does not count the padded cells: torch's
  `count_include_pad=False` does that for symmetric padding; for asymmetric padding the torch side
  uses `KerasAvgPool`, which divides by the number of real cells in each window.
- Global pooling reduces the spatial axes, which torch holds after the channels (dims 2, 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from exchange.errors import ExchangeError
from exchange.kinds import OMIT_DEFAULT, LayerKind, check_step_mask, mask_name, register, torch_mask
from exchange.kinds.convolution import check_window, tf_padding, torch_pad_argument, window_output_sizes


@dataclass(frozen=True)
class PoolConfig:
    pool_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str = "valid"

    def __post_init__(self) -> None:
        check_window(self.pool_size, self.strides, (1,) * len(self.pool_size), self.padding, (1, 2), "pooling",
                     paddings=("valid", "same"))


class _Pooling(LayerKind):
    spatial = 2
    average = False

    def from_keras(self, options):
        options.expect("data_format", "channels_last", None)
        pool_size = options.sizes("pool_size", self.spatial, 2, keras2="pool_length")
        strides = options.sizes("strides", self.spatial, None, keras2="stride") if options.take(
            "strides", None, keras2="stride") is not None else pool_size
        padding = options.take("padding", "valid")
        if padding not in ("valid", "same"):
            raise options.unsupported("padding", padding)
        return PoolConfig(pool_size, strides, padding)

    def output_shape(self, config, input_shapes):
        shape = input_shapes[0]
        if len(shape) != self.spatial + 1:
            raise ExchangeError(f"expects rank-{self.spatial + 2} input, found shape (batch, {shape})")
        if len(config.pool_size) != self.spatial:
            raise ExchangeError(f"pool size {list(config.pool_size)} has not {self.spatial} spatial axes")
        return window_output_sizes(shape, config.pool_size, config.strides, (1,) * self.spatial,
                                   config.padding) + (shape[-1],)

    def torch_forward(self, builder, context, inputs):
        config, nn = context.config, builder.nn
        pads = [tf_padding(size, k, s, 1, config.padding, context.node.name)
                for size, k, s in zip(context.input_shape[:-1], config.pool_size, config.strides)]
        symmetric = all(before == after for before, after in pads)
        value = inputs[0]
        if self.average:
            if symmetric:
                pool_class = nn.AvgPool1d if self.spatial == 1 else nn.AvgPool2d
                module = pool_class(config.pool_size, config.strides, padding=tuple(b for b, _ in pads),
                                    count_include_pad=False)
            else:
                module = builder.helpers.KerasAvgPool(config.pool_size, config.strides, torch_pad_argument(pads))
        else:
            if not symmetric:
                value = builder.call(builder.F.pad, value, torch_pad_argument(pads), value=float("-inf"))
                pads = [(0, 0)] * self.spatial
            pool_class = nn.MaxPool1d if self.spatial == 1 else nn.MaxPool2d
            module = pool_class(config.pool_size, config.strides, padding=tuple(b for b, _ in pads))
        return builder.module(context, module, value)

    def keras_layer(self, keras, context):
        config = context.config
        layer_class = getattr(keras.layers, self.keras_classes[0])
        return layer_class(pool_size=config.pool_size, strides=config.strides, padding=config.padding,
                           data_format="channels_last", **context.keras_identity)


@register
class MaxPooling2D(_Pooling):
    kind, keras_classes, Config = "max_pool2d", ("MaxPooling2D", "MaxPool2D"), PoolConfig


@register
class MaxPooling1D(_Pooling):
    kind, keras_classes, Config = "max_pool1d", ("MaxPooling1D", "MaxPool1D"), PoolConfig
    spatial = 1


@register
class AveragePooling2D(_Pooling):
    kind, keras_classes, Config = "avg_pool2d", ("AveragePooling2D", "AvgPool2D"), PoolConfig
    average = True


@register
class AveragePooling1D(_Pooling):
    kind, keras_classes, Config = "avg_pool1d", ("AveragePooling1D", "AvgPool1D"), PoolConfig
    spatial, average = 1, True


@dataclass(frozen=True)
class GlobalPoolConfig:
    keepdims: bool = False
    mask_input: bool = field(default=False, metadata=OMIT_DEFAULT)   # GlobalAveragePooling1D(x, mask)


class _GlobalPooling(LayerKind):
    spatial = 2
    average = True
    Config = GlobalPoolConfig

    def from_keras(self, options):
        options.expect("data_format", "channels_last", None)
        return GlobalPoolConfig(options.flag("keepdims", False))

    def output_shape(self, config, input_shapes):
        shape = input_shapes[0]
        if len(shape) != self.spatial + 1:
            raise ExchangeError(f"expects rank-{self.spatial + 2} input, found shape (batch, {shape})")
        if config.mask_input and self.mask_position is None:
            raise ExchangeError("takes no mask input")
        check_step_mask(config, input_shapes)
        return ((1,) * self.spatial if config.keepdims else ()) + (shape[-1],)

    def torch_forward(self, builder, context, inputs):
        dims = tuple(range(2, 2 + self.spatial))
        reduce = builder.torch.mean if self.average else builder.torch.amax
        return builder.call(reduce, inputs[0], dim=dims, keepdim=context.config.keepdims)

    def keras_layer(self, keras, context):
        return getattr(keras.layers, self.keras_classes[0])(
            keepdims=context.config.keepdims, data_format="channels_last",
            **context.keras_identity)


@register
class GlobalAveragePooling2D(_GlobalPooling):
    kind, keras_classes = "global_avg_pool2d", ("GlobalAveragePooling2D", "GlobalAvgPool2D")


@register
class GlobalAveragePooling1D(_GlobalPooling):
    """On a masked sequence Keras averages the unmasked steps only (and drops the mask)."""

    kind, keras_classes, spatial = "global_avg_pool1d", ("GlobalAveragePooling1D", "GlobalAvgPool1D"), 1
    mask_position = 1   # call(inputs, mask=None); a mask tensor is kept where != 0 (Keras casts it to bool)

    def from_keras(self, options):
        return replace(super().from_keras(options), mask_input=options.take_mask_input())

    def torch_forward(self, builder, context, inputs):
        if mask_name(context) is None:
            return super().torch_forward(builder, context, inputs)
        torch, keepdims = builder.torch, context.config.keepdims
        keep = builder.call(torch.unsqueeze, torch_mask(builder, context, inputs), 1)   # (N, 1, T)
        total = builder.call(torch.sum, builder.call(torch.where, keep, inputs[0], 0.0), dim=2, keepdim=keepdims)
        return builder.call(torch.div, total, builder.call(torch.sum, keep, dim=2, keepdim=keepdims))

    def keras_call(self, keras_layer, arguments, context):
        if context.config.mask_input:
            return keras_layer(arguments[0], mask=arguments[-1])
        return keras_layer(arguments[0])


@register
class GlobalMaxPooling2D(_GlobalPooling):
    kind, keras_classes, average = "global_max_pool2d", ("GlobalMaxPooling2D", "GlobalMaxPool2D"), False


@register
class GlobalMaxPooling1D(_GlobalPooling):
    kind, keras_classes, spatial, average = "global_max_pool1d", ("GlobalMaxPooling1D", "GlobalMaxPool1D"), 1, False
