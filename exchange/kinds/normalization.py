"""Normalisation: BatchNormalization, Normalization (a preprocessing layer), Rescaling,
LayerNormalization, RMSNormalization, GroupNormalization, UnitNormalization, LayerScale.

Conventions that differ:
- Axes. Keras names the normalised axes in its channels-last layout. torch's BatchNorm
  normalises per dim 1, so a BatchNormalization on another axis moves that axis to dim 1 and
  back. `nn.LayerNorm` and `nn.RMSNorm` normalise the trailing dims, so the torch side moves the
  normalised axes last, in Keras's order, and back: their weights then have Keras's shape (the
  sizes of the axes in increasing order, as Keras builds them). Keras sorts a list of axes as
  written, so a list mixing signs whose sorted order is not the axes' order (LayerNormalization
  axis=[1, -1]) reshapes its weights across axes; it is refused.
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
  Keeping other axes than the channels (`axis` a list, or None: one mean for everything), the
  mean and variance (Keras: the sizes of the kept axes) are held in torch's channels-first
  broadcast shape (1 along the other axes). Values given in the config are then only accepted
  as a single value.
- BatchNormalization given a mask (`mask=` a tensor) weighs its batch moments by it in training
  only; at inference it normalises every position with the moving statistics, and so does the
  torch side, which reads nothing of the mask (it is passed on to the layers after).
- BatchNormalization with `renorm=True` computes at inference exactly what plain BatchNorm does
  (the moving mean and variance); its `moving_stddev`, `renorm_mean` and `renorm_stddev` only
  serve training and are not exported (a Keras model rebuilt from torch keeps their initial
  values: training it further in Keras re-derives the moving variance from `moving_stddev`).
- LayerNormalization `rms_scaling=True` is Keras's own formula, x · rsqrt(var(x) + ε) · gamma
  (the variance about the mean, but x itself not centred; no beta): `KerasRMSScaledLayerNorm`.
- RMSNormalization is `nn.RMSNorm`: both x · rsqrt(mean(x²) + ε) · scale, ε inside the root;
  Keras's default ε is 1e-6 (torch's, None, is the dtype's machine epsilon), written out. Keras
  multiplies the scale by broadcasting, along the last axes, so only the last axes are read.
- GroupNormalization groups its `axis` (any feature axis, not only the channels) into contiguous
  groups, as `nn.GroupNorm` groups dim 1: the torch side moves that axis to dim 1 and back.
- UnitNormalization: x · min(rsqrt(Σx²), 1e12) in Keras = x / max(‖x‖₂, 1e-12): `F.normalize`
  with eps 1e-12 on one axis; over several axes the same formula written out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_AXIS,
    MAX_FEATURES,
    OMIT_DEFAULT,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    check_axis,
    check_int,
    check_ints,
    known,
    register,
)
from exchange.kinds.axis_order import to_keras_order, torch_axis, torch_shape
from exchange.ports import KerasOnly, Permute, Port, Reshape, Step, TorchOnly

if TYPE_CHECKING:
    from exchange.graph import Node, NodeContext, Shape
    from exchange.ports import AnyPort

KERAS_EPSILON = 1e-7  # keras.config.epsilon(), Normalization's floor on the standard deviation
UNIT_NORM_EPSILON = 1e-12  # UnitNormalization's floor on the norm


def _axes(options: KerasOptions, default: Any = -1) -> Axes:
    """An `axis` option: one axis as an int, several (or none: Normalization's None) as a tuple."""
    axis = options.take("axis", default)
    if axis is None:
        axis = []
    if isinstance(axis, (list, tuple)) and len(axis) == 1:
        axis = axis[0]
    if isinstance(axis, (list, tuple)) and all(isinstance(a, int) and not isinstance(a, bool) for a in axis):
        return tuple(axis)
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise options.unsupported("axis", axis, "an axis or a list of axes")
    return axis


def _check_axes(axis: Axes, what: str, allow_none: bool = False) -> None:
    if isinstance(axis, tuple):
        check_ints(axis, what, MAX_AXIS, -MAX_AXIS)
        if not axis and not allow_none:
            raise ExchangeError(f"{what} must name at least one axis")
    else:
        check_int(axis, what, MAX_AXIS, -MAX_AXIS)


def norm_axes(axis: Axes, shape: Shape, where: str, sorted_as_written: bool = True) -> tuple[int, ...]:
    """The Keras axes (positive, 1..rank, increasing) a layer normalises or keeps, each of known
    size. `sorted_as_written`: Keras sorts the list as given (LayerNormalization, RMSNormalization),
    which must be the axes' order (see the module docstring)."""
    written = axis if isinstance(axis, tuple) else (axis,)
    positive = tuple(check_axis(value, len(shape)) for value in written)
    if len(set(positive)) != len(positive):
        raise UnsupportedLayerError(f"{where}: axis {list(written)} names an axis twice")
    if sorted_as_written and [positive[written.index(value)] for value in sorted(written)] != sorted(positive):
        raise UnsupportedLayerError(
            f"{where}: axis {list(written)} sorts to another order than the axes' "
            "(Keras then reshapes its weights across axes); write them all positive "
            "or all negative"
        )
    if any(shape[value - 1] is None for value in positive):
        raise UnsupportedLayerError(
            f"{where}: axis {list(written)} has an axis of unknown size in input shape {list(shape)}"
        )
    return tuple(sorted(positive))


def _axes_last(
    builder: TorchBuilder, value: TorchValue, axes: tuple[int, ...], rank: int
) -> tuple[TorchValue, Callable[[TorchValue], TorchValue]]:
    """Move the Keras axes `axes` of a channels-first tensor last, in Keras order; return the
    moved value and a function that moves them back."""
    if axes == (rank,) and rank >= 2:  # the channels
        moved = builder.call(builder.torch.movedim, value, 1, -1)
        return moved, lambda result: builder.call(builder.torch.movedim, result, -1, 1)
    dims = [to_keras_order(rank)[axis] for axis in axes]
    order = tuple(dim for dim in range(rank + 1) if dim not in dims) + tuple(dims)
    if order == tuple(range(rank + 1)):
        return value, lambda result: result
    back = tuple(int(dim) for dim in np.argsort(order))
    return builder.call(builder.torch.permute, value, order), lambda result: builder.call(
        builder.torch.permute, result, back
    )


def _one_axis(options: KerasOptions, default: Any = -1) -> int:
    axis = options.take("axis", default)
    if isinstance(axis, (list, tuple)) and len(axis) == 1:
        axis = axis[0]
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise options.unsupported("axis", axis, "one axis, the channels")
    return axis


def _check_channel_axis(axis: int, shape: Shape, where: str) -> None:
    if check_axis(axis, len(shape)) != len(shape):
        raise UnsupportedLayerError(f"{where}: axis {axis} is not the channel axis; only the last axis is supported")


# An `axis` option: one axis, or several (none: Normalization's axis=None).
Axes = int | tuple[int, ...]


@dataclass(frozen=True)
class BatchNormConfig:
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True
    # Batch renormalisation: training only (see the module docstring); kept for the Keras layer.
    renorm: bool = field(default=False, metadata=OMIT_DEFAULT)
    renorm_momentum: float = field(default=0.99, metadata=OMIT_DEFAULT)
    renorm_clipping: tuple[float | None, float | None, float | None] | None = field(
        default=None, metadata=OMIT_DEFAULT
    )  # (rmax, rmin, dmax)
    # BatchNormalization()(x, mask=m): the mask only weighs training's batch moments; at inference
    # it is passed on, as Keras's supports_masking does (the node's last input).
    mask_input: bool = field(default=False, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_int(self.axis, "axis", MAX_AXIS, -MAX_AXIS)
        if self.renorm_clipping is not None and not self.renorm:
            raise ExchangeError("BatchNormalization renorm_clipping is given without renorm")


RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _renorm_clipping(options: KerasOptions) -> tuple[float | None, float | None, float | None] | None:
    """`renorm_clipping` as (rmax, rmin, dmax), each a number or None; None when absent."""
    value = options.take("renorm_clipping", None)
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or set(value) - set(RENORM_CLIPPING_KEYS)
        or not all(
            item is None or (isinstance(item, (int, float)) and not isinstance(item, bool)) for item in value.values()
        )
    ):
        raise options.unsupported("renorm_clipping", value, "a dict of rmax, rmin and dmax")
    rmax, rmin, dmax = (None if value.get(key) is None else float(value[key]) for key in RENORM_CLIPPING_KEYS)
    return rmax, rmin, dmax


@register
class BatchNormalization(LayerKind):
    kind, keras_classes, Config = "batch_norm", ("BatchNormalization",), BatchNormConfig
    casts_integers = True
    passes_mask = True
    mask_position = 2  # call(inputs, training=None, mask=None)

    def training_not_reproduced(self, config: BatchNormConfig) -> str | None:
        if not config.renorm:
            return None
        return "BatchNormalization renorm=True trains with batch renormalisation, which is not reproduced in torch"

    def from_keras(self, options: KerasOptions) -> BatchNormConfig:
        for key, allowed in (("synchronized", False), ("virtual_batch_size", None), ("adjustment", None)):
            options.expect(key, allowed)
        options.take("fused", None)  # Keras 2: an implementation choice
        renorm = options.flag("renorm", False)
        renorm_momentum = options.number("renorm_momentum", 0.99)
        clipping = _renorm_clipping(options)
        if not renorm:  # unused without renorm
            renorm_momentum, clipping = 0.99, None
        return BatchNormConfig(
            _one_axis(options),
            options.number("momentum", 0.99),
            options.number("epsilon", 1e-3),
            options.flag("center", True),
            options.flag("scale", True),
            renorm,
            renorm_momentum,
            clipping,
            options.take_mask_input(),
        )

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        if node.config.mask_input:  # Keras passes the mask it was given on (supports_masking)
            return node.inputs[-1]
        return super().output_mask(node, input_masks)

    def output_shape(self, config: BatchNormConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if config.mask_input and (len(input_shapes) != 2 or len(input_shapes[1]) != len(input_shapes[0]) - 1):
            raise ExchangeError(
                f"argument 'mask' of shape (batch, {input_shapes[-1]}) for an input of shape "
                f"(batch, {input_shapes[0]}): Keras takes a mask of one axis less"
            )
        norm_axes(config.axis, input_shapes[0], "BatchNormalization")
        if len(input_shapes[0]) > 4:  # torch has BatchNorm1d/2d/3d only
            raise ExchangeError(f"expects an input of rank 2 to 5, found shape (batch, {input_shapes[0]})")
        return input_shapes[0]

    def _channels(self, context: NodeContext) -> int:
        return known(context.input_shape[check_axis(context.config.axis, len(context.input_shape)) - 1], "channels")

    def ports(self, context: NodeContext) -> list[AnyPort]:
        channels = (self._channels(context),)
        ports = _affine_ports(context.config, channels) + [
            Port("moving_mean", "running_mean", shape=channels, buffer=True),
            Port("moving_variance", "running_var", shape=channels, buffer=True),
        ]
        if context.config.renorm:
            ports += [
                KerasOnly(name, why="batch renormalisation's training statistics", shape=channels)
                for name in ("moving_stddev", "renorm_mean", "renorm_stddev")
            ]
        # torch's counter comes last in its state_dict; Keras has no variable for it
        return ports + [
            TorchOnly(
                "num_batches_tracked", (), 0, dtype="int64", why="torch's counter of training batches", buffer=True
            )
        ]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, rank = context.config, len(context.input_shape)
        module_class = {
            1: builder.nn.BatchNorm1d,
            2: builder.nn.BatchNorm1d,
            3: builder.nn.BatchNorm2d,
            4: builder.nn.BatchNorm3d,
        }[rank]
        # round(): 1 - 0.99 is 0.010000000000000009 in floats; torch's momentum is the written 0.01
        norm = module_class(
            self._channels(context),
            eps=config.epsilon,
            momentum=round(1.0 - config.momentum, 12),
            affine=config.center or config.scale,
            device="meta",
            dtype=builder.dtype(context),
        )
        dim = torch_axis(config.axis, rank, context.node.name)
        if dim == 1:
            return builder.module(context, norm, inputs[0])
        value = builder.module(context, norm, builder.call(builder.torch.movedim, inputs[0], dim, 1))
        return builder.call(builder.torch.movedim, value, 1, dim)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        renorm = {}
        if config.renorm:
            clipping = config.renorm_clipping
            renorm = {
                "renorm": True,
                "renorm_momentum": config.renorm_momentum,
                "renorm_clipping": None
                if clipping is None
                else {key: value for key, value in zip(RENORM_CLIPPING_KEYS, clipping) if value is not None},
            }
        return keras.layers.BatchNormalization(
            axis=config.axis,
            momentum=config.momentum,
            epsilon=config.epsilon,
            center=config.center,
            scale=config.scale,
            **renorm,
            **context.keras_identity,
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        if context.config.mask_input:
            return keras_layer(arguments[0], mask=arguments[-1])
        return keras_layer(arguments[0])


@dataclass(frozen=True)
class NormalizationConfig:
    axis: int | tuple[int, ...] = -1  # the axes kept (one mean per position); () for Keras's None
    invert: bool = False
    mean: tuple[float, ...] | None = None  # given in the Keras config: constants, not weights
    variance: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_axes(self.axis, "Normalization axis", allow_none=True)
        if (self.mean is None) != (self.variance is None):
            raise ExchangeError("Normalization mean and variance must be given together")


@register
class Normalization(LayerKind):
    kind, keras_classes, Config = "normalization", ("Normalization",), NormalizationConfig
    casts_integers = True
    passes_mask = True

    def from_keras(self, options: KerasOptions) -> NormalizationConfig:
        constants = {}
        for key in ("mean", "variance"):
            value = options.take(key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            if value is not None and not (
                isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise options.unsupported(key, value, "a number or a list of numbers per channel")
            constants[key] = None if value is None else tuple(float(v) for v in value)
        if (constants["mean"] is None) != (constants["variance"] is None):
            raise options.unsupported("mean", constants["mean"], "mean and variance are given together")
        return NormalizationConfig(_axes(options), options.flag("invert", False), **constants)

    def _kept(self, config: NormalizationConfig, shape: Shape) -> tuple[int, ...]:
        return norm_axes(config.axis, shape, "Normalization", sorted_as_written=False) if config.axis != () else ()

    def _per_channel(self, config: NormalizationConfig, shape: Shape) -> bool:
        """Whether one value per channel (or one value) holds the statistics: the torch module's
        (C,) form."""
        return self._kept(config, shape) == (len(shape),) or (config.mean is not None and len(config.mean) == 1)

    def output_shape(self, config: NormalizationConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        self._kept(config, shape)
        channels = shape[-1]
        for values in (config.mean, config.variance):
            if values is None:
                continue
            if not self._per_channel(config, shape):
                raise UnsupportedLayerError(
                    f"Normalization: {len(values)} values given for axis {config.axis}; "
                    "only one value, or one per channel of the last axis, is supported"
                )
            if len(values) not in (1, channels):
                raise UnsupportedLayerError(f"Normalization: {len(values)} values for {channels} channels")
        return input_shapes[0]

    def _broadcast(self, config: NormalizationConfig, shape: Shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(Keras shape of the statistics, their Keras broadcast shape: 1 along the other axes)."""
        kept = self._kept(config, shape)
        keras = tuple(known(shape[axis - 1], "a kept axis") for axis in kept)
        return keras, tuple(known(size, "a kept axis") if axis + 1 in kept else 1 for axis, size in enumerate(shape))

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config, shape = context.config, context.input_shape
        if config.mean is not None:
            return []
        steps: tuple[Step, ...]
        keras: tuple[int, ...]
        if self._per_channel(config, shape):
            keras, steps = (known(shape[-1], "channels"),), ()
        else:  # Keras's statistics -> their broadcast shape, Keras layout -> channels-first
            keras, broadcast = self._broadcast(config, shape)
            steps = (Reshape(keras, broadcast),)
            if len(shape) >= 2:
                steps += (Permute((len(shape) - 1,) + tuple(range(len(shape) - 1))),)
        return [
            Port("mean", "mean", steps, shape=keras, buffer=True),
            Port("variance", "variance", steps, shape=keras, buffer=True),
            KerasOnly("count", why="the number of samples seen by adapt()", shape=()),
        ]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, shape = context.config, context.input_shape
        broadcast = None if self._per_channel(config, shape) else torch_shape(self._broadcast(config, shape)[1])
        module = builder.helpers.KerasNormalization(
            shape[-1],
            len(shape),
            config.invert,
            KERAS_EPSILON,
            dtype=builder.dtype(context),
            constant_mean=config.mean,
            constant_variance=config.variance,
            shape=broadcast,
        )
        return builder.module(context, module, inputs[0])

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        constants = {}
        if config.mean is not None:  # one value as a number: Keras refuses a list longer than its axes
            constants = {
                key: values[0] if len(values) == 1 else list(values)
                for key, values in (("mean", config.mean), ("variance", config.variance))
            }
        axis = list(config.axis) if isinstance(config.axis, tuple) else config.axis
        return keras.layers.Normalization(
            axis=axis if axis != [] else None, invert=config.invert, **context.keras_identity, **constants
        )


@dataclass(frozen=True)
class RescalingConfig:
    scale: float | tuple[float, ...] = 1.0  # one number, or one per channel
    offset: float | tuple[float, ...] = 0.0


@register
class Rescaling(LayerKind):
    """x * scale + offset. Per-channel values (keras.applications' EfficientNet) become a small
    module holding them as constants in the channels-first layout."""

    kind, keras_classes, Config = "rescaling", ("Rescaling",), RescalingConfig
    casts_integers = True
    passes_mask = True
    keeps_element_order = True

    def keeps_order(self, config: RescalingConfig) -> bool:
        # one value per channel is tied to the element order: a permuted Flatten cannot pass
        return not isinstance(config.scale, tuple) and not isinstance(config.offset, tuple)

    def from_keras(self, options: KerasOptions) -> RescalingConfig:
        values: dict[str, float | tuple[float, ...]] = {}
        for key, default in (("scale", 1.0), ("offset", 0.0)):
            value = options.take(key, default)
            if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                values[key] = tuple(float(v) for v in value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value)
            else:
                raise options.unsupported(key, value, "a number or a list of numbers per channel")
        return RescalingConfig(**values)

    def output_shape(self, config: RescalingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        for values in (config.scale, config.offset):
            if isinstance(values, tuple) and len(values) not in (1, input_shapes[0][-1]):
                raise UnsupportedLayerError(f"Rescaling: {len(values)} values for {input_shapes[0][-1]} channels")
        return input_shapes[0]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        if isinstance(config.scale, tuple) or isinstance(config.offset, tuple):
            module = builder.helpers.ChannelAffine(config.scale, config.offset, len(context.input_shape))
            return builder.module(context, module, inputs[0])
        value = builder.call(builder.torch.mul, inputs[0], config.scale)
        return builder.call(builder.torch.add, value, config.offset)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        scale, offset = (list(v) if isinstance(v, tuple) else v for v in (config.scale, config.offset))
        return keras.layers.Rescaling(scale, offset, **context.keras_identity)


@dataclass(frozen=True)
class LayerNormConfig:
    axis: int | tuple[int, ...] = -1
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True
    rms_scaling: bool = field(default=False, metadata=OMIT_DEFAULT)  # Keras's formula: see the docstring

    def __post_init__(self) -> None:
        _check_axes(self.axis, "LayerNormalization axis")


def _affine_ports(config: Any, channels: tuple[int, ...], bias_optional: bool = False) -> list[AnyPort]:
    """gamma/beta as torch weight/bias. torch's affine norms hold both or neither (LayerNorm can
    drop the bias alone: `bias_optional`): with one of them off in Keras, torch holds it as a
    constant (weight 1, bias 0) that Keras cannot change, so torch -> Keras refuses another value."""
    ports: list[AnyPort] = []
    if config.scale:
        ports.append(Port("gamma", "weight", shape=channels))
    elif config.center:
        ports.append(TorchOnly("weight", channels, 1.0, must_equal_fill=True, why="Keras scale=False"))
    if config.center:
        ports.append(Port("beta", "bias", shape=channels))
    elif config.scale and not bias_optional:
        ports.append(TorchOnly("bias", channels, 0.0, must_equal_fill=True, why="Keras center=False"))
    return ports


def _keras_axis(axis: Axes) -> int | list[int]:
    """An axis config value as Keras takes it: an int, or a list."""
    return list(axis) if isinstance(axis, tuple) else axis


def _normalised_shape(context: NodeContext, where: str) -> tuple[int, ...]:
    """The sizes of the axes a LayerNormalization or RMSNormalization normalises: its weights'."""
    axes = norm_axes(context.config.axis, context.input_shape, where)
    return tuple(known(context.input_shape[axis - 1], where) for axis in axes)


@register
class LayerNormalization(LayerKind):
    """`nn.LayerNorm` over the normalised axes moved last (see the module docstring). Keras's
    epsilon (1e-3) is written out (torch's is 1e-5); `scale=False` alone is `bias=False` in torch."""

    kind, keras_classes, Config = "layer_norm", ("LayerNormalization",), LayerNormConfig
    passes_mask = True

    def from_keras(self, options: KerasOptions) -> LayerNormConfig:
        return LayerNormConfig(
            _axes(options),
            options.number("epsilon", 1e-3),
            options.flag("center", True),
            options.flag("scale", True),
            options.flag("rms_scaling", False),
        )

    def output_shape(self, config: LayerNormConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        norm_axes(config.axis, input_shapes[0], "LayerNormalization")
        return input_shapes[0]

    def ports(self, context: NodeContext) -> list[AnyPort]:
        shape = _normalised_shape(context, "LayerNormalization")
        if context.config.rms_scaling:  # Keras keeps gamma, never beta
            return [Port("gamma", "weight", shape=shape)]
        return _affine_ports(context.config, shape, bias_optional=True)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, shape = context.config, _normalised_shape(context, "LayerNormalization")
        if config.rms_scaling:
            norm = builder.helpers.KerasRMSScaledLayerNorm(
                shape, config.epsilon, device="meta", dtype=builder.dtype(context)
            )
        else:
            norm = builder.nn.LayerNorm(
                shape,
                eps=config.epsilon,
                elementwise_affine=config.center or config.scale,
                bias=config.center,
                device="meta",
                dtype=builder.dtype(context),
            )
        axes = norm_axes(config.axis, context.input_shape, "LayerNormalization")
        value, back = _axes_last(builder, inputs[0], axes, len(context.input_shape))
        return back(builder.module(context, norm, value))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.LayerNormalization(
            axis=_keras_axis(config.axis),
            epsilon=config.epsilon,
            center=config.center,
            scale=config.scale,
            rms_scaling=config.rms_scaling,
            **context.keras_identity,
        )


@dataclass(frozen=True)
class RMSNormConfig:
    axis: int | tuple[int, ...] = -1
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        _check_axes(self.axis, "RMSNormalization axis")


@register
class RMSNormalization(LayerKind):
    """`nn.RMSNorm` over the normalised axes moved last (see the module docstring)."""

    kind, keras_classes, Config = "rms_norm", ("RMSNormalization",), RMSNormConfig

    def from_keras(self, options: KerasOptions) -> RMSNormConfig:
        return RMSNormConfig(_axes(options), options.number("epsilon", 1e-6))

    def output_shape(self, config: RMSNormConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        axes, rank = norm_axes(config.axis, input_shapes[0], "RMSNormalization"), len(input_shapes[0])
        if axes != tuple(range(rank - len(axes) + 1, rank + 1)):
            raise UnsupportedLayerError(
                f"RMSNormalization axis {_keras_axis(config.axis)} of an input of shape "
                f"{list(input_shapes[0])}: Keras multiplies its scale along the last "
                f"{len(axes)} axes (broadcasting), not the normalised ones; only the last "
                "axes are supported"
            )
        return input_shapes[0]

    def ports(self, context: NodeContext) -> list[AnyPort]:
        return [Port("scale", "weight", shape=_normalised_shape(context, "RMSNormalization"))]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        norm = builder.nn.RMSNorm(
            _normalised_shape(context, "RMSNormalization"),
            eps=config.epsilon,
            device="meta",
            dtype=builder.dtype(context),
        )
        axes = norm_axes(config.axis, context.input_shape, "RMSNormalization")
        value, back = _axes_last(builder, inputs[0], axes, len(context.input_shape))
        return back(builder.module(context, norm, value))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.RMSNormalization(
            axis=_keras_axis(config.axis), epsilon=config.epsilon, **context.keras_identity
        )


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
    """Keras groups contiguous channels as `nn.GroupNorm` does (channel c in group c // (C/groups)),
    along its `axis`; `nn.GroupNorm` takes them at dim 1, where the torch side moves that axis."""

    kind, keras_classes, Config = "group_norm", ("GroupNormalization",), GroupNormConfig
    passes_mask = True

    def from_keras(self, options: KerasOptions) -> GroupNormConfig:
        return GroupNormConfig(
            options.integer("groups", 32),
            _one_axis(options),
            options.number("epsilon", 1e-3),
            options.flag("center", True),
            options.flag("scale", True),
        )

    def channels(self, config: GroupNormConfig, shape: Shape) -> int | None:
        """The size of the grouped axis."""
        return shape[check_axis(config.axis, len(shape)) - 1]

    def known_channels(self, context: NodeContext) -> int:
        return known(self.channels(context.config, context.input_shape), "GroupNormalization axis")

    def output_shape(self, config: GroupNormConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        channels = self.channels(config, input_shapes[0])
        if channels is None or config.groups < 1 or channels % config.groups:
            raise UnsupportedLayerError(
                f"GroupNormalization: {channels} channels do not split into {config.groups} groups"
            )
        return input_shapes[0]

    def ports(self, context: NodeContext) -> list[AnyPort]:
        return _affine_ports(context.config, (self.known_channels(context),))

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, rank = context.config, len(context.input_shape)
        norm = builder.nn.GroupNorm(
            config.groups,
            self.known_channels(context),
            eps=config.epsilon,
            affine=config.center or config.scale,
            device="meta",
            dtype=builder.dtype(context),
        )
        dim = torch_axis(config.axis, rank, context.node.name)
        if dim == 1:
            return builder.module(context, norm, inputs[0])
        value = builder.module(context, norm, builder.call(builder.torch.movedim, inputs[0], dim, 1))
        return builder.call(builder.torch.movedim, value, 1, dim)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.GroupNormalization(
            groups=config.groups,
            axis=config.axis,
            epsilon=config.epsilon,
            center=config.center,
            scale=config.scale,
            **context.keras_identity,
        )


@dataclass(frozen=True)
class UnitNormConfig:
    axis: int | tuple[int, ...] = -1

    def __post_init__(self) -> None:
        _check_axes(self.axis, "UnitNormalization axis")


@register
class UnitNormalization(LayerKind):
    """x / max(‖x‖₂, 1e-12) over the axes (see the module docstring)."""

    kind, keras_classes, Config = "unit_norm", ("UnitNormalization",), UnitNormConfig
    passes_mask = True

    def from_keras(self, options: KerasOptions) -> UnitNormConfig:
        return UnitNormConfig(_axes(options))

    def output_shape(self, config: UnitNormConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        norm_axes(config.axis, input_shapes[0], "UnitNormalization", sorted_as_written=False)
        return input_shapes[0]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        rank, torch = len(context.input_shape), builder.torch
        axes = norm_axes(context.config.axis, context.input_shape, "UnitNormalization", sorted_as_written=False)
        dims = [torch_axis(axis, rank, context.node.name) for axis in axes]
        if len(dims) == 1:
            return builder.call(builder.F.normalize, inputs[0], p=2.0, dim=dims[0], eps=UNIT_NORM_EPSILON)
        # Keras's x * min(rsqrt(sum(x²)), 1 / epsilon), written out
        squares = builder.call(torch.sum, builder.call(torch.square, inputs[0]), dim=dims, keepdim=True)
        scale = builder.call(torch.clamp, builder.call(torch.rsqrt, squares), max=1.0 / UNIT_NORM_EPSILON)
        return builder.call(torch.mul, inputs[0], scale)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.UnitNormalization(axis=_keras_axis(context.config.axis), **context.keras_identity)


@dataclass(frozen=True)
class LayerScaleConfig:
    init_values: float = 1e-6


@register
class LayerScale(LayerKind):
    """keras.applications' ConvNeXt LayerScale: x * gamma per channel (gamma is a weight). ConvNeXt
    adds its gamma without a name, so Keras calls it `variable`; torch's `ChannelScale` calls it
    `gamma`."""

    kind, keras_classes, Config = "layer_scale", ("LayerScale",), LayerScaleConfig
    keeps_element_order = False

    def from_keras(self, options: KerasOptions) -> LayerScaleConfig:
        options.take("projection_dim")  # the channel count, known from the input shape
        return LayerScaleConfig(options.number("init_values", 1e-6))

    def ports(
        self, context: NodeContext
    ) -> list[AnyPort]:  # ConvNeXt adds its gamma without a name: Keras calls it `variable`
        return [Port("variable", "gamma", shape=(known(context.input_shape[-1], "LayerScale channels"),))]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        module = builder.helpers.ChannelScale(
            context.input_shape[-1], len(context.input_shape), dtype=builder.dtype(context)
        )
        return builder.module(context, module, inputs[0])

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        from keras.src.applications.convnext import LayerScale as KerasLayerScale

        return KerasLayerScale(context.config.init_values, context.input_shape[-1], **context.keras_identity)
