"""The one Keras model-config parser: Keras 2 and Keras 3 configs, Sequential and functional
models, nested models inlined, multiple inputs and outputs -> a `Graph`.

It reads what `config.json` in a `.keras`, `model_config` in a Keras 2 `.h5`, a `to_json()` file
or a live model's `get_config()` holds, and also says where each layer's variables are stored
(`KerasLocation`), reproducing how each format names its weight groups:
- Keras 3 names a layer's group by its class in snake_case plus a counter per class over the
  container's layers (`layers/conv2d`, `layers/conv2d_1`, …), nesting sub-models
  (`layers/functional/layers/dense`); variables are `vars/0`, `vars/1`, … in creation order.
- Keras 2 keeps a group per top-level layer name; its `weight_names` attribute lists datasets
  such as `conv_a/kernel:0` (for a nested model, `inner_layer/kernel:0` inside the model's group).

Every layer kind reads its own options (`exchange.kinds`); an unknown layer or option is an error
naming the layer, its class and the option, and all the model's problems are reported together.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

from exchange import tf_ops, untrusted
from exchange.errors import ExchangeError, ExchangeFileError, UnsupportedLayerError
from exchange.graph import DTYPES, INPUT_DTYPES, Graph, InputSpec, Node, shared_call_name
from exchange.kinds import KINDS_DOC, TENSOR, KerasOptions, kind_for_keras_class, kind_of, refusal_for_keras_class
from exchange.kinds.preprocessing import STRING_REASON

INPUT_CLASSES = ("InputLayer",)  # a model's inputs, not layers of the graph
SEQUENTIAL_CLASSES = ("Sequential",)
OPS_MODULE = "keras.src.ops."  # `x + 3.0` on a Keras tensor records an operation, not a layer
OPS_PREFIX = "ops."  # ... registered by kinds as "ops.Add", "ops.Multiply", …
FUNCTIONAL_CLASSES = ("Functional", "Model")
# A Keras 3 functional config records the masks it passes along as operations (an Embedding's
# `ids != 0`, a Masking's `any(x != mask_value, axis=-1)`, a merge's `logical_or` of its inputs'
# masks, …) given to layers as `mask=`. The graph derives masks itself (`Graph.masks`), so
# operations that only compute masks are not nodes: each `mask=` is checked to compare what the
# derived mask compares (`Graph.mask_sources`).
MASK_KEYWORD = "mask"
MASK_SOURCE_OPERATION = "NotEqual"  # `tensor != constant`: 0 for an Embedding's, mask_value for a Masking's
# The operations Keras's own compute_mask methods record (merges: logical_or; Concatenate:
# expand_dims, zeros_like, ones_like, concatenate, any); a mask made with any other is the model's own.
MASK_OPERATIONS = (
    "NotEqual",
    "LogicalOr",
    "LogicalAnd",
    "ExpandDims",
    "ZerosLike",
    "OnesLike",
    "Concatenate",
    "Any",
    "All",
)
MAX_NESTING = 32  # nested models deeper than this are refused (a real model nests a few levels)


@dataclass(frozen=True)
class MaskRecord:
    """What Keras's record of a mask computes: the graph edges it reads (through other mask
    operations), the constants its `NotEqual`s compare them with, and whether it uses any
    operation but those Keras's own compute_mask methods record (`ids > 3`: the model's own)."""

    reads: frozenset[str]
    constants: frozenset[float]
    foreign: bool


@dataclass(frozen=True)
class KerasLocation:
    keras3_group: str  # e.g. "layers/functional/layers/dense_1"
    keras2_group: str  # the top-level layer's group name, e.g. "model_1"
    layer_name: str
    container_path: tuple[str, ...]  # names of the nested models holding the layer
    keras3_subgroups: tuple[str, ...] = ("",)  # where below keras3_group its vars are (LSTM: "cell")
    keras3_extras: tuple[tuple[str, tuple], ...] = ()  # named entries beside the vars (`keras3_saved_extras`)


@dataclass
class _Calls:
    """A layer of a functional model, its calls (`inbound_nodes`) and how many are made so far."""

    layer: dict
    group: str
    inbound: list
    first_node: int  # the node index of its first call in the config's tensor histories
    made: int = 0


@dataclass(frozen=True)
class ParsedModel:
    graph: Graph
    locations: dict[str, KerasLocation]
    class_names: dict[str, str]  # node name -> Keras class name, for messages


# Keras classes exported (and so serialized) under another name than their Python class, which
# names their Keras 3 group: `keras.layers.GroupQueryAttention` is class GroupedQueryAttention.
KERAS3_GROUP_CLASSES = {"GroupQueryAttention": "GroupedQueryAttention"}


def to_snake_case(name: str) -> str:
    """Keras's own `naming.to_snake_case`: `Conv2DTranspose` -> `conv2d_transpose`."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def parse_model_config(model_config: dict, source: str, keras2: bool = False) -> ParsedModel:
    """A Keras model config ({"class_name": …, "config": …}) -> graph and variable locations."""
    parser = _Parser(source, keras2)
    try:
        if not isinstance(model_config, dict):
            raise ExchangeFileError(f"{source}: not a Keras model config")
        outputs = parser.model(model_config, (), "layers", None, None)
    except UnsupportedLayerError as err:
        raise UnsupportedLayerError(f"{source}: {err}") from None
    except ExchangeError as err:
        raise ExchangeFileError(f"{source}: {err}") from None
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        raise ExchangeFileError(f"{source}: malformed Keras model config ({type(err).__name__}: {err})") from None
    if parser.problems:
        raise UnsupportedLayerError(f"{source}: " + "; ".join(dict.fromkeys(parser.problems)))  # a shared layer's once
    try:
        nodes = parser.nodes if not any(node.shares for node in parser.nodes) else _canonical_order(parser.nodes)
        graph = Graph(
            _text(model_config["config"].get("name", "model"))
            if isinstance(model_config.get("config"), dict)
            else "model",
            tuple(parser.inputs),
            tuple(nodes),
            tuple(outputs),
        )
        graph.shapes  # noqa: B018  (shape inference now, so a bad model fails here, naming the layer)
        graph.masks  # noqa: B018  (and masks: a layer that cannot take one fails here)
        _check_explicit_masks(graph, parser.explicit_masks)
    except UnsupportedLayerError as err:
        raise UnsupportedLayerError(f"{source}: {err}") from None
    except ExchangeError as err:
        raise ExchangeFileError(f"{source}: {err}") from None
    return ParsedModel(graph, parser.locations, parser.class_names)


def _canonical_order(nodes: list[Node]) -> list[Node]:
    """The nodes of a model with shared layers in an order that depends on the graph alone: each
    step takes, of the nodes whose inputs are made, the first by name. Keras lists a layer once
    whatever its calls and a nested model's layers inside it, so the order of a model with a
    shared nested model differs from that of the same model rebuilt flat; this one does not, and
    file -> Keras -> file stays bit-identical."""
    made = {name for node in nodes for name in node.inputs} - {node.name for node in nodes}  # the inputs
    by_name = {node.name: node for node in nodes}
    readers: dict[str, list[str]] = {}
    for node in nodes:
        for name in dict.fromkeys(node.inputs):
            if name not in made:
                readers.setdefault(name, []).append(node.name)
    waiting = {node.name: len({name for name in node.inputs if name not in made}) for node in nodes}  # each once
    ready = [name for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        name = heapq.heappop(ready)
        ordered.append(by_name[name])
        for reader in readers.get(name, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    return ordered if len(ordered) == len(nodes) else nodes  # (a cycle is reported by the graph's checks)


class _Parser:
    def __init__(self, source: str, keras2: bool):
        self.source, self.keras2 = source, keras2
        self.inputs: list[InputSpec] = []
        self.nodes: list[Node] = []
        self.locations: dict[str, KerasLocation] = {}
        self.class_names: dict[str, str] = {}
        # A layer already made into a node, by where it is (its nested models and its name) -> that
        # node and the calls made of it since: a later call is a node sharing it.
        self.made: dict[tuple[str, ...], list] = {}
        self.problems: list[str] = []
        self.mask_operations: dict[str, MaskRecord] = {}  # mask-only operation edges -> what they compute
        self.explicit_masks: dict[str, MaskRecord] = {}  # layer -> what its mask= computes

    def model(
        self,
        model_config: dict,
        container_path: tuple[str, ...],
        keras3_prefix: str,
        keras2_group: str | None,
        incoming: list[str] | None,
    ) -> list[str]:
        """Parse one (possibly nested) model; returns its output edge names."""
        if len(container_path) > MAX_NESTING:
            raise ExchangeError(f"models nested more than {MAX_NESTING} deep")
        class_name, config = model_config.get("class_name"), model_config.get("config")
        if class_name in SEQUENTIAL_CLASSES:
            return self.sequential(model_config, config, container_path, keras3_prefix, keras2_group, incoming)
        if class_name in FUNCTIONAL_CLASSES:
            return self.functional(config, container_path, keras3_prefix, keras2_group, incoming)
        raise UnsupportedLayerError(
            f"unsupported model class {class_name!r}: a subclassed model's config has no "
            "layers; pass the Python file that defines it with --custom-objects FILE "
            "(Sequential and functional models are read from their config)"
        )

    def _groups(self, layers: list[dict], keras3_prefix: str) -> list[str]:
        counts: dict[str, int] = {}
        groups = []
        for layer in layers:
            if _is_operation(layer):
                groups.append("")  # operations are not layers: no weights, not counted
                continue
            class_name = _text(layer["class_name"])
            snake = to_snake_case(KERAS3_GROUP_CLASSES.get(class_name, class_name))
            counts[snake] = counts.get(snake, -1) + 1
            groups.append(f"{keras3_prefix}/{snake}" + (f"_{counts[snake]}" if counts[snake] else ""))
        return groups

    def sequential(self, model_config, config, container_path, keras3_prefix, keras2_group, incoming):
        layers = config if isinstance(config, list) else config["layers"]
        if not isinstance(layers, list) or not layers:
            raise ExchangeError("a Sequential model with no layers")
        groups = self._groups(layers, keras3_prefix)
        current = None if incoming is None else incoming
        for layer, group in zip(layers, groups):
            class_name, layer_config = _text(layer["class_name"]), layer.get("config", {})
            name = _layer_name(layer)
            if class_name in INPUT_CLASSES:
                if current is None:
                    current = [self.add_input(name, layer_config)]
                continue
            if current is None:  # Keras 2: the first layer declares the input shape
                shape = _batch_shape(layer_config) or _build_shape(model_config)
                if shape is None:
                    raise ExchangeError(f"Sequential model without an input shape (layer {name!r})")
                current = [self.add_input(f"{name}_input", {"batch_shape": shape, "dtype": layer_config.get("dtype")})]
            current = self.layer(layer, current, container_path, group, keras2_group or name)
        return current

    def functional(self, config, container_path, keras3_prefix, keras2_group, incoming) -> list[str]:
        layers = [
            self.tf_operation(layer)
            if isinstance(layer, dict) and layer.get("class_name") in tf_ops.LAYER_CLASSES
            else layer
            for layer in config["layers"]
        ]
        groups = self._groups(layers, keras3_prefix)
        input_names = [entry[0] for entry in _entries(config.get("input_layers", []))]
        edges: dict[tuple[str, int, int], str] = {}  # (layer, call, output index) -> the graph's edge
        mask_only = _mask_only_operations(layers)
        if incoming is not None and len(incoming) != len(input_names):
            raise ExchangeError(f"nested model takes {len(input_names)} inputs, given {len(incoming)}")
        waiting: list[_Calls] = []
        for layer, group in zip(layers, groups):
            class_name, name = _text(layer["class_name"]), _layer_name(layer)
            if class_name in INPUT_CLASSES:
                if incoming is None:
                    edges[(name, 0, 0)] = self.add_input(name, layer.get("config", {}))
                else:
                    edges[(name, 0, 0)] = incoming[input_names.index(name)]
                continue
            inbound = layer.get("inbound_nodes", [])
            if not isinstance(inbound, list) or not inbound:
                self.problems.append(f"layer {name!r} ({class_name}) is never called")
                continue
            waiting.append(_Calls(layer, group, inbound, self._first_node(layer)))
        # Keras's own order (functional_from_config): pass over the layers again and again, each
        # making its calls in turn while what they read is there. A shared layer's later call may
        # read a layer listed after it.
        while waiting:
            progress = False
            for calls in waiting:
                while calls.made < len(calls.inbound) and _reads_known(calls.inbound[calls.made], edges):
                    self.call(calls, edges, container_path, keras2_group, mask_only)
                    calls.made += 1
                    progress = True
            waiting = [calls for calls in waiting if calls.made < len(calls.inbound)]
            if waiting and not progress:
                if self.problems:
                    break  # a layer before failed; that problem is already reported
                calls = waiting[0]
                unknown = next(ref for ref in _histories(calls.inbound[calls.made]) if _edge_key(ref) not in edges)
                raise ExchangeError(
                    f"layer {_layer_name(calls.layer)!r} reads {_text(unknown[0])!r} (call "
                    f"{unknown[1]}, output {unknown[2]}), which no layer of the model makes"
                )
        if incoming is None:  # the model's inputs in its order (`input_layers`), not the layers' order
            order = {input_name: index for index, input_name in enumerate(input_names)}
            self.inputs.sort(key=lambda spec: order.get(spec.name, len(order)))
        # Keras 3 writes `output_layers` with a nested functional model's own node numbers, whose
        # node 0 is the model's build on its own inputs (its calls are 1, 2, …), where the tensors
        # its layers read count the calls from 0.
        own_build = (
            set()
            if self.keras2
            else {_layer_name(layer) for layer in layers if layer.get("class_name") in FUNCTIONAL_CLASSES}
        )
        try:
            return [
                edges[(name, node_index - (name in own_build), tensor_index)]
                for name, node_index, tensor_index in _entries(config["output_layers"])
            ]
        except KeyError:
            if self.problems:
                return []
            raise

    def tf_operation(self, layer: dict) -> dict:
        """A Keras 2 TensorFlow op layer (TFOpLambda) as the Keras 3 layer or operation computing
        the same (`exchange.tf_ops`); an op not supported is reported and stands in as no node."""
        try:
            return tf_ops.keras3_layer(layer)
        except UnsupportedLayerError as err:
            self.problems.append(str(err))
            return tf_ops.refused(layer)

    def call(self, calls: _Calls, edges: dict, container_path, keras2_group, mask_only: set[str]) -> None:
        """One call of a layer in a functional model: its node(s), and its outputs in `edges`."""
        layer, group, call_index = calls.layer, calls.group, calls.made
        class_name, name = _text(layer["class_name"]), _layer_name(layer)
        if class_name == tf_ops.REFUSED:  # (its refusal is reported)
            edges[(name, calls.first_node + call_index, 0)] = name
            return
        inbound = calls.inbound[call_index]
        if name in mask_only and len(calls.inbound) == 1:
            self.mask_operation(name, class_name, inbound, edges)
            return
        try:
            kind = None if _is_operation(layer) else kind_for_keras_class(_class_key(layer))
            tensor_kwargs = kind.tensor_kwargs if kind is not None else ()
            call = _first_argument_by_position(inbound)
            mask = _mask_ref(call)
            if mask is None and kind is not None:  # `layer(x, mask)`, as Keras's own tests call it
                call, mask = _positional_mask(call, kind.mask_position)
            sources = [edges[ref] for ref in _inbound_refs(call, tensor_kwargs)]
            call_args = _call_args(call)
            call_kwargs = _call_kwargs(call, tensor_kwargs)
            mask_input = False
            if mask is not None and class_name not in SEQUENTIAL_CLASSES + FUNCTIONAL_CLASSES:
                # (a nested model passes its input's mask on to its layers, as the graph does)
                if edges[mask] in self.mask_operations:  # Keras's record of an Embedding's or Masking's mask
                    self.explicit_masks[name] = self.mask_operations[edges[mask]]
                else:  # a tensor of the model: the node's last input, read by kinds that take one
                    mask_input = True
                    sources.append(edges[mask])
        except UnsupportedLayerError as err:  # a call this exchange cannot read: name the layer
            message = str(err)
            self.problems.append(message if repr(name) in message else f"layer {name!r} ({class_name}): {message}")
            return
        outputs = self.layer(
            layer,
            sources,
            container_path,
            group,
            keras2_group or name,
            call_args,
            call_kwargs,
            mask_given=mask is not None,
            mask_input=mask_input,
        )
        for index, edge in enumerate(outputs):
            edges[(name, calls.first_node + call_index, index)] = edge

    def _first_node(self, layer: dict) -> int:
        """Keras 3 numbers a layer's calls in a model 0, 1, …. Keras 2 numbers a nested model's from
        1 where the model was built on inputs of its own (a functional model; a Sequential with an
        input shape): node 0 is that build, left out of the config (tf-keras's `_should_skip_first_node`)."""
        if not self.keras2:
            return 0
        class_name, config = layer.get("class_name"), layer.get("config")
        if class_name in FUNCTIONAL_CLASSES:
            return 1
        if (
            class_name in SEQUENTIAL_CLASSES
            and isinstance(config, dict)
            and isinstance(config.get("layers"), list)
            and config["layers"]
            and isinstance(config["layers"][0], dict)
        ):
            first = config["layers"][0]
            return int(first.get("class_name") in INPUT_CLASSES or _batch_shape(first.get("config") or {}) is not None)
        return 0

    def mask_operation(self, name: str, class_name: str, inbound, edges: dict) -> None:
        """Record an operation that only computes masks (not a node) as a `MaskRecord`."""
        reads: set[str] = set()
        constants: set[float] = set()
        foreign = False
        for ref in _inbound_refs(inbound, tuple((inbound.get("kwargs") or {}) if isinstance(inbound, dict) else ())):
            edge = edges[ref]
            if edge in self.mask_operations:
                record = self.mask_operations[edge]
                reads |= record.reads
                constants |= record.constants
                foreign |= record.foreign
            else:
                reads.add(edge)
        if class_name == MASK_SOURCE_OPERATION:
            compared = [value for value in _call_args(inbound) if value is not None]
            foreign |= len(compared) != 1 or not _is_number(compared[0])  # `a != b` of two tensors
            constants.update(value for value in compared if _is_number(value))
        foreign |= class_name not in MASK_OPERATIONS  # e.g. `ids > 3`: the model's own mask
        edge = f"{name}:mask"
        self.mask_operations[edge] = MaskRecord(frozenset(reads), frozenset(constants), foreign)
        edges[(name, 0, 0)] = edge

    def add_input(self, name: str, config: dict) -> str:
        shape = _batch_shape(config)
        if shape is None:
            raise ExchangeError(f"input {name!r} has no shape")
        if _policy_name(config.get("dtype")) == "string":  # reported with the layers that read it
            self.problems.append(f"input {name!r}: unsupported dtype 'string' ({STRING_REASON})")
            return name
        dtype = _input_dtype(config.get("dtype"), name)
        self.inputs.append(InputSpec(name, tuple(shape[1:]), dtype))
        return name

    def layer(
        self,
        layer: dict,
        sources: list[str],
        container_path,
        group: str,
        keras2_group: str,
        call_args: list | None = None,
        call_kwargs: dict | None = None,
        mask_given: bool = False,
        mask_input: bool = False,
    ) -> list[str]:
        class_name, name, config = _text(layer["class_name"]), _layer_name(layer), layer.get("config", {})
        if class_name in SEQUENTIAL_CLASSES + FUNCTIONAL_CLASSES:
            return self.model(layer, container_path + (name,), f"{group}/layers", keras2_group, sources)
        untrusted.check_layer_count(len(self.nodes) + 1)
        operation = _is_operation(layer)
        kind = kind_for_keras_class(OPS_PREFIX + class_name if operation else _class_key(layer))
        if kind is None:
            what = f"operation {layer.get('module')}.{class_name}" if operation else _class_key(layer)
            reason = None if operation else refusal_for_keras_class(class_name)
            if reason is None and not operation and not _is_builtin(layer):
                reason = f"a class of your own: register a layer kind for it with --kinds FILE (see {KINDS_DOC})"
            self.problems.append(f"unsupported layer {name!r} ({what})" + (f": {reason}" if reason else ""))
            return [name]
        try:
            if not isinstance(config, dict):
                raise ExchangeError("config is not an object")
            options = KerasOptions(
                class_name,
                name,
                config,
                keras2=self.keras2,
                call_args=call_args if call_args is not None else [None] * len(sources),
                call_kwargs=call_kwargs,
                mask_given=mask_given,
                mask_input=mask_input,
            )
            integer_dtype = kind.takes_integer_dtype and _policy_name(config.get("dtype")) in ("int32", "int64")
            # first: a quantized layer's options differ
            dtype = "float32" if integer_dtype else _dtype(config.get("dtype"), name, class_name)
            node_config = kind.from_keras(options)
            options.finish()
        except (ExchangeError, KeyError, TypeError, ValueError) as err:
            message = str(err) if isinstance(err, ExchangeError) else f"{type(err).__name__}: {err}"
            self.problems.append(message if name in message else f"layer {name!r} ({class_name}): {message}")
            return [name]
        where = container_path + (name,)
        if where in self.made:  # a shared layer (or a layer of a nested model) called again
            shared = self.made[where]
            shared[1] += 1
            name = shared_call_name(shared[0], shared[1])
            self.nodes.append(Node(name, kind.kind, tuple(sources), node_config, dtype, shares=shared[0]))
        else:
            self.made[where] = [name, 0]
            self.nodes.append(Node(name, kind.kind, tuple(sources), node_config, dtype))
            self.locations[name] = KerasLocation(
                group,
                keras2_group,
                name,
                container_path,
                tuple(kind.keras3_subgroups(node_config)),
                tuple(kind.keras3_saved_extras(node_config)),
            )
        self.class_names[name] = class_name
        count = kind.output_count(node_config)
        if count == 1:
            return [name]
        # A layer with several outputs (return_state=True) is read through one `output` node each.
        output_kind = kind_of("output")
        names = [f"{name}:output{index}" for index in range(count)]
        for index, output_name in enumerate(names):
            self.nodes.append(Node(output_name, output_kind.kind, (name,), output_kind.Config(index), dtype))
            self.locations[output_name] = KerasLocation("", keras2_group, output_name, container_path)
            self.class_names[output_name] = f"output {index} of {name}"
        return names


def _class_key(layer: dict) -> str:
    """The name a layer's class is registered under: a built-in's class name, a registered class's
    `package>Name` (Keras 3 records it as `registered_name`; Keras 2 writes it as the class name)."""
    registered = layer.get("registered_name")
    return _text(registered) if isinstance(registered, str) and ">" in registered else _text(layer["class_name"])


def _layer_name(layer: dict) -> str:
    return _text(layer.get("name") or (layer.get("config") or {}).get("name"))


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise TypeError(f"expected a name, found {type(value).__name__}")
    return value


def _batch_shape(config: dict):
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    if shape is None:
        return None
    if not isinstance(shape, (list, tuple)) or not all(
        s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 0) for s in shape
    ):
        raise ExchangeError(f"invalid input shape {shape!r}")
    return shape


def _build_shape(model_config: dict):
    build = model_config.get("build_config") or {}
    return build.get("input_shape") if isinstance(build, dict) else None


# Keras's quantization modes (`keras.dtype_policies.QUANTIZATION_MODES`): a policy named
# "<mode>_from_<dtype>", or a dict whose config has a `mode`, holds quantized variables.
QUANTIZATION_MODES = ("int8", "float8", "int4", "gptq", "awq")


def _dtype(value, name: str, class_name: str = "") -> str:
    """The dtype of a layer's variables from its dtype or dtype policy."""
    if value is None:
        return "float32"
    if isinstance(value, dict):
        config = value.get("config")
        policy = config if isinstance(config, dict) else {}
        if "mode" in policy or "Quantized" in str(value.get("class_name")):
            mode = policy.get("mode", value.get("class_name"))
            raise UnsupportedLayerError(
                f"layer {name!r} ({class_name}): quantized dtype policy "
                f"{str(mode)[:60]!r} is not supported (its weights are not floats)"
            )
        value = policy.get("name")
    if isinstance(value, str) and value.startswith(QUANTIZATION_MODES):
        raise UnsupportedLayerError(
            f"layer {name!r} ({class_name}): quantized dtype policy "
            f"{value[:60]!r} is not supported (its weights are not floats)"
        )
    if isinstance(value, str) and value.startswith("mixed_"):
        return "float32"  # mixed precision keeps float32 variables
    if value not in DTYPES:
        raise UnsupportedLayerError(f"layer {name!r}: unsupported dtype {value!r}")
    return value


def _policy_name(value):
    """The dtype named by a dtype or a dtype policy's config."""
    return (value.get("config") or {}).get("name") if isinstance(value, dict) else value


def _input_dtype(value, name: str) -> str:
    """An input's dtype (`graph.INPUT_DTYPES`): a float type, an integer type or bool."""
    if isinstance(value, dict):
        value = (value.get("config") or {}).get("name")
    if value is None:
        return "float32"
    if value not in INPUT_DTYPES:
        raise UnsupportedLayerError(f"input {name!r}: unsupported dtype {value!r}")
    return value


def _entries(spec) -> list:
    """Keras's input_layers/output_layers: ["name", 0, 0] or [["name", 0, 0], …], nested where the
    model's outputs are (`keras.Model(x, [y, [h, c]])`, a stacked RNN's states): read flat."""
    if not spec:
        return []
    if isinstance(spec[0], str):
        return [spec]
    return [entry for item in spec for entry in _entries(item)]


def _mask_only_operations(layers: list) -> set[str]:
    """Names of the operation layers whose results are only used as `mask=` (or by other such
    operations): Keras's recorded mask computations. Consumers follow producers in a config."""
    uses: dict[str, list[tuple[str, bool]]] = {}  # producer -> [(consumer, used as mask=)]
    for layer in layers:
        for node in layer.get("inbound_nodes") or []:
            if not isinstance(node, dict):
                continue
            for key, value in list(enumerate(node.get("args", []))) + list((node.get("kwargs") or {}).items()):
                for history in _histories(value):
                    uses.setdefault(_text(history[0]), []).append((_layer_name(layer), key == MASK_KEYWORD))
    mask_only: set[str] = set()
    for layer in reversed(layers):
        name = _layer_name(layer)
        if (
            _is_operation(layer)
            and uses.get(name)
            and all(as_mask or consumer in mask_only for consumer, as_mask in uses[name])
        ):
            mask_only.add(name)
    return mask_only


def _check_explicit_masks(graph: Graph, explicit_masks: dict[str, MaskRecord]) -> None:
    """Each `mask=` a Keras 3 config records must be what the graph derives for that input: it
    compares the tensor the derived mask compares (an Embedding's ids, a Masking's input), with
    the same value (0, the mask_value), and reads no other input."""
    inputs = {spec.name for spec in graph.inputs}
    for name, record in explicit_masks.items():
        mask = graph.masks[graph.node(name).inputs[0]]
        source, value = graph.mask_sources.get(mask, (mask, 0)) if mask is not None else (None, None)
        if (
            mask is None
            or record.foreign
            or record.constants != {value}
            or source not in record.reads
            or (record.reads & inputs) - {source}
        ):
            shown = ", ".join(sorted(record.reads))
            raise UnsupportedLayerError(
                f"layer {name!r} is given a mask (computed from {shown}) that is not "
                "the mask of an Embedding with mask_zero=True or of a Masking layer; "
                "not supported"
            )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _edge_key(history) -> tuple[str, int, int]:
    """(layer name, call, output index) from a Keras tensor's history, [layer, node, tensor]: a
    layer's node index counts its calls in this model, as its `inbound_nodes` lists them."""
    return _text(history[0]), int(history[1]), int(history[2])


def _call_refs(inbound) -> list:
    """The histories of every tensor a call reads, positional or keyword, masks included."""
    if isinstance(inbound, dict):  # Keras 3
        return _histories(inbound)
    refs = [entry for entry in inbound if isinstance(entry, list)]  # Keras 2: [[name, node, tensor, kwargs], …]
    return refs + [value for value in _keras2_kwargs(inbound).values() if _is_keras2_ref(value)]


def _reads_known(inbound, edges: dict) -> bool:
    """Whether every tensor the call reads is made already."""
    return all(_edge_key(ref) in edges for ref in _call_refs(inbound))


def _mask_ref(node) -> tuple[str, int, int] | None:
    """(layer name, call, output index) of the tensor a Keras 3 call passes as `mask=`, if any."""
    if not isinstance(node, dict):
        return None
    histories = _histories((node.get("kwargs") or {}).get(MASK_KEYWORD))
    if len(histories) > 1:
        raise UnsupportedLayerError(f"a list of masks is not supported ({len(histories)} given)")
    return _edge_key(histories[0]) if histories else None


def _first_argument_by_position(node):
    """A Keras 3 call that passes its first tensor by keyword, `layer(inputs=x)` (Keras's own
    layer tests call layers so), as the same call with it positional: `inputs` is the name of
    the first parameter of every built-in layer's `call` that takes one tensor or a list."""
    if not isinstance(node, dict) or node.get("args") or "inputs" not in (node.get("kwargs") or {}):
        return node
    keywords = dict(node["kwargs"])
    return dict(node, args=[keywords.pop("inputs")], kwargs=keywords)


def _positional_mask(node, position: int | None):
    """A Keras 3 call with a tensor at the `mask` position of its layer's call (`LayerKind.mask_position`):
    the call without it (and without the `None`s before it: LSTM's `(x, None, mask)`) and the mask's
    (layer name, call, output index). Keras 3 records positional arguments as given."""
    if position is None or not isinstance(node, dict):
        return node, None
    arguments = list(node.get("args", []))
    if (
        len(arguments) <= position
        or not isinstance(arguments[position], dict)
        or len(_histories(arguments[position])) != 1
    ):
        return node, None
    history = _histories(arguments[position])[0]
    rest = arguments[:position]
    while len(rest) > 1 and rest[-1] is None:
        rest.pop()
    return dict(node, args=rest + arguments[position + 1 :]), _edge_key(history)


def _inbound_refs(node, tensor_kwargs: tuple[str, ...] = ()) -> list[tuple[str, int, int]]:
    """(layer name, call, output index) of each tensor a call reads, in order: the positional arguments,
    then the keyword arguments its layer kind takes as tensors (`LayerKind.tensor_kwargs`, e.g.
    MultiHeadAttention's `key`, `attention_mask`); `mask` is not one (see `_mask_ref`)."""
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        refs = [_edge_key(history) for history in _histories(node.get("args", []))]
        for key, value in (node.get("kwargs") or {}).items():
            if key != MASK_KEYWORD and _histories(value):
                if key not in tensor_kwargs:
                    raise UnsupportedLayerError(f"tensor passed as keyword argument {key!r} is not supported")
                refs += [_edge_key(history) for history in _histories(value)]
        return refs
    refs = [_edge_key(entry) for entry in node]  # Keras 2: [[name, node, tensor, kwargs], …]
    for key, value in _keras2_kwargs(node).items():
        if key in tensor_kwargs and _is_keras2_ref(value):
            refs.append(_edge_key(value))
    return refs


def _call_kwargs(node, tensor_kwargs: tuple[str, ...] = ()) -> dict:
    """A call's keyword arguments but `mask`: the value of each constant, TENSOR for each tensor
    (a node input after the positional ones, in this order; see `_inbound_refs`)."""
    if isinstance(node, dict):
        return {
            key: TENSOR if _histories(value) else value
            for key, value in (node.get("kwargs") or {}).items()
            if key != MASK_KEYWORD
        }
    # Keras 2 records every argument but the first as a keyword, a tensor as [layer, node, tensor].
    return {
        key: TENSOR if key in tensor_kwargs and _is_keras2_ref(value) else value
        for key, value in _keras2_kwargs(node).items()
        if key != MASK_KEYWORD
    }


def _keras2_kwargs(node) -> dict:
    """The keyword arguments a Keras 2 inbound node records with its first tensor."""
    if (
        isinstance(node, list)
        and node
        and isinstance(node[0], list)
        and len(node[0]) > 3
        and isinstance(node[0][3], dict)
    ):
        return node[0][3]
    return {}


def _is_keras2_ref(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and all(isinstance(item, int) and not isinstance(item, bool) for item in value[1:])
    )


def _is_builtin(layer: dict) -> bool:
    """Whether the layer is Keras's own: Keras 3 records its module (`keras.layers`); a Keras 2
    config records none, and a registered class of the user's is `package>Name`."""
    module = layer.get("module")
    if isinstance(module, str) or "registered_name" in layer:
        return isinstance(module, str) and (module == "keras" or module.startswith("keras."))
    return ">" not in str(layer.get("class_name"))


def _is_operation(layer: dict) -> bool:
    """A Keras 3 operation, not a layer. Keras 3's legacy `.h5` configs leave out the module:
    there an operation is a class no layer kind reads that an operation kind or a mask does."""
    if "module" not in layer and isinstance(layer.get("class_name"), str):
        class_name = layer["class_name"]
        return kind_for_keras_class(class_name) is None and (
            kind_for_keras_class(OPS_PREFIX + class_name) is not None or class_name in MASK_OPERATIONS
        )
    return str(layer.get("module") or "").startswith(OPS_MODULE)


def _call_args(node) -> list:
    """A call's positional arguments: None for each tensor, the value of each constant."""
    if not isinstance(node, dict):
        return [None] * len(node)  # Keras 2: tensors only
    arguments = []
    for value in node.get("args", []):
        if isinstance(value, list) and _histories(value) and all(_histories(item) for item in value):
            arguments += [None] * len(value)  # a list of tensors, as merges take
        else:
            arguments.append(None if _histories(value) else value)
    return arguments


def _histories(value) -> list:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return [value["config"]["keras_history"]]
        return [history for item in value.values() for history in _histories(item)]
    if isinstance(value, list):
        return [history for item in value for history in _histories(item)]
    return []


# Keras walks a functional model's graph recursively, one Python call per layer of depth
# (keras.src.ops.function._build_map_helper): under Python's default recursion limit of 1,000 it
# fails past about 990 layers, so no model Keras writes is deeper. Deeper graphs are refused
# before anything is built (`keras_adapter` runs Keras with room for this depth).
MAX_KERAS_DEPTH = 1_000


def graph_depth(graph: Graph) -> int:
    """The most layers on one path from an input to an output (computed without recursing)."""
    depths = {spec.name: 0 for spec in graph.inputs}
    for node in graph.nodes:
        depths[node.name] = 1 + max(depths[name] for name in node.inputs)
    return max(depths.values())


def check_depth(graph: Graph, label: str = "") -> None:
    """Refuse, before Keras builds anything, a graph deeper than Keras can build."""
    depth = graph_depth(graph)
    if depth > MAX_KERAS_DEPTH:
        raise ExchangeError(
            f"{label + ': ' if label else ''}model {graph.name!r} is {depth:,} layers deep; "
            f"Keras builds models at most {MAX_KERAS_DEPTH:,} deep"
        )
