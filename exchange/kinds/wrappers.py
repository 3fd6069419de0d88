"""Wrappers: TimeDistributed (one layer applied to every time step of a sequence) and
SpectralNormalization (a layer whose kernel Keras normalises while training).

Keras applies the wrapped layer to (N·T, …) and reshapes back; so does the torch side, where the
wrapped kind builds its module under the wrapper's name (keys `td.weight`, `td.bias`). The time
steps are merged into the batch in Keras's layout, so every convention of the wrapped kind (a
Dense's transposed kernel, a Conv2D's channels-first images) applies unchanged. Keras 3 keeps the
wrapped layer's variables in `<group>/layer/vars`.

Conventions that differ (SpectralNormalization):
- At inference Keras runs the wrapped layer with its stored kernel as it is: the power iteration
  and the division by sigma happen only in training, where Keras writes the normalised kernel back
  into the variable. The torch side runs the wrapped kind's module as it is, at `<name>.layer`
  (keys `sn.layer.weight`, `sn.layer.bias`), inside a `KerasSpectralNormalization` holding the
  power iteration's state `vector_u` (1, kernel's last axis) as a buffer (`sn.vector_u`), so the
  weights go back to Keras whole.
- Keras tracks the wrapped layer's kernel as the wrapper's own variable too: `layer.weights` is
  [kernel, vector_u, the wrapped layer's other variables], and a Keras 3 file stores the kernel
  twice, in `<group>/vars` ([kernel, vector_u]) and `<group>/layer/vars` ([kernel, bias]). Keras
  loads the wrapper's own variables first and its layer's last, so the copy in `layer/vars` is the
  one it computes with; the exchange reads that one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_REPEATS,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    _short,
    check_int,
    check_known_keys,
    kind_of,
    register,
)
from exchange.kinds.axis_order import to_keras_order, to_torch_order
from exchange.ports import Port, TorchOnly

if TYPE_CHECKING:
    from exchange.graph import NodeContext, Shape
    from exchange.ports import AnyPort


@dataclass(frozen=True)
class TimeDistributedConfig:
    layer: str  # the wrapped layer's kind
    config: Any  # and its config
    layer_name: str  # the wrapped Keras layer's own name

    def __post_init__(self) -> None:
        check_wrapped(self, wraps, WRAPS, "TimeDistributed")


def check_wrapped(config: Any, accepts: Callable[[LayerKind], bool], what: str, wrapper: str) -> None:
    """A wrapper's config names a kind it `accepts`, holds a config of that kind and a Keras name."""
    kind = kind_of(config.layer)  # raises for an unknown kind
    if not accepts(kind):
        raise ExchangeError(f"{wrapper} cannot wrap a {kind.kind!r} layer: {what}")
    if not isinstance(config.config, kind.Config):
        raise ExchangeError(f"{wrapper}: the wrapped config is not a {kind.kind!r} config")
    if (
        not isinstance(config.layer_name, str)
        or not 0 < len(config.layer_name) <= 1000
        or "/" in config.layer_name
        or not config.layer_name.isprintable()
    ):
        raise ExchangeError(
            f"{wrapper} layer_name {_short(config.layer_name)} is not a Keras layer name "
            "(1 to 1000 printable characters, no '/')"
        )


def wrapped_config(
    kind: LayerKind, values: Any, node_name: str, accepts: Callable[[LayerKind], bool], what: str
) -> dict[str, Any]:
    """The fields `layer`, `config`, `layer_name` of a wrapper's config read from an exchange file."""
    if not isinstance(values, dict) or not isinstance(values.get("layer"), str):
        raise ExchangeError(f"layer {node_name!r}: config must name the wrapped layer kind")
    inner_kind = kind_of(values["layer"])
    if not accepts(inner_kind):
        raise ExchangeError(f"layer {node_name!r} ({kind.kind}): cannot wrap a {inner_kind.kind!r} layer: {what}")
    inner = inner_kind.config_from_dict(values.get("config", {}), node_name)
    return dict(layer=inner_kind.kind, config=inner, layer_name=values.get("layer_name"))


WRAPS = "a layer with one input and one output, not TimeDistributed"


def wraps(kind: LayerKind) -> bool:
    """Whether TimeDistributed takes a layer of this kind (as Keras applies it to each step)."""
    return (
        not kind.takes_list
        and not kind.selects_output
        and kind.kind != TimeDistributed.kind
        and type(kind).output_count is LayerKind.output_count
    )


@register
class TimeDistributed(LayerKind):
    kind, keras_classes, Config = "time_distributed", ("TimeDistributed",), TimeDistributedConfig
    passes_mask = True

    def from_keras(self, options: KerasOptions) -> TimeDistributedConfig:
        kind, config, name = options.wrapped_layer("layer", wraps, WRAPS)
        return TimeDistributedConfig(kind.kind, config, name)

    def config_from_dict(self, values: Any, node_name: str) -> Any:
        fields = wrapped_config(self, values, node_name, wraps, WRAPS)
        check_known_keys(values, ("layer", "config", "layer_name"), f"layer {node_name!r} ({self.kind})")
        return self.build_config(node_name, **fields)

    def inner(self, context: NodeContext) -> tuple[LayerKind, NodeContext]:
        """The wrapped kind and its context: one time step, the batch axis holding N·T."""
        config = context.config
        kind = kind_of(config.layer)
        inner_input = tuple(context.input_shape[1:])
        node = replace(context.node, kind=kind.kind, config=config.config)
        inner_context = replace(
            context,
            node=node,
            input_shapes=(inner_input,),
            output_shape=tuple(kind.output_shape(config.config, (inner_input,))),
            flat_source=None,
            channels_first_flatten=False,
            input_masks=(None,),
        )
        return kind, inner_context

    def keras3_subgroups(self, config: TimeDistributedConfig) -> tuple[str, ...]:
        return tuple(
            "/".join(part for part in ("layer", sub) if part)
            for sub in kind_of(config.layer).keras3_subgroups(config.config)
        )

    def output_shape(self, config: TimeDistributedConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        if len(shape) < 2:
            raise ExchangeError(f"expects (batch, time, …) input, found (batch, {shape})")
        return (shape[0],) + tuple(kind_of(config.layer).output_shape(config.config, (tuple(shape[1:]),)))

    def keras_variables(
        self, context: NodeContext
    ) -> list[tuple[str, tuple[int, ...]]]:  # the wrapped kind's order (MultiHeadAttention reorders)
        kind, inner_context = self.inner(context)
        return kind.keras_variables(inner_context)

    def ports(self, context: NodeContext) -> list[AnyPort]:
        kind, inner_context = self.inner(context)
        return kind.ports(inner_context)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        torch = builder.torch
        kind, inner_context = self.inner(context)
        rank, inner_rank = len(context.input_shape), len(inner_context.input_shape)
        steps = builder.call(torch.permute, inputs[0], to_keras_order(rank))  # (N, T, …) as Keras has it
        batch = builder.method(steps, "size", 0)
        merged = builder.call(torch.flatten, steps, 0, 1)  # (N·T, …)
        if inner_rank >= 2:
            merged = builder.call(torch.permute, merged, to_torch_order(inner_rank))
        value = kind.torch_forward(builder, inner_context, [merged])
        out_rank = len(inner_context.output_shape)
        if out_rank >= 2:
            value = builder.call(torch.permute, value, to_keras_order(out_rank))
        value = builder.call(torch.unflatten, value, 0, (batch, -1))  # (N, T, …)
        return builder.call(torch.permute, value, to_torch_order(out_rank + 1))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        kind, inner_context = self.inner(context)
        inner_node = replace(inner_context.node, name=context.config.layer_name)
        layer = kind.keras_layer(keras, replace(inner_context, node=inner_node))
        return keras.layers.TimeDistributed(layer, **context.keras_identity)


# The kinds SpectralNormalization takes: layers with a `kernel` variable, their first (Keras
# refuses a layer without `kernel` or `embeddings`; an Embedding's output it casts to the integer
# ids' dtype, refused).
SPECTRAL_KINDS = (
    "dense",
    "einsum_dense",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv1d_transpose",
    "conv2d_transpose",
    "conv3d_transpose",
    "depthwise_conv1d",
    "depthwise_conv2d",
)
SPECTRAL_WRAPS = "only a Dense, EinsumDense or convolution layer is supported inside it"


def spectral_wraps(kind: LayerKind) -> bool:
    return kind.kind in SPECTRAL_KINDS


@dataclass(frozen=True)
class SpectralNormalizationConfig:
    layer: str  # the wrapped layer's kind
    config: Any  # and its config
    layer_name: str  # the wrapped Keras layer's own name
    power_iterations: int = 1  # training only: the power iterations per step

    def __post_init__(self) -> None:
        check_wrapped(self, spectral_wraps, SPECTRAL_WRAPS, "SpectralNormalization")
        if kind_of(self.layer).merged_when_saved(self.config):
            raise ExchangeError(
                "SpectralNormalization of a layer with a LoRA adapter is not supported (its kernel "
                "is the merged kernel, not a variable)"
            )
        check_int(self.power_iterations, "SpectralNormalization power_iterations", MAX_REPEATS)


@register
class SpectralNormalization(LayerKind):
    """The wrapped layer with its stored kernel, as Keras computes at inference (see the module
    docstring); `vector_u` carried on both sides."""

    kind, keras_classes, Config = "spectral_normalization", ("SpectralNormalization",), SpectralNormalizationConfig

    def from_keras(self, options: KerasOptions) -> SpectralNormalizationConfig:
        if options.keras2:
            raise UnsupportedLayerError(
                f"{options.where()}: Keras 2's SpectralNormalization is not supported "
                "(only Keras 3 files are read for it)"
            )
        kind, config, name = options.wrapped_layer("layer", spectral_wraps, SPECTRAL_WRAPS)
        inner_dtype = options.config["layer"]["config"].get("dtype")  # a dict: wrapped_layer checked it
        if _policy(inner_dtype) != _policy(options.config.get("dtype")):
            raise UnsupportedLayerError(
                f"{options.where()}: the wrapped layer's dtype {_short(_policy(inner_dtype))} "
                f"differs from the wrapper's {_short(_policy(options.config.get('dtype')))}; "
                "not supported"
            )
        iterations = options.integer("power_iterations", 1)
        if iterations < 1:
            raise options.unsupported("power_iterations", iterations, "must be at least 1")
        return SpectralNormalizationConfig(kind.kind, config, name, iterations)

    def config_from_dict(self, values: Any, node_name: str) -> Any:
        fields = wrapped_config(self, values, node_name, spectral_wraps, SPECTRAL_WRAPS)
        check_known_keys(
            values, ("layer", "config", "layer_name", "power_iterations"), f"layer {node_name!r} ({self.kind})"
        )
        return self.build_config(node_name, **fields, power_iterations=values.get("power_iterations", 1))

    def inner(self, context: NodeContext) -> tuple[LayerKind, NodeContext]:
        """The wrapped kind and its context: the same shapes, its torch module at `<name>.layer`."""
        kind = kind_of(context.config.layer)
        node = replace(context.node, kind=kind.kind, config=context.config.config)
        return kind, replace(context, node=node, torch_name=f"{context.torch_name}.layer")

    def output_shape(self, config: SpectralNormalizationConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return kind_of(config.layer).output_shape(config.config, input_shapes)

    def keras3_subgroups(self, config: SpectralNormalizationConfig) -> tuple[str, ...]:
        return ("",) + tuple(
            "/".join(part for part in ("layer", sub) if part)
            for sub in kind_of(config.layer).keras3_subgroups(config.config)
        )

    def keras3_file_variables(self, config: SpectralNormalizationConfig, stored: list[Any]) -> list[Any]:
        own, inner = stored[:2], stored[2:]  # [kernel, vector_u] then the layer's [kernel, ...]
        return [inner[0], own[1]] + inner[1:] if len(own) == 2 and inner else stored

    def _kernel_shape(
        self, inner_variables: list[tuple[str, tuple[int, ...]]], context: NodeContext
    ) -> tuple[int, ...]:
        if not inner_variables or inner_variables[0][0] != "kernel":
            raise ExchangeError(
                f"layer {context.node.name!r}: SpectralNormalization needs the wrapped layer's "
                "kernel as its first variable"
            )
        return tuple(inner_variables[0][1])

    def keras_variables(
        self, context: NodeContext
    ) -> list[tuple[str, tuple[int, ...]]]:  # the layer's kernel, vector_u, then its other variables
        kind, inner_context = self.inner(context)
        inner = kind.keras_variables(inner_context)
        return [inner[0], ("vector_u", (1, self._kernel_shape(inner, context)[-1]))] + inner[1:]

    def ports(self, context: NodeContext) -> list[AnyPort]:
        kind, inner_context = self.inner(context)
        kernel_shape = self._kernel_shape(kind.keras_variables(inner_context), context)
        ports: list[AnyPort] = [_under(port, "layer.") for port in kind.ports(inner_context)]
        return ports[:1] + [Port("vector_u", "vector_u", shape=(1, kernel_shape[-1]), buffer=True)] + ports[1:]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        kind, inner_context = self.inner(context)
        kernel_shape = self._kernel_shape(kind.keras_variables(inner_context), context)
        holder = builder.helpers.KerasSpectralNormalization(
            None, kernel_shape[-1], device="meta", dtype=builder.dtype(context)
        )
        builder.root.add_module(context.torch_name, holder)  # the layer's module is added below it
        builder.graph.get_attr(context.torch_name)  # so torch.fx keeps the holder (and vector_u), not a plain Module
        return kind.torch_forward(builder, inner_context, inputs)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        kind, inner_context = self.inner(context)
        inner_node = replace(inner_context.node, name=context.config.layer_name)
        layer = kind.keras_layer(keras, replace(inner_context, node=inner_node))
        return keras.layers.SpectralNormalization(
            layer, power_iterations=context.config.power_iterations, **context.keras_identity
        )


def _policy(dtype: Any) -> Any:
    """The name of a Keras dtype or dtype policy (None: the default, float32)."""
    name = (dtype.get("config") or {}).get("name") if isinstance(dtype, dict) else dtype
    return "float32" if name is None else name


def _under(port: Any, prefix: str) -> Any:  # an AnyPort; its `torch` field is read by duck type
    """The port with its torch keys below `prefix` (the wrapped layer's module)."""
    if isinstance(port, TorchOnly) or isinstance(getattr(port, "torch", None), str):
        return replace(port, torch=prefix + port.torch)
    if isinstance(getattr(port, "torch", None), tuple):
        return replace(port, torch=tuple(prefix + key for key in port.torch))
    return port  # KerasOnly: no torch tensor
