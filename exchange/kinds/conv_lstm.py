"""Convolutional LSTMs: ConvLSTM1D, ConvLSTM2D, ConvLSTM3D.

Conventions that differ:
- Data: Keras's sequence of frames (N, T, *spatial, C) is torch's (N, C, T, *spatial), as every
  channels-last tensor; `KerasConvLSTM` reads each step's frame from there.
- Kernels: Keras keeps kernel (k…, in, 4·filters) and recurrent_kernel (k…, filters, 4·filters),
  torch's convolutions (4·filters, in, k…) and (4·filters, filters, k…): the convolutions' one
  permutation. The gates are i, f, c, o in both, the blocks of the last Keras axis; the bias
  (4·filters,) is the same. unit_forget_bias only initialises the bias.
- Padding: the input convolution pads TensorFlow's way (`same`: the odd cell at the end), with
  the layer's strides and dilation; the recurrent convolution always uses `same` with stride 1 and
  no dilation, so the state keeps the output's spatial size. Torch pads explicitly (`F.pad`).
- go_backwards reverses the time axis of the input; with return_sequences the outputs stay in
  that reversed order, as Keras returns them. return_state adds h and c (the output's shape,
  without the time axis); initial_state=[h, c] reads them as inputs after the sequence.

Not supported (refused by name): data_format="channels_first", stateful=True, a masked input.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import MAX_FEATURES, KerasOptions, LayerKind, TorchBuilder, TorchValue, check_int, register
from exchange.kinds.activations import ELEMENTWISE_ACTIVATIONS, check_activation, keras_activation, torch_function
from exchange.kinds.convolution import (
    check_window,
    kernel_permutation,
    tf_padding,
    torch_pad_argument,
    window_output_sizes,
)
from exchange.kinds.recurrent import refuse_stateful
from exchange.ports import Permute, Port

if TYPE_CHECKING:
    from exchange.graph import Node, NodeContext, Shape
    from exchange.ports import AnyPort

PADDINGS = ("valid", "same")
GATES = 4  # i, f, c, o


@dataclass(frozen=True)
class ConvLSTMConfig:
    filters: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str = "valid"
    dilation_rate: tuple[int, ...] = (1,)
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    use_bias: bool = True
    return_sequences: bool = False
    return_state: bool = False
    go_backwards: bool = False

    def __post_init__(self) -> None:
        check_window(
            self.kernel_size, self.strides, self.dilation_rate, self.padding, (1, 2, 3), "ConvLSTM", paddings=PADDINGS
        )
        check_int(self.filters, "ConvLSTM filters", MAX_FEATURES // GATES)
        for name in (self.activation, self.recurrent_activation):
            check_activation(name, "ConvLSTM")
            if name not in ELEMENTWISE_ACTIVATIONS:
                raise UnsupportedLayerError(f"ConvLSTM: activation {name!r} is not supported")


class _ConvLSTM(LayerKind):
    """ConvLSTM of `rank` spatial axes: one `KerasConvLSTM` module under the node's name."""

    Config = ConvLSTMConfig
    rank = 2
    tensor_kwargs = ("initial_state",)  # its tensors are node inputs after the sequence
    mask_position = 2  # call(sequences, initial_state=None, mask=None, training=False)

    def from_keras(self, options: KerasOptions) -> ConvLSTMConfig:
        refuse_stateful(options)
        options.expect("data_format", "channels_last", None)
        for key in ("dropout", "recurrent_dropout", "seed", "unit_forget_bias"):
            options.take(key, None)  # training or initialisation only
        # Without a mask (refused) zero_output_for_mask changes nothing; unrolling gives the same outputs.
        options.flag("zero_output_for_mask", False)
        options.flag("unroll", False)
        padding = options.take("padding", "valid")
        if padding not in PADDINGS:
            raise options.unsupported("padding", padding)
        activations = []
        for key in ("activation", "recurrent_activation"):
            name = options.activation(key)
            if name not in ELEMENTWISE_ACTIVATIONS:
                raise options.unsupported(key, name, "not supported in a recurrent layer")
            activations.append(name)
        return ConvLSTMConfig(
            filters=options.integer("filters"),
            kernel_size=options.sizes("kernel_size", self.rank),
            strides=options.sizes("strides", self.rank, 1),
            padding=padding,
            dilation_rate=options.sizes("dilation_rate", self.rank, 1),
            activation=activations[0],
            recurrent_activation=activations[1],
            use_bias=options.flag("use_bias", True),
            return_sequences=options.flag("return_sequences", False),
            return_state=options.flag("return_state", False),
            go_backwards=options.flag("go_backwards", False),
        )

    def keras3_subgroups(self, config: ConvLSTMConfig) -> tuple[str, ...]:
        return ("cell",)

    # -- shapes and weights -----------------------------------------------------------------

    def output_count(self, config: ConvLSTMConfig) -> int:
        return 3 if config.return_state else 1

    def output_shapes(self, config: ConvLSTMConfig, input_shapes: tuple[Shape, ...]) -> list[Shape]:
        shape = tuple(input_shapes[0])
        if len(config.kernel_size) != self.rank or len(shape) != self.rank + 2:
            raise ExchangeError(
                f"expects (batch, time, {self.rank} spatial axes, channels) input with a "
                f"{self.rank}-D kernel, found input (batch, {shape}) and kernel "
                f"{list(config.kernel_size)}"
            )
        if None in shape[1:]:
            raise ExchangeError(f"needs known spatial sizes and channels (as Keras does), found (batch, {shape})")
        frame = window_output_sizes(
            shape[1:-1], config.kernel_size, config.strides, config.dilation_rate, config.padding
        ) + (config.filters,)
        states = [tuple(state) for state in input_shapes[1:]]
        if states and states != [frame, frame]:
            raise ExchangeError(f"initial_state must be 2 tensors of shape (batch, {frame}), found {states}")
        output = (shape[0],) + frame if config.return_sequences else frame
        return [output] + ([frame, frame] if config.return_state else [])

    def output_shape(self, config: ConvLSTMConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return self.output_shapes(config, input_shapes)[0]

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        if input_masks and input_masks[0] is not None:
            raise UnsupportedLayerError(
                f"layer {node.name!r} ({self.keras_classes[0]}): a masked input is not supported"
            )
        return None

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config, width = context.config, GATES * context.config.filters
        steps = (Permute(kernel_permutation(self.rank)),)
        ports: list[AnyPort] = [
            Port("kernel", "weight_ih", steps, shape=config.kernel_size + (context.input_shape[-1], width)),
            Port("recurrent_kernel", "weight_hh", steps, shape=config.kernel_size + (config.filters, width)),
        ]
        if config.use_bias:
            ports.append(Port("bias", "bias", shape=(width,)))
        return ports

    # -- torch ----------------------------------------------------------------------------

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        pads = [
            tf_padding(size, k, s, d, config.padding, context.node.name)
            for size, k, s, d in zip(
                context.input_shape[1:-1], config.kernel_size, config.strides, config.dilation_rate
            )
        ]
        module = builder.helpers.KerasConvLSTM(
            context.input_shape[-1],
            config.filters,
            config.kernel_size,
            config.strides,
            config.dilation_rate,
            torch_pad_argument(pads),
            bias=config.use_bias,
            activation=torch_function(config.activation, builder)[0],
            recurrent_activation=torch_function(config.recurrent_activation, builder)[0],
            device="meta",
            dtype=builder.dtype(context),
        )
        sequence = inputs[0]  # (N, C, T, *spatial)
        if config.go_backwards:
            sequence = builder.call(builder.torch.flip, sequence, (2,))
        arguments = [sequence] + ([tuple(inputs[1:3])] if len(inputs) > 1 else [])
        result = builder.module(context, module, *arguments)
        outputs = builder.call(operator.getitem, result, 0)  # (N, filters, T, *out_spatial)
        output = (
            outputs
            if config.return_sequences
            else builder.call(operator.getitem, outputs, (slice(None), slice(None), -1))
        )
        if not config.return_state:
            return output
        state = builder.call(operator.getitem, result, 1)
        return (output,) + tuple(builder.call(operator.getitem, state, index) for index in range(2))

    # -- Keras ----------------------------------------------------------------------------

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config, where = context.config, f"layer {context.node.name!r}"
        return getattr(keras.layers, self.keras_classes[0])(
            config.filters,
            config.kernel_size,
            strides=config.strides,
            padding=config.padding,
            data_format="channels_last",
            dilation_rate=config.dilation_rate,
            activation=keras_activation(config.activation, where),
            recurrent_activation=keras_activation(config.recurrent_activation, where),
            use_bias=config.use_bias,
            return_sequences=config.return_sequences,
            return_state=config.return_state,
            go_backwards=config.go_backwards,
            stateful=False,
            **context.keras_identity,
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        if len(arguments) == 1:
            return keras_layer(arguments[0])
        return keras_layer(arguments[0], initial_state=list(arguments[1:]))


@register
class ConvLSTM1D(_ConvLSTM):
    kind, keras_classes, rank = "conv_lstm1d", ("ConvLSTM1D",), 1


@register
class ConvLSTM2D(_ConvLSTM):
    kind, keras_classes, rank = "conv_lstm2d", ("ConvLSTM2D",), 2


@register
class ConvLSTM3D(_ConvLSTM):
    kind, keras_classes, rank = "conv_lstm3d", ("ConvLSTM3D",), 3
