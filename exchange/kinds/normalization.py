"""Normalisation: BatchNormalization, Normalization (a preprocessing layer), Rescaling.

Conventions that differ:
- BatchNormalization: Keras gamma, beta, moving_mean, moving_variance are torch's weight, bias,
  running_mean, running_var. torch also keeps `num_batches_tracked` (int64, no Keras source;
  written as 0, dropped going back). Keras's `momentum` weighs the old value (0.99), torch's the
  new one (0.1): torch momentum = 1 − Keras momentum. Epsilon is written out (Keras 1e-3, torch
  1e-5 by default; keras.applications' ResNets use 1.001e-5). With only one of center/scale off,
  torch's affine BatchNorm holds the missing one as a constant (bias 0 or weight 1); a torch file
  whose constant was changed cannot go back to Keras and is refused.
- Normalization: an adapted layer's mean and variance are weights; Keras divides by
  max(sqrt(variance), 1e-7). Its `count` only matters to `adapt` and is not exported. A layer given
  `mean=` and `variance=` in its config (keras.applications' ConvNeXt) keeps them in the config,
  and the torch module holds them as non-persistent buffers (not weights, not in the file).
"""

from __future__ import annotations

from dataclasses import dataclass

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import MAX_AXIS, MAX_FEATURES, LayerKind, check_axis, check_int, register
from exchange.ports import KerasOnly, Port, TorchOnly

KERAS_EPSILON = 1e-7   # keras.config.epsilon(), Normalization's floor on the standard deviation


def _one_axis(options, default=-1) -> int:
    axis = options.take("axis", default)
    if isinstance(axis, (list, tuple)) and len(axis) == 1:
        axis = axis[0]
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise options.unsupported("axis", axis, "one axis, the channels")
    return axis


def _check_channel_axis(axis: int, shape: tuple, where: str) -> None:
    if check_axis(axis, len(shape)) != len(shape):
        raise UnsupportedLayerError(f"{where}: axis {axis} is not the channel axis; only "
                                    "the last axis is supported")


@dataclass(frozen=True)
class BatchNormConfig:
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True

    def __post_init__(self) -> None:
        check_int(self.axis, "axis", MAX_AXIS, -MAX_AXIS)


@register
class BatchNormalization(LayerKind):
    kind, keras_classes, Config = "batch_norm", ("BatchNormalization",), BatchNormConfig
    passes_mask = True

    def from_keras(self, options):
        for key, allowed in (("synchronized", False), ("renorm", False), ("renorm_clipping", None),
                             ("virtual_batch_size", None), ("adjustment", None)):
            options.expect(key, allowed)
        options.take("renorm_momentum", None)   # unused without renorm
        options.take("fused", None)             # Keras 2: an implementation choice
        return BatchNormConfig(_one_axis(options), options.number("momentum", 0.99),
                               options.number("epsilon", 1e-3), options.flag("center", True),
                               options.flag("scale", True))

    def output_shape(self, config, input_shapes):
        _check_channel_axis(config.axis, input_shapes[0], "BatchNormalization")
        if len(input_shapes[0]) > 4:   # torch has BatchNorm1d/2d/3d only
            raise ExchangeError(f"expects an input of rank 2 to 5, found shape (batch, {input_shapes[0]})")
        return input_shapes[0]

    def ports(self, context):
        channels = (context.input_shape[-1],)
        return _affine_ports(context.config, channels) + [
            Port("moving_mean", "running_mean", shape=channels), Port("moving_variance", "running_var", shape=channels),
            TorchOnly("num_batches_tracked", (), 0, dtype="int64", why="torch's counter of training batches")]

    def torch_forward(self, builder, context, inputs):
        config, rank = context.config, len(context.input_shape)
        module_class = {1: builder.nn.BatchNorm1d, 2: builder.nn.BatchNorm1d, 3: builder.nn.BatchNorm2d,
                        4: builder.nn.BatchNorm3d}[rank]
        # round(): 1 - 0.99 is 0.010000000000000009 in floats; torch's momentum is the written 0.01
        norm = module_class(context.input_shape[-1], eps=config.epsilon, momentum=round(1.0 - config.momentum, 12),
                            affine=config.center or config.scale, device="meta", dtype=builder.dtype(context))
        return builder.module(context, norm, inputs[0])

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.BatchNormalization(axis=config.axis, momentum=config.momentum, epsilon=config.epsilon,
                                               center=config.center, scale=config.scale,
                                               **context.keras_identity)


@dataclass(frozen=True)
class NormalizationConfig:
    axis: int = -1
    invert: bool = False
    mean: tuple[float, ...] | None = None       # given in the Keras config: constants, not weights
    variance: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_int(self.axis, "axis", MAX_AXIS, -MAX_AXIS)
        if (self.mean is None) != (self.variance is None):
            raise ExchangeError("Normalization mean and variance must be given together")


@register
class Normalization(LayerKind):
    kind, keras_classes, Config = "normalization", ("Normalization",), NormalizationConfig
    passes_mask = True

    def from_keras(self, options):
        constants = {}
        for key in ("mean", "variance"):
            value = options.take(key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            if value is not None and not (isinstance(value, list) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise options.unsupported(key, value, "a number or a list of numbers per channel")
            constants[key] = None if value is None else tuple(float(v) for v in value)
        if (constants["mean"] is None) != (constants["variance"] is None):
            raise options.unsupported("mean", constants["mean"], "mean and variance are given together")
        return NormalizationConfig(_one_axis(options), options.flag("invert", False), **constants)

    def output_shape(self, config, input_shapes):
        _check_channel_axis(config.axis, input_shapes[0], "Normalization")
        channels = input_shapes[0][-1]
        for values in (config.mean, config.variance):
            if values is not None and len(values) not in (1, channels):
                raise UnsupportedLayerError(f"Normalization: {len(values)} values for {channels} channels")
        return input_shapes[0]

    def ports(self, context):
        if context.config.mean is not None:
            return []
        channels = (context.input_shape[-1],)
        return [Port("mean", "mean", shape=channels), Port("variance", "variance", shape=channels),
                KerasOnly("count", why="the number of samples seen by adapt()", shape=())]

    def torch_forward(self, builder, context, inputs):
        config = context.config
        module = builder.helpers.KerasNormalization(context.input_shape[-1], len(context.input_shape),
                                                    config.invert, KERAS_EPSILON, dtype=builder.dtype(context),
                                                    constant_mean=config.mean, constant_variance=config.variance)
        return builder.module(context, module, inputs[0])

    def keras_layer(self, keras, context):
        config = context.config
        constants = {} if config.mean is None else {"mean": list(config.mean), "variance": list(config.variance)}
        return keras.layers.Normalization(axis=config.axis, invert=config.invert,
                                          **context.keras_identity, **constants)


@dataclass(frozen=True)
class RescalingConfig:
    scale: float | tuple[float, ...] = 1.0       # one number, or one per channel
    offset: float | tuple[float, ...] = 0.0


@register
class Rescaling(LayerKind):
    """x * scale + offset. Per-channel values (keras.applications' EfficientNet) become a small
    module holding them as constants in the channels-first layout."""

    kind, keras_classes, Config = "rescaling", ("Rescaling",), RescalingConfig
    passes_mask = True
    keeps_element_order = True

    def keeps_order(self, config) -> bool:
        # one value per channel is tied to the element order: a permuted Flatten cannot pass
        return not isinstance(config.scale, tuple) and not isinstance(config.offset, tuple)

    def from_keras(self, options):
        values = {}
        for key, default in (("scale", 1.0), ("offset", 0.0)):
            value = options.take(key, default)
            if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                values[key] = tuple(float(v) for v in value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value)
            else:
                raise options.unsupported(key, value, "a number or a list of numbers per channel")
        return RescalingConfig(**values)

    def output_shape(self, config, input_shapes):
        for values in (config.scale, config.offset):
            if isinstance(values, tuple) and len(values) not in (1, input_shapes[0][-1]):
                raise UnsupportedLayerError(f"Rescaling: {len(values)} values for {input_shapes[0][-1]} channels")
        return input_shapes[0]

    def torch_forward(self, builder, context, inputs):
        config = context.config
        if isinstance(config.scale, tuple) or isinstance(config.offset, tuple):
            module = builder.helpers.ChannelAffine(config.scale, config.offset, len(context.input_shape))
            return builder.module(context, module, inputs[0])
        value = builder.call(builder.torch.mul, inputs[0], config.scale)
        return builder.call(builder.torch.add, value, config.offset)

    def keras_layer(self, keras, context):
        config = context.config
        scale, offset = (list(v) if isinstance(v, tuple) else v for v in (config.scale, config.offset))
        return keras.layers.Rescaling(scale, offset, **context.keras_identity)


@dataclass(frozen=True)
class LayerNormConfig:
    axis: int = -1
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True

    def __post_init__(self) -> None:
        check_int(self.axis, "axis", MAX_AXIS, -MAX_AXIS)


def _affine_ports(config, channels: tuple, bias_optional: bool = False) -> list:
    """gamma/beta as torch weight/bias. torch's affine norms hold both or neither (LayerNorm can
    drop the bias alone: `bias_optional`): with one of them off in Keras, torch holds it as a
    constant (weight 1, bias 0) that Keras cannot change, so torch -> Keras refuses another value."""
    ports: list = []
    if config.scale:
        ports.append(Port("gamma", "weight", shape=channels))
    elif config.center:
        ports.append(TorchOnly("weight", channels, 1.0, must_equal_fill=True, why="Keras scale=False"))
    if config.center:
        ports.append(Port("beta", "bias", shape=channels))
    elif config.scale and not bias_optional:
        ports.append(TorchOnly("bias", channels, 0.0, must_equal_fill=True, why="Keras center=False"))
    return ports


@register
class LayerNormalization(LayerKind):
    """Over the channels (Keras's last axis): torch's `nn.LayerNorm` normalises trailing dims, so on
    channels-first tensors the torch side moves the channels last and back. Keras's epsilon
    (1e-3) is written out (torch's is 1e-5); `scale=False` alone is `bias=False` in torch."""

    kind, keras_classes, Config = "layer_norm", ("LayerNormalization",), LayerNormConfig
    passes_mask = True

    def from_keras(self, options):
        options.expect("rms_scaling", False)   # deprecated in Keras: it scales by the variance
        return LayerNormConfig(_one_axis(options), options.number("epsilon", 1e-3),
                               options.flag("center", True), options.flag("scale", True))

    def output_shape(self, config, input_shapes):
        _check_channel_axis(config.axis, input_shapes[0], "LayerNormalization")
        return input_shapes[0]

    def ports(self, context):
        return _affine_ports(context.config, (context.input_shape[-1],), bias_optional=True)

    def torch_forward(self, builder, context, inputs):
        config, rank = context.config, len(context.input_shape)
        norm = builder.nn.LayerNorm(context.input_shape[-1], eps=config.epsilon,
                                    elementwise_affine=config.center or config.scale, bias=config.center,
                                    device="meta", dtype=builder.dtype(context))
        value = inputs[0] if rank < 2 else builder.call(builder.torch.movedim, inputs[0], 1, -1)
        value = builder.module(context, norm, value)
        return value if rank < 2 else builder.call(builder.torch.movedim, value, -1, 1)

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.LayerNormalization(axis=config.axis, epsilon=config.epsilon, center=config.center,
                                               scale=config.scale, **context.keras_identity)


@dataclass(frozen=True)
class GroupNormConfig:
    groups: int
    axis: int = -1
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True

    def __post_init__(self) -> None:
        check_int(self.axis, "axis", MAX_AXIS, -MAX_AXIS)
        check_int(self.groups, "GroupNormalization groups", MAX_FEATURES)


@register
class GroupNormalization(LayerKind):
    """Keras groups contiguous channels as `nn.GroupNorm` does (channel c in group c // (C/groups))."""

    kind, keras_classes, Config = "group_norm", ("GroupNormalization",), GroupNormConfig
    passes_mask = True

    def from_keras(self, options):
        return GroupNormConfig(options.integer("groups", 32), _one_axis(options),
                               options.number("epsilon", 1e-3), options.flag("center", True),
                               options.flag("scale", True))

    def output_shape(self, config, input_shapes):
        _check_channel_axis(config.axis, input_shapes[0], "GroupNormalization")
        if config.groups < 1 or input_shapes[0][-1] % config.groups:
            raise UnsupportedLayerError(f"GroupNormalization: {input_shapes[0][-1]} channels do not split "
                                        f"into {config.groups} groups")
        return input_shapes[0]

    def ports(self, context):
        return _affine_ports(context.config, (context.input_shape[-1],))

    def torch_forward(self, builder, context, inputs):
        config = context.config
        norm = builder.nn.GroupNorm(config.groups, context.input_shape[-1], eps=config.epsilon,
                                    affine=config.center or config.scale, device="meta", dtype=builder.dtype(context))
        return builder.module(context, norm, inputs[0])

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.GroupNormalization(groups=config.groups, axis=config.axis, epsilon=config.epsilon,
                                               center=config.center, scale=config.scale,
                                               **context.keras_identity)


@dataclass(frozen=True)
class UnitNormConfig:
    axis: int = -1

    def __post_init__(self) -> None:
        check_int(self.axis, "axis", MAX_AXIS, -MAX_AXIS)


@register
class UnitNormalization(LayerKind):
    """x / max(‖x‖₂, 1e-6) along the axis: Keras's rsqrt(max(Σx², 1e-12)) is `F.normalize`'s form."""

    kind, keras_classes, Config = "unit_norm", ("UnitNormalization",), UnitNormConfig
    passes_mask = True

    def from_keras(self, options):
        return UnitNormConfig(_one_axis(options))

    def output_shape(self, config, input_shapes):
        check_axis(config.axis, len(input_shapes[0]))
        return input_shapes[0]

    def torch_forward(self, builder, context, inputs):
        from exchange.kinds.layout import torch_axis

        dim = torch_axis(context.config.axis, len(context.input_shape), context.node.name)
        return builder.call(builder.F.normalize, inputs[0], p=2.0, dim=dim, eps=1e-6)

    def keras_layer(self, keras, context):
        return keras.layers.UnitNormalization(axis=context.config.axis,
                                              **context.keras_identity)


@dataclass(frozen=True)
class LayerScaleConfig:
    init_values: float = 1e-6


@register
class LayerScale(LayerKind):
    """keras.applications' ConvNeXt LayerScale: x * gamma per channel (gamma is a weight)."""

    kind, keras_classes, Config = "layer_scale", ("LayerScale",), LayerScaleConfig
    keeps_element_order = False

    def from_keras(self, options):
        options.take("projection_dim")   # the channel count, known from the input shape
        return LayerScaleConfig(options.number("init_values", 1e-6))

    def ports(self, context):   # ConvNeXt adds its gamma without a name: Keras calls it `variable`
        return [Port("variable", "gamma", shape=(context.input_shape[-1],))]

    def torch_forward(self, builder, context, inputs):
        module = builder.helpers.ChannelScale(context.input_shape[-1], len(context.input_shape),
                                              dtype=builder.dtype(context))
        return builder.module(context, module, inputs[0])

    def keras_layer(self, keras, context):
        from keras.src.applications.convnext import LayerScale as KerasLayerScale

        return KerasLayerScale(context.config.init_values, context.input_shape[-1],
                               **context.keras_identity)
