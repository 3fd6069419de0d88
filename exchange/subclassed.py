"""Subclassed Keras models (`class MyModel(keras.Model)` with its own `call`): opened by Keras with
the user's own code, traced into a functional model over the same layers, converted as usual.

A subclassed model's file holds its class name and constructor arguments, not its layers: what it
computes is the Python of its `call`. So the user names the file that defines the class
(`--custom-objects my_models.py`); the code runs because the user named it, never because a model
file says so, and Keras still loads in safe mode. Then:

1. Keras opens the model (`keras.saving.load_model(path, custom_objects=..., safe_mode=True)`; for
   a `.weights.h5`, the model is made from `--arch`'s class, config and build config, and its
   weights loaded by Keras), so the weights are exactly those Keras loads.
2. `model.call` runs on symbolic `keras.Input`s shaped as the model's build config says (or
   `--input-shape`). Called directly (not through `model(...)`), each layer call and each
   `keras.ops` operation inside records a node; a layer of the user's own with no layer kind is
   traced into the same way (its `call` runs on the symbolic tensors), one with a kind
   (`--kinds FILE`) stays one node.
3. `keras.Model(inputs, outputs)` over those nodes is a functional model whose layers are the
   loaded model's own objects; its config goes through the one parser (`keras_config`) and its
   weights through `keras_adapter.get_tensors`, as any functional model's.

Names are stable, whatever else the process made before: a layer Keras named automatically
(`conv2d_3`: the number counts the layers made so far) is named by where the model keeps it
(`self.conv` -> `conv`, `self.block.dense` -> `block_dense`, `self.convs[1]` -> `convs_1`); a name
the user gave is kept; operations are named by their class in graph order (`add`, `add_1`).

Refused, in one line: a `call` that cannot run on symbolic tensors (Python control flow on tensor
values, TensorFlow functions on Keras tensors), naming the layer whose `call` and the line of the
user's file that stopped it; a layer of the user's that computes with its own variables in `call`
(it needs a layer kind); a layer made inside `call` that has weights (they are not in the file).
Keras and TensorFlow are imported only on this path.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import linecache
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from exchange import filekinds
from exchange.errors import ExchangeError, ExchangeFileError, UnsupportedLayerError, first_line
from exchange.graph import INPUT_DTYPES, Graph

CUSTOM_OBJECT_FILES: list[str] = []  # the user's files defining the model's classes (--custom-objects)
INPUT_SHAPES: list[str] = []  # --input-shape values, one per input of `call`, in order
_MODULES: dict[str, ModuleType] = {}  # each file runs once per process
NOT_SUBCLASSED = ("Functional", "Model", "Sequential")  # read from their config, no code needed
MAX_INPUTS = 64  # inputs of a traced `call` (real models take a few)
MAX_INPUT_RANK = 8


def use_custom_objects(custom_objects: list, input_shapes: list | None = None) -> None:
    """What the command line gave: the files defining the user's classes (run when first needed)
    and the input shapes of their `call`, if given."""
    CUSTOM_OBJECT_FILES[:] = [str(Path(path).resolve()) for path in custom_objects]
    INPUT_SHAPES[:] = list(input_shapes or [])


def state() -> dict:
    """What the `--verify` child needs to trace the model the same way."""
    return {"custom_objects": list(CUSTOM_OBJECT_FILES), "input_shapes": list(INPUT_SHAPES)}


# ---------------------------------------------------------------------------------------------
# Which files take this path


def model_class(path: Path, arch, kind: filekinds.FileKind | None = None) -> str | None:
    """The class name of a subclassed model this conversion reads (a `.keras` of one, or a
    weights-only file whose `--arch` is one) when `--custom-objects` was given; else None, and
    the usual readers take (or refuse) the file. `kind`, the input's when the caller has decided
    it, is not decided again."""
    if not CUSTOM_OBJECT_FILES:
        return None
    from exchange import keras_files

    kind = kind or filekinds.input_kind(path)
    config_path = path if kind is filekinds.KERAS else arch if isinstance(arch, Path) else None
    if config_path is None:
        return None
    try:
        config = keras_files.read_keras_config(config_path, kind if config_path == path else None)
    except ExchangeFileError:
        return None  # not a Keras model config (an exchange architecture): the usual readers say
    class_name = config.get("class_name")
    if not isinstance(class_name, str) or class_name in NOT_SUBCLASSED:
        return None
    return class_name


# ---------------------------------------------------------------------------------------------
# The user's code


def _load_file(path: str) -> ModuleType:
    """Run one of the user's files once (a file also given as `--kinds` ran already: reused)."""
    if path in _MODULES:
        return _MODULES[path]
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == path:
            _MODULES[path] = module
            return module
    if not Path(path).is_file() or not path.endswith(".py"):
        raise ExchangeError(f"{path}: --custom-objects takes a Python file (.py) that defines the model's classes")
    spec = importlib.util.spec_from_file_location(f"exchange_user_models_{len(_MODULES)}", path)
    if spec is None or spec.loader is None:
        raise ExchangeError(f"{path}: Python cannot load it as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Keras's serialization looks classes up by module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 (the user's file may raise anything)
        del sys.modules[spec.name]
        raise ExchangeError(
            f"{path}: running it failed{_where(err)} ({type(err).__name__}: {first_line(err)})"
        ) from None
    _MODULES[path] = module
    return module


def custom_objects() -> dict:
    """Every class and function the user's files define, by name, and the Keras classes also by
    their registered name (`package>Name`): what Keras's deserialization looks up."""
    import keras

    objects = {}
    for path in CUSTOM_OBJECT_FILES:
        module = _load_file(path)
        for value in vars(module).values():
            if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ == module.__name__:
                objects[value.__name__] = value
                if inspect.isclass(value) and issubclass(value, keras.layers.Layer):
                    objects[keras.saving.get_registered_name(value)] = value
    return objects


def _where(err: BaseException) -> str:
    """` at FILE:LINE (`source`)`: the deepest line of the user's files in the traceback, if any."""
    frame = _user_frame(err)
    if frame is None:
        return ""
    filename, line_number, _ = frame
    source = linecache.getline(filename, line_number).strip()
    return f" at {Path(filename).name}:{line_number}" + (f" (`{source}`)" if source else "")


def _user_frame(error: BaseException):
    """(file, line, the frame's `self`) of the deepest frame in one of the user's files."""
    user_files = set(CUSTOM_OBJECT_FILES)
    found = None
    seen = set()
    err: BaseException | None = error
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback = err.__traceback__
        while traceback is not None:
            code = traceback.tb_frame.f_code
            if code.co_filename in user_files:
                found = (code.co_filename, traceback.tb_lineno, traceback.tb_frame.f_locals.get("self"))
            traceback = traceback.tb_next
        if found is not None:
            return found
        err = err.__cause__ or err.__context__
    return None


# ---------------------------------------------------------------------------------------------
# Opening the model with Keras


def load_model(path: Path, arch=None, kind: filekinds.FileKind | None = None):
    """The user's model as Keras loads it: a `.keras` file, or `--arch`'s model with the weights
    of a `.weights.h5` (`kind`: the input's, when decided). The file is checked by the direct
    reader's guards first (zip members, HDF5 metadata), so Keras reads only what those read safely."""
    import keras

    from exchange import keras_files

    kind = kind or filekinds.input_kind(path)
    if kind not in (filekinds.KERAS, filekinds.HDF5):
        raise ExchangeFileError(
            f"{path}: Keras reads a subclassed model's weights from a .keras file or a "
            ".weights.h5 (model.save_weights), not from {kind.description}"
        )
    keras_files.check_readable(path, kind)
    objects = custom_objects()
    if kind is filekinds.KERAS:
        from exchange.keras_adapter import named_for_keras

        with _keras_errors(path, "Keras could not load it"), named_for_keras(path, kind) as keras_path:
            return keras.saving.load_model(str(keras_path), custom_objects=objects, compile=False, safe_mode=True)
    model = model_from_arch(arch, objects)
    with _keras_errors(path, "Keras could not load its weights"):
        from keras.src.saving import saving_lib

        saving_lib.load_weights_only(model, str(path))
    return model


def model_from_arch(arch, objects: dict | None = None):
    """The user's model made from a config (a `.keras`'s, or a JSON file of
    `keras.saving.serialize_keras_object(model)`): its class, constructor arguments and build
    config, weights as initialized."""
    import keras

    from exchange import keras_files

    if not isinstance(arch, Path):
        raise ExchangeFileError(
            "a subclassed model's weights-only file needs --arch (its .keras, or a JSON file of "
            "keras.saving.serialize_keras_object(model)) and --custom-objects"
        )
    config = keras_files.read_keras_config(arch)
    if not isinstance(config.get("build_config"), dict) and not INPUT_SHAPES:
        raise ExchangeFileError(f"{arch}: no build_config (the model's input shape); pass --input-shape")
    with _keras_errors(arch, "Keras could not make the model"):
        model = keras.saving.deserialize_keras_object(
            config, custom_objects=objects or custom_objects(), safe_mode=True
        )
        if not isinstance(model, keras.Model):
            raise ExchangeFileError(f"{arch}: {config.get('class_name')!r} is not a keras.Model")
        if not model.built:
            _build_from_shapes(model)
    return model


def _build_from_shapes(model) -> None:
    """Build an unbuilt model by running it on zeros of the `--input-shape` shapes (batch 1)."""
    import numpy as np

    arrays = [np.zeros((1,) + tuple(size or 1 for size in shape), dtype) for _, shape, dtype in _input_specs(model)]
    model(arrays[0] if len(arrays) == 1 else arrays, **_training(model))


@contextmanager
def _keras_errors(path, what: str):
    """Keras's exceptions (and the user's code's) while loading as one line naming the file; a
    warning that weights were left as initialized is an error, never a silent random model."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except ExchangeError:
            raise
        except Exception as err:  # noqa: BLE001 (Keras and the user's code raise many types)
            raise ExchangeFileError(f"{path}: {what}{_where(err)} ({type(err).__name__}: {first_line(err)})") from None
    for warning in caught:
        text = str(warning.message)
        if re.search(r"could not be loaded|freshly-initialized|cannot be built|Skipping variable", text):
            raise ExchangeFileError(f"{path}: {what}: {first_line(Exception(text))}")


# ---------------------------------------------------------------------------------------------
# Tracing `call`


def _input_specs(model) -> list[tuple[str, tuple, str]]:
    """(name, shape without the batch axis, dtype) of each input of `call`: `--input-shape` when
    given, else the model's build config (its `input_shape`: one shape, or a list of them)."""
    parameters = [
        name
        for name, parameter in inspect.signature(model.call).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    first = parameters[0] if parameters else "inputs"
    if INPUT_SHAPES:
        shapes = [_parse_shape(text) for text in INPUT_SHAPES]
        names = [first] if len(shapes) == 1 else [f"{first}_{index}" for index in range(len(shapes))]
        return [(name, shape, dtype) for name, (shape, dtype) in zip(names, shapes)]
    build = model.get_build_config() or {}
    if "shapes_dict" in build:
        raise ExchangeError(
            f"model {type(model).__name__!r} takes several arguments "
            f"({', '.join(map(str, build['shapes_dict']))}); only a tensor or a list of tensors "
            "is traced"
        )
    shape = build.get("input_shape")
    if _is_shape(shape):
        return [(first, _without_batch(shape), "float32")]
    if isinstance(shape, (list, tuple)) and 0 < len(shape) <= MAX_INPUTS and all(_is_shape(item) for item in shape):
        return [(f"{first}_{index}", _without_batch(item), "float32") for index, item in enumerate(shape)]
    if shape is None:
        raise ExchangeError(f"model {type(model).__name__!r} has no build config (its input shape); pass --input-shape")
    raise ExchangeError(
        f"model {type(model).__name__!r}: input shapes {shape!r} are not a shape or a list of "
        "shapes; pass --input-shape"
    )


def _is_shape(value) -> bool:
    return (
        isinstance(value, (list, tuple))
        and 1 <= len(value) <= MAX_INPUT_RANK + 1
        and all(item is None or (isinstance(item, int) and not isinstance(item, bool) and item > 0) for item in value)
    )


def _without_batch(shape) -> tuple:
    return tuple(shape[1:])


def _parse_shape(text: str) -> tuple[tuple, str]:
    """`--input-shape 9,8,3` (float32) or `12:int32`: the shape of one input without the batch axis."""
    shape_text, _, dtype = str(text).partition(":")
    dtype = dtype or "float32"
    try:
        shape = tuple(None if item.strip() in ("None", "?") else int(item) for item in shape_text.split(","))
    except ValueError:
        shape = ()
    if (
        not shape
        or len(shape) > MAX_INPUT_RANK
        or any(item is not None and not 0 < item <= 1 << 24 for item in shape)
        or dtype not in INPUT_DTYPES
    ):
        raise ExchangeError(
            f"--input-shape {text!r}: expected sizes without the batch axis, e.g. 28,28,1 or "
            f"12:int32 (dtypes: {', '.join(INPUT_DTYPES)})"
        )
    return shape, dtype


def trace(model, source: str):
    """A functional keras.Model computing `model.call`, over the model's own layer objects."""
    import keras

    if len(_input_specs(model)) > MAX_INPUTS:
        raise ExchangeError(f"{source}: more than {MAX_INPUTS} inputs")
    taken, named = _name_layers(model)
    inputs = []
    for name, shape, dtype in _input_specs(model):
        inputs.append(keras.Input(shape=shape, dtype=dtype, name=_unique(name, taken)))
    arguments = inputs[0] if len(inputs) == 1 else list(inputs)
    with _tracing_into(_traced_classes(model)):
        try:
            outputs = model.call(arguments, **_training(model))
        except ExchangeError:
            raise
        except Exception as err:  # noqa: BLE001 (whatever `call` does with a symbolic tensor)
            raise UnsupportedLayerError(
                f"{source}: cannot trace {type(model).__name__}.call{_stopped_at(err, model)}: "
                f"{type(err).__name__}: {first_line(err)}"
            ) from None
    flat = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    if not flat or not all(isinstance(output, keras.KerasTensor) for output in flat):
        raise UnsupportedLayerError(
            f"{source}: {type(model).__name__}.call returns "
            f"{type(outputs).__name__}; a tensor or a list of tensors is traced"
        )
    operations = _operations(flat)
    _check_variables(model, operations, source)
    for operation in operations:  # operations (new on each trace) and layers no attribute holds: in graph order
        if not isinstance(operation, keras.layers.Layer) or id(operation) not in named:
            automatic = not isinstance(operation, keras.layers.Layer) or _is_automatic(operation.name, operation)
            operation.name = _unique(_snake(type(operation).__name__) if automatic else operation.name, taken)
    name = model.name if not _is_automatic(model.name, model) else _snake(type(model).__name__)
    try:
        return keras.Model(inputs[0] if len(inputs) == 1 else inputs, flat[0] if len(flat) == 1 else flat, name=name)
    except (ValueError, TypeError) as err:
        raise UnsupportedLayerError(
            f"{source}: Keras cannot make a functional model of what {type(model).__name__}"
            f".call computes ({first_line(err)})"
        ) from None


def _training(model) -> dict:
    return {"training": False} if "training" in inspect.signature(model.call).parameters else {}


def _stopped_at(err: BaseException, model) -> str:
    """` in layer 'block' (Block) at my_models.py:42 (`if ...`)`: where `call` stopped."""
    import keras

    frame = _user_frame(err)
    if frame is None:
        return ""
    layer = frame[2]
    where = ""
    if isinstance(layer, keras.layers.Layer) and layer is not model:
        where = f" in layer {layer.name!r} ({type(layer).__name__})"
    return where + _where(err)


def _snake(name: str) -> str:
    from exchange.keras_config import to_snake_case

    return to_snake_case(name)


def _is_automatic(name: str, layer) -> bool:
    """Whether Keras made the name (`conv2d`, `conv2d_3`): the class in snake case and a count."""
    return re.fullmatch(re.escape(_snake(type(layer).__name__)) + r"(_\d+)?", name) is not None


def _unique(name: str, taken: set) -> str:
    candidate, count = name, 0
    while candidate in taken:
        count += 1
        candidate = f"{name}_{count}"
    taken.add(candidate)
    return candidate


def _name_layers(model) -> tuple[set, set]:
    """Give each layer Keras named automatically the path of the attribute that holds it; keep
    the names the user gave (a name given twice is kept once). Returns the names taken and the
    ids of the layers named."""
    import keras

    found: list[tuple[str, Any]] = []  # (attribute path, layer), each layer once, in attribute order
    seen = {id(model)}

    def walk(owner, prefix: str) -> None:
        for attribute, value in list(vars(owner).items()):
            if attribute.startswith("_"):
                continue
            items = [(attribute, value)]
            if isinstance(value, (list, tuple)):
                items = [(f"{attribute}_{index}", item) for index, item in enumerate(value)]
            elif isinstance(value, dict):
                items = [(f"{attribute}_{key}", item) for key, item in value.items() if isinstance(key, str)]
            for path, item in items:
                if isinstance(item, keras.layers.Layer) and id(item) not in seen:
                    seen.add(id(item))
                    found.append((prefix + path, item))
                    if _is_own_code(item) or isinstance(item, (keras.Sequential, keras.Model)):
                        walk(item, prefix + path + "_")
                    if isinstance(item, keras.Model) and not _is_own_code(item):  # a nested Sequential, functional
                        for index, inner in enumerate(item.layers):
                            if id(inner) not in seen and not isinstance(inner, keras.layers.InputLayer):
                                seen.add(id(inner))
                                found.append((f"{prefix}{path}_{index}", inner))

    walk(model, "")
    taken, kept = set(), set()
    for _, layer in found:  # the names the user gave, each once
        if not _is_automatic(layer.name, layer) and layer.name not in taken:
            taken.add(layer.name)
            kept.add(id(layer))
    for path, layer in found:
        if id(layer) not in kept:
            layer.name = _unique(re.sub(r"\W", "_", path), taken)
    return taken, seen


def _is_own_code(layer) -> bool:
    """A class of the user's (not Keras's own)."""
    return not type(layer).__module__.startswith("keras")


def _traced_classes(model) -> set:
    """The user's layer classes inside the model that have no layer kind: traced into."""
    import keras

    from exchange.kinds import kind_for_keras_class

    classes = set()
    for layer in model._flatten_layers(include_self=False):
        if (
            _is_own_code(layer)
            and kind_for_keras_class(keras.saving.get_registered_name(type(layer))) is None
            and kind_for_keras_class(type(layer).__name__) is None
        ):
            classes.add(type(layer))
    return classes


@contextmanager
def _tracing_into(classes: set):
    """While tracing, calling a layer of these classes on symbolic tensors runs its `call` (so its
    layers and operations are recorded), not one opaque node."""
    import keras

    saved = {}
    for cls in classes:
        original = cls.__call__

        def traced(self, *args, __original=original, **kwargs):
            symbolic = any(isinstance(value, keras.KerasTensor) for value in keras.tree.flatten((args, kwargs)))
            if type(self) in classes and symbolic:
                if "training" in inspect.signature(self.call).parameters and kwargs.get("training") is None:
                    kwargs["training"] = False
                return self.call(*args, **kwargs)
            return __original(self, *args, **kwargs)

        saved[cls] = cls.__dict__.get("__call__")
        cls.__call__ = traced
    try:
        yield
    finally:
        for cls, previous in saved.items():
            if previous is None:
                del cls.__call__
            else:
                cls.__call__ = previous


def _operations(outputs: list) -> list:
    """The layers and operations that make the outputs, each once, inputs before their readers."""
    import keras

    ordered: list = []
    done, visiting = set(), set()
    stack = [(tensor, False) for tensor in reversed(outputs)]
    while stack:  # an iterative depth-first walk: deep models exceed Python's recursion
        tensor, expanded = stack.pop()
        operation, node_index, _ = tensor._keras_history
        if isinstance(operation, keras.layers.InputLayer):
            continue
        key = (id(operation), node_index)
        if expanded:
            visiting.discard(key)
            if key not in done:
                done.add(key)
                if all(id(item) != id(operation) for item in ordered):
                    ordered.append(operation)
            continue
        if key in done or key in visiting:
            continue
        visiting.add(key)
        stack.append((tensor, True))
        node = operation._inbound_nodes[node_index]
        stack.extend((value, False) for value in reversed(node.input_tensors))
    return ordered


def _check_variables(model, operations: list, source: str) -> None:
    """Every weight the traced graph computes with is a weight of one of its layers, loaded from
    the file: no operation reads a layer's variable directly, and no layer made inside `call`
    has weights."""
    import keras

    owners = {}
    for layer in model._flatten_layers(include_self=True):
        for variable in layer._trainable_variables + layer._non_trainable_variables:
            owners[id(variable)] = layer
    for operation in operations:
        if isinstance(operation, keras.layers.Layer):
            fresh = [variable for variable in operation.weights if id(variable) not in owners]
            if fresh:
                raise UnsupportedLayerError(
                    f"{source}: layer {operation.name!r} ({type(operation).__name__}) is made "
                    "inside call: its weights are not the model's (make it in __init__)"
                )
            continue
        for node in operation._inbound_nodes:
            for value in keras.tree.flatten((node.arguments.args, node.arguments.kwargs)):
                if isinstance(value, keras.Variable):
                    owner = owners.get(id(value))
                    who = f"layer {owner.name!r} ({type(owner).__name__})" if owner is not None else "the model"
                    raise UnsupportedLayerError(
                        f"{source}: {who} computes with its own variable {value.name!r} in call; register a "
                        "layer kind for its class (--kinds FILE, see docs/adding-a-layer-kind.md)"
                    )


# ---------------------------------------------------------------------------------------------
# Entry points for the command line


def open_subclassed(path: Path, arch=None, kind: filekinds.FileKind | None = None):
    """(graph, file-layout tensors) of a subclassed model's `.keras` or `.weights.h5` (with
    `--arch`), traced from its `call`."""
    model = load_model(path, arch, kind)
    functional = trace(model, str(path))
    return _graph_of(functional, path), _tensors_of(functional, path)


def open_both(path: Path, arch=None, kind: filekinds.FileKind | None = None):
    """The user's model as Keras loaded it and its traced functional model (for `--verify`)."""
    model = load_model(path, arch, kind)
    return model, trace(model, str(path))


def architecture(arch: Path) -> Graph:
    """The graph of the subclassed model a config describes (`--arch` for a weights file)."""
    model = model_from_arch(arch)
    return _graph_of(trace(model, str(arch)), arch)


def _graph_of(functional, path: Path) -> Graph:
    from exchange.keras_adapter import _plain, recursion_room
    from exchange.keras_config import parse_model_config

    with recursion_room():
        config = json.loads(json.dumps({"class_name": "Functional", "config": functional.get_config()}, default=_plain))
    return parse_model_config(config, f"{path} (traced)").graph


def _tensors_of(functional, path: Path) -> dict:
    from exchange import keras_adapter

    try:
        return keras_adapter.get_tensors(functional)
    except ExchangeError as err:
        raise type(err)(f"{path}: {err}") from None
