"""Dense: y = activation(x @ kernel + bias) over the last axis.

Conventions that differ:
- Keras keeps the kernel as (in, out) and computes x @ kernel; torch's `nn.Linear` keeps its
  weight as (out, in) and computes x @ weight.T. The bias is (out,) in both.
- On inputs of rank > 2 Keras applies the kernel to the last axis, the channels; the torch side
  holds such tensors channels-first, so it moves the channel axis last and back around the Linear.
- After a Flatten of an image Keras's inputs come in (H, W, C) order, torch's `flatten` gives
  (C, H, W) order: the weight's input axis is permuted to match (see `Graph.channels_first_flattens`).
"""

from __future__ import annotations

from dataclasses import dataclass

from exchange.errors import ExchangeError
from exchange.kinds import MAX_FEATURES, LayerKind, check_int, register
from exchange.kinds.activations import check_activation, keras_activation, numpy_activation, torch_activation
from exchange.kinds.layout import to_torch_order
from exchange.ports import Permute, Port, Reshape


@dataclass(frozen=True)
class DenseConfig:
    units: int
    activation: str = "linear"
    use_bias: bool = True

    def __post_init__(self) -> None:
        check_int(self.units, "Dense units", MAX_FEATURES)
        check_activation(self.activation, "Dense")


@register
class Dense(LayerKind):
    kind, keras_classes, Config = "dense", ("Dense",), DenseConfig
    reads_permuted_flat = True
    passes_mask = True

    def from_keras(self, options):
        options.expect("lora_rank", None)
        options.expect("lora_alpha", None)
        options.expect("quantization_config", None)
        return DenseConfig(options.integer("units"), options.activation(), options.flag("use_bias", True))

    def output_shape(self, config, input_shapes):
        if not input_shapes[0] or input_shapes[0][-1] is None:
            raise ExchangeError(f"needs a known feature axis, found input shape (batch, {input_shapes[0]})")
        return tuple(input_shapes[0][:-1]) + (config.units,)

    def ports(self, context):
        steps: tuple = (Permute((1, 0)),)
        if context.flat_source is not None:
            units, source = context.config.units, tuple(context.flat_source)
            unflat = (units,) + source
            reordered = tuple(unflat[axis] for axis in to_torch_order(len(source)))
            steps += (Reshape((units, context.input_shape[-1]), unflat), Permute(to_torch_order(len(source))),
                      Reshape(reordered, (units, context.input_shape[-1])))
        ports = [Port("kernel", "weight", steps, shape=(context.input_shape[-1], context.config.units))]
        if context.config.use_bias:
            ports.append(Port("bias", "bias", shape=(context.config.units,)))
        return ports

    def torch_forward(self, builder, context, inputs):
        config = context.config
        linear = builder.nn.Linear(context.input_shape[-1], config.units, bias=config.use_bias,
                                   device="meta", dtype=builder.dtype(context))
        value = inputs[0]
        channels_moved = len(context.input_shape) > 1
        if channels_moved:
            value = builder.call(builder.torch.movedim, value, 1, -1)
        value = builder.module(context, linear, value)
        if channels_moved:
            value = builder.call(builder.torch.movedim, value, -1, 1)
        return torch_activation(builder, config.activation, value)

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.Dense(config.units, activation=keras_activation(config.activation, context.node.name),
                                  use_bias=config.use_bias, **context.keras_identity)

    def numpy_forward(self, context, tensors, inputs):
        hidden = inputs[0] @ tensors["weight"].T
        if context.config.use_bias:
            hidden = hidden + tensors["bias"]
        return numpy_activation(context.config.activation, context.node.name)(hidden)
