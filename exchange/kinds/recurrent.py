"""Recurrent layers: LSTM, GRU, SimpleRNN, RNN around their cells, and the Bidirectional wrapper.

Conventions that differ:
- Keras keeps kernel (in, G·H) and recurrent_kernel (H, G·H); torch keeps weight_ih_l0 (G·H, in)
  and weight_hh_l0 (G·H, H): transposed.
- Gate order: an LSTM's is i, f, c, o in Keras and i, f, g, o in torch (the same); a GRU's is
  z, r, h in Keras and r, z, n in torch: its blocks are reordered (`GRU_GATE_ORDER`).
- Biases: Keras's LSTM and SimpleRNN have one bias, torch two (bias_ih_l0 + bias_hh_l0, summed).
  Keras -> torch writes Keras's bias into bias_ih_l0 and zeros into bias_hh_l0; torch -> Keras
  sums them (`Summed`, declared lossy). A GRU with reset_after=True (Keras 3's default) keeps both
  as its (2, 3H) bias (`Stacked`); with reset_after=False (old Keras 2's default) it has one bias
  and no torch equivalent: a `KerasRecurrent` module with bias_ih_l0 only.
- Data: torch holds sequences channels-first (N, F, T); the recurrent modules take (N, T, F), so
  the feature axis moves last before and back after.
- `nn.LSTM`, `nn.GRU` and `nn.RNN` are used where they compute exactly what Keras does (the
  default activations, no mask); anything else (another activation, a GRU with reset_after=False,
  a masked input) gets `KerasRecurrent`, which Keras's masking semantics are written into. The
  weights are named the same either way.
- `go_backwards` reverses the time axis of the input (and mask); with return_sequences the
  outputs stay in that reversed order, as Keras returns them. Bidirectional flips the backward
  layer's output sequence before merging, whatever its go_backwards: Keras 3 makes the backward
  layer go_backwards=True (Keras 2 negated the forward's); around a forward layer with
  go_backwards=True (given a backward_layer with False) both sequences end up reversed.
- return_state=True: the layer has several outputs (sequence or last output, then h, and c for an
  LSTM); the graph reads them through `output` nodes. A call with `initial_state=[h, c]` (an
  encoder's states into a decoder) reads them as inputs after the sequence.
- `keras.layers.RNN(cell)` is the layer of that cell (RNN(LSTMCell) computes what LSTM does), its
  variables in the Keras 3 group `cell/vars` as an LSTM's. A StackedRNNCells (`RNN([cells])`)
  runs its cells in turn at each step and skips a masked step for all of them; torch runs one
  module per cell over the whole sequence (`<name>.cell0`, …), which computes the same. Keras 3
  keeps each cell's variables in `cell/cells/lstm_cell`, `cell/cells/lstm_cell_1`, … (named by
  class and counted), nests a stack's initial states and returned states per cell ([h1, [h2, c2]]);
  the graph holds them flat, in that order.

Not supported (refused by name): stateful=True (the states carry over between batches: state no
file holds).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_FEATURES,
    OMIT_DEFAULT,
    TENSOR,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    check_choice,
    check_int,
    check_step_mask,
    known,
    register,
    torch_mask,
)
from exchange.kinds.activations import ELEMENTWISE_ACTIVATIONS, check_activation, keras_activation, torch_function
from exchange.ports import Blocks, Permute, Port, Stacked, Step, Summed

if TYPE_CHECKING:
    from exchange.graph import Node, NodeContext, Shape
    from exchange.ports import AnyPort

GRU_GATE_ORDER = (1, 0, 2)  # torch's r, z, n are Keras's blocks 1, 0, 2 (z, r, h)
TORCH_DEFAULTS = ("tanh", "sigmoid")  # nn.LSTM's and nn.GRU's activation and gate activation
TORCH_RNN_ACTIVATIONS = ("tanh", "relu")  # nn.RNN's nonlinearity
MERGE_MODES = ("concat", "sum", "mul", "ave", None)


@dataclass(frozen=True)
class RecurrentConfig:
    units: int
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"  # LSTM and GRU only
    use_bias: bool = True
    return_sequences: bool = False
    return_state: bool = False
    go_backwards: bool = False
    zero_output_for_mask: bool = False
    reset_after: bool = True  # GRU only
    # Whether the layer skips its input's masked steps: Keras 3 passes a layer the mask of its
    # input only when the call has that one tensor (no initial_state) or passes `mask=`.
    uses_mask: bool = True
    # The call gives a mask tensor (`lstm(x, None, mask)`, `mask=m`): the node's last input.
    mask_input: bool = field(default=False, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_int(self.units, "recurrent units", MAX_FEATURES)
        for name in (self.activation, self.recurrent_activation):
            check_activation(name, "recurrent layer")
            if name not in ELEMENTWISE_ACTIVATIONS:
                raise UnsupportedLayerError(f"recurrent layer: activation {name!r} is not supported")


def _recurrent_activation(options: KerasOptions, key: str) -> str:
    """An activation option of a recurrent layer: one `KerasRecurrent` can compute."""
    name = options.activation(key)
    if name not in ELEMENTWISE_ACTIVATIONS:
        raise options.unsupported(key, name, "not supported in a recurrent layer")
    return name


def refuse_stateful(options: KerasOptions) -> None:
    """A stateful layer carries its last states into the next batch: state no file holds."""
    if options.flag("stateful", False):
        raise options.unsupported(
            "stateful", True, "its states carry over between batches; only stateful=False is supported"
        )


def uses_mask(options: KerasOptions) -> bool:
    """Whether the layer skips its input's masked steps: Keras 3 passes a layer the mask of its
    input only when the call has that one tensor (no initial_state) or passes `mask=`."""
    tensors = sum(argument is None for argument in options.call_args) + sum(
        value is TENSOR for value in options.call_kwargs.values()
    )
    return options.keras2 or options.mask_given or tensors <= 1


def cell_options(options: KerasOptions, kind: _Recurrent) -> dict[str, Any]:
    """What computes one step of an LSTM, GRU or SimpleRNN (layer or cell): units, activations,
    bias; dropout and the initialisers (unit_forget_bias) only act in training."""
    for key in ("dropout", "recurrent_dropout", "seed", "unit_forget_bias", "implementation"):
        options.take(key, None)
    return dict(
        units=options.integer("units"),
        activation=_recurrent_activation(options, "activation"),
        recurrent_activation=(_recurrent_activation(options, "recurrent_activation") if kind.gates > 1 else "sigmoid"),
        use_bias=options.flag("use_bias", True),
        reset_after=options.flag("reset_after", not options.keras2) if kind.mode == "gru" else True,
    )


def cell_arguments(kind: _Recurrent, config: Any, where: str) -> dict[str, Any]:
    """The Keras arguments of a layer's or cell's step options (`cell_options`)."""
    arguments = dict(
        units=config.units, activation=keras_activation(config.activation, where), use_bias=config.use_bias
    )
    if kind.gates > 1:
        arguments["recurrent_activation"] = keras_activation(config.recurrent_activation, where)
    if kind.mode == "gru":
        arguments["reset_after"] = config.reset_after
    return arguments


class _Recurrent(LayerKind):
    """LSTM, GRU and SimpleRNN: one kind each, differing in `mode` (gates, biases, torch module)."""

    Config = RecurrentConfig
    mode = ""  # KerasRecurrent's mode: "lstm", "gru" or "rnn"
    gates = 1
    state_count = 1  # states after the output with return_state (LSTM: h and c)
    passes_mask = True
    tensor_kwargs = ("initial_state",)  # its tensors are node inputs after the sequence
    casts_integers = True
    mask_position = 2  # call(sequences, initial_state=None, mask=None, training=False)

    def from_keras(self, options: KerasOptions) -> RecurrentConfig:
        refuse_stateful(options)
        options.expect("time_major", False)
        for key in ("use_cudnn", "unroll"):
            options.take(key, None)  # speed options: the same outputs either way
        return RecurrentConfig(
            **cell_options(options, self),
            return_sequences=options.flag("return_sequences", False),
            return_state=options.flag("return_state", False),
            go_backwards=options.flag("go_backwards", False),
            zero_output_for_mask=options.flag("zero_output_for_mask", False),
            uses_mask=uses_mask(options),
            mask_input=options.take_mask_input(),
        )

    def keras3_subgroups(self, config: RecurrentConfig) -> tuple[str, ...]:
        return ("cell",)

    # -- shapes and weights -----------------------------------------------------------------

    def output_count(self, config: RecurrentConfig) -> int:
        return 1 + self.state_count if config.return_state else 1

    def output_shapes(self, config: RecurrentConfig, input_shapes: tuple[Shape, ...]) -> list[Shape]:
        shape = input_shapes[0]
        if len(shape) != 2:
            raise ExchangeError(f"expects (batch, time, features) input, found (batch, {shape})")
        input_shapes = check_step_mask(config, input_shapes)
        states = [tuple(state) for state in input_shapes[1:]]
        if states and states != [(config.units,)] * self.state_count:
            raise ExchangeError(
                f"initial_state must be {self.state_count} tensor(s) of shape (batch, {config.units}), found {states}"
            )
        output: Shape = (shape[0], config.units) if config.return_sequences else (config.units,)
        state_shapes: list[Shape] = [(config.units,)] * (self.state_count if config.return_state else 0)
        return [output] + state_shapes

    def output_shape(self, config: RecurrentConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return self.output_shapes(config, input_shapes)[0]

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        return _sequence_mask(node, input_masks)

    def output_masks(self, node: Node, input_masks: tuple[str | None, ...]) -> list[str | None]:
        return [self.output_mask(node, input_masks)] + [None] * (self.output_count(node.config) - 1)

    def bias_shape(self, config: RecurrentConfig) -> tuple[int, ...]:
        return (self.gates * config.units,)

    def gate_steps(self) -> tuple[Step, ...]:
        return ()

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config, width = context.config, self.gates * context.config.units
        steps = (Permute((1, 0)),) + self.gate_steps()
        ports: list[AnyPort] = [
            Port("kernel", "weight_ih_l0", steps, shape=(known(context.input_shape[-1], "input features"), width)),
            Port("recurrent_kernel", "weight_hh_l0", steps, shape=(config.units, width)),
        ]
        if config.use_bias:
            ports.append(self.bias_port(config))
        return ports

    def bias_port(self, config: RecurrentConfig) -> AnyPort:
        return Summed("bias", ("bias_ih_l0", "bias_hh_l0"), self.gate_steps(), shape=self.bias_shape(config))

    # -- torch ----------------------------------------------------------------------------

    torch_class = ""  # nn.LSTM / nn.GRU: what computes this layer with the default activations

    def standard_module(
        self, builder: TorchBuilder, config: RecurrentConfig, input_size: int | None, dtype: Any
    ) -> Any:
        """The `nn.LSTM`/`nn.GRU`/`nn.RNN` computing exactly this layer, or None."""
        if (config.activation, config.recurrent_activation) != TORCH_DEFAULTS or not config.reset_after:
            return None
        return getattr(builder.nn, self.torch_class)(
            input_size, config.units, bias=config.use_bias, batch_first=True, device="meta", dtype=dtype
        )

    def torch_module(self, builder: TorchBuilder, context: NodeContext, masked: bool) -> Any:
        config, dtype, input_size = context.config, builder.dtype(context), context.input_shape[-1]
        module = None if masked else self.standard_module(builder, config, input_size, dtype)
        return module or builder.helpers.KerasRecurrent(
            self.mode,
            input_size,
            config.units,
            bias=config.use_bias,
            activation=torch_function(config.activation, builder)[0],
            recurrent_activation=torch_function(config.recurrent_activation, builder)[0],
            reset_after=config.reset_after,
            zero_output_for_mask=config.zero_output_for_mask,
            device="meta",
            dtype=dtype,
        )

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        sequence = builder.call(builder.torch.movedim, inputs[0], 1, -1)  # (N, F, T) -> (N, T, F)
        mask = torch_mask(builder, context, inputs) if context.config.uses_mask else None
        states = inputs[1:-1] if context.config.mask_input else inputs[1:]
        results = run_recurrent(builder, context, self, sequence, mask, context.torch_name, initial_state=states)
        output = results[0]
        if context.config.return_sequences:
            output = builder.call(builder.torch.movedim, output, -1, 1)
        return (output,) + tuple(results[1:]) if context.config.return_state else output

    # -- Keras ----------------------------------------------------------------------------

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return getattr(keras.layers, self.keras_classes[0])(
            **self.keras_arguments(context.config, context.node.name), dtype=context.node.dtype
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        return keras_recurrent_call(keras_layer, arguments, context, list)

    def keras_arguments(self, config: RecurrentConfig, name: str) -> dict[str, Any]:
        return dict(
            cell_arguments(self, config, f"layer {name!r}"),
            return_sequences=config.return_sequences,
            return_state=config.return_state,
            go_backwards=config.go_backwards,
            zero_output_for_mask=config.zero_output_for_mask,
            name=name,
        )


def keras_recurrent_call(
    keras_layer: Any,
    arguments: list[Any],
    context: NodeContext,
    initial_state: Callable[[list[Any]], list[Any]],
) -> Any:
    """Call a recurrent Keras layer on its sequence, its initial states (`initial_state` shapes
    the flat list of them as the layer takes it) and its mask; with return_state, the outputs
    as one flat list (Keras nests a StackedRNNCells' states per cell), as the graph numbers them."""
    config = context.config
    if config.mask_input:
        states = list(arguments[1:-1])
        result = keras_layer(
            arguments[0], **({"initial_state": initial_state(states)} if states else {}), mask=arguments[-1]
        )
    elif len(arguments) == 1:
        result = keras_layer(arguments[0])
    else:
        # With initial states Keras 3 passes the input's mask only when given as `mask=`.
        mask = context.input_masks[0] is not None and config.uses_mask
        result = keras_layer(
            arguments[0],
            initial_state=initial_state(list(arguments[1:])),
            **({"mask": _keras_mask(arguments[0])} if mask else {}),
        )
    if config.return_state:
        from keras import tree

        return tree.flatten(result)
    return result


def _keras_mask(tensor: Any) -> Any:
    """The mask Keras attached to a symbolic tensor (an Embedding's with mask_zero=True)."""
    from keras.src.backend import get_keras_mask

    return get_keras_mask(tensor)


def run_recurrent(
    builder: TorchBuilder,
    context: NodeContext,
    kind: _Recurrent,
    sequence: TorchValue,
    mask: TorchValue,
    module_name: str,
    initial_state: Sequence[TorchValue] = (),
) -> list[TorchValue]:
    """Add one recurrent module (of `context.config`, under `module_name`) reading `sequence`
    (N, T, F) from the initial states (N, H) given, or zeros; returns [outputs (N, T, H) or last
    output (N, H), then the states (N, H)], in Keras's order."""
    config = context.config
    if config.go_backwards:
        sequence = builder.call(builder.torch.flip, sequence, (1,))
        if mask is not None:
            mask = builder.call(builder.torch.flip, mask, (1,))
    module = kind.torch_module(builder, context, mask is not None)
    arguments: list[Any] = [sequence] if mask is None else [sequence, mask]
    if initial_state:  # torch's states are (layers, N, H): one layer
        states: Sequence[TorchValue] = tuple(builder.call(builder.torch.unsqueeze, state, 0) for state in initial_state)
        if mask is None and not isinstance(module, builder.helpers.KerasRecurrent):
            arguments.append(states if kind.state_count == 2 else states[0])
        else:
            arguments += [None] * (2 - len(arguments)) + [states]
    result = builder.submodule(module_name, module, *arguments)
    outputs = builder.call(operator.getitem, result, 0)
    if config.return_sequences and not config.return_state:
        return [outputs]
    last = builder.call(operator.getitem, outputs, (slice(None), -1))
    values = [outputs if config.return_sequences else last]
    if config.return_state:
        # The module's last state (1, N, H): not the last output, which a masked last step with
        # zero_output_for_mask makes zero, nor with an initial state carried over a masked row.
        state = builder.call(operator.getitem, result, 1)
        states = (
            [builder.call(operator.getitem, state, index) for index in range(kind.state_count)]
            if kind.state_count == 2
            else [state]
        )
        values += [builder.call(operator.getitem, value, 0) for value in states]
    return values


@register
class LSTM(_Recurrent):
    kind, keras_classes, mode, gates, state_count = "lstm", ("LSTM",), "lstm", 4, 2
    torch_class = "LSTM"


@register
class GRU(_Recurrent):
    kind, keras_classes, mode, gates = "gru", ("GRU",), "gru", 3
    torch_class = "GRU"  # with reset_after=True only: nn.GRU applies the reset gate after its matmul

    def gate_steps(self) -> tuple[Step, ...]:
        return (Blocks(0, GRU_GATE_ORDER),)

    def bias_shape(self, config: RecurrentConfig) -> tuple[int, ...]:
        return (2, 3 * config.units) if config.reset_after else (3 * config.units,)

    def bias_port(self, config: RecurrentConfig) -> AnyPort:
        if config.reset_after:
            return Stacked("bias", ("bias_ih_l0", "bias_hh_l0"), self.gate_steps(), shape=self.bias_shape(config))
        return Port("bias", "bias_ih_l0", self.gate_steps(), shape=self.bias_shape(config))


@register
class SimpleRNN(_Recurrent):
    kind, keras_classes, mode, gates = "simple_rnn", ("SimpleRNN",), "rnn", 1

    def logits_not_reproduced(self, config: RecurrentConfig) -> str | None:
        return None if config.return_sequences else unrolled_logits(config.activation)

    def standard_module(
        self, builder: TorchBuilder, config: RecurrentConfig, input_size: int | None, dtype: Any
    ) -> Any:
        if config.activation not in TORCH_RNN_ACTIVATIONS:
            return None
        return builder.nn.RNN(
            input_size,
            config.units,
            nonlinearity=config.activation,
            bias=config.use_bias,
            batch_first=True,
            device="meta",
            dtype=dtype,
        )


def unrolled_logits(activation: str) -> str | None:
    """A SimpleRNN cell's last step ends with its activation; Keras attaches the logits of a
    softmax or sigmoid one to the output when the loop is unrolled only (`logits_not_reproduced`)."""
    if activation not in ("softmax", "sigmoid"):
        return None
    return (
        f"SimpleRNN with a {activation} activation: Keras takes its cross-entropy from the logits when "
        "the loop is unrolled, not otherwise; not reproduced"
    )


# ---------------------------------------------------------------------------------------------
# RNN: a cell, or a StackedRNNCells of several, run over the sequence

# The Keras cells that compute one step of a recurrent kind: (class, Keras 3's group name for it).
CELL_CLASSES = {
    "lstm": ("LSTMCell", "lstm_cell"),
    "gru": ("GRUCell", "gru_cell"),
    "simple_rnn": ("SimpleRNNCell", "simple_rnn_cell"),
}
CELL_KINDS = {class_name: kind for kind, (class_name, _) in CELL_CLASSES.items()}
STACKED_CELLS = "StackedRNNCells"
# Cells in one StackedRNNCells: real stacks have a handful; each is a module and a Python loop.
MAX_CELLS = 64
CELL_VARIABLES = ("kernel", "recurrent_kernel", "bias")


@dataclass(frozen=True)
class CellConfig:
    """One LSTMCell, GRUCell or SimpleRNNCell: the step of the recurrent kind `cell`."""

    cell: str  # "lstm", "gru" or "simple_rnn"
    units: int
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"  # LSTMCell and GRUCell only
    use_bias: bool = True
    reset_after: bool = True  # GRUCell only

    def __post_init__(self) -> None:
        check_choice(self.cell, tuple(CELL_CLASSES), "RNN cell")
        kind = _recurrent_kind(self.cell, "RNN cell")
        if kind.gates == 1 and self.recurrent_activation != "sigmoid":
            raise ExchangeError("a SimpleRNNCell has no recurrent_activation")
        if kind.mode != "gru" and not self.reset_after:
            raise ExchangeError("reset_after=false is a GRUCell option")
        self.layer_config()  # checks units and activations

    def layer_config(self, **layer_options: Any) -> RecurrentConfig:
        """The config of the layer of kind `cell` running this cell (with the RNN's options)."""
        return RecurrentConfig(
            units=self.units,
            activation=self.activation,
            recurrent_activation=self.recurrent_activation,
            use_bias=self.use_bias,
            reset_after=self.reset_after,
            **layer_options,
        )


@dataclass(frozen=True)
class RNNConfig:
    cells: tuple[CellConfig, ...]
    stacked: bool = False  # the cell is a StackedRNNCells (Keras's `RNN([cells])`, even of one)
    return_sequences: bool = False
    return_state: bool = False
    go_backwards: bool = False
    zero_output_for_mask: bool = False
    unroll: bool = False  # Keras builds the loop unrolled: the same outputs
    uses_mask: bool = True  # as RecurrentConfig's
    mask_input: bool = field(default=False, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        if (
            not isinstance(self.cells, tuple)
            or not 1 <= len(self.cells) <= MAX_CELLS
            or not all(isinstance(cell, CellConfig) for cell in self.cells)
        ):
            raise ExchangeError(f"an RNN has 1 to {MAX_CELLS} cells")
        if len(self.cells) > 1 and not self.stacked:
            raise ExchangeError("an RNN of several cells holds them in a StackedRNNCells (stacked=true)")


@register
class RNN(LayerKind):
    """`keras.layers.RNN` around an LSTMCell, GRUCell or SimpleRNNCell: the LSTM, GRU or SimpleRNN
    layer of that cell (the same torch module and weights, under the node's name). Around a
    StackedRNNCells: each step runs the cells in turn, cell i reading cell i-1's output; Keras skips
    a masked step for the whole stack at once, which is what the same cells as stacked layers,
    each returning sequences and skipping the masked steps, compute. So torch runs one recurrent
    module per cell over the whole sequence, `<name>.cell0`, `<name>.cell1`, …; go_backwards reverses the
    input once, before the first cell. return_state gives each cell's states in order (h, then c
    for an LSTMCell), as Keras's flattened outputs number them."""

    kind, keras_classes, Config = "rnn", ("RNN",), RNNConfig
    casts_integers = True
    passes_mask = True
    tensor_kwargs = ("initial_state",)
    mask_position = 2  # call(sequences, initial_state=None, mask=None, training=False)
    # A stacked cell's variables are named `kernel`, … in Keras; its ports `cell1_kernel`, ….
    variable_aliases = {f"cell{index}_{name}": (name,) for index in range(MAX_CELLS) for name in CELL_VARIABLES}

    def logits_not_reproduced(self, config: RNNConfig) -> str | None:
        cell = config.cells[-1]
        return None if config.return_sequences or cell.cell != "simple_rnn" else unrolled_logits(cell.activation)

    def from_keras(self, options: KerasOptions) -> RNNConfig:
        refuse_stateful(options)
        options.expect("time_major", False)
        cell = options.take("cell")
        stacked = isinstance(cell, dict) and cell.get("class_name") == STACKED_CELLS
        if stacked:
            stack = _nested_options(options, "cell", cell)
            cell_list = stack.take("cells")
            stack.finish()
            if not isinstance(cell_list, list) or not 1 <= len(cell_list) <= MAX_CELLS:
                raise options.unsupported("cell", STACKED_CELLS, f"must hold 1 to {MAX_CELLS} cells")
        else:
            cell_list = [cell]
        cells = []
        for cell_config in cell_list:
            class_name = cell_config.get("class_name") if isinstance(cell_config, dict) else None
            if class_name not in CELL_KINDS:
                raise options.unsupported(
                    "cell",
                    class_name if isinstance(class_name, str) else cell_config,
                    "an LSTMCell, GRUCell, SimpleRNNCell or a StackedRNNCells of them",
                )
            kind = _recurrent_kind(CELL_KINDS[class_name], options.layer_name)
            inner = _nested_options(options, "cell", cell_config)
            cells.append(CellConfig(kind.kind, **cell_options(inner, kind)))
            inner.finish()
        return RNNConfig(
            tuple(cells),
            stacked=stacked,
            return_sequences=options.flag("return_sequences", False),
            return_state=options.flag("return_state", False),
            go_backwards=options.flag("go_backwards", False),
            zero_output_for_mask=options.flag("zero_output_for_mask", False),
            unroll=options.flag("unroll", False),
            uses_mask=uses_mask(options),
            mask_input=options.take_mask_input(),
        )

    def config_from_dict(self, values: Any, node_name: str) -> Any:
        if isinstance(values, dict) and isinstance(values.get("cells"), list):
            if not 1 <= len(values["cells"]) <= MAX_CELLS:
                raise ExchangeError(
                    f"layer {node_name!r} ({self.kind}): an RNN has 1 to {MAX_CELLS} cells, "
                    f"found {len(values['cells']):,}"
                )
            values = dict(values, cells=[_CELL_READER.config_from_dict(cell, node_name) for cell in values["cells"]])
        return super().config_from_dict(values, node_name)

    def keras3_subgroups(self, config: RNNConfig) -> tuple[str, ...]:
        if not config.stacked:
            return ("cell",)
        groups: list[str] = []
        counts: dict[str, int] = {}
        for cell in config.cells:  # Keras 3 names a list's layers by class, counted: lstm_cell, lstm_cell_1
            snake = CELL_CLASSES[cell.cell][1]
            counts[snake] = counts.get(snake, -1) + 1
            groups.append(f"cell/cells/{snake}" + (f"_{counts[snake]}" if counts[snake] else ""))
        return tuple(groups)

    # -- shapes and weights -----------------------------------------------------------------

    def state_counts(self, config: RNNConfig) -> list[int]:
        return [_recurrent_kind(cell.cell, "RNN cell").state_count for cell in config.cells]

    def output_count(self, config: RNNConfig) -> int:
        return 1 + sum(self.state_counts(config)) if config.return_state else 1

    def output_shapes(self, config: RNNConfig, input_shapes: tuple[Shape, ...]) -> list[Shape]:
        shape = input_shapes[0]
        if len(shape) != 2:
            raise ExchangeError(f"expects (batch, time, features) input, found (batch, {shape})")
        input_shapes = check_step_mask(config, input_shapes)
        state_shapes: list[Shape] = [
            (cell.units,) for cell, count in zip(config.cells, self.state_counts(config)) for _ in range(count)
        ]
        states = [tuple(state) for state in input_shapes[1:]]
        if states and states != state_shapes:
            raise ExchangeError(
                f"initial_state must be tensors of shapes {[(None,) + s for s in state_shapes]}, "
                f"found {[(None,) + s for s in states]}"
            )
        units = config.cells[-1].units
        output: Shape = (shape[0], units) if config.return_sequences else (units,)
        return [output] + (state_shapes if config.return_state else [])

    def output_shape(self, config: RNNConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return self.output_shapes(config, input_shapes)[0]

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        return _sequence_mask(node, input_masks)

    def output_masks(self, node: Node, input_masks: tuple[str | None, ...]) -> list[str | None]:
        return [self.output_mask(node, input_masks)] + [None] * (self.output_count(node.config) - 1)

    def cell_contexts(self, context: NodeContext) -> list[tuple[_Recurrent, NodeContext]]:
        """(kind, context) of the layer each cell is: every cell but the last returns its
        sequence (for the next cell); the last has the RNN's options."""
        config = context.config
        size, last = context.input_shape[-1], len(config.cells) - 1
        found: list[tuple[_Recurrent, NodeContext]] = []
        for index, cell in enumerate(config.cells):
            layer = cell.layer_config(
                return_sequences=config.return_sequences or index < last,
                return_state=config.return_state,
                zero_output_for_mask=config.zero_output_for_mask and index == last,
                uses_mask=config.uses_mask,
            )
            found.append(
                (
                    _recurrent_kind(cell.cell, context.node.name),
                    replace(
                        context,
                        node=replace(context.node, config=layer),
                        input_shapes=((context.input_shape[0], size),),
                    ),
                )
            )
            size = cell.units
        return found

    def ports(self, context: NodeContext) -> list[AnyPort]:
        if not context.config.stacked:
            kind, cell_context = self.cell_contexts(context)[0]
            return kind.ports(cell_context)
        return [
            _renamed(port, f"cell{index}_", f"cell{index}.")
            for index, (kind, cell_context) in enumerate(self.cell_contexts(context))
            for port in kind.ports(cell_context)
        ]

    # -- torch ----------------------------------------------------------------------------

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        sequence = builder.call(builder.torch.movedim, inputs[0], 1, -1)  # (N, F, T) -> (N, T, F)
        mask = torch_mask(builder, context, inputs) if config.uses_mask else None
        states = list(inputs[1:-1] if config.mask_input else inputs[1:])
        if config.go_backwards:  # once, for the whole stack (each cell then runs forward)
            sequence = builder.call(builder.torch.flip, sequence, (1,))
            if mask is not None:
                mask = builder.call(builder.torch.flip, mask, (1,))
        if config.stacked:
            builder.root.add_module(context.torch_name, builder.nn.ModuleDict())
        output = sequence
        final_states: list[TorchValue] = []
        for index, (kind, cell_context) in enumerate(self.cell_contexts(context)):
            name = f"{context.torch_name}.cell{index}" if config.stacked else context.torch_name
            results = run_recurrent(
                builder, cell_context, kind, output, mask, name, initial_state=states[: kind.state_count]
            )
            states = states[kind.state_count :]
            output, final_states = results[0], final_states + results[1:]
        if config.return_sequences:
            output = builder.call(builder.torch.movedim, output, -1, 1)
        return (output,) + tuple(final_states) if config.return_state else output

    # -- Keras ----------------------------------------------------------------------------

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config, where = context.config, f"layer {context.node.name!r}"
        cells = [
            getattr(keras.layers, CELL_CLASSES[cell.cell][0])(
                **cell_arguments(_recurrent_kind(cell.cell, where), cell, where), dtype=context.node.dtype
            )
            for cell in config.cells
        ]
        return keras.layers.RNN(
            cells if config.stacked else cells[0],
            return_sequences=config.return_sequences,
            return_state=config.return_state,
            go_backwards=config.go_backwards,
            stateful=False,
            unroll=config.unroll,
            zero_output_for_mask=config.zero_output_for_mask,
            **context.keras_identity,
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        counts = self.state_counts(context.config)

        def per_cell(states: list[Any]) -> list[Any]:  # a StackedRNNCells takes a list of states per cell
            if not context.config.stacked:
                return states
            starts = [sum(counts[:index]) for index in range(len(counts))]
            return [states[start : start + count] for start, count in zip(starts, counts)]

        return keras_recurrent_call(keras_layer, arguments, context, per_cell)


class _CellReader(LayerKind):
    """Reads a CellConfig from an exchange file's JSON, as kinds read theirs (not a layer kind)."""

    kind, Config = "rnn_cell", CellConfig


_CELL_READER = _CellReader()


def _nested_options(options: KerasOptions, key: str, nested: Any) -> KerasOptions:
    """The options of a layer config nested in option `key` (an RNN's cell), named in errors."""
    if not isinstance(nested, dict) or not isinstance(nested.get("config"), dict):
        raise options.unsupported(key, nested, "expected a layer config")
    name = str(nested["config"].get("name", key))
    return KerasOptions(
        str(nested.get("class_name")), f"{options.layer_name}/{name}", nested["config"], keras2=options.keras2
    )


def _renamed(port: Any, keras_prefix: str, torch_prefix: str) -> Any:  # an AnyPort with torch keys
    """A port of a layer inside another (a Bidirectional's side, a stacked cell) under the outer
    layer's names: the Keras variable prefixed (aliased to its own name), the torch keys below
    the inner module."""
    torch_names = (port.torch,) if isinstance(port.torch, str) else port.torch
    renamed = tuple(f"{torch_prefix}{name}" for name in torch_names)
    return replace(
        port, keras=f"{keras_prefix}{port.keras}", torch=renamed[0] if isinstance(port.torch, str) else renamed
    )


def _sequence_mask(node: Node, input_masks: tuple[str | None, ...]) -> str | None:
    """A recurrent layer's output mask: its input's (or the mask given) when it returns sequences
    and skips masked steps."""
    mask = node.inputs[-1] if node.config.mask_input else input_masks[0]
    return mask if node.config.return_sequences and node.config.uses_mask else None


# ---------------------------------------------------------------------------------------------
# Bidirectional


@dataclass(frozen=True)
class BidirectionalConfig:
    layer: str  # the wrapped kind: "lstm", "gru" or "simple_rnn"
    forward: RecurrentConfig
    backward: RecurrentConfig  # the other go_backwards (Keras 3 makes it True, Keras 2 the forward's negation)
    merge_mode: str | None = "concat"
    mask_input: bool = field(default=False, metadata=OMIT_DEFAULT)  # the call gives a mask tensor

    def __post_init__(self) -> None:
        """What Keras's Bidirectional requires of its two layers (`_verify_layer_config`, and
        `__init__` setting zero_output_for_mask), and what the torch form supports."""
        _recurrent_kind(self.layer, "bidirectional")
        check_choice(self.merge_mode, MERGE_MODES, "Bidirectional merge_mode")
        forward, backward = self.forward, self.backward
        if forward.go_backwards == backward.go_backwards:
            raise ExchangeError(
                f"Bidirectional needs forward and backward layers of different go_backwards, got "
                f"{forward.go_backwards} for both"
            )
        for option in ("return_sequences", "return_state"):
            if getattr(forward, option) != getattr(backward, option):
                raise ExchangeError(f"Bidirectional forward and backward layers differ in {option}")
        for side in (forward, backward):
            if side.zero_output_for_mask != forward.return_sequences:
                raise ExchangeError(
                    "Bidirectional layers must have zero_output_for_mask = return_sequences, as Keras sets them"
                )
        if forward.uses_mask != backward.uses_mask:
            raise ExchangeError(
                "Bidirectional forward and backward layers differ in uses_mask (both read the mask "
                "the Bidirectional is given)"
            )


@register
class Bidirectional(LayerKind):
    """A forward and a backward recurrent layer over the same input, of opposite go_backwards.
    With return_sequences the backward layer's outputs are flipped in time before the merge
    (concat on the feature axis, sum, mul, ave, or None: two outputs), whichever its go_backwards:
    a forward layer with go_backwards=True keeps its reversed order and the backward one (False)
    is flipped into it, as Keras does. Keras forces zero_output_for_mask on both when they return
    sequences. With return_state the merged output(s) are followed by the forward layer's states,
    then the backward layer's (h, and c for an LSTM); an initial_state lists them in the same order
    (Keras gives its first half to the forward layer). Torch modules `<name>.forward_layer` and
    `<name>.backward_layer`, Keras 3 groups `forward_layer/cell` and `backward_layer/cell`."""

    kind, keras_classes, Config = "bidirectional", ("Bidirectional",), BidirectionalConfig
    casts_integers = True
    variable_aliases = {
        f"{side}_{name}": (name,) for side in ("forward", "backward") for name in ("kernel", "recurrent_kernel", "bias")
    }
    passes_mask = True
    SIDES = ("forward_layer", "backward_layer")
    tensor_kwargs = ("initial_state",)  # its tensors are node inputs after the sequence
    mask_position = 2  # call(sequences, initial_state=None, mask=None, training=None)

    def from_keras(self, options: KerasOptions) -> BidirectionalConfig:
        merge_mode = options.take("merge_mode", "concat")
        if merge_mode not in MERGE_MODES:
            raise options.unsupported("merge_mode", merge_mode)
        forward_kind, forward, _ = options.wrapped_layer("layer", _is_recurrent, "LSTM, GRU or SimpleRNN")
        backward = options.wrapped_layer(
            "backward_layer",
            lambda kind: kind is forward_kind,
            f"a {forward_kind.keras_classes[0]}, as the forward layer",
            required=False,
        )
        # Without a backward_layer Keras 3 copies the layer with go_backwards=True; Keras 2 negated it.
        backward_config = (
            replace(forward, go_backwards=not forward.go_backwards if options.keras2 else True)
            if backward is None
            else backward[1]
        )
        if forward.go_backwards == backward_config.go_backwards:
            raise options.unsupported(
                "layer", f"go_backwards={forward.go_backwards}", "the backward layer's must differ, as Keras requires"
            )
        for option in ("return_sequences", "return_state"):
            if getattr(forward, option) != getattr(backward_config, option):
                raise options.unsupported("backward_layer", option, "differs from the forward layer's")
        # Keras sets zero_output_for_mask = return_sequences on both (Bidirectional.__init__).
        forward = replace(forward, zero_output_for_mask=forward.return_sequences, uses_mask=uses_mask(options))
        backward_config = replace(
            backward_config, zero_output_for_mask=forward.return_sequences, uses_mask=uses_mask(options)
        )
        return BidirectionalConfig(forward_kind.kind, forward, backward_config, merge_mode, options.take_mask_input())

    def config_from_dict(self, values: Any, node_name: str) -> Any:
        if isinstance(values, dict):
            values = dict(values)
            for side in ("forward", "backward"):
                if isinstance(values.get(side), dict):
                    values[side] = _recurrent_kind(values.get("layer"), node_name).config_from_dict(
                        values[side], node_name
                    )
        return super().config_from_dict(values, node_name)

    def wrapped(self, config: BidirectionalConfig) -> _Recurrent:
        return _recurrent_kind(config.layer, "bidirectional")

    def keras3_subgroups(self, config: BidirectionalConfig) -> tuple[str, ...]:
        return tuple(f"{side}/cell" for side in self.SIDES)

    def merged_count(self, config: BidirectionalConfig) -> int:
        """The outputs before the states: 2 with merge_mode None, else 1."""
        return 2 if config.merge_mode is None else 1

    def output_count(self, config: BidirectionalConfig) -> int:
        states = 2 * self.wrapped(config).state_count if config.forward.return_state else 0
        return self.merged_count(config) + states

    def output_shapes(self, config: BidirectionalConfig, input_shapes: tuple[Shape, ...]) -> list[Shape]:
        kind = self.wrapped(config)
        sequence, *states = check_step_mask(config, input_shapes)
        half = len(states) // 2  # Keras's split of the initial states
        forward, *forward_states = kind.output_shapes(config.forward, (sequence, *states[:half]))
        backward, *backward_states = kind.output_shapes(config.backward, (sequence, *states[half:]))
        if config.merge_mode is None:
            merged = [forward, backward]
        elif config.merge_mode == "concat":
            merged = [forward[:-1] + (known(forward[-1], "units") + known(backward[-1], "units"),)]
        elif forward != backward:
            raise ExchangeError(f"merge_mode {config.merge_mode!r} needs equal outputs, found {forward} and {backward}")
        else:
            merged = [forward]
        return merged + forward_states + backward_states

    def output_shape(self, config: BidirectionalConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return self.output_shapes(config, input_shapes)[0]

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        mask = node.inputs[-1] if node.config.mask_input else input_masks[0]
        return mask if node.config.forward.return_sequences and node.config.forward.uses_mask else None

    def output_masks(self, node: Node, input_masks: tuple[str | None, ...]) -> list[str | None]:
        """The input's mask on the merged output(s) when they are sequences; none on the states."""
        merged = self.merged_count(node.config)
        return [self.output_mask(node, input_masks)] * merged + [None] * (self.output_count(node.config) - merged)

    def _side_contexts(self, context: NodeContext) -> list[NodeContext]:
        return [
            replace(context, node=replace(context.node, config=side_config))
            for side_config in (context.config.forward, context.config.backward)
        ]

    def ports(self, context: NodeContext) -> list[AnyPort]:
        kind = self.wrapped(context.config)
        return [
            _renamed(port, f"{side}_", f"{attribute}.")
            for side, attribute, side_context in zip(("forward", "backward"), self.SIDES, self._side_contexts(context))
            for port in kind.ports(side_context)
        ]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, kind = context.config, self.wrapped(context.config)
        sequence = builder.call(builder.torch.movedim, inputs[0], 1, -1)
        mask = torch_mask(builder, context, inputs) if config.forward.uses_mask else None
        initial = list(inputs[1:-1] if config.mask_input else inputs[1:])
        halves = (initial[: len(initial) // 2], initial[len(initial) // 2 :])
        builder.root.add_module(context.torch_name, builder.nn.ModuleDict())
        results, states = [], []
        for attribute, side_context, initial_state in zip(self.SIDES, self._side_contexts(context), halves):
            value, *side_states = run_recurrent(
                builder,
                side_context,
                kind,
                sequence,
                mask,
                f"{context.torch_name}.{attribute}",
                initial_state=initial_state,
            )
            if attribute == "backward_layer" and side_context.config.return_sequences:
                value = builder.call(builder.torch.flip, value, (1,))  # Keras flips it whatever its go_backwards
            results.append(value)
            states += side_states
        forward, backward = results
        if config.merge_mode == "concat":
            merged = [builder.call(builder.torch.cat, [forward, backward], -1)]
        elif config.merge_mode == "sum":
            merged = [builder.call(builder.torch.add, forward, backward)]
        elif config.merge_mode == "mul":
            merged = [builder.call(builder.torch.mul, forward, backward)]
        elif config.merge_mode == "ave":
            merged = [builder.call(builder.torch.div, builder.call(builder.torch.add, forward, backward), 2)]
        else:
            merged = [forward, backward]
        if config.forward.return_sequences:
            merged = [builder.call(builder.torch.movedim, value, -1, 1) for value in merged]
        outputs = merged + states
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config, kind = context.config, self.wrapped(context.config)
        layer_class = getattr(keras.layers, kind.keras_classes[0])
        name = context.node.name
        forward = layer_class(**kind.keras_arguments(config.forward, f"forward_{name}"), dtype=context.node.dtype)
        backward = layer_class(**kind.keras_arguments(config.backward, f"backward_{name}"), dtype=context.node.dtype)
        return keras.layers.Bidirectional(
            forward, merge_mode=config.merge_mode, backward_layer=backward, name=name, dtype=context.node.dtype
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        config = context.config
        states = list(arguments[1:-1] if config.mask_input else arguments[1:])
        options = {"initial_state": states} if states else {}
        if config.mask_input:
            options["mask"] = arguments[-1]
        elif states and context.input_masks[0] is not None and config.forward.uses_mask:
            options["mask"] = _keras_mask(arguments[0])  # with initial states Keras 3 passes it only as `mask=`
        result = keras_layer(arguments[0], **options)
        if config.forward.return_state:
            from keras import tree

            return tree.flatten(result)
        return result


def _recurrent_kind(name: object, node_name: str) -> _Recurrent:
    from exchange.kinds import _short, kind_of

    kind = kind_of(name) if isinstance(name, str) else None
    if not isinstance(kind, _Recurrent):
        raise ExchangeError(f"layer {node_name!r}: {_short(name)} is not a recurrent layer kind")
    return kind


def _is_recurrent(kind: LayerKind) -> bool:
    return isinstance(kind, _Recurrent)


# ---------------------------------------------------------------------------------------------
# Layers with several outputs are read through `output` nodes


@dataclass(frozen=True)
class OutputConfig:
    index: int


@register
class Output(LayerKind):
    """Output `index` of a layer with several (an LSTM with return_state=True, a Bidirectional
    with merge_mode=None). Not a Keras layer: Keras's call returns a list, this picks from it."""

    kind, keras_classes, Config = "output", (), OutputConfig
    selects_output = True  # its shape and mask are those of output `index` of its input (Graph)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        return inputs[0][context.config.index]

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        return None

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        return arguments[0][context.config.index]
