"""PyTorch source code a person would have written, from an exchange graph.

`write_module(graph, "model.py", weights_name="model.safetensors")` writes one file that imports
only torch: one class named after the Keras model, whose `__init__` creates standard `torch.nn`
modules with explicit arguments under the weights file's key names, and whose `forward` is one
statement per operation, read off the same `torch.fx` graph that `torch_adapter.build_module`
builds (so the two are the same computation). The small helper modules a model needs (from
`exchange.torch_modules`) are copied into the file with their docstrings. Generation is
deterministic: the same graph gives the same bytes.
"""

from __future__ import annotations

import inspect
import itertools
import math
import operator
import os
import re
import textwrap
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from exchange import optimizers, torch_modules, training_code, training_state
from exchange.errors import ExchangeError
from exchange.graph import Graph
from exchange.kinds.axis_order import torch_shape
from exchange.torch_adapter import build_module, class_name

# torch's recurrent modules take `*args, **kwargs`: their arguments and defaults, written out here.
RECURRENT_ARGUMENTS = {
    "input_size": None,
    "hidden_size": None,
    "num_layers": 1,
    "nonlinearity": "tanh",
    "bias": True,
    "batch_first": False,
    "dropout": 0.0,
    "bidirectional": False,
    "proj_size": 0,
}
HELPERS = {
    module_type: module_type.__name__
    for _, module_type in inspect.getmembers(torch_modules, inspect.isclass)
    if issubclass(module_type, nn.Module) and module_type.__module__ == torch_modules.__name__
}
# Plain functions of torch_modules (`keras2_hard_sigmoid`): copied into generated code that names them.
HELPER_FUNCTIONS = {
    function: name
    for name, function in inspect.getmembers(torch_modules, inspect.isfunction)
    if function.__module__ == torch_modules.__name__
}
SKIPPED_ARGUMENTS = ("device",)
# Size arguments torch takes as one int for all axes: (7, 7) is written 7.
SIZE_ARGUMENTS = ("kernel_size", "stride", "padding", "dilation", "output_padding")
POSITIONAL_ARGUMENTS = 2  # nn.Conv2d(3, 64, kernel_size=7): sizes positional, the rest by keyword


def generate(graph: Graph, weights_name: str, source_name: str, training=None) -> str:
    """The source of a standalone module for `graph`; its state_dict is the weights file's.
    With `training` (a checked `training_state.TrainingState` whose slots the weights file holds),
    its dropout and noise layers act in `train()` mode (`build_module(training=True)`), its
    BatchNorms are `KerasBatchNorm`s, its Embeddings give sparse gradients (Keras 3's steps,
    unless the run was Keras 2's) and it has the training functions of
    `exchange.training_code`; without, no trace of training."""
    module = build_module(graph, training=training is not None)
    module.graph.eliminate_dead_code()  # values only the layer-by-layer check reads
    uses_batch_norm = activity = False
    if training is not None:
        optimizers.use_keras_batch_norm(module)
        if not training.summed_lookups:  # Keras 3 steps an Embedding lookup by lookup: `per_lookup`
            optimizers.torch_sparse_lookups(module)
        uses_batch_norm = any(isinstance(part, optimizers.KerasBatchNorm) for part in module.modules())
        activity = any(isinstance(part, torch_modules.KerasActivityRegularization) for part in module.modules())
    name = class_name(graph.name)
    used_helpers = []
    init_lines = []
    for attribute, submodule in module.named_children():
        init_lines.append(f"self.{attribute} = {_constructor(submodule)}")
        for part in submodule.modules():  # helpers inside containers (Bidirectional) too
            if type(part) in HELPERS and type(part) not in used_helpers:
                used_helpers.append(type(part))
    keras_names = {graph.torch_names[node.name]: node.name for node in graph.layers}
    parameters, body = _forward(module.graph, keras_names)
    logits_method = ""
    activation = None if training is None else training_state.logits_activation(graph, training.loss, "training")
    if activation is not None:  # forward = the activation of `pre_activation`, which `loss_fn` takes
        logits, final = training_state.logits_model(module, activation)
        _, logits_body = _forward(logits.graph, keras_names)
        call = _Variable(f"self.pre_activation({', '.join(parameters)})")
        body = [f"return {_statement(final, (call,), final.kwargs, keras_names)}"]
        logits_method = (
            f"\n    def pre_activation(self, {', '.join(parameters)}):\n"
            f'        """The output before its final {activation}: what Keras takes the cross-entropy from."""\n'
            + "".join(f"        {line}\n" for line in logits_body)
        )
    helper_sources = [textwrap.dedent(inspect.getsource(helper)) for helper in used_helpers]
    named = "\n".join(init_lines + body + [logits_method] + helper_sources)
    used_functions: list = []  # named in the code, or by a function already copied (hash_integers' helpers)
    while True:
        added = [
            function
            for function, function_name in HELPER_FUNCTIONS.items()
            if function not in used_functions and re.search(rf"\b{function_name}\b", named)
        ]
        if not added:
            break
        used_functions += added
        named += "\n".join(inspect.getsource(function) for function in added)
    helper_sources = [
        inspect.getsource(function) for function in HELPER_FUNCTIONS if function in used_functions
    ] + helper_sources
    training_functions = []
    if training is not None:
        helper_sources += training_code.copied_sources(training_code.helper_names(training, uses_batch_norm, activity))
        training_functions = training_code.functions(
            graph, training, [key for key, _ in module.named_parameters()], weights_name, parameters, activity
        )
    layout = "; images are channels-first (N, C, H, W)" if any(len(spec.shape) > 1 for spec in graph.inputs) else ""
    model_class = (
        f"class {name}(nn.Module):\n"
        f'    """The Keras model {quoted(graph.name)} in PyTorch{layout}."""\n\n'
        "    def __init__(self):\n        super().__init__()\n"
        + "".join(f"        {line}\n" for line in init_lines)
        + f"\n    def forward(self, {', '.join(parameters)}):\n"
        + "".join(f"        {line}\n" for line in body)
        + logits_method
    )
    code = "".join(helper_sources) + model_class + "".join(training_functions)
    standard_library = [f"import {name}" for name in ("json", "math") if re.search(rf"\b{name}\.", code)]
    imports = (
        (standard_library + [""] if standard_library else [])
        + (["import torch"] if re.search(r"\btorch\.", code) else [])
        + (["import torch.nn.functional as F"] if re.search(r"\bF\.", code) else [])
        + ["from torch import nn"]
    )
    parts = [_docstring(graph, name, weights_name, source_name, training), "\n".join(imports) + "\n"]
    parts += helper_sources
    parts.append(model_class)
    if training is None:
        parts.append(
            f"def load(path={quoted(weights_name)}):\n"
            '    """The weights file as a state_dict: `model.load_state_dict(load(), strict=True)`."""\n'
            "    from safetensors.torch import load_file\n\n"
            "    return load_file(path)\n"
        )
    parts += training_functions
    docstring, *sections = (part.rstrip("\n") for part in parts)
    return docstring + "\n\n" + "\n\n\n".join(sections) + "\n"


def write_module(graph: Graph, path: str | os.PathLike, weights_name: str, source_name: str, training=None) -> None:
    """Write the generated source to `path` (no atomic rename: the caller owns a temporary)."""
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(generate(graph, weights_name, source_name, training))


def quoted(text: str) -> str:
    """`text` as a Python string literal that is safe anywhere in generated code, a docstring or
    a comment included: ASCII only, every quote, backslash, line break and other non-printable
    character escaped. The one way a string from a file enters generated code (`repr` is not
    enough: three double quotes in a name close a docstring, and it keeps non-ASCII text)."""
    escaped = str(text).encode("unicode_escape", "backslashreplace").decode("ascii")
    return "'" + escaped.replace("'", r"\x27").replace('"', r"\x22") + "'"


def _docstring(graph: Graph, name: str, weights_name: str, source_name: str, training=None) -> str:
    inputs = ", ".join(
        f"{quoted(spec.name)} (N, {', '.join(str(s) for s in torch_shape(spec.shape))}) {spec.dtype}"
        for spec in graph.inputs
    )
    outputs = ", ".join(
        f"{quoted(output)} (N, {', '.join(str(s) for s in torch_shape(graph.shapes[output]))})"
        for output in graph.outputs
    )
    return (
        f'"""{name}: the Keras model {quoted(graph.name)} from {quoted(source_name)}, ported to PyTorch.\n\n'
        f"Inputs, channels-first: {inputs}.\nOutputs: {outputs}.\n\n"
        "Load the weights:\n\n"
        f"    model = {name}()\n"
        f"    model.load_state_dict(load({quoted(weights_name)}), strict=True)\n"
        "    model.eval()\n\n"
        + (training_code.usage(training) if training is not None else "")
        + "Generated by keras-torch-exchange (scripts/convert.py); edit it as your own code.\n"
        '"""\n'
    )


def _constructor(module: nn.Module) -> str:
    """`nn.Conv2d(3, 64, kernel_size=(7, 7), stride=(2, 2), bias=False)`: the arguments that
    differ from the defaults, read from the module's attributes of the same names."""
    module_type = type(module)
    if module_type in (nn.Module, nn.ModuleDict):  # a container (torch.fx makes plain Modules of them)
        children = ", ".join(f"{quoted(key)}: {_constructor(value)}" for key, value in module.named_children())
        return f"nn.ModuleDict({{{children}}})"
    standard = getattr(nn, module_type.__name__, None) is module_type  # torch.nn's own: nn.Conv2d
    type_name = f"nn.{module_type.__name__}" if standard else HELPERS.get(module_type)
    if module_type is optimizers.KerasBatchNorm:  # a trained model's (`exchange.training_code`)
        type_name = module_type.__name__
    if type_name is None:
        raise ExchangeError(
            f"no source form for torch module {module_type.__name__} (neither in torch.nn "
            "nor in exchange.torch_modules)"
        )
    if isinstance(module, nn.RNNBase):
        arguments = [_format(module.input_size), _format(module.hidden_size)]
        arguments += [
            f"{name}={_format(getattr(module, name))}"
            for name, default in RECURRENT_ARGUMENTS.items()
            if default is not None and hasattr(module, name) and getattr(module, name) != default
        ]
        dtype = _argument(module, "dtype")
        if dtype is not _ABSENT:
            arguments.append(f"dtype={_format(dtype)}")
        return f"{type_name}({', '.join(arguments)})"
    signature = inspect.signature(module_type.__init__)
    positional: list[str] = []
    keywords: list[str] = []
    for parameter_name, parameter in list(signature.parameters.items())[1:]:
        if parameter_name in SKIPPED_ARGUMENTS or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        value = _argument(module, parameter_name)
        if value is _ABSENT or (parameter.default is not parameter.empty and _same(value, parameter.default)):
            continue
        if (
            standard
            and parameter_name in SIZE_ARGUMENTS
            and isinstance(value, tuple)
            and value
            and all(isinstance(item, int) and item == value[0] for item in value)
        ):
            value = value[0]
        if parameter.default is parameter.empty and not keywords and len(positional) < POSITIONAL_ARGUMENTS:
            positional.append(_format(value))
        else:
            keywords.append(f"{parameter_name}={_format(value)}")
    return f"{type_name}({', '.join(positional + keywords)})"


_ABSENT = object()


def _argument(module: nn.Module, name: str):
    if name == "dtype":
        tensors = list(module.parameters()) + list(module.buffers())
        dtype = tensors[0].dtype if tensors else torch.float32
        return _ABSENT if dtype == torch.float32 else dtype
    value = getattr(module, name, _ABSENT)
    if name == "bias" and (value is None or isinstance(value, torch.Tensor)):
        return value is not None
    if name == "bias" and value is _ABSENT:  # nn.MultiheadAttention: in_proj_bias, out_proj.bias
        return any(key.endswith("bias") for key, _ in module.named_parameters())
    if isinstance(value, torch.Tensor):
        return _ABSENT
    return value


def _same(value, default) -> bool:
    if isinstance(value, tuple) and not isinstance(default, tuple):
        return all(item == default for item in value)
    return (value == default and type(value) is type(default)) or (
        isinstance(value, float) and isinstance(default, (int, float)) and value == default
    )


def _format(value) -> str:
    if isinstance(value, _Variable):
        return str(value)
    if isinstance(value, nn.Module):  # a helper holding a module (KerasSpectralNormalization's layer)
        return _constructor(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return f'float("{value}")'
        return repr(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_format(item) for item in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_format(item) for item in value) + "]"
    if isinstance(value, str):
        return quoted(value)
    if value is None or value is Ellipsis or isinstance(value, (bool, int)):
        return repr(value)
    if isinstance(value, slice):
        return f"slice({_format(value.start)}, {_format(value.stop)}, {_format(value.step)})"
    if callable(value) and not isinstance(value, (type, nn.Module)):  # an activation given to a helper
        return _function_name(value)
    raise ExchangeError(f"no source form for a {type(value).__name__}")


def _index(value) -> str:
    """A subscript as written by hand: `[:, -1]`, `[0]`."""
    if isinstance(value, tuple):
        return ", ".join(_index(item) for item in value)
    if isinstance(value, slice):
        return ":".join("" if part is None else _format(part) for part in (value.start, value.stop)) + (
            "" if value.step is None else f":{_format(value.step)}"
        )
    return _format(value)


def _function_name(function: Callable[..., object]) -> str:
    if function in HELPER_FUNCTIONS:
        return HELPER_FUNCTIONS[function]
    module_name = getattr(function, "__module__", None) or ""
    if module_name == "torch.nn.functional" or function is getattr(F, function.__name__, None):
        return f"F.{function.__name__}"  # F.gelu is a builtin of torch._C._nn
    if function is getattr(torch, function.__name__, None):
        return f"torch.{function.__name__}"
    raise ExchangeError(f"no source form for function {getattr(function, '__name__', type(function).__name__)}")


class _Variable(str):
    """A local variable of the generated `forward`, written as its name (not as a quoted string)."""


def _forward(graph: fx.Graph, keras_names: dict[str, str]) -> tuple[list[str], list[str]]:
    """Parameters and body lines of `forward`, one statement per fx node.

    Intermediate values live in a few reused variables, `x`, `x1`, `x2`, ..., as a person writes
    them: a statement's result takes the variable of an input whose last use it is (`x =
    F.relu(x)`), else the first variable free; an input that dies there without passing on its
    variable is `del`eted after it (where branches join). So each tensor is freed after its last
    use, as the fx module frees it (its `name = None`), and the peak memory is the fx module's."""
    nodes = list(graph.nodes)
    last_user = {}
    for node in nodes:
        for value in node.all_input_nodes:
            last_user[value] = node
    parameters = [node.name for node in nodes if node.op == "placeholder"]
    names = (
        name for name in itertools.chain(["x"], (f"x{index}" for index in itertools.count(1))) if name not in parameters
    )
    variables: dict[fx.Node, str] = {}  # the variable holding each value
    allocated: list[str] = []  # every variable so far, in order of first use
    live: set[str] = set()  # the variables holding a value that is still used
    lines = []
    for node in nodes:
        if node.op == "placeholder":
            variables[node] = node.name
            continue
        if node.op == "get_attr" and not node.users:  # a holder fx keeps (spectral normalization's)
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda value: _Variable(variables[value]))
        dying = sorted(
            {
                variables[value]
                for value in node.all_input_nodes
                if last_user[value] is node and value.op != "placeholder"
            },
            key=allocated.index,
        )
        live.difference_update(dying)
        if node.op == "output":
            lines.append(f"return {_format(args[0])}")
            continue
        if not node.users:  # kept for its effect only (eliminate_dead_code left it)
            target = None
        else:
            target = dying[0] if dying else next((name for name in allocated if name not in live), None)
            if target is None:
                target = next(names)
                allocated.append(target)
            live.add(target)
            variables[node] = target
        statement = _statement(node, args, kwargs, keras_names)
        lines.append(statement if target is None else f"{target} = {statement}")
        if [name for name in dying if name != target]:
            lines.append(f"del {', '.join(name for name in dying if name != target)}")
    return parameters, lines


def _statement(node: fx.Node, args: tuple, kwargs: dict, keras_names: dict[str, str]) -> str:
    """The right-hand side of one fx node's statement (its Keras layer's name as a comment)."""
    arguments = ", ".join(
        [_format(argument) for argument in args] + [f"{key}={_format(value)}" for key, value in kwargs.items()]
    )
    if node.op == "call_module":
        keras_name = keras_names.get(str(node.target))
        comment = f"  # Keras layer {quoted(keras_name)}" if keras_name and keras_name != node.target else ""
        return f"self.{node.target}({arguments}){comment}"
    if node.op == "call_function" and node.target is operator.getitem:
        return f"{_format(args[0])}[{_index(args[1])}]"
    if node.op == "call_function":
        function = cast("Callable[..., object]", node.target)  # a call_function's target: a callable
        return f"{_function_name(function)}({arguments})"
    if node.op == "call_method":
        first, *rest = args
        rest_text = ", ".join(
            [_format(argument) for argument in rest] + [f"{key}={_format(value)}" for key, value in kwargs.items()]
        )
        return f"{_format(first)}.{node.target}({rest_text})"
    raise ExchangeError(f"no source form for the fx operation {node.op}")
