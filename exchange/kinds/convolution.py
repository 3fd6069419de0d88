"""Convolutions over 1, 2 or 3 spatial axes: Conv1D/2D/3D, Conv1D/2D/3DTranspose,
DepthwiseConv1D/2D, SeparableConv1D/2D.

Conventions that differ:
- Kernels: Keras (k…, in, out), torch (out, in, k…): one permutation. A transposed convolution
  stores (k…, out, in) against torch's (in, out, k…): the same permutation, the channel axes
  meaning the opposite. A depthwise kernel (k…, in, multiplier) is torch's (in·multiplier, 1, k…)
  with groups = in (output channel i·multiplier + j in both). A separable convolution is one Keras
  layer and two torch convolutions (`name.depthwise`, `name.pointwise`). Kernels have these
  shapes whatever the `data_format`.
- `same` padding: TensorFlow pads total = (out − 1)·stride + dilated kernel − in, with the extra
  cell at the end (bottom/right/back) when the total is odd; torch's `padding=` is symmetric.
  Where the two sides differ the torch side pads explicitly (`F.pad`) before a convolution with
  no padding. `causal` (1-D) pads only at the start.
- A transposed convolution's output length is Keras's: (in − 1)·stride + dilated kernel, plus
  `output_padding` (`valid`; by default what reaches max(kernel, stride)), or in·stride (`same`;
  with `output_padding`, (in − 1)·stride + kernel % 2 + output_padding). TensorFlow computes it
  as the gradient of the `same`/`valid` convolution of that length: of torch's full result
  ((in − 1)·stride + dilated kernel cells) it keeps the cells from (full − out) // 2 on (`same`;
  0 for `valid`), cells past the full result being the bias alone. Torch's symmetric `padding=`
  crops, its `output_padding` extends the end; what they cannot say is a `narrow` per axis.
- `data_format="channels_first"`: Keras's tensor is (N, C, d1, …, dk); the torch side holds every
  tensor with the last Keras axis second, (N, dk, C, d1, …). The torch form permutes it to
  (N, C, d1, …, dk), torch's own layout, computes, and permutes back; between two such layers the
  two permutes cancel (`TorchGraphBuilder.call`).
- LoRA on Conv1D/2D/3D (`lora_rank`, see `exchange.kinds.dense` for LoRA's conventions): Keras
  adds (lora_alpha / lora_rank) * lora_kernel_a @ lora_kernel_b, a (k…, in/groups, rank) by
  (rank, filters) matmul, to the kernel. The torch side is `LoRAConv`: `lora_a` (rank, in/groups,
  k…), Keras's lora_kernel_a permuted as a kernel, and `lora_b` (filters, rank), lora_kernel_b
  transposed, merged in `forward` the same way. Conv layers keep lora_alpha (unlike Dense).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_FEATURES,
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
from exchange.kinds.activations import check_activation, keras_activation, torch_activation
from exchange.kinds.axis_order import to_keras_order, to_torch_order
from exchange.kinds.dense import check_lora, check_lora_dtype, lora_keras_args, read_lora
from exchange.ports import Permute, Port, Reshape, Step

if TYPE_CHECKING:
    from exchange.graph import NodeContext, Shape
    from exchange.ports import AnyPort

PADDINGS = ("valid", "same", "causal")
DATA_FORMATS = ("channels_last", "channels_first")
SPATIAL_AXES = (1, 2, 3)
# The most cells a `same` or `causal` padding may add to one input (all spatial axes, one channel
# and example): torch's F.pad and TensorFlow materialise the padded tensor. A 3x3 window adds about
# 33,000 cells to a 8192x8192 image, a 7x7 one 3,300 to ResNet's 224x224; the cap stops a window far
# larger than its input (a pooling of 8192 cells on an 8x8 image would add 67 million per channel).
MAX_ADDED_CELLS = 1 << 22


def check_window(
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    dilation_rate: tuple[int, ...],
    padding: str,
    spatial: tuple[int, ...],
    what: str,
    paddings: tuple[str, ...] = PADDINGS,
) -> None:
    """The sizes of a sliding window (a convolution's or a pooling's), whichever source they come
    from: 1 to 3 spatial axes, each size positive and under the caps, a known padding, and (as
    Keras and TensorFlow require) not strides > 1 together with dilation > 1."""
    check_ints(kernel_size, f"{what} kernel size", MAX_WINDOW, count=spatial)
    check_ints(strides, f"{what} strides", MAX_WINDOW, count=(len(kernel_size),))
    check_ints(dilation_rate, f"{what} dilation_rate", MAX_WINDOW, count=(len(kernel_size),))
    for kernel, dilation in zip(kernel_size, dilation_rate):
        check_int((kernel - 1) * dilation + 1, f"{what} dilated kernel size", MAX_WINDOW)
    check_choice(padding, paddings if len(kernel_size) == 1 else ("valid", "same"), f"{what} padding")
    if max(strides) > 1 and max(dilation_rate) > 1:
        raise ExchangeError(
            f"{what}: strides {list(strides)} > 1 together with dilation_rate "
            f"{list(dilation_rate)} > 1 is not supported (Keras refuses it)"
        )


def read_data_format(options: KerasOptions) -> str:
    """A layer's `data_format`; absent or None is Keras's default, channels_last."""
    value = options.take("data_format", None)
    if value is None:
        return "channels_last"
    if value not in DATA_FORMATS:
        raise options.unsupported("data_format", value)
    return cast(str, value)


def split_channels(shape: Shape, spatial: int, data_format: str) -> tuple[Shape, int | None]:
    """(spatial sizes, channels) of a Keras shape (no batch axis) of a layer with `spatial` axes."""
    if len(shape) != spatial + 1:
        raise ExchangeError(f"expects rank-{spatial + 2} input, found shape (batch, {shape})")
    if data_format == "channels_first":
        return tuple(shape[1:]), shape[0]
    return tuple(shape[:-1]), shape[-1]


def join_channels(sizes: Shape, channels: int | None, data_format: str) -> Shape:
    """The Keras shape of spatial `sizes` and `channels` in `data_format`."""
    return (channels,) + tuple(sizes) if data_format == "channels_first" else tuple(sizes) + (channels,)


def to_torch_layout(builder: TorchBuilder, value: TorchValue, data_format: str, rank: int) -> TorchValue:
    """The layer's input as torch's convolutions and poolings take it, (N, C, d…). The torch side
    already holds a channels_last tensor so; a channels_first one is held (N, dk, C, d1, …) and is
    permuted to Keras's own order. `rank`: the Keras shape's length without the batch axis."""
    if data_format == "channels_last":
        return value
    return builder.call(builder.torch.permute, value, to_keras_order(rank))


def from_torch_layout(builder: TorchBuilder, value: TorchValue, data_format: str, rank: int) -> TorchValue:
    """The inverse of `to_torch_layout` on the layer's output."""
    if data_format == "channels_last":
        return value
    return builder.call(builder.torch.permute, value, to_torch_order(rank))


def window_output_sizes(
    spatial: Shape,
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    dilation_rate: tuple[int, ...],
    padding: str,
) -> Shape:
    """The spatial output sizes of a sliding window over spatial sizes `spatial`: a `valid` window
    must fit the input; a `same` or `causal` padding must add at most `MAX_ADDED_CELLS`."""
    if len(spatial) != len(kernel_size):
        raise ExchangeError(f"a {len(kernel_size)}-D window cannot slide over spatial sizes {list(spatial)}")
    unpadded = padded = 1
    for size, kernel, stride, dilation in zip(spatial, kernel_size, strides, dilation_rate):
        if size is None and stride > 1 and padding == "same":
            before, after = (kernel - 1) * dilation, 0  # at most the dilated window less one
        else:
            before, after = tf_padding(size, kernel, stride, dilation, padding, "window")
        unpadded *= 1 if size is None else size
        padded *= (1 if size is None else size) + before + after
    if padded - unpadded > MAX_ADDED_CELLS:
        raise ExchangeError(
            f"{padding!r} padding of a {list(kernel_size)} window (dilation {list(dilation_rate)}) "
            f"adds {padded - unpadded:,} cells to input {list(spatial)}, more than the "
            f"{MAX_ADDED_CELLS:,} allowed"
        )
    return tuple(
        conv_output_size(size, k, s, d, padding) for size, k, s, d in zip(spatial, kernel_size, strides, dilation_rate)
    )


def conv_output_size(size: int | None, kernel: int, stride: int, dilation: int, padding: str) -> int | None:
    """Keras's output length of a convolution or pooling along one axis (None stays None)."""
    if size is None:
        return None
    effective = (kernel - 1) * dilation + 1
    length = size if padding in ("same", "causal") else size - effective + 1
    if length < 1:
        raise ExchangeError(f"input size {size} is smaller than the kernel ({effective})")
    return (length + stride - 1) // stride


def tf_padding(size: int | None, kernel: int, stride: int, dilation: int, padding: str, where: str) -> tuple[int, int]:
    """(before, after) cells TensorFlow pads along one axis."""
    effective = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (0, 0)
    if padding == "causal":
        return (effective - 1, 0)
    if size is None:
        if stride == 1:
            total = effective - 1
        else:
            raise UnsupportedLayerError(f"{where}: `same` padding with stride {stride} needs a fixed input size")
    else:
        total = max((ceil(size / stride) - 1) * stride + effective - size, 0)
    return (total // 2, total - total // 2)


def torch_pad_argument(pads: list[tuple[int, int]]) -> tuple[int, ...]:
    """`F.pad`'s argument: (before, after) pairs from the last axis to the first."""
    return tuple(amount for pair in reversed(pads) for amount in pair)


def kernel_permutation(spatial: int) -> tuple[int, ...]:
    """Keras kernel (k…, a, b) -> torch (b, a, k…)."""
    return (spatial + 1, spatial) + tuple(range(spatial))


def bias_ports(config: Any, size: int, torch_key: str = "bias") -> list[Port]:
    """The bias of a layer with `use_bias`: (size,) in both frameworks."""
    return [Port("bias", torch_key, shape=(size,))] if config.use_bias else []


@dataclass(frozen=True)
class ConvConfig:
    filters: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str = "valid"
    dilation_rate: tuple[int, ...] = (1,)
    groups: int = 1
    activation: str = "linear"
    use_bias: bool = True
    # A transposed convolution's extra output cells per axis (None: Keras's default length).
    output_padding: tuple[int, ...] | None = field(default=None, metadata=OMIT_DEFAULT)
    data_format: str = field(default="channels_last", metadata=OMIT_DEFAULT)
    lora_rank: int | None = field(default=None, metadata=OMIT_DEFAULT)
    lora_alpha: float | None = field(default=None, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_lora(self.lora_rank, self.lora_alpha, "convolution")
        check_window(self.kernel_size, self.strides, self.dilation_rate, self.padding, SPATIAL_AXES, "convolution")
        check_int(self.filters, "convolution filters", MAX_FEATURES)
        check_int(self.groups, "convolution groups", MAX_FEATURES)
        if self.filters % self.groups:  # Keras refuses filters that do not split into the groups
            raise ExchangeError(f"convolution filters {self.filters} do not split into {self.groups} groups")
        check_activation(self.activation, "convolution")
        check_choice(self.data_format, DATA_FORMATS, "convolution data_format")
        if self.output_padding is not None:
            check_ints(
                self.output_padding,
                "convolution output_padding",
                MAX_WINDOW - 1,
                minimum=0,
                count=(len(self.kernel_size),),
            )
            if any(extra >= stride for extra, stride in zip(self.output_padding, self.strides)):
                raise ExchangeError(
                    f"convolution output_padding {list(self.output_padding)} must be below the "
                    f"strides {list(self.strides)} (Keras refuses it)"
                )


class _Convolution(LayerKind):
    """Shared by the convolution kinds: options, padding, output shape, the torch padding step."""

    spatial = 2
    one_group = True  # all but Conv1D/2D/3D: groups must be 1
    transposed = False  # only transposed convolutions take output_padding
    causal = False  # only Conv1D takes `causal` padding (Keras refuses it elsewhere)
    takes_lora = False  # only Conv1D/2D/3D take a LoRA adapter

    def output_activation(self, config: ConvConfig) -> str | None:
        return config.activation  # Keras's call ends with `self.activation(x)`

    def read_common(self, options: KerasOptions, filters: int | None, kernel_key: str = "kernel_size") -> ConvConfig:
        if self.takes_lora:
            lora_rank, lora_alpha = read_lora(options, honours_alpha=True)
        else:
            options.expect("lora_rank", None)
            options.expect("lora_alpha", None)
            lora_rank = lora_alpha = None
        padding = options.take("padding", "valid")
        if padding not in PADDINGS or (padding == "causal" and not self.causal):
            raise options.unsupported("padding", padding)
        return ConvConfig(
            filters=0 if filters is None else int(filters),
            kernel_size=options.sizes(kernel_key, self.spatial),
            strides=options.sizes("strides", self.spatial, 1),
            padding=padding,
            dilation_rate=options.sizes("dilation_rate", self.spatial, 1),
            groups=options.integer("groups", 1),
            activation=options.activation(),
            use_bias=options.flag("use_bias", True),
            data_format=read_data_format(options),
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
        )

    def check_config(self, config: ConvConfig) -> None:
        """What this kind of convolution takes of the shared `ConvConfig` (checked in shape inference)."""
        if len(config.kernel_size) != self.spatial:
            raise ExchangeError(f"kernel size {list(config.kernel_size)} has not {self.spatial} spatial axes")
        if self.one_group and config.groups != 1:
            raise ExchangeError(f"groups must be 1, got {config.groups}")
        if config.output_padding is not None and not self.transposed:
            raise ExchangeError("only a transposed convolution takes output_padding")
        if config.padding == "causal" and not self.causal:
            raise ExchangeError("only Conv1D takes causal padding")
        if config.lora_rank is not None and not self.takes_lora:
            raise ExchangeError("only Conv1D/2D/3D take a LoRA adapter")

    def channels(self, config: ConvConfig, shape: Shape) -> tuple[Shape, int]:
        """(spatial sizes, channels) of the input, the channel count known."""
        sizes, channels = split_channels(shape, self.spatial, config.data_format)
        if channels is None:
            raise ExchangeError(f"needs a known channel axis, found input shape (batch, {shape})")
        return sizes, channels

    def output_shape(self, config: Any, input_shapes: tuple[Shape, ...]) -> Shape:
        self.check_config(config)
        sizes, channels = self.channels(config, input_shapes[0])
        out_sizes = window_output_sizes(sizes, config.kernel_size, config.strides, config.dilation_rate, config.padding)
        if channels % config.groups:
            raise ExchangeError(f"{channels} input channels do not split into {config.groups} groups")
        return join_channels(out_sizes, self.out_channels(config, channels), config.data_format)

    def out_channels(self, config: ConvConfig, in_channels: int) -> int:
        return config.filters

    def in_channels(self, context: NodeContext) -> int:
        return self.channels(context.config, context.input_shape)[1]

    def padded(
        self, builder: TorchBuilder, context: NodeContext, value: TorchValue
    ) -> tuple[TorchValue, tuple[int, ...]]:
        """Apply TensorFlow's padding to the (N, C, d…) input; returns (value, symmetric padding
        left for the conv)."""
        config = context.config
        sizes = self.channels(config, context.input_shape)[0]
        pads = [
            tf_padding(size, k, s, d, config.padding, context.node.name)
            for size, k, s, d in zip(sizes, config.kernel_size, config.strides, config.dilation_rate)
        ]
        if all(before == after for before, after in pads):
            return value, tuple(before for before, _ in pads)
        return builder.call(builder.F.pad, value, torch_pad_argument(pads)), (0,) * self.spatial

    def conv_module(self, builder: TorchBuilder) -> Any:
        return (builder.nn.Conv1d, builder.nn.Conv2d, builder.nn.Conv3d)[self.spatial - 1]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        value = to_torch_layout(builder, inputs[0], config.data_format, len(context.input_shape))
        value, padding = self.padded(builder, context, value)
        value = builder.module(context, self.torch_module(builder, context, padding), value)
        value = torch_activation(builder, config.activation, value)
        return from_torch_layout(builder, value, config.data_format, len(context.output_shape))

    def torch_module(self, builder: TorchBuilder, context: NodeContext, padding: tuple[int, ...]) -> Any:
        """The torch module of this convolution, given the symmetric padding it applies."""
        raise NotImplementedError

    def keras_options(self, config: ConvConfig) -> dict[str, Any]:
        return dict(
            kernel_size=config.kernel_size,
            strides=config.strides,
            padding=config.padding,
            dilation_rate=config.dilation_rate,
            data_format=config.data_format,
            activation=keras_activation(config.activation, "convolution"),
            use_bias=config.use_bias,
        )


@register
class Conv2D(_Convolution):
    kind, keras_classes, Config = "conv2d", ("Conv2D", "Convolution2D"), ConvConfig
    spatial, one_group, takes_lora = 2, False, True

    def from_keras(self, options: KerasOptions) -> ConvConfig:
        return self.read_common(options, options.take("filters"))  # ConvConfig checks the groups

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config, in_channels = context.config, self.in_channels(context)
        if in_channels % config.groups or config.filters % config.groups:
            raise ExchangeError(
                f"layer {context.node.name!r}: {in_channels} input channels and "
                f"{config.filters} filters do not split into {config.groups} groups"
            )
        kernel_shape = config.kernel_size + (in_channels // config.groups, config.filters)
        kernel_steps = (Permute(kernel_permutation(self.spatial)),)
        ports: list[AnyPort] = [
            Port("kernel", "weight", kernel_steps, shape=kernel_shape),
            *bias_ports(config, config.filters),
        ]
        if config.lora_rank is not None:
            check_lora_dtype(context)
            ports += [
                Port("lora_kernel_a", "lora_a", kernel_steps, shape=kernel_shape[:-1] + (config.lora_rank,)),
                Port("lora_kernel_b", "lora_b", (Permute((1, 0)),), shape=(config.lora_rank, config.filters)),
            ]
        return ports

    def merged_when_saved(self, config: ConvConfig) -> tuple[str, ...]:
        return () if config.lora_rank is None else ("lora_kernel_a", "lora_kernel_b")

    def torch_module(self, builder: TorchBuilder, context: NodeContext, padding: tuple[int, ...]) -> Any:
        config = context.config
        window = dict(
            stride=config.strides,
            padding=padding,
            dilation=config.dilation_rate,
            groups=config.groups,
            bias=config.use_bias,
            device="meta",
            dtype=builder.dtype(context),
        )
        if config.lora_rank is not None:
            scale = config.lora_alpha / config.lora_rank
            return builder.helpers.LoRAConv(
                self.in_channels(context), config.filters, config.kernel_size, config.lora_rank, scale=scale, **window
            )
        return self.conv_module(builder)(
            self.in_channels(context), config.filters, kernel_size=config.kernel_size, **window
        )

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        layer_class = getattr(keras.layers, self.keras_classes[0])
        return layer_class(
            config.filters,
            groups=config.groups,
            **context.keras_identity,
            **self.keras_options(config),
            **lora_keras_args(config),
        )


@register
class Conv1D(Conv2D):
    kind, keras_classes, Config = "conv1d", ("Conv1D", "Convolution1D"), ConvConfig
    spatial, causal = 1, True


@register
class Conv3D(Conv2D):
    kind, keras_classes, Config = "conv3d", ("Conv3D", "Convolution3D"), ConvConfig
    spatial = 3


@register
class Conv2DTranspose(_Convolution):
    kind, keras_classes, Config = "conv2d_transpose", ("Conv2DTranspose", "Convolution2DTranspose"), ConvConfig
    spatial, transposed = 2, True

    def from_keras(self, options: KerasOptions) -> ConvConfig:
        output_padding = options.take("output_padding", None)
        config = self.read_common(options, options.take("filters"))
        if config.groups != 1:
            raise options.unsupported("groups", config.groups)
        if output_padding is not None:
            output_padding = options.sizes("output_padding", self.spatial)
        return ConvConfig(**{**config.__dict__, "output_padding": output_padding})

    def _lengths(self, config: ConvConfig, size: int | None, axis: int) -> tuple[int, int]:
        """(Keras's output length, torch's full length) along one spatial axis."""
        kernel = (config.kernel_size[axis] - 1) * config.dilation_rate[axis] + 1
        stride = config.strides[axis]
        extra = None if config.output_padding is None else config.output_padding[axis]
        size = 1 if size is None else size  # the difference does not depend on the size
        full = (size - 1) * stride + kernel
        if config.padding == "valid":
            target = full + (max(kernel, stride) - kernel if extra is None else extra)
        else:
            target = size * stride if extra is None else (size - 1) * stride + kernel % 2 + extra
        return target, full

    def output_shape(self, config: ConvConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        self.check_config(config)
        sizes, _ = self.channels(config, input_shapes[0])
        out_sizes = []
        for axis, size in enumerate(sizes):
            target = None if size is None else self._lengths(config, size, axis)[0]
            if target is not None and target < 1:
                raise ExchangeError(f"output_padding {list(config.output_padding or ())} gives an empty output")
            out_sizes.append(target)
        return join_channels(tuple(out_sizes), config.filters, config.data_format)

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config = context.config
        kernel_shape = config.kernel_size + (config.filters, self.in_channels(context))
        return [
            Port("kernel", "weight", (Permute(kernel_permutation(self.spatial)),), shape=kernel_shape),
            *bias_ports(config, config.filters),
        ]

    def torch_plan(self, context: NodeContext) -> list[tuple[int, int, tuple[int, int] | None]]:
        """Per spatial axis: (torch padding, torch output_padding, (start, length) of a `narrow`
        or None) that give TensorFlow's cells (see the module docstring)."""
        config = context.config
        plan = []
        for axis, size in enumerate(self.channels(config, context.input_shape)[0]):
            target, full = self._lengths(config, size, axis)
            start = max(full - target, 0) // 2 if config.padding == "same" else 0
            end = start + target
            limit = max(config.strides[axis], config.dilation_rate[axis])  # torch's bound on output_padding
            if end <= full:
                padding, extra = min(start, full - end), 0
            elif end - full + start < limit:
                padding, extra = start, end - full + start
            elif end - full < limit:
                padding, extra = 0, end - full
            else:
                raise UnsupportedLayerError(
                    f"layer {context.node.name!r}: torch cannot extend a transposed convolution by {end - full} cells"
                )
            narrow = None
            if start != padding or full - 2 * padding + extra != target:
                if size is None:
                    raise UnsupportedLayerError(
                        f"layer {context.node.name!r}: this transposed convolution crops "
                        "unevenly, which needs a fixed input size"
                    )
                narrow = (start - padding, target)
            plan.append((padding, extra, narrow))
        return plan

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        plan = self.torch_plan(context)
        conv = (builder.nn.ConvTranspose1d, builder.nn.ConvTranspose2d, builder.nn.ConvTranspose3d)[self.spatial - 1](
            self.in_channels(context),
            config.filters,
            kernel_size=config.kernel_size,
            stride=config.strides,
            padding=tuple(padding for padding, _, _ in plan),
            output_padding=tuple(extra for _, extra, _ in plan),
            dilation=config.dilation_rate,
            bias=config.use_bias,
            device="meta",
            dtype=builder.dtype(context),
        )
        value = to_torch_layout(builder, inputs[0], config.data_format, len(context.input_shape))
        value = builder.module(context, conv, value)
        for axis, (_, _, narrow) in enumerate(plan):
            if narrow is not None:
                value = builder.method(value, "narrow", 2 + axis, *narrow)
        value = torch_activation(builder, config.activation, value)
        return from_torch_layout(builder, value, config.data_format, len(context.output_shape))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return getattr(keras.layers, self.keras_classes[0])(
            config.filters, output_padding=config.output_padding, **context.keras_identity, **self.keras_options(config)
        )


@register
class Conv1DTranspose(Conv2DTranspose):
    kind, keras_classes = "conv1d_transpose", ("Conv1DTranspose", "Convolution1DTranspose")
    spatial = 1


@register
class Conv3DTranspose(Conv2DTranspose):
    kind, keras_classes = "conv3d_transpose", ("Conv3DTranspose", "Convolution3DTranspose")
    spatial = 3


@register
class DepthwiseConv2D(_Convolution):
    """`filters` holds the depth multiplier."""

    kind, keras_classes, Config = "depthwise_conv2d", ("DepthwiseConv2D",), ConvConfig
    spatial = 2
    variable_aliases = {"kernel": ("depthwise_kernel",)}  # Keras 2's name for it

    def from_keras(self, options: KerasOptions) -> ConvConfig:
        config = self.read_common(options, options.take("depth_multiplier", 1))
        if config.groups != 1:
            raise options.unsupported("groups", config.groups)
        return config

    def out_channels(self, config: ConvConfig, in_channels: int) -> int:
        return in_channels * config.filters

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config, in_channels = context.config, self.in_channels(context)
        return [
            Port(
                "kernel",
                "weight",
                depthwise_steps(config.kernel_size, in_channels, config.filters),
                shape=config.kernel_size + (in_channels, config.filters),
            ),
            *bias_ports(config, in_channels * config.filters),
        ]

    def torch_module(self, builder: TorchBuilder, context: NodeContext, padding: tuple[int, ...]) -> Any:
        config, in_channels = context.config, self.in_channels(context)
        return self.conv_module(builder)(
            in_channels,
            in_channels * config.filters,
            kernel_size=config.kernel_size,
            stride=config.strides,
            padding=padding,
            dilation=config.dilation_rate,
            groups=in_channels,
            bias=config.use_bias,
            device="meta",
            dtype=builder.dtype(context),
        )

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return getattr(keras.layers, self.keras_classes[0])(
            depth_multiplier=config.filters, **context.keras_identity, **self.keras_options(config)
        )


@register
class DepthwiseConv1D(DepthwiseConv2D):
    kind, keras_classes = "depthwise_conv1d", ("DepthwiseConv1D",)
    spatial = 1


def depthwise_steps(kernel_size: tuple[int, ...], in_channels: int, multiplier: int) -> tuple[Step, ...]:
    """Keras (k…, in, m) -> torch (in·m, 1, k…)."""
    spatial = len(kernel_size)
    return (
        Permute((spatial, spatial + 1) + tuple(range(spatial))),
        Reshape((in_channels, multiplier) + tuple(kernel_size), (in_channels * multiplier, 1) + tuple(kernel_size)),
    )


@dataclass(frozen=True)
class SeparableConfig(ConvConfig):
    depth_multiplier: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.depth_multiplier, "separable convolution depth_multiplier", MAX_FEATURES)


@register
class SeparableConv2D(_Convolution):
    kind, keras_classes, Config = "separable_conv2d", ("SeparableConv2D", "SeparableConvolution2D"), SeparableConfig
    spatial = 2

    def from_keras(self, options: KerasOptions) -> SeparableConfig:
        common = self.read_common(options, options.take("filters"))
        if common.groups != 1:
            raise options.unsupported("groups", common.groups)
        return SeparableConfig(**{**common.__dict__, "depth_multiplier": options.integer("depth_multiplier", 1)})

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config, in_channels = context.config, self.in_channels(context)
        middle = in_channels * config.depth_multiplier
        return [
            Port(
                "depthwise_kernel",
                "depthwise.weight",
                depthwise_steps(config.kernel_size, in_channels, config.depth_multiplier),
                shape=config.kernel_size + (in_channels, config.depth_multiplier),
            ),
            Port(
                "pointwise_kernel",
                "pointwise.weight",
                (Permute(kernel_permutation(self.spatial)),),
                shape=(1,) * self.spatial + (middle, config.filters),
            ),
            *bias_ports(config, config.filters, torch_key="pointwise.bias"),
        ]

    def torch_module(self, builder: TorchBuilder, context: NodeContext, padding: tuple[int, ...]) -> Any:
        config = context.config
        return builder.helpers.SeparableConv(
            self.in_channels(context),
            config.filters,
            config.kernel_size,
            stride=config.strides,
            padding=padding,
            dilation=config.dilation_rate,
            depth_multiplier=config.depth_multiplier,
            bias=config.use_bias,
            device="meta",
            dtype=builder.dtype(context),
        )

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return getattr(keras.layers, self.keras_classes[0])(
            config.filters,
            depth_multiplier=config.depth_multiplier,
            **context.keras_identity,
            **self.keras_options(config),
        )


@register
class SeparableConv1D(SeparableConv2D):
    kind, keras_classes = "separable_conv1d", ("SeparableConv1D", "SeparableConvolution1D")
    spatial = 1
