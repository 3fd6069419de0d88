"""Activations: the function table shared by every layer with an `activation` option, and the
layers that only apply one (Activation, ReLU, LeakyReLU, Softmax, ELU).

Conventions that differ:
- Keras applies `softmax` over the last axis, the channels of an image; torch holds images
  channels-first, so the torch side uses `dim=1` (which is also the last axis of a flat input).
  The Softmax layer's axes (one or several; never the batch axis) are remapped the same way;
  a mask of lower rank than its input broadcasts from the right in Keras's order (see Softmax).
- `hard_sigmoid` is relu6(x + 3) / 6 in Keras 3 (= `F.hardsigmoid`) but clip(0.2x + 0.5, 0, 1)
  in Keras 2. A Keras 2 file's `hard_sigmoid` is read as `hard_sigmoid_keras2`.
- Keras 2 spells silu `swish`; Keras 3's `gelu` activation is the exact (erf) form.
- `--verify` of a Keras 2 file without tf-keras rebuilds it in Keras 3, which has no name for
  Keras 2's hard_sigmoid: inside `keras_formulas()` the rebuild gets it as a keras.ops function
  (`KERAS_FORMULAS`); such a model is only run, never saved (a function has no config).
- PReLU: Keras's alpha has the input's shape without the batch (1 on `shared_axes`), channels
  last; torch's is channels-first. An alpha of one value per channel (every other axis shared),
  or of one value, is `nn.PReLU`'s `weight` of shape (C,) or (1,); an alpha with extent along
  another axis is `KerasPReLU`'s `weight` in the channels-first layout.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_AXIS,
    OMIT_DEFAULT,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    _short,
    check_axis,
    check_int,
    coerce,
    register,
)
from exchange.kinds.axis_order import torch_shape
from exchange.ports import Permute, Port, Reshape, Step

if TYPE_CHECKING:
    from exchange.graph import Node, NodeContext, Shape
    from exchange.ports import AnyPort


def _np_softmax(x: Any) -> Any:
    exponentials = np.exp(x - x.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Activation:
    """One activation, the one table every part of the exchange reads (the layer kinds, the
    recurrent helper module and the seed MLP): its torch form as (namespace, function name,
    keyword arguments) on channels-first tensors, resolved against `torch`, `F` (functional) or
    `helpers` (`exchange.torch_modules`) so that this module imports no torch; its Keras 3 name
    (None where Keras 3 has none); and, where written, a numpy form (on Keras-layout arrays)."""

    torch: tuple[str, str, dict[str, Any]]
    keras: str | None
    numpy: Callable[[Any], Any] | None = None


# Keyed by the exchange's name for the activation (Keras 3's, except hard_sigmoid_keras2 and gelu_tanh).
ACTIVATIONS: dict[str, Activation] = {
    "linear": Activation(("helpers", "identity", {}), "linear", lambda x: x),
    "relu": Activation(("F", "relu", {}), "relu", lambda x: np.maximum(x, 0)),
    "relu6": Activation(("F", "relu6", {}), "relu6", lambda x: np.clip(x, 0, 6)),
    "tanh": Activation(("torch", "tanh", {}), "tanh", np.tanh),
    "sigmoid": Activation(("torch", "sigmoid", {}), "sigmoid", lambda x: 1 / (1 + np.exp(-x))),
    "hard_sigmoid": Activation(("F", "hardsigmoid", {}), "hard_sigmoid", lambda x: np.clip(x + 3, 0, 6) / 6),
    "hard_sigmoid_keras2": Activation(
        ("helpers", "keras2_hard_sigmoid", {}), None, lambda x: np.clip(0.2 * x + 0.5, 0, 1)
    ),
    "softmax": Activation(("torch", "softmax", {"dim": 1}), "softmax", _np_softmax),
    "log_softmax": Activation(("torch", "log_softmax", {"dim": 1}), "log_softmax"),
    "silu": Activation(("F", "silu", {}), "silu", lambda x: x / (1 + np.exp(-x))),
    "hard_silu": Activation(("F", "hardswish", {}), "hard_silu"),
    "gelu": Activation(("F", "gelu", {}), "gelu"),
    "gelu_tanh": Activation(("F", "gelu", {"approximate": "tanh"}), None),
    "elu": Activation(("F", "elu", {}), "elu"),
    "selu": Activation(("F", "selu", {}), "selu"),
    "softplus": Activation(("F", "softplus", {}), "softplus", lambda x: np.logaddexp(0, x)),
    "softsign": Activation(("F", "softsign", {}), "softsign", lambda x: x / (1 + np.abs(x))),
    "mish": Activation(("F", "mish", {}), "mish"),
    "exponential": Activation(("torch", "exp", {}), "exponential", np.exp),
}
# Activations that act on each element alone (no axis): what a recurrent cell's gates may use.
ELEMENTWISE_ACTIVATIONS = tuple(name for name, activation in ACTIVATIONS.items() if not activation.torch[2])
KERAS_SPELLINGS = {"swish": "silu", "hard_swish": "hard_silu"}


def read_activation(options: KerasOptions, key: str = "activation") -> str:
    """The exchange name of a layer's activation option; anything else is an error naming it."""
    value = options.take(key, "linear")
    if value is None:
        return "linear"
    if isinstance(value, dict) and isinstance(value.get("config"), str):  # Keras 3 serialized function
        value = value["config"]
    if not isinstance(value, str):
        raise options.unsupported(key, value, "only built-in activations are supported")
    name = KERAS_SPELLINGS.get(value, value)
    if name == "hard_sigmoid" and options.keras2:
        name = "hard_sigmoid_keras2"
    formula = name.removeprefix(FORMULA_PACKAGE + ">")
    if formula != name and formula in _formula_functions:  # a live model of `keras_formulas()`
        return formula
    if name not in ACTIVATIONS or (ACTIVATIONS[name].keras is None and not options.keras2):
        readable = sorted(name for name, activation in ACTIVATIONS.items() if activation.keras)
        raise options.unsupported(key, value, f"supported: {', '.join(readable)}")
    return name


def check_activation(name: str, what: str) -> str:
    coerce(name, str, what)
    if name not in ACTIVATIONS:
        raise UnsupportedLayerError(f"{what}: unsupported activation {_short(name)}")
    return name


def torch_function(name: str, namespaces: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    """(function, keyword arguments) of activation `name`, looked up on `namespaces` (an object
    with `torch`, `F` and `helpers`: a torch builder, or `exchange.torch_modules.NAMESPACES`)."""
    namespace, function_name, keywords = ACTIVATIONS[name].torch
    return getattr(getattr(namespaces, namespace), function_name), keywords


def torch_activation(builder: TorchBuilder, name: str, value: TorchValue) -> TorchValue:
    """Apply activation `name` in the torch graph: one statement (none for `linear`)."""
    if name == "linear":
        return value
    function, keywords = torch_function(name, builder)
    return builder.call(function, value, **keywords)


# The activations Keras 3 has no name for, as keras.ops functions (and the formula, said in
# --verify's output): what `--verify` rebuilds a Keras 2 model with when tf-keras is missing.
KERAS_FORMULAS: dict[str, tuple[str, Callable[[Any], Callable[[Any], Any]]]] = {
    "hard_sigmoid_keras2": ("clip(0.2x + 0.5, 0, 1)", lambda ops: lambda x: ops.clip(0.2 * x + 0.5, 0.0, 1.0)),
    "gelu_tanh": ("gelu(x, approximate=True)", lambda ops: lambda x: ops.gelu(x, approximate=True)),
}
_formulas_used: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("keras_formulas", default=None)
_formula_functions: dict[str, object] = {}
# How Keras names such a function in a config (registered, so that the model's config reads back).
FORMULA_PACKAGE = "exchange"


@contextmanager
def keras_formulas() -> Iterator[set[str]]:
    """While the block runs, `keras_activation` gives the activations Keras 3 has no name for as
    keras.ops functions (KERAS_FORMULAS) instead of refusing them; yields the set of those used.
    For a model that is run, never saved (`--verify`)."""
    used: set[str] = set()
    token = _formulas_used.set(used)
    try:
        yield used
    finally:
        _formulas_used.reset(token)


def _formula_function(name: str) -> object:
    """KERAS_FORMULAS[name] as a Keras function, registered once as `exchange>NAME`."""
    if name not in _formula_functions:
        import keras

        function = KERAS_FORMULAS[name][1](keras.ops)
        function.__name__ = name
        _formula_functions[name] = keras.saving.register_keras_serializable(FORMULA_PACKAGE, name)(function)
    return _formula_functions[name]


def keras_activation(name: str, what: str) -> object:
    """The Keras 3 name of activation `name` (a keras.ops function inside `keras_formulas()`)."""
    keras_name = ACTIVATIONS[name].keras
    if keras_name is None:
        used = _formulas_used.get()
        if used is not None and name in KERAS_FORMULAS:
            used.add(name)
            return _formula_function(name)
        from exchange.errors import UnsupportedLayerError

        raise UnsupportedLayerError(f"{what}: activation {name!r} has no Keras 3 equivalent")
    return keras_name


def numpy_activation(name: str, what: str) -> Callable[[Any], Any]:
    function = ACTIVATIONS[name].numpy
    if function is None:
        from exchange.errors import UnsupportedLayerError

        raise UnsupportedLayerError(f"{what}: no numpy form of activation {name!r}; install torch")
    return function


@dataclass(frozen=True)
class ActivationConfig:
    activation: str

    def __post_init__(self) -> None:
        check_activation(self.activation, "Activation")


@register
class ActivationLayer(LayerKind):
    kind, keras_classes, Config = "activation", ("Activation",), ActivationConfig
    passes_mask = True
    keeps_element_order = True

    def output_activation(self, config: ActivationConfig) -> str | None:
        return config.activation

    def passes_input_in_training(self, config: ActivationConfig) -> bool:
        return config.activation == "linear"  # Keras's linear returns its input

    def from_keras(self, options: KerasOptions) -> ActivationConfig:
        return ActivationConfig(options.activation())

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        return torch_activation(builder, context.config.activation, inputs[0])

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.Activation(
            keras_activation(context.config.activation, context.node.name), **context.keras_identity
        )

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        return numpy_activation(context.config.activation, context.node.name)(inputs[0])


@dataclass(frozen=True)
class ReLUConfig:
    max_value: float | None = None
    negative_slope: float = 0.0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        # Keras's ReLU refuses a negative max_value, negative_slope or threshold
        for name in ("max_value", "negative_slope", "threshold"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ExchangeError(f"ReLU {name} must be a non-negative number, got {value!r}")


@register
class ReLU(LayerKind):
    """Keras's ReLU: x >= threshold -> min(x, max_value); below -> negative_slope * (x - threshold).
    The plain and the relu6 forms are `F.relu` / `F.relu6`; others a `KerasReLU` module."""

    kind, keras_classes, Config = "relu", ("ReLU",), ReLUConfig
    passes_mask = True
    keeps_element_order = True

    def from_keras(self, options: KerasOptions) -> ReLUConfig:
        max_value = options.take("max_value", None)
        return ReLUConfig(
            None if max_value is None else float(max_value),
            options.number("negative_slope", 0.0),
            options.number("threshold", 0.0),
        )

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        if config.negative_slope == 0 and config.threshold == 0 and config.max_value in (None, 6.0):
            return builder.call(builder.F.relu if config.max_value is None else builder.F.relu6, inputs[0])
        return builder.module(
            context, builder.helpers.KerasReLU(config.max_value, config.negative_slope, config.threshold), inputs[0]
        )

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.ReLU(
            max_value=config.max_value,
            negative_slope=config.negative_slope,
            threshold=config.threshold,
            **context.keras_identity,
        )


@dataclass(frozen=True)
class LeakyReLUConfig:
    negative_slope: float = 0.3

    def __post_init__(self) -> None:
        if not self.negative_slope >= 0:  # Keras's LeakyReLU refuses a negative slope
            raise ExchangeError(f"LeakyReLU negative_slope must be a non-negative number, got {self.negative_slope!r}")


@register
class LeakyReLU(LayerKind):
    """Keras 3 spells the slope `negative_slope`, Keras 2 `alpha`; the default is 0.3 in both
    (torch's is 0.01), so it is always written out."""

    kind, keras_classes, Config = "leaky_relu", ("LeakyReLU",), LeakyReLUConfig
    passes_mask = True
    keeps_element_order = True

    def from_keras(self, options: KerasOptions) -> LeakyReLUConfig:
        return LeakyReLUConfig(options.number("negative_slope", 0.3, keras2="alpha"))

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        return builder.call(builder.F.leaky_relu, inputs[0], negative_slope=context.config.negative_slope)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.LeakyReLU(negative_slope=context.config.negative_slope, **context.keras_identity)


@dataclass(frozen=True)
class ELUConfig:
    alpha: float = 1.0


@register
class ELU(LayerKind):
    kind, keras_classes, Config = "elu", ("ELU",), ELUConfig
    passes_mask = True
    keeps_element_order = True

    def from_keras(self, options: KerasOptions) -> ELUConfig:
        return ELUConfig(options.number("alpha", 1.0))

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        return builder.call(builder.F.elu, inputs[0], alpha=context.config.alpha)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return keras.layers.ELU(alpha=context.config.alpha, **context.keras_identity)


# What Keras 3's Softmax puts at masked positions before the softmax (`_large_negative_number`).
SOFTMAX_LARGE_NEGATIVE = {"float16": -3e4}
DEFAULT_SOFTMAX_LARGE_NEGATIVE = -1e9


def _batch_shape(shape: Shape) -> str:
    return "(" + ", ".join(["batch"] + ["None" if size is None else str(size) for size in shape]) + ")"


@dataclass(frozen=True)
class SoftmaxConfig:
    # Keras axis, batch included; negative counts from the end. Several axes (a tuple of two or
    # more) normalise over all of them together.
    axis: int | tuple[int, ...] = -1
    mask_input: bool = field(default=False, metadata=OMIT_DEFAULT)  # Softmax()(x, mask)

    def __post_init__(self) -> None:
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        if isinstance(self.axis, tuple) and not 2 <= len(self.axis) <= MAX_AXIS + 1:
            raise ExchangeError(f"Softmax axis {_short(self.axis)}: one axis, or a tuple of 2 to {MAX_AXIS + 1}")
        for axis in axes:
            check_int(axis, "Softmax axis", MAX_AXIS, -MAX_AXIS)


def softmax_axes(axis: int | tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The Keras axes (batch included) a Softmax normalises over, as positive feature axes in
    1..rank. The batch axis is refused: each row's output would depend on the rows batched with it,
    which Keras's `predict` and a torch call batch differently."""
    values = axis if isinstance(axis, tuple) else (axis,)
    if any(isinstance(value, int) and value in (0, -rank - 1) for value in values):
        raise UnsupportedLayerError(
            f"axis {_short(axis)} is not a feature axis: a softmax over the batch axis "
            "makes each row's output depend on the rows batched with it; not supported"
        )
    axes = tuple(check_axis(value, rank) for value in values)
    if len(set(axes)) != len(axes):
        raise ExchangeError(f"Softmax axis {_short(axis)} names an axis twice")
    return axes


@register
class Softmax(LayerKind):
    """The Keras axes are remapped to torch's channels-first layout. Several axes: Keras computes
    exp(x - logsumexp(x, axes)), and so does the torch side. A mask given as a tensor broadcasts
    against the input from the right, as numpy's rules (Keras's): one of the input's rank is held
    in torch's layout like the input; a shorter one (a (batch,) mask for a (batch, N) input lines
    its batch axis up with N) is applied with the input in Keras's order. Keras keeps the positions
    where a bool mask is True, another mask's where it is > 0.5 (an int mask: > 0), puts −1e9
    (float16: −3e4) elsewhere and zeroes them after the softmax; so does the torch side. A Softmax
    on an input that carries a Keras mask (from an Embedding or Masking) is refused."""

    kind, keras_classes, Config = "softmax", ("Softmax",), SoftmaxConfig
    mask_position = 1  # call(inputs, mask=None)

    def output_activation(self, config: SoftmaxConfig) -> str | None:
        # a one-axis unmasked Softmax returns `activations.softmax`'s output, which carries the logits
        return "softmax" if not isinstance(config.axis, tuple) and not config.mask_input else None

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        if node.config.mask_input:  # Keras passes the mask it was given on (supports_masking)
            return node.inputs[-1]
        if input_masks[0] is not None:  # Keras adds a large negative number at masked steps
            raise UnsupportedLayerError(
                f"layer {node.name!r} (Softmax) on a masked input (mask from {input_masks[0]!r}) is not supported"
            )
        return None

    def from_keras(self, options: KerasOptions) -> SoftmaxConfig:
        axis = options.take("axis", -1)
        if isinstance(axis, list) and len(axis) == 1:
            axis = axis[0]
        if (
            isinstance(axis, list)
            and len(axis) > 1
            and all(isinstance(value, int) and not isinstance(value, bool) for value in axis)
        ):
            axis = tuple(axis)
        if not isinstance(axis, (int, tuple)) or isinstance(axis, bool):
            raise options.unsupported("axis", axis, "an axis or a list of axes")
        return SoftmaxConfig(axis, options.take_mask_input())

    def output_shape(self, config: SoftmaxConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        softmax_axes(config.axis, len(input_shapes[0]))
        if config.mask_input:
            # Keras broadcasts the mask from the right (numpy's rules), batch axes included.
            shape, mask = (None,) + tuple(input_shapes[0]), (None,) + tuple(input_shapes[-1])
            if (
                len(input_shapes) != 2
                or len(mask) > len(shape)
                or any(m not in (1, None) and s is not None and m != s for m, s in zip(mask[::-1], shape[::-1]))
            ):
                raise ExchangeError(
                    f"argument 'mask' of shape {_batch_shape(input_shapes[-1])} for an input of shape "
                    f"{_batch_shape(input_shapes[0])} is not supported: it does not broadcast to it "
                    "(numpy's rules, as Keras's)"
                )
        return input_shapes[0]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        from exchange.kinds.axis_order import to_keras_order, to_torch_order

        torch, rank = builder.torch, len(context.input_shape)
        axes = softmax_axes(context.config.axis, rank)
        if not context.config.mask_input:
            return _softmax(builder, inputs[0], tuple(to_keras_order(rank)[axis] for axis in axes))
        mask_rank = len(context.input_shapes[-1])
        value, mask = inputs[0], inputs[-1]
        keras_order = mask_rank != rank and rank >= 2  # a shorter mask lines up with Keras's axes
        if keras_order:
            value = builder.call(torch.permute, value, to_keras_order(rank))
            if mask_rank >= 2:
                mask = builder.call(torch.permute, mask, to_keras_order(mask_rank))
        dims = axes if keras_order else tuple(to_keras_order(rank)[axis] for axis in axes)
        # Keras keeps the positions where a bool mask is True, another where it is > 0.5 (an int
        # mask cast 0.5 to 0: > 0), puts SOFTMAX_LARGE_NEGATIVE elsewhere, and zeroes them after.
        keep = builder.call(torch.gt, mask, 0.5)
        negative = SOFTMAX_LARGE_NEGATIVE.get(context.node.dtype, DEFAULT_SOFTMAX_LARGE_NEGATIVE)
        value = builder.call(torch.where, keep, value, negative)
        value = _softmax(builder, value, dims)
        value = builder.call(torch.where, keep, value, 0.0)
        return builder.call(torch.permute, value, to_torch_order(rank)) if keras_order else value

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        axis = context.config.axis
        return keras.layers.Softmax(axis=list(axis) if isinstance(axis, tuple) else axis, **context.keras_identity)

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        if context.config.mask_input:
            return keras_layer(arguments[0], mask=arguments[-1])
        return keras_layer(arguments[0])


def _softmax(builder: TorchBuilder, value: TorchValue, dims: tuple[int, ...]) -> TorchValue:
    """Softmax over torch dims: `torch.softmax` for one, exp(x - logsumexp(x, dims)) for several."""
    torch = builder.torch
    if len(dims) == 1:
        return builder.call(torch.softmax, value, dim=dims[0])
    total = builder.call(torch.logsumexp, value, dims, keepdim=True)
    return builder.call(torch.exp, builder.call(torch.sub, value, total))


@dataclass(frozen=True)
class PReLUConfig:
    shared_axes: tuple[int, ...] = ()  # Keras axes (batch is 0) along which one alpha is shared

    def __post_init__(self) -> None:
        for axis in self.shared_axes:
            check_int(axis, "PReLU shared_axes", MAX_AXIS - 1)
        if len(set(self.shared_axes)) != len(self.shared_axes):
            raise ExchangeError(f"PReLU shared_axes {list(self.shared_axes)} repeat an axis")


def _alpha_shape(config: PReLUConfig, input_shape: Shape) -> tuple[int, ...]:
    """Keras's alpha: the input's shape without the batch, 1 along each shared axis."""
    for axis in config.shared_axes:
        if axis > len(input_shape):
            raise ExchangeError(
                f"PReLU shared axis {axis} is not an axis of an input of shape {_batch_shape(input_shape)}"
            )
    shape = tuple(1 if axis + 1 in config.shared_axes else size for axis, size in enumerate(input_shape))
    if None in shape:
        raise UnsupportedLayerError(
            f"PReLU needs a known size along every axis it does not share, "
            f"found input shape {_batch_shape(input_shape)}"
        )
    return cast("tuple[int, ...]", shape)


@register
class PReLU(LayerKind):
    """max(x, 0) - alpha * max(-x, 0), alpha a weight (see the module docstring for its layout)."""

    kind, keras_classes, Config = "prelu", ("PReLU",), PReLUConfig
    passes_mask = True

    def from_keras(self, options: KerasOptions) -> PReLUConfig:
        shared = options.take("shared_axes", None)
        if isinstance(shared, int) and not isinstance(shared, bool):
            shared = [shared]
        if shared is None:
            shared = []
        if not isinstance(shared, list) or not all(
            isinstance(axis, int) and not isinstance(axis, bool) and axis >= 1 for axis in shared
        ):
            raise options.unsupported("shared_axes", shared, "positive axes (batch is 0)")
        return PReLUConfig(tuple(shared))

    def output_shape(self, config: PReLUConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        _alpha_shape(config, input_shapes[0])
        return input_shapes[0]

    def _per_channel(self, alpha: tuple[int, ...]) -> bool:
        """Whether `nn.PReLU` holds this alpha: one value, or one per channel (the last axis)."""
        return all(size == 1 for size in alpha[:-1])

    def ports(self, context: NodeContext) -> list[AnyPort]:
        alpha = _alpha_shape(context.config, context.input_shape)
        steps: tuple[Step, ...] = ()
        if len(alpha) >= 2:
            steps = (Permute((len(alpha) - 1,) + tuple(range(len(alpha) - 1))),)
            if self._per_channel(alpha):
                steps += (Reshape(torch_shape(alpha), alpha[-1:]),)
        return [Port("alpha", "weight", steps, shape=alpha)]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        alpha = _alpha_shape(context.config, context.input_shape)
        if self._per_channel(alpha):
            module = builder.nn.PReLU(alpha[-1], device="meta", dtype=builder.dtype(context))
        else:
            module = builder.helpers.KerasPReLU(torch_shape(alpha), device="meta", dtype=builder.dtype(context))
        return builder.module(context, module, inputs[0])

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        shared = list(context.config.shared_axes) or None
        return keras.layers.PReLU(shared_axes=shared, **context.keras_identity)
