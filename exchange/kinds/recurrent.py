"""Recurrent layers: LSTM, GRU, SimpleRNN, and the Bidirectional wrapper.

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
  layer's sequence back before merging.
- return_state=True: the layer has several outputs (sequence or last output, then h, and c for an
  LSTM); the graph reads them through `output` nodes. A call with `initial_state=[h, c]` (an
  encoder's states into a decoder) reads them as inputs after the sequence.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (MAX_FEATURES, OMIT_DEFAULT, TENSOR, LayerKind, check_choice, check_int, check_step_mask,
                            register, torch_mask)
from exchange.kinds.activations import ELEMENTWISE_ACTIVATIONS, check_activation, keras_activation, torch_function
from exchange.ports import Blocks, Permute, Port, Stacked, Summed

GRU_GATE_ORDER = (1, 0, 2)           # torch's r, z, n are Keras's blocks 1, 0, 2 (z, r, h)
TORCH_DEFAULTS = ("tanh", "sigmoid")     # nn.LSTM's and nn.GRU's activation and gate activation
TORCH_RNN_ACTIVATIONS = ("tanh", "relu")   # nn.RNN's nonlinearity
MERGE_MODES = ("concat", "sum", "mul", "ave", None)


@dataclass(frozen=True)
class RecurrentConfig:
    units: int
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"   # LSTM and GRU only
    use_bias: bool = True
    return_sequences: bool = False
    return_state: bool = False
    go_backwards: bool = False
    zero_output_for_mask: bool = False
    reset_after: bool = True                # GRU only
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


def _recurrent_activation(options, key: str) -> str:
    """An activation option of a recurrent layer: one `KerasRecurrent` can compute."""
    name = options.activation(key)
    if name not in ELEMENTWISE_ACTIVATIONS:
        raise options.unsupported(key, name, "not supported in a recurrent layer")
    return name


class _Recurrent(LayerKind):
    """LSTM, GRU and SimpleRNN: one kind each, differing in `mode` (gates, biases, torch module)."""

    Config = RecurrentConfig
    mode = ""            # KerasRecurrent's mode: "lstm", "gru" or "rnn"
    gates = 1
    state_count = 1      # states after the output with return_state (LSTM: h and c)
    passes_mask = True
    tensor_kwargs = ("initial_state",)   # its tensors are node inputs after the sequence
    mask_position = 2   # call(sequences, initial_state=None, mask=None, training=False)

    def from_keras(self, options):
        options.expect("stateful", False)
        options.expect("time_major", False)
        tensors = sum(argument is None for argument in options.call_args) + sum(
            value is TENSOR for value in options.call_kwargs.values())
        for key in ("dropout", "recurrent_dropout", "seed", "unit_forget_bias", "implementation", "use_cudnn",
                    "unroll"):
            options.take(key, None)   # training-only or speed options
        config = RecurrentConfig(
            units=options.integer("units"),
            activation=_recurrent_activation(options, "activation"),
            recurrent_activation=(_recurrent_activation(options, "recurrent_activation") if self.gates > 1
                                  else "sigmoid"),
            use_bias=options.flag("use_bias", True),
            return_sequences=options.flag("return_sequences", False),
            return_state=options.flag("return_state", False),
            go_backwards=options.flag("go_backwards", False),
            zero_output_for_mask=options.flag("zero_output_for_mask", False),
            reset_after=options.flag("reset_after", not options.keras2) if self.mode == "gru" else True,
            uses_mask=options.keras2 or options.mask_given or tensors <= 1,
            mask_input=options.take_mask_input())
        return config

    def keras3_subgroups(self, config):
        return ("cell",)

    # -- shapes and weights -----------------------------------------------------------------

    def output_count(self, config) -> int:
        return 1 + self.state_count if config.return_state else 1

    def output_shapes(self, config, input_shapes) -> list[tuple]:
        shape = input_shapes[0]
        if len(shape) != 2:
            raise ExchangeError(f"expects (batch, time, features) input, found (batch, {shape})")
        input_shapes = check_step_mask(config, input_shapes)
        states = [tuple(state) for state in input_shapes[1:]]
        if states and states != [(config.units,)] * self.state_count:
            raise ExchangeError(f"initial_state must be {self.state_count} tensor(s) of shape (batch, "
                                f"{config.units}), found {states}")
        output = (shape[0], config.units) if config.return_sequences else (config.units,)
        return [output] + [(config.units,)] * (self.state_count if config.return_state else 0)

    def output_shape(self, config, input_shapes):
        return self.output_shapes(config, input_shapes)[0]

    def output_mask(self, node, input_masks):
        mask = node.inputs[-1] if node.config.mask_input else input_masks[0]
        return mask if node.config.return_sequences and node.config.uses_mask else None

    def output_masks(self, node, input_masks) -> list:
        return [self.output_mask(node, input_masks)] + [None] * (self.output_count(node.config) - 1)

    def bias_shape(self, config) -> tuple:
        return (self.gates * config.units,)

    def gate_steps(self) -> tuple:
        return ()

    def ports(self, context):
        config, width = context.config, self.gates * context.config.units
        steps = (Permute((1, 0)),) + self.gate_steps()
        ports = [Port("kernel", "weight_ih_l0", steps, shape=(context.input_shape[-1], width)),
                 Port("recurrent_kernel", "weight_hh_l0", steps, shape=(config.units, width))]
        if config.use_bias:
            ports.append(self.bias_port(config))
        return ports

    def bias_port(self, config):
        return Summed("bias", ("bias_ih_l0", "bias_hh_l0"), self.gate_steps(), shape=self.bias_shape(config))

    # -- torch ----------------------------------------------------------------------------

    torch_class = ""     # nn.LSTM / nn.GRU: what computes this layer with the default activations

    def standard_module(self, builder, config, input_size, dtype):
        """The `nn.LSTM`/`nn.GRU`/`nn.RNN` computing exactly this layer, or None."""
        if (config.activation, config.recurrent_activation) != TORCH_DEFAULTS or not config.reset_after:
            return None
        return getattr(builder.nn, self.torch_class)(input_size, config.units, bias=config.use_bias, batch_first=True,
                                                     device="meta", dtype=dtype)

    def torch_module(self, builder, context, masked: bool):
        config, dtype, input_size = context.config, builder.dtype(context), context.input_shape[-1]
        module = None if masked else self.standard_module(builder, config, input_size, dtype)
        return module or builder.helpers.KerasRecurrent(
            self.mode, input_size, config.units, bias=config.use_bias,
            activation=torch_function(config.activation, builder)[0],
            recurrent_activation=torch_function(config.recurrent_activation, builder)[0], reset_after=config.reset_after,
            zero_output_for_mask=config.zero_output_for_mask, device="meta", dtype=dtype)

    def torch_forward(self, builder, context, inputs):
        sequence = builder.call(builder.torch.movedim, inputs[0], 1, -1)   # (N, F, T) -> (N, T, F)
        mask = torch_mask(builder, context, inputs) if context.config.uses_mask else None
        states = inputs[1:-1] if context.config.mask_input else inputs[1:]
        results = run_recurrent(builder, context, self, sequence, mask, context.torch_name, initial_state=states)
        output = results[0]
        if context.config.return_sequences:
            output = builder.call(builder.torch.movedim, output, -1, 1)
        return (output,) + tuple(results[1:]) if context.config.return_state else output

    # -- Keras ----------------------------------------------------------------------------

    def keras_layer(self, keras, context):
        return getattr(keras.layers, self.keras_classes[0])(**self.keras_arguments(context.config, context.node.name),
                                                            dtype=context.node.dtype)

    def keras_call(self, keras_layer, arguments, context):
        if context.config.mask_input:
            states = list(arguments[1:-1])
            return keras_layer(arguments[0], **({"initial_state": states} if states else {}), mask=arguments[-1])
        if len(arguments) == 1:
            return keras_layer(arguments[0])
        # With initial states Keras 3 passes the input's mask only when given as `mask=`.
        mask = context.input_masks[0] is not None and context.config.uses_mask
        return keras_layer(arguments[0], initial_state=list(arguments[1:]),
                           **({"mask": _keras_mask(arguments[0])} if mask else {}))

    def keras_arguments(self, config, name: str) -> dict:
        where = f"layer {name!r}"
        arguments = dict(units=config.units, activation=keras_activation(config.activation, where),
                         use_bias=config.use_bias, return_sequences=config.return_sequences,
                         return_state=config.return_state, go_backwards=config.go_backwards,
                         zero_output_for_mask=config.zero_output_for_mask, name=name)
        if self.gates > 1:
            arguments["recurrent_activation"] = keras_activation(config.recurrent_activation, where)
        if self.mode == "gru":
            arguments["reset_after"] = config.reset_after
        return arguments


def _keras_mask(tensor):
    """The mask Keras attached to a symbolic tensor (an Embedding's with mask_zero=True)."""
    from keras.src.backend import get_keras_mask

    return get_keras_mask(tensor)


def run_recurrent(builder, context, kind: _Recurrent, sequence, mask, module_name: str, initial_state=()) -> list:
    """Add one recurrent module (of `context.config`, under `module_name`) reading `sequence`
    (N, T, F) from the initial states (N, H) given, or zeros; returns [outputs (N, T, H) or last
    output (N, H), then the states (N, H)], in Keras's order."""
    config = context.config
    if config.go_backwards:
        sequence = builder.call(builder.torch.flip, sequence, (1,))
        if mask is not None:
            mask = builder.call(builder.torch.flip, mask, (1,))
    module = kind.torch_module(builder, context, mask is not None)
    arguments = [sequence] if mask is None else [sequence, mask]
    if initial_state:   # torch's states are (layers, N, H): one layer
        states = tuple(builder.call(builder.torch.unsqueeze, state, 0) for state in initial_state)
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
        states = [builder.call(operator.getitem, state, index) for index in range(kind.state_count)] \
            if kind.state_count == 2 else [state]
        values += [builder.call(operator.getitem, value, 0) for value in states]
    return values


@register
class LSTM(_Recurrent):
    kind, keras_classes, mode, gates, state_count = "lstm", ("LSTM",), "lstm", 4, 2
    torch_class = "LSTM"


@register
class GRU(_Recurrent):
    kind, keras_classes, mode, gates = "gru", ("GRU",), "gru", 3
    torch_class = "GRU"      # with reset_after=True only: nn.GRU applies the reset gate after its matmul

    def gate_steps(self):
        return (Blocks(0, GRU_GATE_ORDER),)

    def bias_shape(self, config):
        return (2, 3 * config.units) if config.reset_after else (3 * config.units,)

    def bias_port(self, config):
        if config.reset_after:
            return Stacked("bias", ("bias_ih_l0", "bias_hh_l0"), self.gate_steps(), shape=self.bias_shape(config))
        return Port("bias", "bias_ih_l0", self.gate_steps(), shape=self.bias_shape(config))


@register
class SimpleRNN(_Recurrent):
    kind, keras_classes, mode, gates = "simple_rnn", ("SimpleRNN",), "rnn", 1

    def standard_module(self, builder, config, input_size, dtype):
        if config.activation not in TORCH_RNN_ACTIVATIONS:
            return None
        return builder.nn.RNN(input_size, config.units, nonlinearity=config.activation, bias=config.use_bias,
                              batch_first=True, device="meta", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Bidirectional


@dataclass(frozen=True)
class BidirectionalConfig:
    layer: str                      # the wrapped kind: "lstm", "gru" or "simple_rnn"
    forward: RecurrentConfig
    backward: RecurrentConfig       # go_backwards=True, as Keras makes it
    merge_mode: str | None = "concat"
    mask_input: bool = field(default=False, metadata=OMIT_DEFAULT)   # the call gives a mask tensor

    def __post_init__(self) -> None:
        """What Keras's Bidirectional requires of its two layers (`_verify_layer_config`, and
        `__init__` setting zero_output_for_mask), and what the torch form supports."""
        _recurrent_kind(self.layer, "bidirectional")
        check_choice(self.merge_mode, MERGE_MODES, "Bidirectional merge_mode")
        forward, backward = self.forward, self.backward
        if forward.go_backwards or not backward.go_backwards:
            raise ExchangeError(f"Bidirectional needs a forward layer with go_backwards=False and a backward one "
                                f"with go_backwards=True, got {forward.go_backwards} and {backward.go_backwards}")
        if forward.return_state or backward.return_state:
            raise ExchangeError("Bidirectional with return_state is not supported")
        if forward.return_sequences != backward.return_sequences:
            raise ExchangeError("Bidirectional forward and backward layers differ in return_sequences")
        for side in (forward, backward):
            if side.zero_output_for_mask != forward.return_sequences or not side.uses_mask:
                raise ExchangeError("Bidirectional layers must have zero_output_for_mask = return_sequences and "
                                    "uses_mask = true, as Keras sets them")


@register
class Bidirectional(LayerKind):
    """A forward and a backward recurrent layer over the same input. The backward one reads the
    sequence reversed; with return_sequences its outputs are flipped back before the merge
    (concat on the feature axis, sum, mul, ave, or None: two outputs). Keras forces
    zero_output_for_mask on both when they return sequences. Torch modules `<name>.forward_layer`
    and `<name>.backward_layer`, Keras 3 groups `forward_layer/cell` and `backward_layer/cell`."""

    kind, keras_classes, Config = "bidirectional", ("Bidirectional",), BidirectionalConfig
    variable_aliases = {f"{side}_{name}": (name,) for side in ("forward", "backward")
                        for name in ("kernel", "recurrent_kernel", "bias")}
    passes_mask = True
    SIDES = ("forward_layer", "backward_layer")
    mask_position = 2   # call(sequences, initial_state=None, mask=None, training=None)

    def from_keras(self, options):
        tensors = sum(argument is None for argument in options.call_args) + sum(
            value is TENSOR for value in options.call_kwargs.values())
        if tensors > 1:   # Keras splits the states between the two layers; not supported here
            raise UnsupportedLayerError(f"{options.where()}: argument 'initial_state' is not supported")
        merge_mode = options.take("merge_mode", "concat")
        if merge_mode not in MERGE_MODES:
            raise options.unsupported("merge_mode", merge_mode)
        forward_kind, forward, _ = options.wrapped_layer("layer", _is_recurrent, "LSTM, GRU or SimpleRNN")
        backward = options.wrapped_layer("backward_layer", lambda kind: kind is forward_kind,
                                         f"a {forward_kind.keras_classes[0]}, as the forward layer", required=False)
        backward_config = replace(forward, go_backwards=not forward.go_backwards) if backward is None else backward[1]
        if forward.return_state or forward.go_backwards or not backward_config.go_backwards:
            raise options.unsupported("layer", forward_kind.keras_classes[0],
                                      "return_state, or a forward layer with go_backwards=True")
        if forward.return_sequences != backward_config.return_sequences:
            raise options.unsupported("backward_layer", "return_sequences", "differs from the forward layer's")
        # Keras sets zero_output_for_mask = return_sequences on both (Bidirectional.__init__).
        forward = replace(forward, zero_output_for_mask=forward.return_sequences)
        backward_config = replace(backward_config, zero_output_for_mask=forward.return_sequences)
        return BidirectionalConfig(forward_kind.kind, forward, backward_config, merge_mode, options.take_mask_input())

    def config_from_dict(self, values, node_name):
        if isinstance(values, dict):
            values = dict(values)
            for side in ("forward", "backward"):
                if isinstance(values.get(side), dict):
                    values[side] = _recurrent_kind(values.get("layer"), node_name).config_from_dict(
                        values[side], node_name)
        return super().config_from_dict(values, node_name)

    def wrapped(self, config) -> _Recurrent:
        return _recurrent_kind(config.layer, "bidirectional")

    def keras3_subgroups(self, config):
        return tuple(f"{side}/cell" for side in self.SIDES)

    def output_count(self, config):
        return 2 if config.merge_mode is None else 1

    def output_shapes(self, config, input_shapes):
        kind = self.wrapped(config)
        if len(input_shapes) != 1 + config.mask_input:
            raise ExchangeError("initial_state is not supported")
        input_shapes = check_step_mask(config, input_shapes)
        forward = kind.output_shapes(config.forward, input_shapes)[0]
        backward = kind.output_shapes(config.backward, input_shapes)[0]
        if config.merge_mode is None:
            return [forward, backward]
        if config.merge_mode == "concat":
            return [forward[:-1] + (forward[-1] + backward[-1],)]
        if forward != backward:
            raise ExchangeError(f"merge_mode {config.merge_mode!r} needs equal outputs, found {forward} and {backward}")
        return [forward]

    def output_shape(self, config, input_shapes):
        return self.output_shapes(config, input_shapes)[0]

    def output_mask(self, node, input_masks):
        mask = node.inputs[-1] if node.config.mask_input else input_masks[0]
        return mask if node.config.forward.return_sequences else None

    def _side_contexts(self, context):
        return [replace(context, node=replace(context.node, config=side_config))
                for side_config in (context.config.forward, context.config.backward)]

    def ports(self, context):
        kind = self.wrapped(context.config)
        found = []
        for side, attribute, side_context in zip(("forward", "backward"), self.SIDES, self._side_contexts(context)):
            for port in kind.ports(side_context):
                torch_names = (port.torch,) if isinstance(port.torch, str) else port.torch
                renamed = tuple(f"{attribute}.{name}" for name in torch_names)
                found.append(replace(port, keras=f"{side}_{port.keras}",
                                     torch=renamed[0] if isinstance(port.torch, str) else renamed))
        return found

    def torch_forward(self, builder, context, inputs):
        config, kind = context.config, self.wrapped(context.config)
        sequence = builder.call(builder.torch.movedim, inputs[0], 1, -1)
        mask = torch_mask(builder, context, inputs)
        builder.root.add_module(context.torch_name, builder.nn.ModuleDict())
        results = []
        for attribute, side_context in zip(self.SIDES, self._side_contexts(context)):
            side = side_context.config
            value = run_recurrent(builder, side_context, kind, sequence, mask, f"{context.torch_name}.{attribute}")[0]
            if side.go_backwards and side.return_sequences:
                value = builder.call(builder.torch.flip, value, (1,))
            results.append(value)
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
        return merged[0] if len(merged) == 1 else tuple(merged)

    def keras_layer(self, keras, context):
        config, kind = context.config, self.wrapped(context.config)
        layer_class = getattr(keras.layers, kind.keras_classes[0])
        name = context.node.name
        forward = layer_class(**kind.keras_arguments(config.forward, f"forward_{name}"), dtype=context.node.dtype)
        backward = layer_class(**kind.keras_arguments(config.backward, f"backward_{name}"), dtype=context.node.dtype)
        return keras.layers.Bidirectional(forward, merge_mode=config.merge_mode, backward_layer=backward,
                                          name=name, dtype=context.node.dtype)

    def keras_call(self, keras_layer, arguments, context):
        if context.config.mask_input:
            return keras_layer(arguments[0], mask=arguments[-1])
        return keras_layer(arguments[0])


def _recurrent_kind(name, node_name: str) -> _Recurrent:
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
    selects_output = True    # its shape and mask are those of output `index` of its input (Graph)

    def torch_forward(self, builder, context, inputs):
        return inputs[0][context.config.index]

    def keras_layer(self, keras, context):
        return None

    def keras_call(self, keras_layer, arguments, context):
        return arguments[0][context.config.index]

