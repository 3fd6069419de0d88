"""PyTorch side of the exchange: the graph as a `torch.fx.GraphModule` of standard torch modules.

The file is already in torch layout (it is the module's `state_dict()`), so this adapter builds the
module from the file's architecture and moves tensors; every layout difference lives in the layer
kinds (`exchange.kinds`). The module's `forward` is a straight line, one or two statements per
Keras layer: `print(model.code)` shows it. Images are channels-first; `keras_layout=True` adds a
permutation at each input and output so the module is a drop-in for `keras_model(x)`.

Example:
    >>> from exchange import torch_adapter
    >>> model = torch_adapter.model_from_file("resnet50.safetensors")
    >>> probabilities = model(torch.rand(1, 3, 64, 64))
    >>> torch_adapter.save_file(model, "copy.safetensors")
"""

from __future__ import annotations

import functools
import os
import re
from typing import BinaryIO, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from exchange import fileformat, optimizers, torch_modules
from exchange.errors import ExchangeError, ExchangeFileError, first_line, framework_errors
from exchange.graph import Graph
from exchange.kinds import kind_of
from exchange.kinds.axis_order import to_keras_order, to_torch_order

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
# dtypes that convert to numpy; bfloat16 and the float8 types do not.
NUMPY_READABLE_DTYPES = (
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
)


def _start_thread_pool() -> None:
    """Run one small parallel matmul and element-wise op now.

    Measured on this project's 2-core machines (torch 2.13, TensorFlow 2.21 in the same process):
    in about one process in eight, the first parallel torch computation after TensorFlow has run
    comes out wrong on the main thread's half of the batch (errors near 1e-4 instead of 1e-7);
    every later computation is right, and a process whose thread pool started first never shows
    it. Starting the pool when this module is imported keeps converted models' first outputs exact.
    """
    with torch.no_grad():
        torch.tanh(F.linear(torch.ones(2048, 256), torch.ones(64, 256)))


_start_thread_pool()


class TorchGraphBuilder:
    """What a layer kind's `torch_forward` writes with: modules registered under the node's torch
    name, and calls of torch functions, each one statement of the generated `forward`."""

    nn, F, torch, helpers = nn, F, torch, torch_modules

    def __init__(self, training: bool = False) -> None:
        self.root = nn.Module()
        # For a run continued in torch: the layers that act only in Keras training (dropouts,
        # noise) are modules that act in `train()` mode; otherwise they are the identity.
        self.training = training
        self.graph = fx.Graph()
        self.masks: dict[str, fx.Node] = {}  # Keras masks by the layer that made them: bool (N, T)

    def dtype(self, context) -> torch.dtype:
        return TORCH_DTYPES[context.node.dtype]

    def module(self, context, module: nn.Module, *args) -> fx.Node:
        return self.submodule(context.torch_name, module, *args)

    def submodule(self, path: str, module: nn.Module, *args) -> fx.Node:
        """Register `module` at a dotted path below an existing one (`bi.forward_layer`) and call it."""
        parent, _, name = path.rpartition(".")
        (self.root.get_submodule(parent) if parent else self.root).add_module(name, module)
        return self.graph.call_module(path, args)

    def call(self, function, *args, **kwargs) -> fx.Node:
        if function in (torch.movedim, torch.permute) and not kwargs and _undoes(function, args):
            return args[0].args[0]  # moving the channels last right after moving them first: skip both
        return self.graph.call_function(function, args, kwargs)

    def method(self, value: fx.Node, name: str, *args) -> fx.Node:
        return self.graph.call_method(name, (value,) + args)


def _axes(function, arguments: tuple, rank: int | None) -> tuple[int, ...] | None:
    """The permutation a `torch.permute` or `torch.movedim` call applies (output dim i is input
    dim axes[i]); None when it cannot be told (a movedim of unknown rank)."""
    if function is torch.permute:
        return tuple(arguments[0])
    if rank is None or len(arguments) != 2 or not all(isinstance(axis, int) for axis in arguments):
        return None
    dims = list(range(rank))
    dims.insert(arguments[1] % rank, dims.pop(arguments[0] % rank))
    return tuple(dims)


def _undoes(function, args: tuple) -> bool:
    """Whether this permute/movedim of `args[0]` exactly undoes the permute/movedim that made it."""
    inner = args[0]
    if (
        not isinstance(inner, fx.Node)
        or inner.op != "call_function"
        or inner.kwargs
        or inner.target not in (torch.movedim, torch.permute)
    ):
        return False
    if function is torch.movedim and inner.target is torch.movedim:
        return tuple(args[1:]) == (inner.args[2], inner.args[1])
    rank = len(args[1]) if function is torch.permute else len(cast("tuple[int, ...]", inner.args[1]))
    first, second = _axes(inner.target, inner.args[1:], rank), _axes(function, args[1:], rank)
    return (
        first is not None
        and second is not None
        and len(first) == len(second) == rank
        and all(first[second[axis]] == axis for axis in range(rank))
    )


def build_module(graph: Graph, keras_layout: bool = False, training: bool = False) -> fx.GraphModule:
    """The graph as a torch module on the `meta` device (no memory, no random initialisation):
    load a state_dict into it with `assign=True`. With `training`, the layers that act only in
    Keras training act in `train()` mode (`TorchGraphBuilder.training`); the state_dict is the same."""
    builder = TorchGraphBuilder(training)
    values: dict[str, fx.Node] = {}
    for spec in graph.inputs:
        value = builder.graph.placeholder(graph.input_arguments[spec.name])
        if keras_layout and len(spec.shape) >= 2:
            value = builder.call(torch.permute, value, to_torch_order(len(spec.shape)))
        values[spec.name] = value
    dtypes = {spec.name: TORCH_DTYPES[spec.dtype] for spec in graph.inputs}
    for node in graph.nodes:
        kind = kind_of(node.kind)
        arguments = [values[name] for name in node.inputs]
        if kind.selects_output:
            dtypes[node.name] = dtypes[node.inputs[0]]
        elif not kind.autocasts:  # a keras.ops call: types promote as in torch
            floating = [dtypes[name] for name in node.inputs if dtypes[name].is_floating_point]
            dtypes[node.name] = functools.reduce(torch.promote_types, floating) if floating else dtypes[node.inputs[0]]
        else:
            if not kind.keeps_input_dtypes:
                arguments = _autocast(builder, node, kind, arguments, [dtypes[name] for name in node.inputs])
            dtypes[node.name] = TORCH_DTYPES[kind.integer_output(node.config) or node.dtype]
        with framework_errors(node, "PyTorch"):
            if node.shares is None:
                values[node.name] = kind.torch_forward(builder, graph.context(node), arguments)
            else:
                values[node.name] = _call_shared_layer(builder, graph, node, arguments)
    outputs = []
    for name in graph.outputs:
        value, rank = values[name], len(graph.shapes[name])
        if keras_layout and rank >= 2:
            value = builder.call(torch.permute, value, to_keras_order(rank))
        outputs.append(value)
    builder.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    module = fx.GraphModule(builder.root, builder.graph, class_name=class_name(graph.name))
    # nn.Module's __setattr__ is typed for tensors and modules: these two attributes are plain data
    module.exchange_graph = graph  # type: ignore[assignment]
    # fx names of single-output values (a layer with several outputs is read through `output` nodes)
    fx_names = {name: value.name for name, value in values.items() if isinstance(value, fx.Node)}
    module.exchange_values = fx_names  # type: ignore[assignment]
    return module


def _call_shared_layer(builder: TorchGraphBuilder, graph: Graph, node, arguments: list) -> fx.Node:
    """A shared layer's later call: the kind's `torch_forward` again, its calls going to the
    modules the layer's first call registered (same path: the same parameters, so fine-tuning
    keeps them tied). The modules it builds on the way are compared with those and dropped; a
    layer whose torch modules depend on the input (a padding computed from its size) and differ
    between calls is refused."""
    context = graph.context(node)
    modules, builder.root = builder.root, nn.Module()
    try:
        value = kind_of(node.kind).torch_forward(builder, context, arguments)
    finally:
        rebuilt, builder.root = builder.root, modules
    for name, module in rebuilt.named_children():
        if not hasattr(modules, name) or not _same_module(getattr(modules, name), module):
            raise ExchangeError(
                f"layer {node.name!r}: shared layer {node.shares!r} needs another torch module "
                f"for these inputs {list(context.input_shapes)}; not supported"
            )
    return value


def _same_module(first: nn.Module, second: nn.Module) -> bool:
    """The same type, settings (public attributes: a module's constructor arguments, as generated
    code reads them), parameter and buffer shapes, and submodules."""

    def settings(module: nn.Module) -> dict:
        return {
            key: (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else repr(value)
            for key, value in vars(module).items()
            if not key.startswith("_") and key != "training"
        }

    def tensors(module: nn.Module) -> dict:
        return {
            key: (tuple(value.shape), value.dtype)
            for key, value in list(module._parameters.items()) + list(module._buffers.items())
            if value is not None
        }

    first_children, second_children = dict(first.named_children()), dict(second.named_children())
    return (
        type(first) is type(second)
        and settings(first) == settings(second)
        and tensors(first) == tensors(second)
        and first_children.keys() == second_children.keys()
        and all(_same_module(first_children[key], second_children[key]) for key in first_children)
    )


def _autocast(builder: TorchGraphBuilder, node, kind, arguments: list, dtypes: list) -> list:
    """What a Keras layer does to its inputs: floating-point ones of another dtype are cast to
    the layer's dtype (its compute dtype); integers and bools too where the kind `casts_integers`,
    except a mask given as a tensor. Other integers (token ids, masks) are left alone."""
    target = TORCH_DTYPES[node.dtype]

    def cast(position: int, dtype: torch.dtype) -> bool:
        if dtype.is_floating_point:
            return dtype != target
        return kind.casts_integers and not kind.is_mask_input(node, position)

    return [
        builder.method(value, "to", target) if cast(position, dtype) else value
        for position, (value, dtype) in enumerate(zip(arguments, dtypes))
    ]


def class_name(model_name: str) -> str:
    """A Python class name from a Keras model name: `mnist_cnn` -> `MnistCnn`, `resnet50` -> `Resnet50`.
    ASCII only, like every identifier the exchange makes (see `graph.python_name`)."""
    words = [word for word in re.split(r"[^A-Za-z0-9]+", model_name) if word]
    name = "".join(word[0].upper() + word[1:] for word in words) or "Model"
    if name[0].isdigit():
        return f"Model{name}"
    # Generated code defines it beside `torch`, `F`, `nn`, `load`, the helper classes and, when it
    # trains, the optimizers' (`exchange.training_code`).
    return f"{name}Model" if hasattr(torch_modules, name) or hasattr(optimizers, name) or name == "load" else name


def architecture_of(model: nn.Module) -> Graph:
    graph = getattr(model, "exchange_graph", None)
    if not isinstance(graph, Graph):
        raise ExchangeError(
            f"{type(model).__name__} has no exchange architecture; build it with "
            "exchange.torch_adapter.model_from_file or build_module"
        )
    return graph


def get_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().cpu().numpy().copy() for key, value in model.state_dict().items()}


def to_torch_state(file_tensors: dict) -> dict[str, torch.Tensor]:
    """Tensors sharing the arrays' memory where they are writable (no copy), else copies."""
    return {
        key: torch.from_numpy(value if isinstance(value, np.ndarray) and value.flags.writeable else np.array(value))
        for key, value in file_tensors.items()
    }


def set_tensors(model: nn.Module, file_tensors: dict[str, np.ndarray], assign: bool = False) -> None:
    """Load file tensors with `strict=True` after checking every key, shape and dtype against
    the module's own state_dict (all problems in one error)."""
    expected = {
        key: (tuple(value.shape), str(value.dtype).replace("torch.", "")) for key, value in model.state_dict().items()
    }
    fileformat.check_specs(expected, file_tensors)
    # Each top-level module loads its own keys: `load_state_dict` on the root filters every key
    # for every child (20,000 layers took 100 s). The keys were checked above, so this is strict.
    children = dict(model.named_children())
    per_child: dict[str, dict] = {}
    for key, value in to_torch_state(file_tensors).items():
        head, _, rest = key.partition(".")
        per_child.setdefault(head if rest and head in children else "", {})[
            rest if rest and head in children else key
        ] = value
    for head, state in per_child.items():
        (children[head] if head else model).load_state_dict(state, strict=bool(head), assign=assign)


def save_file(model: nn.Module, path: str | os.PathLike) -> None:
    fileformat.save(path, architecture_of(model), get_tensors(model), source_framework="torch")


def load_file(model: nn.Module, path: str | os.PathLike) -> None:
    exchange_file = fileformat.load(path)
    graph = getattr(model, "exchange_graph", None)
    if isinstance(graph, Graph):
        fileformat.check_same_architecture(exchange_file.architecture, graph, path)
    set_tensors(model, exchange_file.tensors)


def model_from_tensors(
    graph: Graph, file_tensors: dict, keras_layout: bool = False, training: bool = False
) -> fx.GraphModule:
    """A ready module (eval mode, trainable) built from `graph` with the given file tensors
    (`training`: see `build_module`)."""
    fileformat.check_tensors(graph, file_tensors)
    model = build_module(graph, keras_layout, training)
    set_tensors(model, fileformat.materialize(file_tensors), assign=True)
    return model.eval()


def model_from_file(path: str | os.PathLike, keras_layout: bool = False) -> fx.GraphModule:
    """A ready torch module (in eval mode) built from the file's architecture and weights.

    Built on the `meta` device with the file's tensors assigned, so no time goes into a random
    initialisation that would be overwritten at once. Parameters require grad: it can be
    fine-tuned. With `keras_layout=True` it takes and returns tensors in the Keras model's layout
    (images channels-last).
    """
    exchange_file = fileformat.load(path)
    return model_from_tensors(exchange_file.architecture, exchange_file.tensors, keras_layout)


def torch_inputs(graph: Graph, keras_arrays: list[np.ndarray]) -> list[torch.Tensor]:
    """Keras-layout numpy inputs as channels-first torch tensors (a bfloat16 array, numpy's
    `ml_dtypes.bfloat16`, goes through float32, which holds every bfloat16 value exactly)."""
    return [
        _torch_tensor(np.ascontiguousarray(array), spec.dtype).permute(to_torch_order(len(spec.shape)))
        for spec, array in zip(graph.inputs, keras_arrays)
    ]


def _torch_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The array as a tensor of the input's declared dtype (Keras converts inputs to it too)."""
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return torch.from_numpy(array).to(TORCH_DTYPES[dtype])


@torch.no_grad()
def predict(model: nn.Module, keras_arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Outputs in Keras layout for inputs in Keras layout, on a module built by `build_module`."""
    graph = architecture_of(model)
    model.eval()
    outputs = model(*torch_inputs(graph, keras_arrays))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [
        _numpy(output.permute(to_keras_order(len(graph.shapes[name])))) for name, output in zip(graph.outputs, outputs)
    ]


@torch.no_grad()
def intermediate_outputs(
    model: fx.GraphModule, keras_arrays: list[np.ndarray], names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """The outputs of the named nodes (default: every node), in Keras layout, by Keras layer name
    (for layer-by-layer checks). Only those are kept; fx frees every other value after its last use."""
    graph = architecture_of(model)
    input_names = {spec.name for spec in graph.inputs}
    wanted: dict[str, list[str]] = {}  # fx value -> the layers it is the output of (Dropout passes its input)
    exchange_values = cast("dict[str, str]", model.exchange_values)  # set by build_module
    for name in names if names is not None else exchange_values:
        if name in exchange_values and name not in input_names:
            wanted.setdefault(exchange_values[name], []).append(name)
    recorded: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.name in wanted and isinstance(result, torch.Tensor):
                recorded.update(dict.fromkeys(wanted[node.name], result))
            return result

    Recorder(model.eval()).run(*torch_inputs(graph, keras_arrays))
    return {name: _numpy(value.permute(to_keras_order(len(graph.shapes[name])))) for name, value in recorded.items()}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: such values come back as float32 (exactly)."""
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.pt` state_dict safely (`weights_only=True`: no code runs) as numpy arrays."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExchangeFileError(f"{path}: no such file") from None
    except Exception as err:  # noqa: BLE001 (torch raises many types for a bad file: pickle, zip, runtime)
        message = first_line(err)
        raise ExchangeFileError(f"{path}: not a readable PyTorch weights file ({message})") from None
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ExchangeFileError(
            f"{path}: expected a state_dict (a dict of named tensors), found {type(state).__name__}"
        )
    unreadable = sorted(
        f"{key} ({value.dtype})"
        for key, value in state.items()
        if value.dtype not in NUMPY_READABLE_DTYPES or value.layout != torch.strided or value.device.type != "cpu"
    )
    if unreadable:
        raise ExchangeFileError(
            f"{path}: tensors the exchange file cannot hold (it stores dense "
            f"{', '.join(fileformat.DTYPE_CODES)}): {', '.join(unreadable)}"
        )
    # A tensor saved as a lazy negation or conjugate view (`x.conj().imag`) carries a bit numpy lacks.
    return {key: value.detach().cpu().resolve_conj().resolve_neg().numpy() for key, value in state.items()}


def write_state_dict_file(file_tensors: dict[str, np.ndarray], destination: str | os.PathLike | BinaryIO) -> None:
    """Write a plain `.pt` state_dict into `destination`, which the caller owns (a path or a file:
    `PendingOutput.open()`, which makes the write atomic)."""
    torch.save(to_torch_state(file_tensors), destination)
