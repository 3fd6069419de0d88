"""The framework-neutral description of a model (exchange format 2): a graph of layers.

A `Graph` is plain data, stored as JSON in every exchange file's metadata, from which either
framework builds the model. It has inputs (name, shape, dtype), nodes (name, layer kind, the
names of the nodes or inputs they read, a typed config with every value explicit, the dtype of
their weights) and outputs. Shapes are written in Keras's own layout without the batch axis
(an image is (H, W, C)); the torch side holds images channels-first.

Everything that depends on a layer kind is asked of its module in `exchange.kinds`; this module
only walks the graph: shape inference, the file's tensor keys, shapes and dtypes.

Example:
    >>> graph = dense_chain("mlp", 784, [(50, "tanh"), (10, "softmax")])
    >>> graph.parameter_count()
    39760
    >>> Graph.from_json(graph.to_json()) == graph
    True
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from math import prod
from typing import Any

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.ports import AnyPort, TorchOnly

Shape = tuple[int | None, ...]  # None: a size known only at run time; batch axis left out

DTYPES = ("float16", "bfloat16", "float32", "float64")
# Every input dtype Keras takes that torch has: floats, integers (token ids, lookups, masks), bool masks.
INTEGER_DTYPES = ("uint8", "int8", "int16", "int32", "int64")
INPUT_DTYPES = DTYPES + INTEGER_DTYPES + ("bool",)
# Caps on what an architecture may declare: a real model is far below them.
# The one cap on a model's size: a graph's nodes, and the layers of any file read (`untrusted`).
MAX_NODES = 20_000  # twenty times the largest keras.applications models (NASNetLarge: 1,041 layers)
MAX_RANK = 8  # Keras layers work on tensors of rank <= 5
MAX_NAME_LENGTH = 1000  # Keras's generated names are under 100 characters
# The names Keras on TensorFlow can build: each layer enters a TensorFlow name scope, and the model
# a root scope (measured with Keras 3.15: a space, quote, colon, '/', '\\' or non-ASCII letter fails
# when the model first runs). A graph may hold other names (they are data); only Keras refuses them.
KERAS_LAYER_NAME = re.compile(r"[A-Za-z0-9_.>-]+")
KERAS_MODEL_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.>-]*")
MAX_NODE_INPUTS = 1_000  # tensors one node reads (an Add of many branches); each is an argument of its call
MAX_EDGES = 200_000  # all nodes' inputs together: ten per node at the node cap's fifth


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: Shape
    dtype: str = "float32"


@dataclass(frozen=True)
class Node:
    name: str  # the Keras layer name
    kind: str  # an exchange kind registered in exchange.kinds
    inputs: tuple[str, ...]
    config: Any  # the kind's frozen Config dataclass
    dtype: str = "float32"  # the dtype of the node's weights
    # A shared layer's later call: the node whose layer this one calls again (its weights, torch
    # module and Keras layer are that node's); None for a node that is its own layer.
    shares: str | None = None


def shared_call_name(layer: str, call: int) -> str:
    """The node of a shared layer's call after its first: `conv:call1`, `conv:call2`, … (Keras
    layer names hold no colon; the torch side calls the layer's own module, `self.conv`)."""
    return f"{layer}:call{call}"


@dataclass(frozen=True)
class Cost:
    """What one sample costs to run through a graph, from its shapes alone (a size known only at
    run time counts as 1): what `--verify` sizes its batch by, and refuses beyond its budget."""

    parameters: int
    largest_activation: int  # elements of the largest input or layer output
    activations: int  # elements of all inputs and layer outputs together
    operations: int  # multiply-adds, about: each weight once per output position, each value once


@dataclass(frozen=True)
class NodeContext:
    """What a layer kind needs to know about one node beyond its config."""

    node: Node
    torch_name: str  # the node's name as a torch attribute (the key prefix)
    input_shapes: tuple[Shape, ...]
    output_shape: Shape
    # When the torch side holds input 0 as a channels-first Flatten of this Keras shape, a Dense
    # reading it permutes its weight rows instead (see the Flatten kind); None otherwise.
    flat_source: Shape | None = None
    # For a Flatten node: whether its torch form keeps the channels-first order.
    channels_first_flatten: bool = False
    # Per input, the Keras mask it carries: the token ids whose `ids != 0` it is (an Embedding's
    # with mask_zero=True), the `<name>:mask` of the Masking that made it, or None (see `Graph.masks`).
    input_masks: tuple[str | None, ...] = ()

    @property
    def config(self) -> Any:
        return self.node.config

    @property
    def input_shape(self) -> Shape:
        return self.input_shapes[0]

    @property
    def keras_identity(self) -> dict[str, str]:
        """The Keras layer's name and dtype, as every `keras_layer` passes them."""
        return {"name": self.node.name, "dtype": self.node.dtype}


@dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple[InputSpec, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        self._check()

    # -- structure ------------------------------------------------------------------------

    def _check(self) -> None:
        from exchange.kinds import kind_of

        check_name(self.name, "model name")
        if not self.nodes:
            raise ExchangeError("a graph needs at least one node")
        if len(self.nodes) > MAX_NODES:
            raise ExchangeError(f"{len(self.nodes):,} nodes is more than the {MAX_NODES:,} allowed")
        seen: set[str] = set()
        for spec in self.inputs:
            _check_name(spec.name, seen)
            if spec.dtype not in INPUT_DTYPES:
                raise ExchangeError(f"input {spec.name!r}: dtype {spec.dtype[:40]!r} is not one of {INPUT_DTYPES}")
            _check_shape(spec.shape, f"input {spec.name!r}")
        edges = 0
        calls: dict[str, int] = {}  # shared layer -> its calls so far after the first
        own_layers: set[str] = set()  # the earlier nodes that are layers of their own
        for node in self.nodes:
            _check_name(node.name, seen)
            edges += len(node.inputs)
            if len(node.inputs) > MAX_NODE_INPUTS or edges > MAX_EDGES:
                raise ExchangeError(
                    f"layer {node.name!r} reads {len(node.inputs):,} tensors"
                    + (
                        f", more than the {MAX_NODE_INPUTS:,} one layer may read"
                        if len(node.inputs) > MAX_NODE_INPUTS
                        else f"; together the layers read more than the {MAX_EDGES:,} allowed"
                    )
                )
            kind_of(node.kind)  # raises for an unknown kind
            if node.dtype not in DTYPES:
                raise ExchangeError(f"layer {node.name!r}: dtype {node.dtype[:40]!r} is not one of {DTYPES}")
            missing = [name for name in node.inputs if name not in seen or name == node.name]
            if missing or not node.inputs:
                raise ExchangeError(
                    f"layer {node.name!r} reads {missing or 'nothing'}, which is not an input or an earlier layer"
                )
            if node.shares is not None:
                self._check_shared_call(node, calls, own_layers)
            else:
                own_layers.add(node.name)
        unknown = [name for name in self.outputs if name not in seen]
        if unknown or not self.outputs:
            raise ExchangeError(f"graph outputs {unknown or '(none)'} are not layers or inputs")
        # The whole graph is checked now, before anything is built: every shape, mask and tensor.
        self.shapes, self.masks, self.tensor_specs  # noqa: B018

    def _check_shared_call(self, node: Node, calls: dict[str, int], own_layers: set[str]) -> None:
        """A later call of a shared layer: of an earlier node that is its own layer, with the same
        kind, config and dtype, named `shared_call_name(layer, n)` for its n-th call after the first."""
        from exchange.kinds import kind_of

        owner = self._nodes_by_name[node.shares] if node.shares in own_layers else None
        if owner is None or kind_of(node.kind).selects_output:
            raise ExchangeError(
                f"layer {node.name!r} shares {str(node.shares)[:80]!r}, which is not an earlier layer of its own"
            )
        if (owner.kind, owner.config, owner.dtype) != (node.kind, node.config, node.dtype):
            raise ExchangeError(
                f"layer {node.name!r} shares layer {owner.name!r} but differs from it in kind, config or dtype"
            )
        calls[owner.name] = calls.get(owner.name, 0) + 1
        if node.name != shared_call_name(owner.name, calls[owner.name]):
            raise ExchangeError(
                f"layer {node.name!r}: call {calls[owner.name] + 1} of shared layer {owner.name!r} "
                f"must be named {shared_call_name(owner.name, calls[owner.name])!r}"
            )

    def node(self, name: str) -> Node:
        return self._nodes_by_name[name]

    @cached_property
    def layers(self) -> tuple[Node, ...]:
        """The nodes that are layers of their own (every node but a shared layer's later calls):
        one each per set of weights, torch module and Keras layer."""
        return tuple(node for node in self.nodes if node.shares is None)

    @cached_property
    def _nodes_by_name(self) -> dict[str, Node]:
        return {node.name: node for node in self.nodes}

    @cached_property
    def input_arguments(self) -> dict[str, str]:
        """Input name -> the torch module's `forward` argument name (a valid, unshadowing Python name)."""
        return {spec.name: python_name(spec.name) for spec in self.inputs}

    @cached_property
    def consumers(self) -> dict[str, list[Node]]:
        readers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                readers.setdefault(name, []).append(node)
        return readers

    @cached_property
    def torch_names(self) -> dict[str, str]:
        """Node name -> a torch attribute name; unique, so it can prefix the node's keys."""
        names: dict[str, str] = {}
        taken: dict[str, str] = {}
        for node in self.nodes:
            if node.shares is not None:  # a shared layer's later call: the layer's own module
                names[node.name] = names[node.shares]
                continue
            safe = python_name(node.name)
            if safe in taken:
                raise ExchangeError(
                    f"layers {taken[safe]!r} and {node.name!r} both become torch name {safe!r}; rename one"
                )
            taken[safe] = node.name
            names[node.name] = safe
        return names

    # -- shape inference ------------------------------------------------------------------

    @cached_property
    def shapes(self) -> dict[str, Shape]:
        """Every input's and node's output shape, in Keras layout without the batch axis."""
        from exchange.kinds import kind_of

        shapes: dict[str, Shape] = {spec.name: tuple(spec.shape) for spec in self.inputs}
        every_output: dict[str, list[Shape]] = {}  # all output shapes of layers with several outputs
        for node in self.nodes:
            input_shapes = tuple(shapes[name] for name in node.inputs)
            kind = kind_of(node.kind)
            try:
                if kind.selects_output:
                    outputs = every_output.get(node.inputs[0], [])
                    if not 0 <= node.config.index < len(outputs):
                        raise ExchangeError(
                            f"reads output {node.config.index} of {node.inputs[0]!r}, which has "
                            f"{len(outputs) or 'not several'}"
                        )
                    shape = tuple(outputs[node.config.index])
                else:
                    several = [name for name in node.inputs if name in every_output]
                    if several:
                        raise ExchangeError(f"reads {several[0]!r}, a layer with several outputs, directly")
                    all_shapes = kind.output_shapes(node.config, input_shapes)
                    if kind.output_count(node.config) > 1:
                        every_output[node.name] = [tuple(item) for item in all_shapes]
                    shape = tuple(all_shapes[0])
            except UnsupportedLayerError as err:  # named, as every refusal names its layer
                message = str(err)
                raise UnsupportedLayerError(
                    message if repr(node.name) in message else f"layer {node.name!r} ({node.kind}): {message}"
                ) from None
            except ExchangeError as err:
                raise ExchangeError(f"layer {node.name!r} ({node.kind}): {err}") from None
            _check_shape(shape, f"layer {node.name!r} output")
            shapes[node.name] = shape
        return shapes

    @cached_property
    def masks(self) -> dict[str, str | None]:
        """The Keras mask each input and node output carries: the name of the token ids whose
        `ids != 0` it is (made by an Embedding with `mask_zero=True`), `<name>:mask` for the one a
        Masking layer makes (`mask_sources`), or None. Keras passes masks
        along implicitly; the layers that use them (recurrent layers, GlobalAveragePooling1D,
        attention) read them here.
        """
        from exchange.kinds import kind_of

        masks: dict[str, str | None] = {spec.name: None for spec in self.inputs}
        every_mask: dict[str, list[str | None]] = {}  # the masks of each output of layers with several
        for node in self.nodes:
            kind = kind_of(node.kind)
            input_masks = tuple(masks[name] for name in node.inputs)
            if kind.selects_output:
                masks[node.name] = every_mask[node.inputs[0]][node.config.index]
            elif kind.output_count(node.config) > 1:
                every_mask[node.name] = kind.output_masks(node, input_masks)
                masks[node.name] = every_mask[node.name][0]
            else:
                masks[node.name] = kind.output_mask(node, input_masks)
        return masks

    @cached_property
    def mask_sources(self) -> dict[str, tuple[str, float]]:
        """What the masks made by layers from their input compare, as Keras records them: mask ->
        (tensor, value), the mask being `any(tensor != value)` over the features (a Masking's, see
        `LayerKind.mask_source`). A mask not here is token ids or a mask tensor, `!= 0`."""
        from exchange.kinds import kind_of

        sources: dict[str, tuple[str, float]] = {}
        for node in self.nodes:
            source = kind_of(node.kind).mask_source(node)
            mask = self.masks[node.name]
            if source is not None and mask is not None:  # a kind with a mask source names its mask
                sources[mask] = source
        return sources

    @cached_property
    def channels_first_flattens(self) -> dict[str, Shape]:
        """Flatten nodes whose torch form may keep the channels-first order, with the Keras shape
        they flatten.

        A Flatten of an image gives (H, W, C) order in Keras but (C, H, W) order on a torch
        tensor. Where every path from the Flatten reaches only layers that can absorb the order
        into their weights (a Dense permutes its weight rows), through layers that keep the
        element order (activations, dropout), torch flattens as torch does. Anywhere else (a
        model output, a Reshape, a merge) the torch side reorders to (H, W, C) first.
        """
        from exchange.kinds import kind_of

        found: dict[str, Shape] = {}
        outputs = set(self.outputs)
        for node in self.nodes:
            kind = kind_of(node.kind)
            shape = self.shapes[node.inputs[0]]
            if not kind.may_keep_channels_first(node.config) or len(shape) < 2 or None in shape:
                continue
            frontier, ok = [node.name], True
            while frontier and ok:
                name = frontier.pop()
                if name in outputs:
                    ok = False
                for reader in self.consumers.get(name, []):
                    reader_kind = kind_of(reader.kind)
                    if reader_kind.reads_permuted_flat and len(reader.inputs) == 1:
                        continue
                    if reader_kind.keeps_order(reader.config) and len(reader.inputs) == 1:
                        frontier.append(reader.name)
                    else:
                        ok = False
            if ok:
                found[node.name] = shape
        return found

    @cached_property
    def _flat_sources(self) -> dict[str, Shape]:
        from exchange.kinds import kind_of

        sources: dict[str, Shape] = dict(self.channels_first_flattens)
        for node in self.nodes:
            if node.inputs[0] in sources and kind_of(node.kind).keeps_order(node.config):
                sources[node.name] = sources[node.inputs[0]]
        return sources

    def input_shape_of(self, node: Node) -> Shape:
        """The shape of the node's first input."""
        return self.shapes[node.inputs[0]]

    @property
    def torch_order_differs(self) -> set[str]:
        """Nodes whose torch output holds Keras's elements in another order (a channels-first
        Flatten and the element-wise layers after it): compare them by what follows."""
        return set(self._flat_sources) - set(spec.name for spec in self.inputs)

    def context(self, node: Node) -> NodeContext:
        return NodeContext(
            node,
            self.torch_names[node.name],
            tuple(self.shapes[name] for name in node.inputs),
            self.shapes[node.name],
            self._flat_sources.get(node.inputs[0]),
            node.name in self.channels_first_flattens,
            tuple(self.masks[name] for name in node.inputs),
        )

    # -- tensors ----------------------------------------------------------------------------

    def ports(self, node: Node) -> list[AnyPort]:
        from exchange.kinds import kind_of

        return kind_of(node.kind).ports(self.context(node))

    def keras_variables(self, node: Node) -> list[tuple[str, tuple[int, ...]]]:
        """The node's Keras variables, in the layer's variable order, with their Keras shapes."""
        from exchange.kinds import kind_of

        return kind_of(node.kind).keras_variables(self.context(node))

    @cached_property
    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every tensor of the file (= the torch module's state_dict): key -> (shape, dtype)."""
        specs: dict[str, tuple[tuple[int, ...], str]] = {}
        for node in self.nodes:
            if node.shares is not None:
                self._check_same_weights(node, self.node(node.shares))
        for node in self.layers:
            keras_shapes = dict(self.keras_variables(node))
            prefix = self.torch_names[node.name]
            for port in self.ports(node):
                if isinstance(port, TorchOnly):
                    specs[f"{prefix}.{port.torch}"] = (tuple(port.shape), port.dtype or node.dtype)
                elif hasattr(port, "torch_shapes"):
                    for suffix, shape in port.torch_shapes(keras_shapes).items():
                        specs[f"{prefix}.{suffix}"] = (shape, node.dtype)
        return specs

    def _check_same_weights(self, node: Node, owner: Node) -> None:
        """A shared layer's calls must use the same weights the same way: the same variable shapes
        (a Dense on inputs of other widths would need others), and no call may read a channels-first
        Flatten whose order the other calls' weights would have to absorb too."""
        mine, theirs = self.context(node), self.context(owner)
        if self.keras_variables(node) != self.keras_variables(owner):
            raise UnsupportedLayerError(
                f"layer {node.name!r}: shared layer {owner.name!r} is called on inputs "
                f"{list(mine.input_shapes)} and {list(theirs.input_shapes)}, which need "
                "its weights in different shapes; not supported"
            )
        if mine.flat_source != theirs.flat_source:
            flattened = [name for name, context in ((node.name, mine), (owner.name, theirs)) if context.flat_source]
            raise UnsupportedLayerError(
                f"layer {node.name!r}: shared layer {owner.name!r} reads a Flatten of an "
                f"image at call {flattened[0]!r} only, whose channels-first order its "
                "weights would take at that call alone; not supported"
            )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: shape for key, (shape, _) in self.tensor_specs.items()}

    def node_parameter_counts(self) -> dict[str, int]:
        """Parameters per node that has any (floating-point tensors only)."""
        counts: dict[str, int] = {}
        for key, (shape, dtype) in self.tensor_specs.items():
            if dtype in DTYPES:
                node = key.split(".", 1)[0]
                counts[node] = counts.get(node, 0) + prod(shape)
        return counts

    def parameter_count(self) -> int:
        """Values in the torch module's floating-point tensors (a shared layer's once)."""
        return sum(self.node_parameter_counts().values())

    def keras_parameter_count(self) -> int:
        """Values in the Keras model's variables, as `model.count_params()` counts them: fewer than
        torch's where torch holds a tensor Keras has not (an LSTM's zero `bias_hh`)."""
        return sum(prod(shape) for node in self.layers for _, shape in self.keras_variables(node))

    @cached_property
    def cost(self) -> Cost:
        """Per sample: a Dense applies its weights once (per step on a sequence), a convolution
        once per output position, a recurrent layer once per step of its input."""

        def elements(shape: Shape) -> int:
            return prod(1 if size is None else size for size in shape)

        sizes = {name: elements(shape) for name, shape in self.shapes.items()}
        weights = self.node_parameter_counts()
        operations = 0
        for node in self.nodes:
            positions = max(elements(self.shapes[name][:-1]) for name in (node.name,) + node.inputs)
            operations += (
                weights.get(self.torch_names[node.name], 0) * positions
                + sizes[node.name]
                + sum(sizes[name] for name in node.inputs)
            )
        return Cost(sum(weights.values()), max(sizes.values()), sum(sizes.values()), operations)

    def check_keras_names(self) -> None:
        """Refuse, in one line, a graph whose names Keras on TensorFlow cannot use (see KERAS_LAYER_NAME)."""
        if not KERAS_MODEL_NAME.fullmatch(self.name):
            raise UnsupportedLayerError(
                f"model name {self.name!r} cannot be a Keras model's name on TensorFlow "
                "(A-Z a-z 0-9 . first, then also _ - >); it converts to PyTorch, not to Keras"
            )
        from exchange.kinds import kind_of

        for node in self.layers:  # an output-selecting node (`lstm:output1`) is no Keras layer
            if not kind_of(node.kind).selects_output and not KERAS_LAYER_NAME.fullmatch(node.name):
                raise UnsupportedLayerError(
                    f"layer name {node.name!r} cannot be a Keras layer's name on TensorFlow "
                    "(only A-Z a-z 0-9 . _ - >); it converts to PyTorch, not to Keras"
                )

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        from exchange.kinds import config_to_dict

        return {
            "name": self.name,
            "inputs": [{"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype} for spec in self.inputs],
            "nodes": [
                {
                    "name": node.name,
                    "kind": node.kind,
                    "inputs": list(node.inputs),
                    "dtype": node.dtype,
                    "config": config_to_dict(node.config),
                }
                | ({"shares": node.shares} if node.shares is not None else {})
                for node in self.nodes
            ],
            "outputs": list(self.outputs),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, description: dict[str, Any]) -> Graph:
        from exchange.kinds import kind_of

        try:
            _known_fields(description, GRAPH_FIELDS, "the architecture")
            inputs = tuple(
                InputSpec(_str(item["name"]), _shape(item["shape"]), _str(item.get("dtype", "float32")))
                for item in _list(description["inputs"])
                if _known_fields(item, INPUT_FIELDS, "an input")
            )
            nodes = []
            for item in _list(description["nodes"]):
                _known_fields(item, NODE_FIELDS, "a layer")
                kind = kind_of(_str(item["kind"]))
                shares = item.get("shares")
                nodes.append(
                    Node(
                        _str(item["name"]),
                        kind.kind,
                        tuple(_str(name) for name in _list(item["inputs"])),
                        kind.config_from_dict(item.get("config", {}), _str(item["name"])),
                        _str(item.get("dtype", "float32")),
                        None if shares is None else _str(shares),
                    )
                )
            # Construction checks the whole graph (shapes check each config against its inputs).
            return cls(
                _str(description.get("name", "model")),
                inputs,
                tuple(nodes),
                tuple(_str(name) for name in _list(description["outputs"])),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ExchangeError(f"malformed architecture: {type(err).__name__}: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> Graph:
        try:
            description = json.loads(text)
        except (json.JSONDecodeError, RecursionError, ValueError) as err:
            raise ExchangeError(f"architecture is not valid JSON ({type(err).__name__})") from None
        if not isinstance(description, dict):
            raise ExchangeError("architecture JSON must be an object")
        return cls.from_dict(description)

    def differences(self, other: Graph) -> list[str]:
        """Human-readable differences between two graphs (empty when equal)."""
        found = []
        if self.inputs != other.inputs:
            found.append(
                f"inputs {[(i.name, i.shape) for i in self.inputs]} != {[(i.name, i.shape) for i in other.inputs]}"
            )
        mine, theirs = {n.name: n for n in self.nodes}, {n.name: n for n in other.nodes}
        for name in sorted(set(mine) | set(theirs)):
            if name not in theirs or name not in mine:
                found.append(f"layer {name!r} only in {'the first' if name in mine else 'the second'}")
            elif mine[name] != theirs[name]:
                found.append(f"layer {name!r} differs")
        if self.outputs != other.outputs:
            found.append(f"outputs {list(self.outputs)} != {list(other.outputs)}")
        return found


# Names a torch module (a torch.fx.GraphModule) already has as attributes, and names generated
# code uses (`self`, `torch`, `F`, `nn`): a layer or input of such a name gets `_layer` appended.
# tests/test_graph.py checks that every public attribute of torch.fx.GraphModule is listed.
RESERVED_NAMES = frozenset(
    """
    T_destination add_module add_submodule apply bfloat16 buffers call_super_init children code compile cpu
    cuda delete_all_unused_submodules delete_submodule double dump_patches eval extra_repr float forward
    get_buffer get_extra_state get_parameter get_submodule graph half ipu load_state_dict meta modules mtia
    named_buffers named_children named_modules named_parameters parameters print_readable recompile
    register_backward_hook register_buffer register_forward_hook register_forward_pre_hook
    register_full_backward_hook register_full_backward_pre_hook register_load_state_dict_post_hook
    register_load_state_dict_pre_hook register_module register_parameter register_state_dict_post_hook
    register_state_dict_pre_hook requires_grad_ set_extra_state set_submodule share_memory state_dict to
    to_empty to_folder train training type xpu zero_grad self torch F nn
    """.split()
)


def python_name(name: str) -> str:
    """A layer or input name as an ASCII Python identifier that shadows nothing: `conv-1` ->
    `conv_1`, `1st` -> `layer_1st`, `_x` -> `layer_x`, `class` -> `class_layer`, `compile` ->
    `compile_layer`. ASCII only, because Python reads identifiers through NFKC: `ﬁx` (U+FB01)
    would be the attribute `fix`, another layer's. Every other character becomes `_`; two names
    that meet are refused (`Graph.torch_names`), never merged."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not safe or safe[0].isdigit() or safe[0] == "_":
        safe = "layer_" + safe.lstrip("_")
    if keyword.iskeyword(safe) or safe in RESERVED_NAMES:
        safe += "_layer"
    return safe


def check_name(name: object, what: str = "layer or input name") -> str:
    """The rule for every name a graph holds (model, inputs, layers, outputs): text of 1 to
    MAX_NAME_LENGTH printable characters. Names are data: the torch side uses `python_name` of
    them, generated code and messages escape them, and Keras gets them as they are."""
    if not isinstance(name, str):
        raise ExchangeError(f"{what} must be text, found {type(name).__name__}")
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        shown = name[:40] + ("..." if len(name) > 40 else "")
        raise ExchangeError(
            f"invalid {what} {shown!r}: a name is 1 to {MAX_NAME_LENGTH:,} printable "
            "characters (no line breaks, control or format characters)"
        )
    return name


def _check_name(name: str, seen: set[str]) -> None:
    check_name(name)
    if name in seen:
        raise ExchangeError(f"name {name!r} is used twice")
    seen.add(name)


def _check_shape(shape: Shape, what: str) -> None:
    if len(shape) > MAX_RANK or any(
        size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0) for size in shape
    ):
        raise ExchangeError(f"{what}: invalid shape {list(shape)}")


# The fields of a format-2 architecture (`to_dict`); any other is refused, not ignored.
GRAPH_FIELDS = ("name", "inputs", "nodes", "outputs")
INPUT_FIELDS = ("name", "shape", "dtype")
NODE_FIELDS = ("name", "kind", "inputs", "dtype", "config", "shares")


def _known_fields(item: object, fields: tuple[str, ...], what: str) -> bool:
    if not isinstance(item, dict):
        raise TypeError(f"expected an object for {what}, found {type(item).__name__}")
    unknown = sorted(set(item) - set(fields))
    if unknown:
        raise ExchangeError(
            f"{what} has unknown field(s) {', '.join(repr(key[:40]) for key in unknown)} "
            f"(a format-2 architecture has {', '.join(fields)})"
        )
    return True


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, found {type(value).__name__}")
    return value


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, found {type(value).__name__}")
    return value


def _shape(value: object) -> Shape:
    shape = tuple(_list(value))
    _check_shape(shape, "input")
    return shape


def dense_chain(
    name: str,
    input_dim: int,
    layers: Sequence[tuple[int, str] | tuple[int, str, bool]],
    input_name: str = "input",
    layer_prefix: str = "dense_",
) -> Graph:
    """Shorthand for a stack of Dense layers: `dense_chain("mlp", 784, [(50, "tanh"), (10, "softmax")])`.

    Layers are named `dense_0`, `dense_1`, … (the names the seed's Keras model uses); a third
    item per layer, when given, is `use_bias`.
    """
    from exchange.kinds.dense import DenseConfig

    nodes, previous = [], input_name
    for index, layer in enumerate(layers):
        units, activation = layer[0], layer[1]
        use_bias = layer[2] if len(layer) > 2 else True
        nodes.append(
            Node(
                f"{layer_prefix}{index}",
                "dense",
                (previous,),
                DenseConfig(units=units, activation=activation, use_bias=use_bias),
            )
        )
        previous = nodes[-1].name
    return Graph(name, (InputSpec(input_name, (input_dim,)),), tuple(nodes), (previous,))
