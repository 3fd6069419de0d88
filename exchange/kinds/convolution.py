"""Convolutions: Conv1D, Conv2D, Conv2DTranspose, DepthwiseConv2D, SeparableConv2D.

Conventions that differ:
- Kernels: Keras (k…, in, out), torch (out, in, k…): one permutation. Conv2DTranspose stores
  (k…, out, in) against torch's (in, out, k…): the same permutation, the channel axes meaning the
  opposite. DepthwiseConv2D (kh, kw, in, multiplier) is torch's (in·multiplier, 1, kh, kw) with
  groups = in (output channel i·multiplier + j in both). SeparableConv2D is one Keras layer and two
  torch convolutions (`name.depthwise`, `name.pointwise`).
- `same` padding: TensorFlow pads total = (out − 1)·stride + dilated kernel − in, with the extra
  cell at the bottom/right when the total is odd; torch's `padding=` is symmetric. Where the two
  sides differ the torch side pads explicitly (`F.pad`) before a convolution with no padding.
  `causal` (1-D) pads only on the left.
- A transposed `same` convolution crops TensorFlow's way: (full − target) // 2 at the top/left.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import MAX_FEATURES, MAX_WINDOW, LayerKind, check_choice, check_int, check_ints, register
from exchange.kinds.activations import check_activation, keras_activation, torch_activation
from exchange.ports import Permute, Port, Reshape

PADDINGS = ("valid", "same", "causal")
# The most cells a `same` or `causal` padding may add to one input (all spatial axes, one channel
# and example): torch's F.pad and TensorFlow materialise the padded tensor. A 3x3 window adds about
# 33,000 cells to a 8192x8192 image, a 7x7 one 3,300 to ResNet's 224x224; the cap stops a window far
# larger than its input (a pooling of 8192 cells on an 8x8 image would add 67 million per channel).
MAX_ADDED_CELLS = 1 << 22


def check_window(kernel_size: tuple, strides: tuple, dilation_rate: tuple, padding: str, spatial: tuple,
                 what: str, paddings: tuple = PADDINGS) -> None:
    """The sizes of a sliding window (a convolution's or a pooling's), whichever source they come
    from: 1 or 2 spatial axes, each size positive and under the caps, a known padding, and (as
    Keras and TensorFlow require) not strides > 1 together with dilation > 1."""
    check_ints(kernel_size, f"{what} kernel size", MAX_WINDOW, count=spatial)
    check_ints(strides, f"{what} strides", MAX_WINDOW, count=(len(kernel_size),))
    check_ints(dilation_rate, f"{what} dilation_rate", MAX_WINDOW, count=(len(kernel_size),))
    for kernel, dilation in zip(kernel_size, dilation_rate):
        check_int((kernel - 1) * dilation + 1, f"{what} dilated kernel size", MAX_WINDOW)
    check_choice(padding, paddings if len(kernel_size) == 1 else ("valid", "same"), f"{what} padding")
    if max(strides) > 1 and max(dilation_rate) > 1:
        raise ExchangeError(f"{what}: strides {list(strides)} > 1 together with dilation_rate "
                            f"{list(dilation_rate)} > 1 is not supported (Keras refuses it)")


def window_output_sizes(input_shape: tuple, kernel_size: tuple, strides: tuple, dilation_rate: tuple,
                        padding: str) -> tuple:
    """The spatial output sizes of a sliding window over `input_shape` (Keras layout, channels
    last): a `valid` window must fit the input; a `same` or `causal` padding must add at most
    `MAX_ADDED_CELLS`."""
    spatial = input_shape[:-1]
    if len(spatial) != len(kernel_size):
        raise ExchangeError(f"expects rank-{len(kernel_size) + 2} input, found shape (batch, {input_shape})")
    unpadded = padded = 1
    for size, kernel, stride, dilation in zip(spatial, kernel_size, strides, dilation_rate):
        if size is None and stride > 1 and padding == "same":
            before, after = (kernel - 1) * dilation, 0   # at most the dilated window less one
        else:
            before, after = tf_padding(size, kernel, stride, dilation, padding, "window")
        unpadded *= 1 if size is None else size
        padded *= (1 if size is None else size) + before + after
    if padded - unpadded > MAX_ADDED_CELLS:
        raise ExchangeError(f"{padding!r} padding of a {list(kernel_size)} window (dilation {list(dilation_rate)}) "
                            f"adds {padded - unpadded:,} cells to input {list(spatial)}, more than the "
                            f"{MAX_ADDED_CELLS:,} allowed")
    return tuple(conv_output_size(size, k, s, d, padding)
                 for size, k, s, d in zip(spatial, kernel_size, strides, dilation_rate))


def conv_output_size(size, kernel: int, stride: int, dilation: int, padding: str):
    """Keras's output length of a convolution or pooling along one axis (None stays None)."""
    if size is None:
        return None
    effective = (kernel - 1) * dilation + 1
    length = size if padding in ("same", "causal") else size - effective + 1
    if length < 1:
        raise ExchangeError(f"input size {size} is smaller than the kernel ({effective})")
    return (length + stride - 1) // stride


def tf_padding(size, kernel: int, stride: int, dilation: int, padding: str, where: str) -> tuple[int, int]:
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


def bias_ports(config, size: int, torch_key: str = "bias") -> list[Port]:
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

    def __post_init__(self) -> None:
        check_window(self.kernel_size, self.strides, self.dilation_rate, self.padding, (1, 2), "convolution")
        check_int(self.filters, "convolution filters", MAX_FEATURES)
        check_int(self.groups, "convolution groups", MAX_FEATURES)
        if self.filters % self.groups:   # Keras refuses filters that do not split into the groups
            raise ExchangeError(f"convolution filters {self.filters} do not split into {self.groups} groups")
        check_activation(self.activation, "convolution")


class _Convolution(LayerKind):
    """Shared by the convolution kinds: options, padding, output shape, the torch padding step."""

    spatial = 2
    one_group = True     # all but Conv1D/Conv2D: groups must be 1

    def read_common(self, options, filters: int | None, kernel_key: str = "kernel_size") -> ConvConfig:
        options.expect("data_format", "channels_last", None)
        options.expect("lora_rank", None)
        options.expect("lora_alpha", None)
        padding = options.take("padding", "valid")
        if padding not in PADDINGS or (padding == "causal" and self.spatial != 1):
            raise options.unsupported("padding", padding)
        return ConvConfig(
            filters=0 if filters is None else int(filters),
            kernel_size=options.sizes(kernel_key, self.spatial),
            strides=options.sizes("strides", self.spatial, 1),
            padding=padding,
            dilation_rate=options.sizes("dilation_rate", self.spatial, 1),
            groups=options.integer("groups", 1),
            activation=options.activation(),
            use_bias=options.flag("use_bias", True))

    def check_config(self, config) -> None:
        """What this kind of convolution takes of the shared `ConvConfig` (checked in shape inference)."""
        if len(config.kernel_size) != self.spatial:
            raise ExchangeError(f"kernel size {list(config.kernel_size)} has not {self.spatial} spatial axes")
        if self.one_group and config.groups != 1:
            raise ExchangeError(f"groups must be 1, got {config.groups}")

    def output_shape(self, config, input_shapes):
        self.check_config(config)
        shape = input_shapes[0]
        sizes = window_output_sizes(shape, config.kernel_size, config.strides, config.dilation_rate, config.padding)
        if shape[-1] is None:
            raise ExchangeError(f"needs a known channel axis, found input shape (batch, {shape})")
        if shape[-1] % config.groups:
            raise ExchangeError(f"{shape[-1]} input channels do not split into {config.groups} groups")
        return sizes + (self.out_channels(config, shape[-1]),)

    def out_channels(self, config, in_channels: int) -> int:
        return config.filters

    def padded(self, builder, context, value):
        """Apply TensorFlow's padding; returns (value, symmetric padding left for the conv)."""
        config = context.config
        pads = [tf_padding(size, k, s, d, config.padding, context.node.name)
                for size, k, s, d in zip(context.input_shape[:-1], config.kernel_size, config.strides,
                                         config.dilation_rate)]
        if all(before == after for before, after in pads):
            return value, tuple(before for before, _ in pads)
        return builder.call(builder.F.pad, value, torch_pad_argument(pads)), (0,) * self.spatial

    def conv_module(self, builder, spatial: int):
        return builder.nn.Conv1d if spatial == 1 else builder.nn.Conv2d

    def keras_options(self, config) -> dict:
        return dict(kernel_size=config.kernel_size, strides=config.strides, padding=config.padding,
                    dilation_rate=config.dilation_rate, data_format="channels_last",
                    activation=keras_activation(config.activation, "convolution"), use_bias=config.use_bias)


@register
class Conv2D(_Convolution):
    kind, keras_classes, Config = "conv2d", ("Conv2D", "Convolution2D"), ConvConfig
    spatial, one_group = 2, False

    def from_keras(self, options):
        return self.read_common(options, options.take("filters"))   # ConvConfig checks the groups

    def ports(self, context):
        config, in_channels = context.config, context.input_shape[-1]
        if in_channels % config.groups or config.filters % config.groups:
            raise ExchangeError(f"layer {context.node.name!r}: {in_channels} input channels and "
                                f"{config.filters} filters do not split into {config.groups} groups")
        kernel_shape = config.kernel_size + (in_channels // config.groups, config.filters)
        return [Port("kernel", "weight", (Permute(kernel_permutation(self.spatial)),), shape=kernel_shape),
                *bias_ports(config, config.filters)]

    def torch_forward(self, builder, context, inputs):
        config = context.config
        value, padding = self.padded(builder, context, inputs[0])
        conv = self.conv_module(builder, self.spatial)(
            context.input_shape[-1], config.filters, kernel_size=config.kernel_size, stride=config.strides,
            padding=padding, dilation=config.dilation_rate, groups=config.groups, bias=config.use_bias,
            device="meta", dtype=builder.dtype(context))
        return torch_activation(builder, config.activation, builder.module(context, conv, value))

    def keras_layer(self, keras, context):
        config = context.config
        layer_class = keras.layers.Conv1D if self.spatial == 1 else keras.layers.Conv2D
        return layer_class(config.filters, groups=config.groups, **context.keras_identity,
                           **self.keras_options(config))


@register
class Conv1D(Conv2D):
    kind, keras_classes, Config = "conv1d", ("Conv1D", "Convolution1D"), ConvConfig
    spatial = 1


@register
class Conv2DTranspose(_Convolution):
    kind, keras_classes, Config = "conv2d_transpose", ("Conv2DTranspose", "Convolution2DTranspose"), ConvConfig
    spatial = 2

    def from_keras(self, options):
        output_padding = options.take("output_padding", None)
        if output_padding is not None:
            raise options.unsupported("output_padding", output_padding, "only None")
        config = self.read_common(options, options.take("filters"))
        if config.groups != 1 or config.padding == "causal":
            raise options.unsupported("groups" if config.groups != 1 else "padding",
                                      config.groups if config.groups != 1 else config.padding)
        return config

    def _lengths(self, config, size, axis):
        """(Keras's output length, torch's uncropped length) along one spatial axis."""
        kernel = (config.kernel_size[axis] - 1) * config.dilation_rate[axis] + 1
        stride = config.strides[axis]
        size = 1 if size is None else size    # the difference does not depend on the size
        full = (size - 1) * stride + kernel
        target = size * stride + (max(kernel - stride, 0) if config.padding == "valid" else 0)
        return target, full

    def output_shape(self, config, input_shapes):
        self.check_config(config)
        shape = input_shapes[0]
        if len(shape) != 3:
            raise ExchangeError(f"expects rank-4 input, found shape (batch, {shape})")
        sizes = tuple(None if size is None else self._lengths(config, size, axis)[0]
                      for axis, size in enumerate(shape[:-1]))
        return sizes + (config.filters,)

    def ports(self, context):
        config = context.config
        kernel_shape = config.kernel_size + (config.filters, context.input_shape[-1])
        return [Port("kernel", "weight", (Permute(kernel_permutation(2)),), shape=kernel_shape),
                *bias_ports(config, config.filters)]

    def torch_forward(self, builder, context, inputs):
        config = context.config
        output_padding, crops = [], []
        for axis, size in enumerate(context.input_shape[:-1]):
            target, full = self._lengths(config, size, axis)
            if target >= full:
                if target - full >= max(config.strides[axis], config.dilation_rate[axis]):
                    raise UnsupportedLayerError(f"layer {context.node.name!r}: torch cannot pad a "
                                                f"transposed convolution by {target - full}")
                output_padding.append(target - full)
                crops.append((0, 0))
            else:
                before = (full - target) // 2
                output_padding.append(0)
                crops.append((before, full - target - before))
        symmetric = all(before == after for before, after in crops)
        conv = builder.nn.ConvTranspose2d(
            context.input_shape[-1], config.filters, kernel_size=config.kernel_size, stride=config.strides,
            padding=tuple(before for before, _ in crops) if symmetric else 0, output_padding=tuple(output_padding),
            dilation=config.dilation_rate, bias=config.use_bias, device="meta", dtype=builder.dtype(context))
        value = builder.module(context, conv, inputs[0])
        if not symmetric:
            for axis, ((before, _), size) in enumerate(zip(crops, context.output_shape[:-1])):
                value = builder.method(value, "narrow", 2 + axis, before, size)
        return torch_activation(builder, config.activation, value)

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.Conv2DTranspose(config.filters, **context.keras_identity,
                                            **self.keras_options(config))


@register
class DepthwiseConv2D(_Convolution):
    """`filters` holds the depth multiplier."""

    kind, keras_classes, Config = "depthwise_conv2d", ("DepthwiseConv2D",), ConvConfig
    spatial = 2
    variable_aliases = {"kernel": ("depthwise_kernel",)}   # Keras 2's name for it

    def from_keras(self, options):
        config = self.read_common(options, options.take("depth_multiplier", 1))
        if config.groups != 1:
            raise options.unsupported("groups", config.groups)
        return config

    def out_channels(self, config, in_channels):
        return in_channels * config.filters

    def ports(self, context):
        config, in_channels = context.config, context.input_shape[-1]
        return [Port("kernel", "weight", depthwise_steps(config.kernel_size, in_channels, config.filters),
                     shape=config.kernel_size + (in_channels, config.filters)),
                *bias_ports(config, in_channels * config.filters)]

    def torch_forward(self, builder, context, inputs):
        config, in_channels = context.config, context.input_shape[-1]
        value, padding = self.padded(builder, context, inputs[0])
        conv = builder.nn.Conv2d(in_channels, in_channels * config.filters, kernel_size=config.kernel_size,
                                 stride=config.strides, padding=padding, dilation=config.dilation_rate,
                                 groups=in_channels, bias=config.use_bias, device="meta", dtype=builder.dtype(context))
        return torch_activation(builder, config.activation, builder.module(context, conv, value))

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.DepthwiseConv2D(depth_multiplier=config.filters,
                                            **context.keras_identity, **self.keras_options(config))


def depthwise_steps(kernel_size: tuple[int, int], in_channels: int, multiplier: int) -> tuple:
    """Keras (kh, kw, in, m) -> torch (in·m, 1, kh, kw)."""
    kh, kw = kernel_size
    return (Permute((2, 3, 0, 1)), Reshape((in_channels, multiplier, kh, kw), (in_channels * multiplier, 1, kh, kw)))


@dataclass(frozen=True)
class SeparableConfig(ConvConfig):
    depth_multiplier: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.depth_multiplier, "SeparableConv2D depth_multiplier", MAX_FEATURES)


@register
class SeparableConv2D(_Convolution):
    kind, keras_classes, Config = "separable_conv2d", ("SeparableConv2D", "SeparableConvolution2D"), SeparableConfig
    spatial = 2

    def from_keras(self, options):
        common = self.read_common(options, options.take("filters"))
        if common.groups != 1:
            raise options.unsupported("groups", common.groups)
        return SeparableConfig(**{**common.__dict__, "depth_multiplier": options.integer("depth_multiplier", 1)})

    def ports(self, context):
        config, in_channels = context.config, context.input_shape[-1]
        middle = in_channels * config.depth_multiplier
        return [Port("depthwise_kernel", "depthwise.weight",
                     depthwise_steps(config.kernel_size, in_channels, config.depth_multiplier),
                     shape=config.kernel_size + (in_channels, config.depth_multiplier)),
                Port("pointwise_kernel", "pointwise.weight", (Permute(kernel_permutation(2)),),
                     shape=(1, 1, middle, config.filters)),
                *bias_ports(config, config.filters, torch_key="pointwise.bias")]

    def torch_forward(self, builder, context, inputs):
        config, in_channels = context.config, context.input_shape[-1]
        value, padding = self.padded(builder, context, inputs[0])
        module = builder.helpers.SeparableConv2d(
            in_channels, config.filters, config.kernel_size, stride=config.strides, padding=padding,
            dilation=config.dilation_rate, depth_multiplier=config.depth_multiplier, bias=config.use_bias,
            device="meta", dtype=builder.dtype(context))
        return torch_activation(builder, config.activation, builder.module(context, module, value))

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.SeparableConv2D(config.filters, depth_multiplier=config.depth_multiplier,
                                            **context.keras_identity,
                                            **self.keras_options(config))
