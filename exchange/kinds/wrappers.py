"""TimeDistributed: one layer applied to every time step of a sequence.

Keras applies the wrapped layer to (N·T, …) and reshapes back; so does the torch side, where the
wrapped kind builds its module under the wrapper's name (keys `td.weight`, `td.bias`). The time
steps are merged into the batch in Keras's layout, so every convention of the wrapped kind (a
Dense's transposed kernel, a Conv2D's channels-first images) applies unchanged. Keras 3 keeps the
wrapped layer's variables in `<group>/layer/vars`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from exchange.errors import ExchangeError
from exchange.kinds import LayerKind, _short, check_known_keys, kind_of, register
from exchange.kinds.layout import to_keras_order, to_torch_order


@dataclass(frozen=True)
class TimeDistributedConfig:
    layer: str          # the wrapped layer's kind
    config: Any         # and its config
    layer_name: str     # the wrapped Keras layer's own name

    def __post_init__(self) -> None:
        kind = kind_of(self.layer)   # raises for an unknown kind
        if not wraps(kind):
            raise ExchangeError(f"TimeDistributed cannot wrap a {kind.kind!r} layer: {WRAPS}")
        if not isinstance(self.config, kind.Config):
            raise ExchangeError(f"TimeDistributed: the wrapped config is not a {kind.kind!r} config")
        if (not isinstance(self.layer_name, str) or not 0 < len(self.layer_name) <= 1000 or "/" in self.layer_name
                or not self.layer_name.isprintable()):
            raise ExchangeError(f"TimeDistributed layer_name {_short(self.layer_name)} is not a Keras layer name "
                                "(1 to 1000 printable characters, no '/')")


WRAPS = "a layer with one input and one output, not TimeDistributed"


def wraps(kind: LayerKind) -> bool:
    """Whether TimeDistributed takes a layer of this kind (as Keras applies it to each step)."""
    return (not kind.takes_list and not kind.selects_output and kind.kind != TimeDistributed.kind
            and type(kind).output_count is LayerKind.output_count)


@register
class TimeDistributed(LayerKind):
    kind, keras_classes, Config = "time_distributed", ("TimeDistributed",), TimeDistributedConfig
    passes_mask = True

    def from_keras(self, options):
        kind, config, name = options.wrapped_layer("layer", wraps, WRAPS)
        return TimeDistributedConfig(kind.kind, config, name)

    def config_from_dict(self, values, node_name):
        if not isinstance(values, dict) or not isinstance(values.get("layer"), str):
            raise ExchangeError(f"layer {node_name!r}: config must name the wrapped layer kind")
        check_known_keys(values, ("layer", "config", "layer_name"), f"layer {node_name!r} ({self.kind})")
        inner_kind = kind_of(values["layer"])
        if not wraps(inner_kind):
            raise ExchangeError(f"layer {node_name!r} ({self.kind}): cannot wrap a {inner_kind.kind!r} layer: {WRAPS}")
        inner = inner_kind.config_from_dict(values.get("config", {}), node_name)
        return self.build_config(node_name, layer=inner_kind.kind, config=inner, layer_name=values.get("layer_name"))

    def inner(self, context):
        """The wrapped kind and its context: one time step, the batch axis holding N·T."""
        config = context.config
        kind = kind_of(config.layer)
        inner_input = tuple(context.input_shape[1:])
        node = replace(context.node, kind=kind.kind, config=config.config)
        inner_context = replace(context, node=node, input_shapes=(inner_input,),
                                output_shape=tuple(kind.output_shape(config.config, (inner_input,))),
                                flat_source=None, channels_first_flatten=False, input_masks=(None,))
        return kind, inner_context

    def keras3_subgroups(self, config):
        return tuple("/".join(part for part in ("layer", sub) if part)
                     for sub in kind_of(config.layer).keras3_subgroups(config.config))

    def output_shape(self, config, input_shapes):
        shape = input_shapes[0]
        if len(shape) < 2:
            raise ExchangeError(f"expects (batch, time, …) input, found (batch, {shape})")
        return (shape[0],) + tuple(kind_of(config.layer).output_shape(config.config, (tuple(shape[1:]),)))

    def keras_variables(self, context):   # the wrapped kind's order (MultiHeadAttention reorders)
        kind, inner_context = self.inner(context)
        return kind.keras_variables(inner_context)

    def ports(self, context):
        kind, inner_context = self.inner(context)
        return kind.ports(inner_context)

    def torch_forward(self, builder, context, inputs):
        torch = builder.torch
        kind, inner_context = self.inner(context)
        rank, inner_rank = len(context.input_shape), len(inner_context.input_shape)
        steps = builder.call(torch.permute, inputs[0], to_keras_order(rank))        # (N, T, …) as Keras has it
        batch = builder.method(steps, "size", 0)
        merged = builder.call(torch.flatten, steps, 0, 1)                          # (N·T, …)
        if inner_rank >= 2:
            merged = builder.call(torch.permute, merged, to_torch_order(inner_rank))
        value = kind.torch_forward(builder, inner_context, [merged])
        out_rank = len(inner_context.output_shape)
        if out_rank >= 2:
            value = builder.call(torch.permute, value, to_keras_order(out_rank))
        value = builder.call(torch.unflatten, value, 0, (batch, -1))               # (N, T, …)
        return builder.call(torch.permute, value, to_torch_order(out_rank + 1))

    def keras_layer(self, keras, context):
        kind, inner_context = self.inner(context)
        inner_node = replace(inner_context.node, name=context.config.layer_name)
        layer = kind.keras_layer(keras, replace(inner_context, node=inner_node))
        return keras.layers.TimeDistributed(layer, **context.keras_identity)
