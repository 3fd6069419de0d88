"""MultiHeadAttention: Keras's multi-head dot-product attention over the sequence axis; Attention
and AdditiveAttention (at the end of this module: `KerasAttention`).

Keras projects the query to (heads, key_dim), the key to (heads, key_dim) and the value to
(heads, value_dim) per step, attends per head with softmax(q·kᵀ / sqrt(key_dim)), and projects the
concatenated heads to `output_shape` (default: the query's width). Conventions that differ:
- Kernels. Keras keeps each projection as a (features, heads, dim) kernel and a (heads, dim) bias,
  the output one as (heads, value_dim, *output_shape). Torch keeps (heads·dim, features) weights
  with the heads outermost: a Keras kernel flattens to (features, heads·dim) head-major, then is
  transposed; the output kernel flattens to (heads·value_dim, out) and is transposed.
- `nn.MultiheadAttention` can hold this exactly when heads·key_dim is the query's width,
  value_dim = key_dim and the output width is the query's: its head width is then key_dim, so its
  1/sqrt(head_dim) scaling is Keras's 1/sqrt(key_dim). Query, key and value of one width pack
  into `in_proj_weight` (3E, E); otherwise `q_proj_weight`, `k_proj_weight`, `v_proj_weight`.
  The three biases always pack into `in_proj_bias`. Anything else is `KerasMultiHeadAttention`
  (`exchange.torch_modules`), keys `query.weight`, …, `output.weight`.
- Masks. Keras joins the query's and value's (and key's) Keras masks, `use_causal_mask` and an
  explicit `attention_mask` with AND, and puts a large negative number (not -inf) at the masked
  logits, so a fully masked query row attends uniformly instead of giving NaN. The torch side
  builds the same mask and adds it as a float mask with Keras's number.
- Layout. The torch side holds sequences channels-first (N, F, T): each input is moved to
  (N, T, F) for batch-first attention and the output moved back; an `attention_mask` input
  (Keras (N, T, S)) is held as (N, S, T) and moved likewise.

- Two ways. Keras computes attention with its dot_product_attention (the large negative number
  above) unless `dropout` > 0 or `return_attention_scores`: then it scales the query, puts −1e9
  at masked scores and zeroes them after the softmax, so a fully masked query row gives 0 rather
  than an average. Such layers are `KerasMultiHeadAttention` with `explicit_scores`; the scores
  (Keras (N, heads, T, S)) are a second output, held channels-first as (N, S, heads, T).
- `attention_axes` other than the sequence (inputs (N, …, F) of any rank; Keras's None is every
  axis between the batch and the features): the torch side folds the other axes into the batch
  and the attended ones, in Keras's order, into one sequence ((N·others, steps, F)), attends as
  above, and unfolds; the scores are Keras's (N, others, heads, query axes, value axes), held
  channels-first. Keras then always takes its explicit path. `use_causal_mask` and
  `sliding_window` masks, which Keras builds from the sizes of axis 1, apply over the folded
  sequence when axis 1 alone is attended (the folded steps are then axis 1's); with other attended
  axes they, input masks and `attention_mask` are refused.
- `use_gate`: a sigmoid gate projected from the query (to the value heads, Keras's `_gate_dense`)
  multiplies the heads before the output projection (`KerasMultiHeadAttention`'s
  `gate_projection`). `sliding_window` keeps |i − j| < window, AND-ed with the other masks.

Inference only: `dropout` is kept (it acts in training) and needs nothing at inference.
Precision: TensorFlow's Keras rounds the 1/sqrt(key_dim) scale to float32 even in a float64 model;
the torch side does not, so float64 models agree to about 1e-8 rather than 1e-15.

Attention and AdditiveAttention. Keras's Attention scores q·kᵀ (× scale with use_scale), or with
score_mode="concat" w · Σ tanh(scale · (q + k)); AdditiveAttention Σ scale · tanh(q + k), scale a
(features,) vector; then softmax over the value steps and the weighted sum of the values.
Conventions that differ:
- Layout. The torch side holds the inputs channels-first (N, F, …, T); each is moved to Keras's
  (N, …, T, F) for `KerasAttention`, the output moved back, and the attention scores (Keras
  (N, …, Tq, Tv)) are held channels-first as (N, Tv, …, Tq).
- Masks. Keras subtracts 1e9 (float16: 65504) from the scores of masked value steps and, with
  `use_causal_mask`, of future steps (a subtraction, not a replacement), and zeroes the output
  at masked query steps; `KerasAttention` does the same. The key's mask is not read (Keras reads
  the query's and the value's). Masks given as tensors (`mask=[…]`) are refused.
`dropout` acts in training only.

GroupedQueryAttention (Keras also calls it GroupQueryAttention): as MultiHeadAttention, but the key
and value are projected to fewer heads (`num_key_value_heads`), each serving `num_query_heads /
num_key_value_heads` consecutive query heads (Keras's `ops.repeat` on the heads axis is torch's
`repeat_interleave`); scaled by 1/sqrt(head_dim); output projected back to the query's width.
Its kernels move as MultiHeadAttention's, into `KerasGroupedQueryAttention`'s `nn.Linear`s (with
`use_gate`, a sigmoid gate projected from the query multiplies the heads). Masks are joined as
MultiHeadAttention's (a `sliding_window` keeps |i − j| < window). Keras computes the attention two
ways: with `dropout` > 0 or `return_attention_scores` it scales the query, puts −1e9 at masked
scores and zeroes them after the softmax (a fully masked row gives 0); otherwise its
dot_product_attention puts the large negative number (a fully masked row averages). The module
takes the same path (`explicit_scores`). The scores (N, heads, T, S) are held as (N, S, heads, T).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from math import prod
from types import ModuleType
from typing import TYPE_CHECKING, Any, overload

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_AXIS,
    MAX_FEATURES,
    MAX_HEADS,
    OMIT_DEFAULT,
    TENSOR,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    check_int,
    check_ints,
    known,
    register,
)
from exchange.kinds.axis_order import to_keras_order, to_torch_order
from exchange.ports import Packed, Permute, Port, Reshape, Step

if TYPE_CHECKING:
    from exchange.graph import Node, NodeContext, Shape
    from exchange.ports import AnyPort

# What each node input is in the Keras call `layer(query, value, key=None, attention_mask=None)`.
CALL_INPUTS = ("query", "value", "key", "attention_mask")
POSITIONAL_INPUTS = ("query", "value", "key")
# The number Keras puts at masked logits (TensorFlow's dot_product_attention: 0.7 × the dtype's
# largest value, so that adding a logit cannot overflow to -inf).
LARGE_NEGATIVE = {"float16": -45850.0}  # 0.7 × 65500
DEFAULT_LARGE_NEGATIVE = -2.372671e38  # 0.7 × 3.38953e38
# The four projections in Keras's variable order (kernel, then bias, of each). Keras 3 files keep
# them in `<layer>/query_dense/vars`, …, `output_dense/vars`; Keras 2 names them `mha/query/kernel:0`,
# …, `mha/attention_output/bias:0`, so `kernel` and `bias` are aliases of each variable name.
PROJECTIONS = ("query", "key", "value", "output")
# With `use_gate` Keras builds a fourth projection between the key and the value, in `_gate_dense`.
GATED_PROJECTIONS = ("query", "key", "gate", "value", "output")


@dataclass(frozen=True)
class MultiHeadAttentionConfig:
    num_heads: int
    key_dim: int
    value_dim: int
    output_shape: tuple[int, ...] | None = None  # None: the query's width, as in Keras
    use_bias: bool = True
    dropout: float = 0.0
    use_causal_mask: bool = False
    call_inputs: tuple[str, ...] = ("query", "value")  # what each node input is in the call
    use_gate: bool = field(default=False, metadata=OMIT_DEFAULT)
    sliding_window: int | None = field(default=None, metadata=OMIT_DEFAULT)
    return_attention_scores: bool = field(default=False, metadata=OMIT_DEFAULT)
    # Keras axes (batch is 0) attended over, in Keras's order; None: all but the batch and features
    attention_axes: tuple[int, ...] | None = field(default=None, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        if self.sliding_window is not None:
            check_int(self.sliding_window, "MultiHeadAttention sliding_window", MAX_FEATURES)
        if self.attention_axes is not None:
            check_ints(self.attention_axes, "MultiHeadAttention attention_axes", MAX_AXIS, -MAX_AXIS)
        check_int(self.num_heads, "MultiHeadAttention num_heads", MAX_HEADS)
        check_int(self.key_dim, "MultiHeadAttention key_dim", MAX_FEATURES)
        check_int(self.value_dim, "MultiHeadAttention value_dim", MAX_FEATURES)
        if self.output_shape is not None and not 0 < len(self.output_shape) < MAX_AXIS - 1:
            raise ExchangeError("MultiHeadAttention output_shape must be None or 1 to 7 sizes")
        for size in self.output_shape or ():
            check_int(size, "MultiHeadAttention output_shape", MAX_FEATURES)
        check_call_inputs_and_dropout(self.call_inputs, self.dropout, "MultiHeadAttention")


def check_call_inputs_and_dropout(roles: tuple[str, ...], dropout: float, layer: str) -> None:
    """The tensors a MultiHeadAttention or GroupedQueryAttention call names (query, value and
    optionally key and attention_mask, once each) and its dropout rate, in [0, 1)."""
    if (
        len(set(roles)) != len(roles)
        or not set(roles) <= set(CALL_INPUTS)
        or "query" not in roles
        or "value" not in roles
    ):
        raise ExchangeError(
            f"{layer} call_inputs must name query, value and optionally key "
            f"and attention_mask once each, got {list(roles)}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ExchangeError(f"{layer} dropout must be in [0, 1), got {dropout!r}")


def _projections(config: Any) -> tuple[str, ...]:
    return GATED_PROJECTIONS if config.use_gate else PROJECTIONS


@overload
def _output_shape(config: Any, query_width: int) -> tuple[int, ...]: ...
@overload
def _output_shape(config: Any, query_width: int | None) -> Shape: ...
def _output_shape(config: Any, query_width: int | None) -> Shape:
    return tuple(config.output_shape) if config.output_shape is not None else (query_width,)


def _widths(context: NodeContext) -> dict[str, int]:
    """Feature width of the query, key and value inputs (the key defaults to the value)."""
    shapes: dict[str, Shape] = dict(zip(context.config.call_inputs, context.input_shapes))
    key = shapes.get("key", shapes["value"])
    return {
        role: known(shape[-1], f"the {role}'s features")
        for role, shape in (("query", shapes["query"]), ("value", shapes["value"]), ("key", key))
    }


def explicit_scores(config: Any, rank: int = 2) -> bool:
    """Whether Keras computes the scores itself (dropout, returned scores, or inputs other than
    sequences): −1e9 at masked scores, zeroed after the softmax; otherwise its
    dot_product_attention (see the docstring). `rank`: the query's, without the batch."""
    return bool(config.dropout > 0 or config.return_attention_scores or rank != 2)


def fits_torch_multihead(config: Any, query_width: int, rank: int = 2) -> bool:
    """Whether `nn.MultiheadAttention` holds this layer exactly (see the module docstring)."""
    return (
        config.num_heads * config.key_dim == query_width
        and config.value_dim == config.key_dim
        and _output_shape(config, query_width) == (query_width,)
        and not config.use_gate
        and not explicit_scores(config, rank)
    )


def attended_axes(config: Any, rank: int) -> tuple[int, ...]:
    """The Keras axes (positive, in Keras's order) attended over, for inputs of `rank` axes
    after the batch (the last the features): Keras's None is all of 1..rank-1."""
    if config.attention_axes is None:
        return tuple(range(1, rank))
    axes = tuple(axis + rank + 1 if axis < 0 else axis for axis in config.attention_axes)
    if len(set(axes)) != len(axes) or not all(1 <= axis < rank for axis in axes):
        raise UnsupportedLayerError(
            f"MultiHeadAttention attention_axes {list(config.attention_axes)}: not distinct "
            f"axes between the batch and the features of a rank-{rank + 1} input"
        )
    return axes


def _kernel_steps(features: int, heads: int, dim: int) -> tuple[Step, ...]:
    """Keras (features, heads, dim) -> torch (heads·dim, features), heads outermost."""
    return (Reshape((features, heads, dim), (features, heads * dim)), Permute((1, 0)))


def _bias_steps(heads: int, dim: int) -> tuple[Step, ...]:
    return (Reshape((heads, dim), (heads * dim,)),)


@register
class MultiHeadAttention(LayerKind):
    kind, keras_classes, Config = "multi_head_attention", ("MultiHeadAttention",), MultiHeadAttentionConfig
    tensor_kwargs = ("query", "value", "key", "attention_mask")
    variable_aliases = {
        f"{projection}_{variable}": (variable,) for projection in GATED_PROJECTIONS for variable in ("kernel", "bias")
    }

    # -- reading ----------------------------------------------------------------------------

    def reads_integers(self, node: Node, position: int) -> bool:
        roles = node.config.call_inputs
        return position < len(roles) and roles[position] == "attention_mask"

    def from_keras(self, options: KerasOptions) -> MultiHeadAttentionConfig:
        options.expect("softmax_robust_masking", False)  # tf-keras: another masked softmax
        options.take("flash_attention", None)  # an implementation choice: the same attention
        window = options.take("sliding_window", None)
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
            raise options.unsupported("sliding_window", window, "None or a positive integer")
        axes = options.take("attention_axes", None)
        if isinstance(axes, int) and not isinstance(axes, bool):
            axes = [axes]
        if axes is not None and not (
            isinstance(axes, list)
            and axes
            and all(isinstance(axis, int) and not isinstance(axis, bool) for axis in axes)
        ):
            raise options.unsupported("attention_axes", axes, "an axis or a list of axes")
        options.take("seed", None)  # seeds dropout, which acts in training only
        for build_shape in ("query_shape", "key_shape", "value_shape"):
            options.take(build_shape, None)  # Keras 2 records the build shapes; the graph has them
        num_heads, key_dim = options.take("num_heads"), options.take("key_dim")
        value_dim = options.take("value_dim", None) or key_dim
        output_shape = options.take("output_shape", None)
        if isinstance(output_shape, int) and not isinstance(output_shape, bool):
            output_shape = (output_shape,)
        elif output_shape is not None:
            output_shape = tuple(output_shape) or None
        call_inputs, use_causal_mask, return_scores = _read_call(options, scores=True)
        return MultiHeadAttentionConfig(
            num_heads,
            key_dim,
            value_dim,
            output_shape,
            options.flag("use_bias", True),
            options.number("dropout", 0.0),
            use_causal_mask,
            call_inputs,
            options.flag("use_gate", False),
            window,
            return_scores,
            None if axes is None else tuple(axes),
        )

    def keras3_subgroups(self, config: MultiHeadAttentionConfig) -> tuple[str, ...]:
        return tuple(
            "_gate_dense" if projection == "gate" else f"{projection}_dense" for projection in _projections(config)
        )

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        config = node.config
        if config.attention_axes not in (None, (1,), (-2,)) and any(mask is not None for mask in input_masks):
            raise UnsupportedLayerError(
                f"layer {node.name!r} (MultiHeadAttention): masked inputs with "
                f"attention_axes {list(config.attention_axes)} are not supported"
            )
        query: int = config.call_inputs.index("query")
        return input_masks[query]  # Keras sets the query's mask on the output

    def output_count(self, config: MultiHeadAttentionConfig) -> int:
        return 2 if config.return_attention_scores else 1

    def output_shapes(self, config: MultiHeadAttentionConfig, input_shapes: tuple[Shape, ...]) -> list[Shape]:
        output = self.output_shape(config, input_shapes)
        if not config.return_attention_scores:
            return [output]
        shapes = dict(zip(config.call_inputs, input_shapes))
        attended = attended_axes(config, len(shapes["query"]))
        others = [axis for axis in range(1, len(shapes["query"])) if axis not in attended]
        # Keras's scores: (other axes, heads, query's attended axes, value's attended axes)
        return [
            output,
            tuple(shapes["query"][axis - 1] for axis in others)
            + (config.num_heads,)
            + tuple(shapes["query"][axis - 1] for axis in attended)
            + tuple(shapes["value"][axis - 1] for axis in attended),
        ]

    def output_masks(self, node: Node, input_masks: tuple[str | None, ...]) -> list[str | None]:
        return [self.output_mask(node, input_masks)] + [None] * (self.output_count(node.config) - 1)

    # -- shapes and weights -----------------------------------------------------------------

    def output_shape(self, config: MultiHeadAttentionConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if len(input_shapes) != len(config.call_inputs):
            raise ExchangeError(f"{len(input_shapes)} inputs for the call inputs {list(config.call_inputs)}")
        shapes = dict(zip(config.call_inputs, input_shapes))
        rank = len(shapes["query"])
        if rank < 2 or any(len(shapes[role]) != rank for role in ("value", "key") if role in shapes):
            raise ExchangeError(
                f"MultiHeadAttention: query, value and key of shapes "
                f"{[list(shapes[role]) for role in ('query', 'value', 'key') if role in shapes]}; "
                "expected one rank, at least (steps, features)"
            )
        attended = attended_axes(config, rank)
        if rank > 2 or attended != (1,):
            _check_attention_axes(config, shapes, attended)
            return shapes["query"][:-1] + _output_shape(config, shapes["query"][-1])
        source = shapes["value"][0]
        if "key" in shapes and None not in (source, shapes["key"][0]) and shapes["key"][0] != source:
            raise ExchangeError(f"key steps {shapes['key'][0]} differ from value steps {source}")
        if "attention_mask" in shapes:
            mask = shapes["attention_mask"]
            if len(mask) != 2 or any(
                size not in (None, 1, want) for size, want in zip(mask, (shapes["query"][0], source))
            ):
                raise ExchangeError(
                    f"attention_mask of shape {list(mask)} does not broadcast to "
                    f"(query steps, value steps) = ({shapes['query'][0]}, {source})"
                )
        return (shapes["query"][0],) + _output_shape(config, shapes["query"][-1])

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config, widths = context.config, _widths(context)
        heads, out = config.num_heads, _output_shape(config, widths["query"])
        dims = {"query": config.key_dim, "key": config.key_dim, "value": config.value_dim}
        kernel_shapes = {role: (widths[role], heads, dims[role]) for role in dims}
        bias_shapes = {role: (heads, dims[role]) for role in dims}
        kernel_steps = {role: _kernel_steps(widths[role], heads, dims[role]) for role in dims}
        output_kernel = (
            Reshape((heads, config.value_dim) + out, (heads * config.value_dim, prod(out))),
            Permute((1, 0)),
        )
        output_kernel_shape = (heads, config.value_dim) + out
        if not fits_torch_multihead(config, widths["query"], len(context.input_shape)):
            if config.use_gate:  # projected from the query to the value heads
                dims["gate"] = config.value_dim
                kernel_shapes["gate"], bias_shapes["gate"] = (
                    (widths["query"], heads, config.value_dim),
                    (heads, config.value_dim),
                )
                kernel_steps["gate"] = _kernel_steps(widths["query"], heads, config.value_dim)
            module = {role: "gate_projection" if role == "gate" else role for role in dims}  # `gate` is its flag
            ports: list[AnyPort] = [
                Port(f"{role}_kernel", f"{module[role]}.weight", kernel_steps[role], shape=kernel_shapes[role])
                for role in dims
            ]
            ports.append(Port("output_kernel", "output.weight", output_kernel, shape=output_kernel_shape))
            if config.use_bias:
                ports += [
                    Port(
                        f"{role}_bias", f"{module[role]}.bias", _bias_steps(heads, dims[role]), shape=bias_shapes[role]
                    )
                    for role in dims
                ]
                ports.append(Port("output_bias", "output.bias", (Reshape(out, (prod(out),)),), shape=out))
            return ports
        if len({widths["query"], widths["key"], widths["value"]}) == 1:
            ports = [
                Packed(
                    ("query_kernel", "key_kernel", "value_kernel"),
                    "in_proj_weight",
                    tuple(kernel_steps[role] for role in dims),
                    shapes=tuple(kernel_shapes.values()),
                )
            ]
        else:
            ports = [
                Port(f"{role}_kernel", f"{role[0]}_proj_weight", kernel_steps[role], shape=kernel_shapes[role])
                for role in dims
            ]
        ports.append(Port("output_kernel", "out_proj.weight", output_kernel, shape=output_kernel_shape))
        if config.use_bias:
            ports.append(
                Packed(
                    ("query_bias", "key_bias", "value_bias"),
                    "in_proj_bias",
                    tuple(_bias_steps(heads, dims[role]) for role in dims),
                    shapes=tuple(bias_shapes.values()),
                )
            )
            ports.append(Port("output_bias", "out_proj.bias", shape=out))
        return ports

    def keras_variables(self, context: NodeContext) -> list[tuple[str, tuple[int, ...]]]:
        """Keras keeps each projection's kernel then its bias (query, key, value, output); the
        ports pack the three kernels, then the three biases."""
        shapes = dict(super().keras_variables(context))
        return [
            (name, shapes[name])
            for projection in _projections(context.config)
            for name in (f"{projection}_kernel", f"{projection}_bias")
            if name in shapes
        ]

    # -- building -------------------------------------------------------------------------

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, widths, rank = context.config, _widths(context), len(context.input_shape)
        values = dict(zip(config.call_inputs, inputs))
        folding = _Folding(context) if rank > 2 or attended_axes(config, rank) != (1,) else None
        batch_first = {}  # one movedim per distinct input: self-attention reads one tensor

        def steps_last(value: TorchValue) -> TorchValue:
            if value not in batch_first:
                batch_first[value] = (
                    builder.call(builder.torch.movedim, value, 1, -1)
                    if folding is None
                    else folding.fold(builder, value, inputs.index(value))
                )
            return batch_first[value]

        query, value = steps_last(values["query"]), steps_last(values["value"])
        key = steps_last(values["key"]) if "key" in values else value
        bias, per_example = _attention_bias(builder, context, query, value, inputs)
        dtype = builder.dtype(context)
        if fits_torch_multihead(config, widths["query"], rank):
            attention = builder.nn.MultiheadAttention(
                widths["query"],
                config.num_heads,
                dropout=config.dropout,
                bias=config.use_bias,
                kdim=widths["key"],
                vdim=widths["value"],
                batch_first=True,
                device="meta",
                dtype=dtype,
            )
            keywords = {"need_weights": False}
            if bias is not None:
                if per_example:  # nn.MultiheadAttention takes (T, S) or (N·heads, T, S)
                    bias = builder.method(
                        bias, "expand", builder.method(query, "size", 0), *_steps(builder, context, query, value)
                    )
                    bias = builder.method(bias, "repeat_interleave", config.num_heads, 0)
                keywords["attn_mask"] = bias
            builder.root.add_module(context.torch_name, attention)
            output = builder.graph.call_module(context.torch_name, (query, key, value), keywords)
            output = builder.call(operator.getitem, output, 0)  # (output, None) without the weights
        else:
            attention = builder.helpers.KerasMultiHeadAttention(
                widths["query"],
                widths["key"],
                widths["value"],
                config.num_heads,
                config.key_dim,
                config.value_dim,
                _output_shape(config, widths["query"]),
                bias=config.use_bias,
                dropout=config.dropout,
                gate=config.use_gate,
                explicit_scores=explicit_scores(config, rank),
                return_scores=config.return_attention_scores,
                device="meta",
                dtype=dtype,
            )
            output = builder.module(context, attention, query, key, value, *(() if bias is None else (bias,)))
        if folding is not None:
            return folding.unfold(builder, output)
        if config.return_attention_scores:  # Keras's (N, heads, T, S) held channels-first: (N, S, heads, T)
            scores = builder.call(builder.torch.permute, builder.call(operator.getitem, output, 1), to_torch_order(3))
            return builder.call(builder.torch.movedim, builder.call(operator.getitem, output, 0), -1, 1), scores
        return builder.call(builder.torch.movedim, output, -1, 1)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.MultiHeadAttention(
            config.num_heads,
            config.key_dim,
            value_dim=config.value_dim,
            dropout=config.dropout,
            use_bias=config.use_bias,
            output_shape=config.output_shape,
            use_gate=config.use_gate,
            sliding_window=config.sliding_window,
            attention_axes=None if config.attention_axes is None else list(config.attention_axes),
            **context.keras_identity,
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        return _call_attention_layer(keras_layer, arguments, context)


def _call_attention_layer(keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
    """Call a MultiHeadAttention or GroupedQueryAttention layer: its tensors by role, its flags."""
    config = context.config
    values = dict(zip(config.call_inputs, arguments))
    keywords = {role: values[role] for role in ("key", "attention_mask") if role in values}
    for flag in ("use_causal_mask", "return_attention_scores"):
        if getattr(config, flag):
            keywords[flag] = True
    return keras_layer(values["query"], values["value"], **keywords)


def _check_attention_axes(config: Any, shapes: dict[str, Shape], attended: tuple[int, ...]) -> None:
    """Attention over other axes than one sequence axis (see the module docstring): sizes known
    but the batch's, the value's and key's other axes the query's; a causal or sliding-window mask
    only over axis 1 (Keras builds them from axis 1's sizes); no attention_mask."""
    if "attention_mask" in config.call_inputs:
        raise UnsupportedLayerError(
            f"MultiHeadAttention: an attention_mask with attention over axes {list(attended)} "
            f"of inputs of rank {len(shapes['query']) + 1} is not supported"
        )
    if (config.use_causal_mask or config.sliding_window is not None) and attended != (1,):
        raise UnsupportedLayerError(
            f"MultiHeadAttention: use_causal_mask or sliding_window with attention over axes "
            f"{list(attended)}: Keras builds these masks from axis 1's sizes whatever the "
            "attended axes; only attention over axis 1 is supported with them"
        )
    query = shapes["query"]
    for role in ("query", "value", "key"):
        if role in shapes and None in shapes[role]:
            raise UnsupportedLayerError(
                f"MultiHeadAttention: {role} of shape {list(shapes[role])}: attention over "
                f"axes {list(attended)} needs every size known"
            )
        if role in shapes and any(
            shapes[role][axis - 1] != query[axis - 1] for axis in range(1, len(query)) if axis not in attended
        ):
            raise ExchangeError(
                f"MultiHeadAttention: {role} of shape {list(shapes[role])} differs from the query "
                f"{list(query)} off the attended axes {list(attended)}"
            )
    if "key" in shapes and any(shapes["key"][axis - 1] != shapes["value"][axis - 1] for axis in attended):
        raise ExchangeError(f"key shape {list(shapes['key'])} differs from value shape {list(shapes['value'])}")


class _Folding:
    """Attention over the Keras axes `attended` of inputs (N, …, F): the other axes fold into the
    batch and the attended ones, in Keras's order, into one sequence ((N·others, steps, F)),
    and back; the scores unfold to Keras's (N, others, heads, query axes, value axes)."""

    def __init__(self, context: NodeContext):
        config = context.config
        self.config, self.shapes = config, dict(zip(config.call_inputs, context.input_shapes))
        self.rank = len(self.shapes["query"])
        self.attended = attended_axes(config, self.rank)
        self.others = tuple(axis for axis in range(1, self.rank) if axis not in self.attended)
        self.order = (0,) + self.others + self.attended + (self.rank,)  # Keras axes, folded order
        self.roles = config.call_inputs
        if any(mask is not None for mask in context.input_masks or ()):
            raise UnsupportedLayerError(
                f"layer {context.node.name!r} (MultiHeadAttention): masked inputs with "
                f"attention over axes {list(self.attended)} are not supported"
            )

    def fold(self, builder: TorchBuilder, value: TorchValue, index: int) -> TorchValue:
        shape = self.shapes[self.roles[index]]
        dims = tuple(to_keras_order(self.rank)[axis] for axis in self.order)  # torch dims, folded order
        value = builder.call(builder.torch.permute, value, dims)
        return builder.method(value, "reshape", -1, prod(shape[axis - 1] for axis in self.attended), shape[-1])

    def unfold(self, builder: TorchBuilder, result: TorchValue) -> TorchValue:
        torch, query, value = builder.torch, self.shapes["query"], self.shapes["value"]
        others = tuple(query[axis - 1] for axis in self.others)
        scores = None
        if self.config.return_attention_scores:
            result, scores = (builder.call(operator.getitem, result, index) for index in (0, 1))
            scores = builder.method(
                scores,
                "reshape",
                -1,
                *others,
                self.config.num_heads,
                *(query[axis - 1] for axis in self.attended),
                *(value[axis - 1] for axis in self.attended),
            )
            scores = builder.call(torch.permute, scores, to_torch_order(len(others) + 1 + 2 * len(self.attended)))
        out = _output_shape(self.config, query[-1])
        result = builder.method(result, "reshape", -1, *others, *(query[axis - 1] for axis in self.attended), *out)
        # result holds Keras output axis order[p] at p < rank, the output dims after: to torch's layout
        out_rank = self.rank - 1 + len(out)
        position = {axis: index for index, axis in enumerate(self.order[:-1])}
        dims = tuple(position.get(axis, axis) for axis in to_torch_order(out_rank))
        result = builder.call(torch.permute, result, dims)
        return result if scores is None else (result, scores)


def _read_call(options: KerasOptions, scores: bool = False) -> tuple[tuple[str, ...], bool, bool]:
    """What each node input is (positional tensors, then tensor keywords), `use_causal_mask` and
    `return_attention_scores` (refused unless the kind returns them: `scores`)."""
    call_inputs, return_scores = [], False
    for index, argument in enumerate(options.call_args):
        if argument is not None or index >= len(POSITIONAL_INPUTS):
            raise options.unsupported(f"positional argument {index}", argument)
        call_inputs.append(POSITIONAL_INPUTS[index])
    use_causal_mask = False
    for key, value in options.call_kwargs.items():
        if value is TENSOR and key in CALL_INPUTS and key not in call_inputs:
            call_inputs.append(key)
        elif key == "use_causal_mask" and isinstance(value, bool):
            use_causal_mask = value
        elif key == "return_attention_scores" and isinstance(value, bool) and (scores or not value):
            return_scores = value
        elif key == "training":
            continue  # training only switches dropout on
        elif key in ("key", "attention_mask") and value is None:
            continue
        else:
            why = "only the attention output is converted" if key == "return_attention_scores" else ""
            raise options.unsupported(f"call argument {key}", value if value is not TENSOR else "a tensor", why)
    if "query" not in call_inputs or "value" not in call_inputs:
        raise options.unsupported("call arguments", list(call_inputs), "query and value must be tensors")
    return tuple(call_inputs), use_causal_mask, return_scores


def _steps(builder: TorchBuilder, context: NodeContext, query: TorchValue, value: TorchValue) -> tuple[Any, Any]:
    """(query steps, value steps): the sizes where the graph knows them, else read off the tensors."""
    shapes = dict(zip(context.config.call_inputs, context.input_shapes))
    target, source = shapes["query"][0], shapes["value"][0]
    return (
        builder.method(query, "size", 1) if target is None else target,
        builder.method(value, "size", 1) if source is None else source,
    )


def _attention_bias(
    builder: TorchBuilder, context: NodeContext, query: TorchValue, value: TorchValue, inputs: list[TorchValue]
) -> tuple[TorchValue, bool]:
    """The additive float mask Keras's attention applies (0 where it attends, Keras's large
    negative number elsewhere), or None; and whether it differs per example ((N, T, S)
    broadcastable) rather than per step only ((T, S)). `inputs` are the node's torch inputs."""
    config = context.config
    masks = dict(zip(config.call_inputs, context.input_masks or (None,) * len(config.call_inputs)))
    keep, per_example = None, False

    def both(first: TorchValue, second: TorchValue) -> TorchValue:
        return second if first is None else builder.call(builder.torch.logical_and, first, second)

    if masks.get("query") is not None:  # (N, T) -> (N, T, 1)
        keep = builder.method(builder.masks[masks["query"]], "unsqueeze", -1)
        per_example = True
    for role in ("value", "key"):  # (N, S) -> (N, 1, S)
        if masks.get(role) is not None:
            keep = both(keep, builder.method(builder.masks[masks[role]], "unsqueeze", -2))
            per_example = True
    window = getattr(config, "sliding_window", None)
    if config.use_causal_mask or window is not None:
        ones = builder.graph.call_method(
            "new_ones", (query, _steps(builder, context, query, value)), {"dtype": builder.torch.bool}
        )
    if config.use_causal_mask:  # (T, S): the lower triangle, diagonal included
        keep = both(keep, builder.method(ones, "tril"))
    if window is not None:  # (T, S): |i - j| < window, a band about the diagonal
        band = builder.call(
            builder.torch.logical_and,
            builder.method(ones, "tril", window - 1),
            builder.method(ones, "triu", 1 - window),
        )
        keep = both(keep, band)
    if "attention_mask" in config.call_inputs:  # torch holds Keras's (N, T, S) as (N, S, T)
        explicit = inputs[config.call_inputs.index("attention_mask")]
        explicit = builder.call(builder.torch.movedim, explicit, 1, -1)
        keep = both(keep, builder.method(explicit, "bool"))  # Keras casts it: non-zero attends
        per_example = True
    if keep is None:
        return None, False
    large_negative = LARGE_NEGATIVE.get(context.node.dtype, DEFAULT_LARGE_NEGATIVE)
    bias = builder.call(builder.torch.zeros_like, keep, dtype=builder.dtype(context))
    return builder.method(bias, "masked_fill", builder.method(keep, "logical_not"), large_negative), per_example


# -- Attention and AdditiveAttention (see the module docstring) --------------------------------

SCORE_MODES = ("dot", "concat", "additive")
ATTENTION_CALL_FLAGS = ("use_causal_mask", "return_attention_scores")


@dataclass(frozen=True)
class AttentionConfig:
    score_mode: str = "dot"  # "additive" for AdditiveAttention
    use_scale: bool = False
    dropout: float = 0.0
    use_causal_mask: bool = False
    return_attention_scores: bool = False

    def __post_init__(self) -> None:
        from exchange.kinds import check_choice

        check_choice(self.score_mode, SCORE_MODES, "Attention score_mode")
        if not 0.0 <= self.dropout < 1.0:
            raise ExchangeError(f"Attention dropout must be in [0, 1), got {self.dropout!r}")


def _read_attention_call(options: KerasOptions) -> dict[str, Any]:
    """`use_causal_mask` and `return_attention_scores` from the call; `training` only switches dropout."""
    flags = {}
    for key, value in options.call_kwargs.items():
        if key in ATTENTION_CALL_FLAGS and isinstance(value, bool):
            flags[key] = value
        elif key != "training":
            raise options.unsupported(f"call argument {key}", value if value is not TENSOR else "a tensor")
    if any(argument is not None for argument in options.call_args):
        raise options.unsupported("call arguments", options.call_args, "a list [query, value] or [query, value, key]")
    return flags


@register
class Attention(LayerKind):
    kind, keras_classes, Config = "attention", ("Attention",), AttentionConfig
    takes_list = True

    def from_keras(self, options: KerasOptions) -> AttentionConfig:
        score_mode = options.take("score_mode", "dot")
        if score_mode not in ("dot", "concat"):
            raise options.unsupported("score_mode", score_mode, "dot or concat")
        options.take("seed", None)  # seeds dropout, which acts in training only
        return AttentionConfig(
            score_mode,
            options.flag("use_scale", False),
            options.number("dropout", 0.0),
            **_read_attention_call(options),
        )

    def output_count(self, config: AttentionConfig) -> int:
        return 2 if config.return_attention_scores else 1

    def output_shapes(self, config: AttentionConfig, input_shapes: tuple[Shape, ...]) -> list[Shape]:
        if not 2 <= len(input_shapes) <= 3:
            raise ExchangeError(f"needs [query, value] or [query, value, key], found {len(input_shapes)} inputs")
        rank = len(input_shapes[0])
        leading = zip(*(shape[:-2] for shape in input_shapes))  # the batch-like axes, one per input
        if (
            rank < 2
            or any(len(shape) != rank for shape in input_shapes)
            or any(len({size for size in sizes if size is not None}) > 1 for sizes in leading)
        ):
            raise UnsupportedLayerError(
                f"{type(self).__name__}: inputs of shapes {[list(s) for s in input_shapes]}; "
                "only inputs of one rank, (…, steps, features) with the same leading axes, "
                "are supported"
            )
        query, value = input_shapes[:2]
        key = input_shapes[2] if len(input_shapes) == 3 else value
        if None not in (key[0], value[0]) and key[0] != value[0]:
            raise ExchangeError(f"key steps {key[0]} differ from value steps {value[0]}")
        if None not in (query[-1], key[-1]) and query[-1] != key[-1]:
            raise ExchangeError(f"query features {query[-1]} differ from key features {key[-1]}")
        if config.score_mode == "additive" and config.use_scale and query[-1] is None:
            raise ExchangeError("AdditiveAttention with use_scale needs a known query width")
        output = query[:-1] + (value[-1],)
        return [output, query[:-1] + (key[-2],)] if config.return_attention_scores else [output]

    def output_shape(self, config: AttentionConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return self.output_shapes(config, input_shapes)[0]

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        return input_masks[0]  # Keras's compute_mask: the query's

    def output_masks(self, node: Node, input_masks: tuple[str | None, ...]) -> list[str | None]:
        if node.config.return_attention_scores and any(mask is not None for mask in input_masks):
            raise UnsupportedLayerError(
                f"layer {node.name!r} ({type(self).__name__}): return_attention_scores "
                "on masked inputs is not supported"
            )
        return [input_masks[0]] * self.output_count(node.config)

    def _check_masks(self, context: NodeContext) -> None:
        if len(context.input_shape) != 2 and any(mask is not None for mask in context.input_masks or ()):
            raise UnsupportedLayerError(
                f"layer {context.node.name!r} ({type(self).__name__}): masked inputs of "
                f"rank {len(context.input_shape) + 1} are not supported (only sequences)"
            )

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config = context.config
        ports: list[AnyPort] = []
        if config.use_scale:
            shape = (known(context.input_shape[-1], "the features"),) if config.score_mode == "additive" else ()
            ports.append(Port("scale", "scale", shape=shape))
        if config.score_mode == "concat":
            ports.append(Port("concat_score_weight", "concat_score_weight", shape=()))
        return ports

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, torch, rank = context.config, builder.torch, len(context.input_shape)
        self._check_masks(context)
        masks = list(context.input_masks or (None,) * len(inputs)) + [None, None]

        def keras_layout(value: TorchValue) -> TorchValue:  # (N, F, …, T) -> (N, …, T, F)
            if rank == 2:
                return builder.call(torch.movedim, value, 1, -1)
            return builder.call(torch.permute, value, to_keras_order(rank))

        def torch_layout(value: TorchValue) -> TorchValue:
            if rank == 2:
                return builder.call(torch.movedim, value, -1, 1)
            return builder.call(torch.permute, value, to_torch_order(rank))

        steps_last = {}  # one move per distinct input: self-attention reads one tensor
        for value in inputs:
            if value not in steps_last:
                steps_last[value] = keras_layout(value)
        query, value = steps_last[inputs[0]], steps_last[inputs[1]]
        key = steps_last[inputs[2]] if len(inputs) == 3 else value
        value_mask, query_mask = (None if (mask := masks[index]) is None else builder.masks[mask] for index in (1, 0))
        module = builder.helpers.KerasAttention(
            config.score_mode,
            config.use_scale,
            context.input_shape[-1],
            causal=config.use_causal_mask,
            dropout=config.dropout,
            device="meta",
            dtype=builder.dtype(context),
        )
        result = builder.module(context, module, query, value, key, value_mask, query_mask)
        output = torch_layout(builder.call(operator.getitem, result, 0))
        if not config.return_attention_scores:
            return output
        return output, torch_layout(builder.call(operator.getitem, result, 1))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.Attention(
            use_scale=config.use_scale, score_mode=config.score_mode, dropout=config.dropout, **context.keras_identity
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        config = context.config
        flags = {key: True for key in ATTENTION_CALL_FLAGS if getattr(config, key)}
        return keras_layer(list(arguments), **flags)


@register
class AdditiveAttention(Attention):
    kind, keras_classes = "additive_attention", ("AdditiveAttention",)

    def from_keras(self, options: KerasOptions) -> AttentionConfig:
        options.take("seed", None)  # seeds dropout, which acts in training only
        return AttentionConfig(
            "additive", options.flag("use_scale", True), options.number("dropout", 0.0), **_read_attention_call(options)
        )

    def output_shapes(self, config: AttentionConfig, input_shapes: tuple[Shape, ...]) -> list[Shape]:
        if config.score_mode != "additive":
            raise ExchangeError(f"AdditiveAttention score_mode must be 'additive', got {config.score_mode!r}")
        return super().output_shapes(config, input_shapes)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.AdditiveAttention(
            use_scale=config.use_scale, dropout=config.dropout, **context.keras_identity
        )


# -- GroupedQueryAttention (see the module docstring) ----------------------------------------------

# Keras 3 files keep the projections in `<layer>/_query_dense/vars`, …, `_output_dense/vars`.
# Keras builds (and orders the variables of) the gate between the key and the value.
GROUPED_PROJECTIONS = (
    ("query", "_query_dense"),
    ("key", "_key_dense"),
    ("gate", "_gate_dense"),
    ("value", "_value_dense"),
    ("output", "_output_dense"),
)


@dataclass(frozen=True)
class GroupedQueryAttentionConfig:
    head_dim: int
    num_query_heads: int
    num_key_value_heads: int
    use_bias: bool = True
    dropout: float = 0.0
    use_causal_mask: bool = False
    call_inputs: tuple[str, ...] = ("query", "value")  # what each node input is in the call
    use_gate: bool = field(default=False, metadata=OMIT_DEFAULT)
    sliding_window: int | None = field(default=None, metadata=OMIT_DEFAULT)
    return_attention_scores: bool = field(default=False, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        if self.sliding_window is not None:
            check_int(self.sliding_window, "GroupedQueryAttention sliding_window", MAX_FEATURES)
        check_int(self.head_dim, "GroupedQueryAttention head_dim", MAX_FEATURES)
        check_int(self.num_query_heads, "GroupedQueryAttention num_query_heads", MAX_HEADS)
        check_int(self.num_key_value_heads, "GroupedQueryAttention num_key_value_heads", MAX_HEADS)
        if self.num_query_heads % self.num_key_value_heads:
            raise ExchangeError(
                f"GroupedQueryAttention num_query_heads {self.num_query_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}"
            )
        check_call_inputs_and_dropout(self.call_inputs, self.dropout, "GroupedQueryAttention")


@register
class GroupedQueryAttention(LayerKind):
    kind, Config = "grouped_query_attention", GroupedQueryAttentionConfig
    keras_classes = ("GroupedQueryAttention", "GroupQueryAttention")
    tensor_kwargs = ("query", "value", "key", "attention_mask")
    variable_aliases = {
        f"{projection}_{variable}": (variable,)
        for projection, _ in GROUPED_PROJECTIONS
        for variable in ("kernel", "bias")
    }

    def reads_integers(self, node: Node, position: int) -> bool:
        roles = node.config.call_inputs
        return position < len(roles) and roles[position] == "attention_mask"

    def from_keras(self, options: KerasOptions) -> GroupedQueryAttentionConfig:
        options.take("flash_attention", None)  # an implementation choice: the same attention
        options.take("seed", None)  # seeds dropout, which acts in training only
        window = options.take("sliding_window", None)
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
            raise options.unsupported("sliding_window", window, "None or a positive integer")
        call_inputs, use_causal_mask, return_scores = _read_call(options, scores=True)
        return GroupedQueryAttentionConfig(
            options.integer("head_dim"),
            options.integer("num_query_heads"),
            options.integer("num_key_value_heads"),
            options.flag("use_bias", True),
            options.number("dropout", 0.0),
            use_causal_mask,
            call_inputs,
            options.flag("use_gate", False),
            window,
            return_scores,
        )

    def keras3_subgroups(self, config: GroupedQueryAttentionConfig) -> tuple[str, ...]:
        return tuple(group for role, group in GROUPED_PROJECTIONS if role != "gate" or config.use_gate)

    def output_count(self, config: GroupedQueryAttentionConfig) -> int:
        return 2 if config.return_attention_scores else 1

    def output_shapes(self, config: GroupedQueryAttentionConfig, input_shapes: tuple[Shape, ...]) -> list[Shape]:
        query = self.output_shape(config, input_shapes)
        if not config.return_attention_scores:
            return [query]
        shapes = dict(zip(config.call_inputs, input_shapes))
        return [query, (config.num_query_heads, query[0], shapes["value"][0])]

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        query: int = node.config.call_inputs.index("query")
        return input_masks[query]  # Keras sets the query's mask on the output

    def output_masks(self, node: Node, input_masks: tuple[str | None, ...]) -> list[str | None]:
        return [self.output_mask(node, input_masks)] + [None] * (self.output_count(node.config) - 1)

    def output_shape(self, config: GroupedQueryAttentionConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if len(input_shapes) != len(config.call_inputs):
            raise ExchangeError(f"{len(input_shapes)} inputs for the call inputs {list(config.call_inputs)}")
        shapes = dict(zip(config.call_inputs, input_shapes))
        for role in ("query", "value", "key"):
            if role in shapes and len(shapes[role]) != 2:
                raise ExchangeError(
                    f"GroupedQueryAttention: {role} of shape {list(shapes[role])}; expected (steps, features)"
                )
        query, value = shapes["query"], shapes["value"]
        if None not in (query[-1], value[-1]) and query[-1] != value[-1]:
            raise ExchangeError(f"query features {query[-1]} differ from value features {value[-1]}")
        if "key" in shapes and None not in (shapes["key"][0], value[0]) and shapes["key"][0] != value[0]:
            raise ExchangeError(f"key steps {shapes['key'][0]} differ from value steps {value[0]}")
        if "attention_mask" in shapes:
            mask = shapes["attention_mask"]
            if len(mask) != 2 or any(size not in (None, 1, want) for size, want in zip(mask, (query[0], value[0]))):
                raise ExchangeError(
                    f"attention_mask of shape {list(mask)} does not broadcast to "
                    f"(query steps, value steps) = ({query[0]}, {value[0]})"
                )
        return query

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config, widths = context.config, _widths(context)
        dim = config.head_dim
        heads = {
            "query": config.num_query_heads,
            "key": config.num_key_value_heads,
            "value": config.num_key_value_heads,
        }
        heads["gate"] = config.num_query_heads
        widths = dict(widths, gate=widths["query"])
        ports: list[AnyPort] = []
        for role in ("query", "key", "gate", "value") if config.use_gate else ("query", "key", "value"):
            module = "gate_projection" if role == "gate" else role  # the helper's `gate` is its flag
            ports.append(
                Port(
                    f"{role}_kernel",
                    f"{module}.weight",
                    _kernel_steps(widths[role], heads[role], dim),
                    shape=(widths[role], heads[role], dim),
                )
            )
            if config.use_bias:
                ports.append(
                    Port(f"{role}_bias", f"{module}.bias", _bias_steps(heads[role], dim), shape=(heads[role], dim))
                )
        output_shape = (config.num_query_heads, dim, widths["query"])
        ports.append(
            Port(
                "output_kernel",
                "output.weight",
                (Reshape(output_shape, (config.num_query_heads * dim, widths["query"])), Permute((1, 0))),
                shape=output_shape,
            )
        )
        if config.use_bias:
            ports.append(Port("output_bias", "output.bias", shape=(widths["query"],)))
        return ports

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, widths = context.config, _widths(context)
        values = dict(zip(config.call_inputs, inputs))
        batch_first = {}  # one movedim per distinct input: self-attention reads one tensor

        def steps_last(value: TorchValue) -> TorchValue:
            if value not in batch_first:
                batch_first[value] = builder.call(builder.torch.movedim, value, 1, -1)
            return batch_first[value]

        query, value = steps_last(values["query"]), steps_last(values["value"])
        key = steps_last(values["key"]) if "key" in values else value
        bias, _ = _attention_bias(builder, context, query, value, inputs)
        attention = builder.helpers.KerasGroupedQueryAttention(
            widths["query"],
            widths["key"],
            widths["value"],
            config.num_query_heads,
            config.num_key_value_heads,
            config.head_dim,
            bias=config.use_bias,
            dropout=config.dropout,
            gate=config.use_gate,
            explicit_scores=explicit_scores(config),
            device="meta",
            dtype=builder.dtype(context),
        )
        result = builder.module(context, attention, query, key, value, bias)
        output = builder.call(builder.torch.movedim, builder.call(operator.getitem, result, 0), -1, 1)
        if not config.return_attention_scores:
            return output
        # Keras's (N, heads, T, S) held channels-first: (N, S, heads, T)
        return output, builder.call(builder.torch.permute, builder.call(operator.getitem, result, 1), to_torch_order(3))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.GroupQueryAttention(  # Keras exports it under this name only
            config.head_dim,
            config.num_query_heads,
            config.num_key_value_heads,
            dropout=config.dropout,
            use_bias=config.use_bias,
            use_gate=config.use_gate,
            sliding_window=config.sliding_window,
            **context.keras_identity,
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        return _call_attention_layer(keras_layer, arguments, context)
