"""Dense and EinsumDense: y = activation(x @ kernel + bias) over the last axis, or over the axes
an einsum equation names; either may carry a LoRA adapter.

Conventions that differ:
- Keras keeps the kernel as (in, out) and computes x @ kernel; torch's `nn.Linear` keeps its
  weight as (out, in) and computes x @ weight.T. The bias is (out,) in both.
- On inputs of rank > 2 Keras applies the kernel to the last axis, the channels; the torch side
  holds such tensors channels-first, so it moves the channel axis last and back around the Linear
  (and around EinsumDense's einsum, whose equation is written for Keras's channels-last layout).
- After a Flatten of an image Keras's inputs come in (H, W, C) order, torch's `flatten` gives
  (C, H, W) order: the weight's input axis is permuted to match (see `Graph.channels_first_flattens`).
- EinsumDense's kernel and bias stay in Keras's shapes (`KerasEinsumDense` runs Keras's own
  equation with `torch.einsum`); nothing is permuted.
- LoRA (`lora_rank`): Keras adds (lora_alpha / lora_rank) * (lora_kernel_a @ lora_kernel_b) to
  the kernel before using it. The torch side keeps the adapter as parameters `lora_a`, `lora_b`
  and merges the same way in `forward` (`LoRALinear`: as PEFT, lora_a (rank, in) and lora_b
  (out, rank), Keras's (in, rank) and (rank, out) transposed; `KerasEinsumDense`: Keras's shapes).
  Keras 3.15's Dense and Embedding re-enable LoRA at build time without `lora_alpha`, so their
  scale is always 1 (alpha = rank); a different `lora_alpha` in their config is refused rather than
  read one way or the other. EinsumDense keeps its lora_alpha. A Keras 3 `.keras` file stores
  only the merged kernel (Keras's `save_own_variables`) and Keras zeroes the adapter on load: such
  a file is read as kernel = merged, lora_a = lora_b = 0 (`merged_when_saved`), which is what
  Keras computes from it. Keras keeps LoRA variables float32 whatever the layer's dtype: LoRA on a
  layer of another dtype is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_AXIS,
    MAX_FEATURES,
    MAX_VOCABULARY,
    OMIT_DEFAULT,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    _short,
    check_int,
    coerce,
    known,
    known_shape,
    register,
)
from exchange.kinds.activations import check_activation, keras_activation, numpy_activation, torch_activation
from exchange.kinds.axis_order import to_torch_order
from exchange.ports import Permute, Port, Reshape, Step

if TYPE_CHECKING:
    from exchange.graph import Node, NodeContext, Shape
    from exchange.ports import AnyPort

# A LoRA adapter's rank: real adapters use 4 to 256.
MAX_LORA_RANK = 1 << 16
LORA_VARIABLE_DTYPE = "float32"  # Keras's enable_lora creates its variables float32


def check_lora(rank: int | None, alpha: float | None, what: str) -> None:
    """A LoRA rank (None: no adapter) and its alpha (None exactly when the rank is None)."""
    if rank is None:
        if alpha is not None:
            raise ExchangeError(f"{what}: lora_alpha {_short(alpha)} without lora_rank")
        return
    check_int(rank, f"{what} lora_rank", MAX_LORA_RANK)
    if alpha is None:
        raise ExchangeError(f"{what}: lora_rank {rank} needs its lora_alpha")
    coerce(alpha, float, f"{what} lora_alpha")
    if not alpha > 0 or alpha > MAX_FEATURES:
        raise ExchangeError(f"{what}: lora_alpha must be above 0 and at most {MAX_FEATURES:,}, got {alpha!r}")


def read_lora(options: KerasOptions, honours_alpha: bool) -> tuple[int | None, float | None]:
    """(lora_rank, lora_alpha) of a Keras config; alpha defaults to the rank, as in Keras. A layer
    that rebuilds LoRA without its alpha (`honours_alpha=False`) refuses an alpha other than its rank."""
    rank = options.take("lora_rank", None)
    alpha = options.take("lora_alpha", None)
    if rank is None:
        if alpha is not None:
            raise options.unsupported("lora_alpha", alpha, "given without lora_rank")
        return None, None
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise options.unsupported("lora_rank", rank, "must be a positive integer")
    if alpha is None:
        return rank, float(rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise options.unsupported("lora_alpha", alpha, "must be a positive number")
    if not honours_alpha and alpha != rank:
        raise options.unsupported(
            "lora_alpha",
            alpha,
            f"Keras 3.15's {options.class_name} ignores it and scales "
            "its LoRA update by 1 (alpha = rank); refused rather than guessed",
        )
    return rank, float(alpha)


def check_lora_dtype(context: NodeContext) -> None:
    if getattr(context.config, "lora_rank", None) is not None and context.node.dtype != LORA_VARIABLE_DTYPE:
        raise UnsupportedLayerError(
            f"layer {context.node.name!r}: LoRA on a {context.node.dtype} layer is not "
            "supported (Keras keeps the adapter float32, the exchange one dtype per layer)"
        )


def lora_keras_args(config: Any) -> dict[str, Any]:
    return {} if config.lora_rank is None else {"lora_rank": config.lora_rank, "lora_alpha": _number(config.lora_alpha)}


def _number(value: float) -> float:
    """An integral alpha as an int, as Keras configs write it."""
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True)
class DenseConfig:
    units: int
    activation: str = "linear"
    use_bias: bool = True
    lora_rank: int | None = field(default=None, metadata=OMIT_DEFAULT)
    lora_alpha: float | None = field(default=None, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_int(self.units, "Dense units", MAX_FEATURES)
        check_activation(self.activation, "Dense")
        check_lora(self.lora_rank, self.lora_alpha, "Dense")
        if self.lora_rank is not None and self.lora_alpha != self.lora_rank:
            raise ExchangeError(
                f"Dense lora_alpha must equal lora_rank (Keras 3.15's Dense scales by 1), "
                f"got {self.lora_alpha!r} for rank {self.lora_rank}"
            )


@register
class Dense(LayerKind):
    kind, keras_classes, Config = "dense", ("Dense",), DenseConfig
    casts_integers = True
    reads_permuted_flat = True
    passes_mask = True

    def output_activation(self, config: DenseConfig) -> str | None:
        return config.activation  # Keras's call ends with `self.activation(x)`

    def from_keras(self, options: KerasOptions) -> DenseConfig:
        options.expect("quantization_config", None)
        rank, alpha = read_lora(options, honours_alpha=False)
        return DenseConfig(options.integer("units"), options.activation(), options.flag("use_bias", True), rank, alpha)

    def merged_when_saved(self, config: DenseConfig) -> tuple[str, ...]:
        return () if config.lora_rank is None else ("lora_kernel_a", "lora_kernel_b")

    def output_shape(self, config: DenseConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if not input_shapes[0] or input_shapes[0][-1] is None:
            raise ExchangeError(f"needs a known feature axis, found input shape (batch, {input_shapes[0]})")
        return tuple(input_shapes[0][:-1]) + (config.units,)

    def _input_rows(self, context: NodeContext, columns: int) -> tuple[Step, ...]:
        """Steps taking a Keras (in, columns) variable to torch's (columns, in), the input axis
        permuted to a channels-first flatten's order where the input is one."""
        steps: tuple[Step, ...] = (Permute((1, 0)),)
        if context.flat_source is not None:
            source = known_shape(context.flat_source, "the flattened image")
            unflat = (columns,) + source
            reordered = tuple(unflat[axis] for axis in to_torch_order(len(source)))
            features = known(context.input_shape[-1], "Dense input features")
            steps += (
                Reshape((columns, features), unflat),
                Permute(to_torch_order(len(source))),
                Reshape(reordered, (columns, features)),
            )
        return steps

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config, features = context.config, known(context.input_shape[-1], "Dense input features")
        ports: list[AnyPort] = [
            Port("kernel", "weight", self._input_rows(context, config.units), shape=(features, config.units))
        ]
        if config.use_bias:
            ports.append(Port("bias", "bias", shape=(config.units,)))
        if config.lora_rank is not None:
            check_lora_dtype(context)
            ports += [
                Port(
                    "lora_kernel_a",
                    "lora_a",
                    self._input_rows(context, config.lora_rank),
                    shape=(features, config.lora_rank),
                ),
                Port("lora_kernel_b", "lora_b", (Permute((1, 0)),), shape=(config.lora_rank, config.units)),
            ]
        return ports

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        if config.lora_rank is None:
            linear = builder.nn.Linear(
                context.input_shape[-1], config.units, bias=config.use_bias, device="meta", dtype=builder.dtype(context)
            )
        else:
            linear = builder.helpers.LoRALinear(
                context.input_shape[-1],
                config.units,
                config.lora_rank,
                config.lora_alpha / config.lora_rank,
                bias=config.use_bias,
                device="meta",
                dtype=builder.dtype(context),
            )
        value = inputs[0]
        channels_moved = len(context.input_shape) > 1
        if channels_moved:
            value = builder.call(builder.torch.movedim, value, 1, -1)
        value = builder.module(context, linear, value)
        if channels_moved:
            value = builder.call(builder.torch.movedim, value, -1, 1)
        return torch_activation(builder, config.activation, value)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.Dense(
            config.units,
            activation=keras_activation(config.activation, context.node.name),
            use_bias=config.use_bias,
            **lora_keras_args(config),
            **context.keras_identity,
        )

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        weight = tensors["weight"]
        if context.config.lora_rank is not None:
            scale = context.config.lora_alpha / context.config.lora_rank
            weight = weight + scale * (tensors["lora_b"] @ tensors["lora_a"])
        hidden = inputs[0] @ weight.T
        if context.config.use_bias:
            hidden = hidden + tensors["bias"]
        return numpy_activation(context.config.activation, context.node.name)(hidden)


# The three equation forms Keras's EinsumDense accepts (`_analyze_einsum_string`), matched in full:
# `ab,bc->ac`, `...b,bc->...c` (the ellipsis leading, batch inside it) and `ab...,bc->ac...`.
EINSUM_PLAIN = re.compile(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)")
EINSUM_LEFT = re.compile(r"\.\.\.([a-zA-Z]+),([a-zA-Z]+)->\.\.\.([a-zA-Z]+)")
EINSUM_RIGHT = re.compile(r"([a-zA-Z]{2,})\.\.\.,([a-zA-Z]+)->([a-zA-Z]+)\.\.\.")
MAX_EQUATION = 3 * (MAX_AXIS + 1) + 10


@dataclass(frozen=True)
class EinsumParts:
    inputs: str  # the input's letters (without the ellipsis)
    kernel: str
    output: str
    ellipsis: str  # "", "left" or "right"


def einsum_parts(equation: str) -> EinsumParts:
    """The parts of an EinsumDense equation, checked: one of Keras's three forms, no letter twice
    in one operand, every kernel and output letter found where Keras looks for it."""
    coerce(equation, str, "EinsumDense equation")
    if len(equation) > MAX_EQUATION:
        raise ExchangeError(f"EinsumDense equation {_short(equation)} is longer than {MAX_EQUATION} characters")
    for pattern, ellipsis in ((EINSUM_PLAIN, ""), (EINSUM_LEFT, "left"), (EINSUM_RIGHT, "right")):
        match = pattern.fullmatch(equation)
        if match:
            inputs, kernel, output = match.groups()
            parts = EinsumParts(inputs, kernel, output, ellipsis)
            break
    else:
        raise ExchangeError(
            f"EinsumDense equation {_short(equation)} is not of the form ab,bc->ac, "
            "...b,bc->...c or ab...,bc->ac... (letters only)"
        )
    for operand in (parts.inputs, parts.kernel, parts.output):
        if len(set(operand)) != len(operand):
            raise ExchangeError(f"EinsumDense equation {equation!r}: a letter repeats in {operand!r}")
    if set(parts.output) - set(parts.inputs) - set(parts.kernel):
        raise ExchangeError(f"EinsumDense equation {equation!r}: output letters not in the input or kernel")
    if set(parts.kernel) - set(parts.inputs) - set(parts.output):
        raise ExchangeError(f"EinsumDense equation {equation!r}: kernel letters not in the input or output")
    if parts.ellipsis != "left" and (parts.inputs[0] != parts.output[0] or parts.inputs[0] in parts.kernel):
        raise ExchangeError(
            f"EinsumDense equation {equation!r}: the first letter is the batch axis; it must "
            "start the output and not be in the kernel"
        )
    return parts


@dataclass(frozen=True)
class EinsumDenseConfig:
    equation: str
    output_shape: tuple[int | None, ...]  # Keras's partial output shape (no batch, no ellipsis axes)
    bias_axes: str | None = None
    activation: str = "linear"
    lora_rank: int | None = field(default=None, metadata=OMIT_DEFAULT)
    lora_alpha: float | None = field(default=None, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        parts = einsum_parts(self.equation)
        if len(self.output_shape) > MAX_AXIS:
            raise ExchangeError(f"EinsumDense output_shape has more than {MAX_AXIS} sizes")
        for size in self.output_shape:
            if size is not None:
                check_int(size, "EinsumDense output_shape size", MAX_FEATURES)
        if self.bias_axes is not None:
            coerce(self.bias_axes, str, "EinsumDense bias_axes")
            if (
                not self.bias_axes
                or len(set(self.bias_axes)) != len(self.bias_axes)
                or not set(self.bias_axes) <= set(parts.output)
            ):
                raise ExchangeError(
                    f"EinsumDense bias_axes {_short(self.bias_axes)} must be distinct letters of the "
                    f"output {parts.output!r}"
                )
        check_activation(self.activation, "EinsumDense")
        check_lora(self.lora_rank, self.lora_alpha, "EinsumDense")


@dataclass(frozen=True)
class EinsumShapes:
    kernel: tuple[int, ...]
    bias: tuple[int, ...] | None
    output: Shape  # without the batch axis


def einsum_shapes(config: EinsumDenseConfig, input_shape: Shape) -> EinsumShapes:
    """Keras's `_analyze_einsum_string` for an input of `input_shape` (no batch axis): the kernel's
    and bias's shapes and the output's, sizes shared with the input taken from it."""
    parts = einsum_parts(config.equation)
    full_input = (None,) + tuple(input_shape)
    elided = len(full_input) - len(parts.inputs)
    partial: list[int | None] = list(config.output_shape)
    lead: list[int | None]
    trail: list[int | None]
    if parts.ellipsis == "":
        expected_outputs = len(parts.output) - 1
        if elided != 0:
            raise ExchangeError(
                f"equation {config.equation!r} takes a rank-{len(parts.inputs)} input, found (batch, {input_shape})"
            )
        input_sizes = dict(zip(parts.inputs, full_input))
        lead, trail = [], []
    elif parts.ellipsis == "left":
        expected_outputs = len(parts.output)
        if elided < 1:
            raise ExchangeError(
                f"equation {config.equation!r} needs the batch axis in its ellipsis; input "
                f"(batch, {input_shape}) has no axis for it"
            )
        input_sizes = dict(zip(parts.inputs, full_input[elided:]))
        lead, trail = list(full_input[:elided]), []
    else:
        expected_outputs = len(parts.output) - 1
        if elided < 0:
            raise ExchangeError(
                f"equation {config.equation!r} needs at least {len(parts.inputs)} input axes, "
                f"found (batch, {input_shape})"
            )
        input_sizes = dict(zip(parts.inputs, full_input))
        lead, trail = [], list(full_input[len(parts.inputs) :])
    if len(partial) != expected_outputs:
        raise ExchangeError(
            f"output_shape {config.output_shape} has {len(partial)} sizes; equation "
            f"{config.equation!r} needs {expected_outputs}"
        )
    named = partial if parts.ellipsis == "left" else [None, *partial]  # one size per output letter
    output_sizes: dict[str, int | None] = {}
    for letter, given in zip(parts.output, named):
        if letter in input_sizes:
            found = input_sizes[letter]
            if given is not None and found is not None and given != found:
                raise ExchangeError(f"output_shape gives {given} for axis {letter!r}, the input has {found}")
            output_sizes[letter] = found if found is not None else given
        else:
            if given is None:
                raise ExchangeError(f"output_shape must give the size of kernel axis {letter!r}")
            output_sizes[letter] = given
    if parts.ellipsis != "left":
        output_sizes[parts.output[0]] = None  # the batch axis
    kernel: list[int] = []
    for letter in parts.kernel:
        size = output_sizes[letter] if letter in output_sizes else input_sizes[letter]
        if size is None:
            raise ExchangeError(f"kernel axis {letter!r} of equation {config.equation!r} needs a fixed size")
        kernel.append(size)
    bias: list[int | None] | None = None
    if config.bias_axes is not None:
        first = min(parts.output.index(letter) for letter in config.bias_axes)
        bias = [output_sizes[letter] if letter in config.bias_axes else 1 for letter in parts.output[first:]]
        bias += [1] * len(trail)
        if None in bias:
            raise ExchangeError(f"bias axes {config.bias_axes!r} need fixed sizes")
    output = lead + [output_sizes[letter] for letter in parts.output] + trail
    return EinsumShapes(tuple(kernel), None if bias is None else known_shape(tuple(bias), "bias"), tuple(output[1:]))


@register
class EinsumDense(LayerKind):
    """Keras's EinsumDense: `einsum(equation, x, kernel) + bias`, then the activation. The equation
    is one of Keras's three forms (ab,bc->ac, ...b,bc->...c, ab...,bc->ac...: letters, `,`, `->`
    and `...`), no letter twice in one operand."""

    kind, keras_classes, Config = "einsum_dense", ("EinsumDense",), EinsumDenseConfig
    casts_integers = True

    def output_activation(self, config: EinsumDenseConfig) -> str | None:
        return config.activation  # Keras's call ends with `self.activation(x)`

    def from_keras(self, options: KerasOptions) -> EinsumDenseConfig:
        options.expect("quantization_config", None)
        options.expect("gptq_unpacked_column_size", None)
        equation = options.take("equation")
        if not isinstance(equation, str):
            raise options.unsupported("equation", equation, "must be a string")
        output_shape = options.take("output_shape")
        if isinstance(output_shape, int) and not isinstance(output_shape, bool):
            output_shape = [output_shape]
        if not isinstance(output_shape, (list, tuple)) or not all(
            size is None or (isinstance(size, int) and not isinstance(size, bool)) for size in output_shape
        ):
            raise options.unsupported("output_shape", output_shape, "must be sizes or null")
        bias_axes = options.take("bias_axes", None)
        if bias_axes is not None and not isinstance(bias_axes, str):
            raise options.unsupported("bias_axes", bias_axes, "must be a string of output letters")
        rank, alpha = read_lora(options, honours_alpha=True)
        return EinsumDenseConfig(equation, tuple(output_shape), bias_axes or None, options.activation(), rank, alpha)

    def merged_when_saved(self, config: EinsumDenseConfig) -> tuple[str, ...]:
        return () if config.lora_rank is None else ("lora_kernel_a", "lora_kernel_b")

    def output_shape(self, config: EinsumDenseConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return einsum_shapes(config, input_shapes[0]).output

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config = context.config
        shapes = einsum_shapes(config, context.input_shape)
        ports: list[AnyPort] = [Port("kernel", "kernel", shape=shapes.kernel)]
        if shapes.bias is not None:
            ports.append(Port("bias", "bias", shape=shapes.bias))
        if config.lora_rank is not None:
            check_lora_dtype(context)
            ports += [
                Port("lora_kernel_a", "lora_a", shape=shapes.kernel[:-1] + (config.lora_rank,)),
                Port("lora_kernel_b", "lora_b", shape=(config.lora_rank, shapes.kernel[-1])),
            ]
        return ports

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        shapes = einsum_shapes(config, context.input_shape)
        module = builder.helpers.KerasEinsumDense(
            config.equation,
            shapes.kernel,
            shapes.bias,
            config.lora_rank,
            1.0 if config.lora_rank is None else config.lora_alpha / config.lora_rank,
            device="meta",
            dtype=builder.dtype(context),
        )
        value = inputs[0]
        if len(context.input_shape) > 1:
            value = builder.call(builder.torch.movedim, value, 1, -1)
        value = builder.module(context, module, value)
        if len(context.output_shape) > 1:
            value = builder.call(builder.torch.movedim, value, -1, 1)
        return torch_activation(builder, config.activation, value)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.EinsumDense(
            config.equation,
            list(config.output_shape),
            activation=keras_activation(config.activation, context.node.name),
            bias_axes=config.bias_axes,
            **lora_keras_args(config),
            **context.keras_identity,
        )


# The reverse dtypes read besides the layer's own: logits of a float32 layer computed in half precision.
REVERSE_DTYPES = (None, "float16", "bfloat16")


def check_reverse_dtype(context: NodeContext) -> None:
    if context.config.reverse_dtype is not None and context.node.dtype != "float32":
        raise UnsupportedLayerError(
            f"layer {context.node.name!r}: reverse_dtype {context.config.reverse_dtype!r} of a "
            f"{context.node.dtype} layer is not supported (only of a float32 layer)"
        )


@dataclass(frozen=True)
class ReversibleEmbeddingConfig:
    input_dim: int
    output_dim: int
    mask_zero: bool = False
    tie_weights: bool = True
    reverse: bool = False  # called with reverse=True: x @ embeddings.T, logits
    logit_soft_cap: float | None = None  # reverse only: tanh(logits / cap) * cap
    # reverse only: the half-precision dtype the logits are computed in (None: the layer's)
    reverse_dtype: str | None = field(default=None, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        if self.reverse_dtype not in REVERSE_DTYPES or (
            self.reverse_dtype is not None and (self.logit_soft_cap is not None or not self.reverse)
        ):
            raise ExchangeError(
                f"ReversibleEmbedding reverse_dtype {_short(self.reverse_dtype)} is not one of "
                f"{', '.join(map(repr, REVERSE_DTYPES))}, or is given without a reverse call or "
                "with a logit_soft_cap"
            )
        check_int(self.input_dim, "ReversibleEmbedding input_dim (the vocabulary)", MAX_VOCABULARY)
        check_int(self.output_dim, "ReversibleEmbedding output_dim", MAX_FEATURES)
        if self.logit_soft_cap is not None:
            coerce(self.logit_soft_cap, float, "ReversibleEmbedding logit_soft_cap")
            if not self.logit_soft_cap > 0:
                raise ExchangeError(f"ReversibleEmbedding logit_soft_cap must be above 0, got {self.logit_soft_cap!r}")


@register
class ReversibleEmbedding(LayerKind):
    """Keras's ReversibleEmbedding. Called plainly it is an Embedding (token ids -> vectors, the
    mask `ids != 0` with mask_zero); called with `reverse=True` it maps vectors to logits over the
    vocabulary, x @ embeddings.T (tie_weights) or x @ reverse_embeddings, then the optional soft cap
    tanh(logits / cap) * cap. The torch side holds the reverse kernel as `nn.Linear` does, (vocabulary,
    dim): the embeddings themselves when tied, Keras's (dim, vocabulary) `reverse_embeddings`
    transposed (`reverse_weight`) when not. Reverse mode works on the channels, so it moves them
    last and back as Dense does. With `reverse_dtype` float16 or bfloat16 (of a float32 layer, no
    soft cap: TensorFlow's half-precision tanh rounds differently) Keras casts the vectors and the
    kernel to it and computes the logits there;
    so does the torch side, which then returns them as float32, the dtype Keras declares for the
    layer's output (its tensor holds the half-precision dtype: the same values)."""

    kind, keras_classes, Config = "reversible_embedding", ("ReversibleEmbedding",), ReversibleEmbeddingConfig

    def dense_lookup_gradient(self, config: ReversibleEmbeddingConfig) -> bool:
        return True  # Keras's lookups give gradient rows; the torch module's is dense

    def reads_integers(self, node: Node, position: int) -> bool:
        return not node.config.reverse  # token ids

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        config = node.config
        return node.inputs[0] if config.mask_zero and not config.reverse else None

    def from_keras(self, options: KerasOptions) -> ReversibleEmbeddingConfig:
        options.expect("lora_rank", None)
        options.expect("lora_alpha", None)
        options.expect("quantization_config", None)
        options.expect("sparse", False)
        reverse = options.call_kwargs.get("reverse", False)
        if not isinstance(reverse, bool):
            raise options.unsupported("reverse", reverse, "the call's reverse must be true or false")
        reverse_dtype = options.take("reverse_dtype", None)
        if not reverse or reverse_dtype == "float32":  # no reverse call, or the default
            reverse_dtype = None
        if reverse_dtype not in REVERSE_DTYPES:
            raise options.unsupported(
                "reverse_dtype", reverse_dtype, "only float32, float16 or bfloat16 logits are supported"
            )
        cap = options.take("logit_soft_cap", None)
        if reverse_dtype is not None and cap is not None:
            raise options.unsupported(
                "reverse_dtype",
                reverse_dtype,
                "with a logit_soft_cap: TensorFlow's "
                "half-precision tanh rounds some logits one unit apart from torch's",
            )
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool)):
            raise options.unsupported("logit_soft_cap", cap, "must be a number")
        return ReversibleEmbeddingConfig(
            options.integer("input_dim"),
            options.integer("output_dim"),
            options.flag("mask_zero", False),
            options.flag("tie_weights", True),
            reverse,
            None if cap is None else float(cap),
            reverse_dtype,
        )

    def output_shape(self, config: ReversibleEmbeddingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = tuple(input_shapes[0])
        if not config.reverse:
            return shape + (config.output_dim,)
        if not shape or shape[-1] != config.output_dim:
            raise ExchangeError(f"reverse call needs {config.output_dim} features last, found (batch, {shape})")
        return shape[:-1] + (config.input_dim,)

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config = context.config
        check_reverse_dtype(context)
        ports: list[AnyPort] = [Port("embeddings", "weight", shape=(config.input_dim, config.output_dim))]
        if not config.tie_weights:
            ports.append(
                Port(
                    "reverse_embeddings",
                    "reverse_weight",
                    (Permute((1, 0)),),
                    shape=(config.output_dim, config.input_dim),
                )
            )
        return ports

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        module = builder.helpers.KerasReversibleEmbedding(
            config.input_dim,
            config.output_dim,
            tie_weights=config.tie_weights,
            reverse=config.reverse,
            logit_soft_cap=config.logit_soft_cap,
            reverse_dtype=None if config.reverse_dtype is None else getattr(builder.torch, config.reverse_dtype),
            device="meta",
            dtype=builder.dtype(context),
        )
        value = inputs[0]
        if not config.reverse:
            ids = builder.method(value, "long")
            if config.mask_zero and context.node.inputs[0] not in builder.masks:
                builder.masks[context.node.inputs[0]] = builder.call(builder.torch.ne, ids, 0)
            value = builder.module(context, module, ids)
            return builder.call(builder.torch.movedim, value, -1, 1) if context.input_shape else value
        moved = len(context.input_shape) > 1
        if moved:
            value = builder.call(builder.torch.movedim, value, 1, -1)
        value = builder.module(context, module, value)
        return builder.call(builder.torch.movedim, value, -1, 1) if moved else value

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.ReversibleEmbedding(
            config.input_dim,
            config.output_dim,
            tie_weights=config.tie_weights,
            mask_zero=config.mask_zero,
            logit_soft_cap=config.logit_soft_cap,
            reverse_dtype=config.reverse_dtype,
            **context.keras_identity,
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        return keras_layer(arguments[0], reverse=True) if context.config.reverse else keras_layer(arguments[0])
