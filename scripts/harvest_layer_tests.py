"""Harvest single-layer configurations from Keras's own layer tests, by reading them with `ast`.

    python scripts/harvest_layer_tests.py [--out tests/fixtures/keras_layer_cases.json]

Reads keras/src/layers/**/*_test.py of the installed Keras (never imports or runs them) and writes
one case per literal configuration of a built-in layer called on inputs of a literal shape:

  * `self.run_layer_test(layers.X, init_kwargs={...}, input_shape=..., input_dtype=...,
    input_data=..., call_kwargs=...)`;
  * `layers.X(...)` (kwargs, positional arguments mapped by the class's own `__init__`, `**dict`)
    called on arrays of a literal shape: `np.random.*`, `np.ones/zeros/full/array/arange`,
    `ops.ones/zeros`, `keras.Input`/`layers.Input`, `KerasTensor`, `.astype`, `.reshape`;
  * inside test methods decorated with `parameterized.parameters`, `named_parameters` (also of
    Keras's `named_product`) or `product`: each case's values bound to the method's parameters.

Values come from `ast.literal_eval` on literal nodes, from names bound to such values (module
constants, parameters, local assignments, loops over a literal list), and from tuples, lists,
dicts, `*`/`**`, `+`, `-`, `*` and indexing built from them. A layer given as an argument
(`Bidirectional(layers.LSTM(3))`) is written `{"__layer__": "LSTM", "init_kwargs": {...}}`.

Skipped (and counted by reason): anything that needs a value that is not a literal (an
initializer object, a lambda, a custom layer class, `range(...)`, a tensor in `call_kwargs`, a
comprehension), sparse or ragged inputs, calls inside `with self.assertRaises…` (they are meant
to fail), and layers called on something other than a literal-shaped array. Method calls between
construction and call (`layer.build`, `layer.quantize`, `enable_lora`) are not followed: the case
is the freshly constructed layer. Identical cases (same class, kwargs, input shapes without the
batch axis, dtypes, call_kwargs) are kept once, under the first id.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests/fixtures/keras_layer_cases.json"
LAYER_MODULES = ("layers", "keras.layers", "keras.src.layers")
INPUT_MAKERS = ("layers.Input", "keras.Input", "Input", "keras.layers.Input")
KERAS_TENSORS = ("KerasTensor", "backend.KerasTensor", "keras_tensor.KerasTensor")
# Array constructors: how each one is given its shape. "size": `size=` or the n-th positional
# argument; "shape": `shape=` or the first; "dims": every positional argument is one dimension.
ARRAY_MAKERS = {
    "np.random.normal": ("size", 2, "float32"),
    "np.random.uniform": ("size", 2, "float32"),
    "np.random.randint": ("size", 2, "int32"),
    "np.random.random": ("size", 0, "float32"),
    "np.random.random_sample": ("size", 0, "float32"),
    "np.random.standard_normal": ("size", 0, "float32"),
    "np.random.rand": ("dims", 0, "float32"),
    "np.random.randn": ("dims", 0, "float32"),
    "np.ones": ("shape", 0, "float32"),
    "np.zeros": ("shape", 0, "float32"),
    "np.empty": ("shape", 0, "float32"),
    "np.full": ("shape", 0, "float32"),
    "ops.ones": ("shape", 0, "float32"),
    "ops.zeros": ("shape", 0, "float32"),
    "random.uniform": ("shape", 0, "float32"),
    "random.normal": ("shape", 0, "float32"),
}
# Methods of a numpy generator (`np.random.RandomState(0).randn(...)`, `rng.uniform(...)`) and
# keras's own random functions (`keras.random.uniform`, `ops.random.normal`), read as the above.
GENERATOR_METHODS = {
    "randn": "np.random.randn",
    "rand": "np.random.rand",
    "random": "np.random.random",
    "uniform": "np.random.uniform",
    "normal": "np.random.normal",
    "integers": "np.random.randint",
    "randint": "np.random.randint",
    "standard_normal": "np.random.standard_normal",
}
KERAS_RANDOM = {"uniform": "random.uniform", "normal": "random.normal"}
# Calls that give back their (first) argument's array: conversions and casts.
PASS_THROUGH = ("convert_to_tensor", "np.asarray", "ops.cast", "backend.Variable", "tf.constant", "jnp.array")
ASSERT_RAISES = ("assertRaises", "assertRaisesRegex", "raises")


@dataclass(frozen=True)
class Unresolved:
    """A value the harvest does not read (not a literal); `reason` says why."""

    reason: str


@dataclass(frozen=True)
class LayerClass:
    name: str


@dataclass(frozen=True)
class LayerCall:
    """`layers.X(...)`: a constructed layer."""

    name: str
    init_kwargs: dict


@dataclass(frozen=True)
class Array:
    """An input of a known shape (batch axis included) and dtype."""

    shape: tuple
    dtype: str


def normalized_dtype(dtype) -> str | Unresolved:
    if isinstance(dtype, Unresolved) or dtype is None:
        return dtype if dtype is not None else Unresolved("dtype")
    name = str(dtype).split(".")[-1].rstrip("_")
    if name.startswith("float") or name == "bfloat16":
        return "float32"
    if "int" in name:
        return "int32"
    return {"bool": "bool", "str": "string", "string": "string"}.get(name, Unresolved(f"dtype {name}"))


def unresolved_in(value) -> Unresolved | None:
    """The first Unresolved inside a value, or None."""
    if isinstance(value, Unresolved):
        return value
    if isinstance(value, LayerCall):
        return unresolved_in(value.init_kwargs)
    children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((found for child in children if (found := unresolved_in(child)) is not None), None)


def layer_init_signatures(layers_dir: Path) -> dict[str, list[str]]:
    """Positional parameter names of each layer class's `__init__`, read from Keras's source."""
    classes = {}
    for path in sorted(layers_dir.rglob("*.py")):
        if not path.name.endswith("_test.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef):
                    classes[node.name] = node
    signatures = {}

    def positional(name, seen=()):
        node = classes.get(name)
        if node is None or name in seen:
            return None
        init = next((item for item in node.body if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)
        if init is None:  # inherited
            bases = [base.id for base in node.bases if isinstance(base, ast.Name)]
            return positional(bases[0], seen + (name,)) if bases else None
        return None if init.args.vararg else [arg.arg for arg in init.args.args[1:]]

    for name in classes:
        signatures[name] = positional(name)
    return signatures


class Evaluator:
    """Reads an expression node as a value, with names looked up in `env`."""

    def __init__(self, signatures: dict):
        self.signatures = signatures
        self.layer_modules = set(LAYER_MODULES)  # and the file's `from keras.src.layers.x import y`

    def value(self, node: ast.AST, env: dict):
        try:
            return ast.literal_eval(node)  # literal nodes only: anything else raises
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
        if isinstance(node, ast.Name):
            return env.get(node.id, Unresolved(f"name {node.id}"))
        if isinstance(node, (ast.Tuple, ast.List)):
            items = []
            for element in node.elts:
                if isinstance(element, ast.Starred):
                    inner = self.value(element.value, env)
                    if not isinstance(inner, (list, tuple)):
                        return Unresolved("starred value")
                    items.extend(inner)
                else:
                    items.append(self.value(element, env))
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            result = {}
            for key, value in zip(node.keys, node.values):
                if key is None:
                    inner = self.value(value, env)
                    if not isinstance(inner, dict):
                        return Unresolved("** of a non-dict")
                    result.update(inner)
                else:
                    key = self.value(key, env)
                    if not isinstance(key, (str, int, float, bool)) or isinstance(key, Unresolved):
                        return Unresolved("dict key")
                    result[key] = self.value(value, env)
            return result
        if isinstance(node, ast.IfExp):
            test = self.value(node.test, env)
            return self.value(node.body if test else node.orelse, env) if plain(test) else Unresolved("ifexp")
        if isinstance(node, (ast.Compare, ast.BoolOp)) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
        ):
            return self.condition(node, env)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self.value(node.operand, env)
            return (-operand if isinstance(node.op, ast.USub) else operand) if _number(operand) else Unresolved("unary")
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = self.value(node.left, env), self.value(node.right, env)
            arrays = [side for side in (left, right) if isinstance(side, Array)]
            if arrays and all(isinstance(side, Array) or _number(side) for side in (left, right)):
                return arrays[0]  # elementwise with a number or an array of the same shape
            if (
                unresolved_in((left, right)) is None
                and not isinstance(left, (Array, LayerCall, LayerClass))
                and not isinstance(right, (Array, LayerCall, LayerClass))
            ):
                try:
                    return {
                        ast.Add: lambda: left + right,
                        ast.Sub: lambda: left - right,
                        ast.Mult: lambda: left * right,
                    }[type(node.op)]()
                except TypeError:
                    pass
            return Unresolved("arithmetic")
        if isinstance(node, ast.Subscript):
            base = self.value(node.value, env)
            if isinstance(base, Array) and isinstance(node.slice, ast.Slice) and isinstance(base.shape[0], int):
                rows = slice(
                    *(
                        None if part is None else self.value(part, env)
                        for part in (node.slice.lower, node.slice.upper, node.slice.step)
                    )
                )
                if unresolved_in([rows.start, rows.stop, rows.step]) is None:  # x[:2]: fewer rows
                    return Array((len(range(*rows.indices(base.shape[0]))),) + base.shape[1:], base.dtype)
            index = (
                self.value(node.slice, env)
                if not isinstance(node.slice, ast.Slice)
                else slice(
                    *(
                        None if part is None else self.value(part, env)
                        for part in (node.slice.lower, node.slice.upper, node.slice.step)
                    )
                )
            )
            if isinstance(base, (tuple, list, dict, str)) and unresolved_in([base]) is None:
                try:
                    return base[index]
                except (TypeError, KeyError, IndexError, ValueError):
                    pass
            return Unresolved("subscript")
        if isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value)
            if owner in self.layer_modules:
                return LayerClass(node.attr)
            base = self.value(node.value, env)
            if isinstance(base, Array) and node.attr == "shape":
                return base.shape
            if owner in ("np", "numpy", "tf", "jnp", "torch") and _dtype_name(node.attr):
                return node.attr  # np.float32 as a dtype
            return Unresolved(f"attribute {ast.unparse(node)}")
        if isinstance(node, ast.Call):
            return self.call(node, env)
        return Unresolved(type(node).__name__.lower())

    def condition(self, node: ast.AST, env: dict):
        """`==`, `!=`, `in`, `is`, `<`, …, `and`, `or`, `not` of known plain values."""
        if isinstance(node, ast.UnaryOp):
            operand = self.value(node.operand, env)
            return not operand if plain(operand) else Unresolved("condition")
        if isinstance(node, ast.BoolOp):
            values = [self.value(operand, env) for operand in node.values]
            if not all(plain(value) for value in values):
                return Unresolved("condition")
            return all(values) if isinstance(node.op, ast.And) else any(values)
        operators = {
            ast.Eq: lambda a, b: a == b,
            ast.NotEq: lambda a, b: a != b,
            ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b,
            ast.Is: lambda a, b: a is b,
            ast.IsNot: lambda a, b: a is not b,
            ast.Lt: lambda a, b: a < b,
            ast.LtE: lambda a, b: a <= b,
            ast.Gt: lambda a, b: a > b,
            ast.GtE: lambda a, b: a >= b,
        }
        left = self.value(node.left, env)
        for operator, comparator in zip(node.ops, node.comparators):
            right = self.value(comparator, env)
            if not (plain(left) and plain(right)):
                return Unresolved("condition")
            try:
                if not operators[type(operator)](left, right):
                    return False
            except TypeError:
                return Unresolved("condition")
            left = right
        return True

    def keywords(self, node: ast.Call, env: dict) -> dict:
        result = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                inner = self.value(keyword.value, env)
                if not isinstance(inner, dict):
                    return {"**": Unresolved("** of a non-dict")}
                result.update(inner)
            else:
                result[keyword.arg] = self.value(keyword.value, env)
        return result

    def call(self, node: ast.Call, env: dict):
        name = ast.unparse(node.func)
        if name.endswith(PASS_THROUGH) and node.args:
            inner = self.value(node.args[0], env)
            if isinstance(inner, Array):
                dtype = self.value(node.args[1], env) if len(node.args) > 1 else inner.dtype
                return Array(inner.shape, normalized_dtype(dtype))
        if isinstance(node.func, ast.Attribute) and name not in ARRAY_MAKERS:
            receiver = ast.unparse(node.func.value)
            if receiver.endswith("random") and node.func.attr in KERAS_RANDOM:
                name = KERAS_RANDOM[node.func.attr]
            elif node.func.attr in GENERATOR_METHODS and not isinstance(self.value(node.func.value, env), Array):
                name = GENERATOR_METHODS[node.func.attr]
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("astype", "reshape"):
            base = self.value(node.func.value, env)
            argument = self.value(node.args[0], env) if node.args else Unresolved("no argument")
            if isinstance(base, Array) and node.func.attr == "astype":
                return Array(base.shape, normalized_dtype(argument))
            if isinstance(base, Array) and isinstance(argument, (tuple, list)) and unresolved_in(argument) is None:
                return Array(tuple(argument), base.dtype)
            return Unresolved(f"call {name}")
        if name in ARRAY_MAKERS:
            how, position, dtype = ARRAY_MAKERS[name]
            keywords = self.keywords(node, env)
            if how == "dims":
                shape = tuple(self.value(argument, env) for argument in node.args)
            else:
                shape = keywords.get(
                    how if how == "size" else "shape",
                    self.value(node.args[position], env) if len(node.args) > position else None,
                )
            shape = (shape,) if isinstance(shape, int) else shape
            if not isinstance(shape, (tuple, list)) or unresolved_in(shape) is not None:
                return Unresolved(f"shape of {name}")
            return Array(tuple(shape), normalized_dtype(keywords.get("dtype", dtype)))
        if name in ("np.array", "np.asarray", "np.arange"):
            argument = self.value(node.args[0], env) if node.args else Unresolved("no argument")
            if name == "np.arange":
                dtype = normalized_dtype(self.keywords(node, env).get("dtype", "int32"))
                return Array((argument,), dtype) if isinstance(argument, int) else Unresolved("np.arange")
            if unresolved_in([argument]) is not None or not isinstance(argument, (list, tuple)):
                return Unresolved(f"call {name}")
            import numpy  # the shape and kind of a literal, nothing more

            array = numpy.asarray(argument)
            dtype = self.keywords(node, env).get("dtype", array.dtype.name)
            return Array(array.shape, normalized_dtype("str" if numpy.issubdtype(array.dtype, numpy.str_) else dtype))
        if name in INPUT_MAKERS or name in KERAS_TENSORS:
            keywords = self.keywords(node, env)
            shape = keywords.get("shape", self.value(node.args[0], env) if node.args else None)
            if not isinstance(shape, (tuple, list)) or unresolved_in(shape) is not None:
                return Unresolved(f"shape of {name}")
            shape = tuple(shape) if name in KERAS_TENSORS else (keywords.get("batch_size"),) + tuple(shape)
            return Array(shape, normalized_dtype(keywords.get("dtype", "float32")))
        if name.endswith("named_product"):
            return named_product([self.value(argument, env) for argument in node.args], self.keywords(node, env))
        function = self.value(node.func, env)
        if isinstance(function, LayerClass):
            kwargs = self.keywords(node, env)
            if node.args:
                names = self.signatures.get(function.name)
                if (
                    names is None
                    or len(node.args) > len(names)
                    or any(isinstance(argument, ast.Starred) for argument in node.args)
                ):
                    return Unresolved(f"positional arguments of {function.name}")
                kwargs = {**dict(zip(names, (self.value(argument, env) for argument in node.args))), **kwargs}
            return LayerCall(function.name, kwargs)
        return Unresolved(f"call {name}")


def plain(value) -> bool:
    """A known value made of literals only (no array, layer or unknown inside)."""
    if isinstance(value, (Unresolved, Array, LayerCall, LayerClass)):
        return False
    children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return all(plain(child) for child in children)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dtype_name(name: str) -> bool:
    return name.rstrip("_") in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


def named_product(args: list, kwargs: dict):
    """Keras's `named_product`: the product of lists of dicts and of keyword value lists, each
    combination named after its parts."""
    if unresolved_in([args, kwargs]) is not None:
        return Unresolved("named_product of non-literals")
    choices = [list(group) for group in args] + [
        [{"testcase_name": f"{key}_{value}", key: value} for value in values] for key, values in kwargs.items()
    ]
    cases = []
    for combination in itertools.product(*choices):
        case = {}
        for part in combination:
            case.update({key: value for key, value in part.items() if key != "testcase_name"})
        case["testcase_name"] = "_".join(str(part.get("testcase_name", "")) for part in combination)
        cases.append(case)
    return cases


@dataclass
class Harvest:
    layers_dir: Path
    evaluator: Evaluator
    cases: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    # -- test methods and their parameters ---------------------------------------------------
    def file(self, path: Path) -> None:
        tree = ast.parse(path.read_text())
        env = {}
        self.evaluator.layer_modules = set(LAYER_MODULES)
        for statement in tree.body:
            if isinstance(statement, ast.ImportFrom) and (statement.module or "").startswith("keras.src.layers"):
                for alias in statement.names:  # a layer class, or a module of them (`relu.ReLU`)
                    if alias.name in self.evaluator.signatures:
                        env[alias.asname or alias.name] = LayerClass(alias.name)
                    else:
                        self.evaluator.layer_modules.add(alias.asname or alias.name)
            if isinstance(statement, ast.Assign):
                value = self.evaluator.value(statement.value, env)
                for target in statement.targets:
                    if isinstance(target, ast.Name):
                        env[target.id] = value
        relative = path.relative_to(self.layers_dir).as_posix()
        test_classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
        methods = Counter(
            method.name
            for test_class in test_classes
            for method in test_class.body
            if isinstance(method, ast.FunctionDef)
        )
        for test_class in test_classes:
            for method in test_class.body:
                if isinstance(method, ast.FunctionDef) and method.name.startswith("test"):
                    # the class is part of the id only where two classes of the file share a method name
                    prefix = f"{test_class.name}." if methods[method.name] > 1 else ""
                    self.method(method, env, f"{relative}::{prefix}{method.name}")

    def method(self, method: ast.FunctionDef, module_env: dict, test_name: str) -> None:
        cases = self.parameter_cases(method, module_env)
        if isinstance(cases, Unresolved):
            self.skipped["test parameters not literal"] += 1
            return
        for case_id, bound in cases:
            test_id = test_name + (f"[{case_id}]" if case_id is not None else "")
            emitted = []
            self.statements(method.body, {**module_env, **bound}, emitted)
            for number, (case, line) in enumerate(emitted):
                case_name = test_id + (f"#{number}" if len(emitted) > 1 else "")
                self.cases.append({"id": case_name, **case, "source": f"{test_name.split('::')[0]}:{line}"})

    def parameter_cases(self, method: ast.FunctionDef, env: dict):
        """[(case id or None, {parameter: value})] for each case of the method's decorator."""
        decorator = next(
            (
                d
                for d in method.decorator_list
                if isinstance(d, ast.Call)
                and ast.unparse(d.func)
                in ("parameterized.parameters", "parameterized.named_parameters", "parameterized.product")
            ),
            None,
        )
        parameters = [arg.arg for arg in method.args.args[1:]]
        defaults = dict(
            zip(
                parameters[len(parameters) - len(method.args.defaults) :],
                (self.evaluator.value(d, env) for d in method.args.defaults),
            )
        )
        if decorator is None:
            return [(None, defaults)]
        parameterization = ast.unparse(decorator.func).split(".")[1]  # absl's parameters / named_parameters / product
        if parameterization == "product":
            raw = named_product(
                [self.evaluator.value(a, env) for a in decorator.args], self.evaluator.keywords(decorator, env)
            )
            if isinstance(raw, Unresolved):
                return raw
            raw = [{key: value for key, value in case.items() if key != "testcase_name"} for case in raw]
        else:
            raw = [self.evaluator.value(argument, env) for argument in decorator.args]
            if len(raw) == 1 and isinstance(raw[0], list):  # absl: one list argument holds the cases
                raw = raw[0]
            if isinstance(raw, Unresolved) or any(isinstance(case, Unresolved) for case in raw):
                return Unresolved("parameters")
        result = []
        for index, case in enumerate(raw):
            name = str(index)
            if parameterization == "named_parameters":
                if isinstance(case, dict):
                    name, case = str(case.get("testcase_name")), {k: v for k, v in case.items() if k != "testcase_name"}
                elif isinstance(case, (tuple, list)) and case:
                    name, case = str(case[0]), tuple(case[1:])
                else:
                    return Unresolved("named case")
            if isinstance(case, dict):
                bound = {key: value for key, value in case.items() if key in parameters}
                extra = {key: value for key, value in case.items() if key not in parameters}
                if method.args.kwarg is not None:
                    bound[method.args.kwarg.arg] = extra
            else:
                bound = dict(zip(parameters, case if isinstance(case, (tuple, list)) else (case,)))
            result.append((name, {**defaults, **bound}))
        return result

    # -- statements of one test case -------------------------------------------------------
    def statements(self, body: list, env: dict, emitted: list) -> None:
        for statement in body:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                env[statement.name] = Unresolved("local definition")
                continue
            if isinstance(statement, ast.With):
                if any(
                    ast.unparse(
                        item.context_expr.func if isinstance(item.context_expr, ast.Call) else item.context_expr
                    ).split(".")[-1]
                    in ASSERT_RAISES
                    for item in statement.items
                ):
                    self.skipped["inside assertRaises"] += sum(
                        isinstance(node, ast.Call) for node in ast.walk(statement) if self.is_layer_use(node, env)
                    )
                    continue
                for item in statement.items:
                    for name in _names(item.optional_vars):
                        env[name] = Unresolved("with target")
                self.statements(statement.body, env, emitted)
                continue
            if isinstance(statement, ast.For):
                values = self.evaluator.value(statement.iter, env)
                names = _names(statement.target)
                if isinstance(values, (list, tuple)) and unresolved_in(values) is None:
                    for value in values:
                        unpacked = value if len(names) > 1 and isinstance(value, (tuple, list)) else (value,)
                        self.statements(statement.body, {**env, **dict(zip(names, unpacked))}, emitted)
                else:
                    self.statements(statement.body, {**env, **{n: Unresolved("loop") for n in names}}, emitted)
                continue
            if isinstance(statement, ast.If):
                test = self.evaluator.value(statement.test, env)
                if plain(test):  # `if data_format == "channels_first":` with a known data_format
                    self.statements(statement.body if test else statement.orelse, env, emitted)
                    continue
                branches = [dict(env), dict(env)]  # unknown: both, and what they set differently is unknown
                self.statements(statement.body, branches[0], emitted)
                self.statements(statement.orelse, branches[1], emitted)
                for name in set(branches[0]) | set(branches[1]):
                    first, second = (branch.get(name, Unresolved("unset")) for branch in branches)
                    env[name] = first if first == second else Unresolved("set by a condition")
                continue
            if isinstance(statement, (ast.Try, ast.While)):
                for block in (
                    statement.body,
                    getattr(statement, "orelse", []),
                    *[handler.body for handler in getattr(statement, "handlers", [])],
                    getattr(statement, "finalbody", []),
                ):
                    self.statements(block, env, emitted)
                continue
            for node in ast.walk(statement):
                if isinstance(node, ast.Call):
                    self.use(node, env, emitted)
            if isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None:
                value = self.evaluator.value(statement.value, env)
                for target in statement.targets if isinstance(statement, ast.Assign) else [statement.target]:
                    if isinstance(target, ast.Name):
                        env[target.id] = value
                    elif (
                        isinstance(target, (ast.Tuple, ast.List))
                        and all(isinstance(t, ast.Name) for t in target.elts)
                        and isinstance(value, (tuple, list))
                        and len(value) == len(target.elts)
                    ):
                        env.update(zip(_names(target), value))  # a, b = 1, 2
                    else:
                        env.update((name, Unresolved("unpacking")) for name in _names(target))
            elif isinstance(statement, ast.AugAssign):
                for name in _names(statement.target):
                    env[name] = Unresolved("augmented assignment")

    def is_layer_use(self, node: ast.AST, env: dict) -> bool:
        return isinstance(node, ast.Call) and (
            ast.unparse(node.func).endswith("run_layer_test")
            or isinstance(self.evaluator.value(node.func, env), LayerCall)
        )

    def use(self, node: ast.Call, env: dict, emitted: list) -> None:
        """A `run_layer_test` call, or a constructed layer called on inputs: one case, or a skip."""
        value = self.evaluator.value
        if ast.unparse(node.func).endswith("run_layer_test"):
            arguments = dict(zip(("layer_cls", "init_kwargs"), node.args)) | {k.arg: k.value for k in node.keywords}
            get = {name: value(argument, env) for name, argument in arguments.items()}
            if get.get("input_sparse") or get.get("input_ragged"):
                return self.skip("sparse or ragged input")
            layer_class = get.get("layer_cls")
            if not isinstance(layer_class, LayerClass):
                return self.skip("layer class not a built-in layer")
            layer = LayerCall(layer_class.name, get.get("init_kwargs") or {})
            shape, data = get.get("input_shape"), get.get("input_data")
            if shape is None and data is None:
                return self.skip("no input")
            inputs = shape_inputs(shape, get.get("input_dtype")) if shape is not None else data_inputs(data)
            return self.emit(layer, inputs, get.get("call_kwargs") or {}, node, emitted)
        layer = value(node.func, env)
        if not isinstance(layer, LayerCall):
            return
        arrays = [(None, value(argument, env)) for argument in node.args]
        call_kwargs = {}
        for keyword in node.keywords:
            item = value(keyword.value, env)
            if keyword.arg is not None and (
                isinstance(item, Array)
                or (isinstance(item, (list, tuple)) and item and all(isinstance(x, Array) for x in item))
            ):
                arrays.append((keyword.arg, item))
            elif keyword.arg is None:
                return self.skip("call **kwargs")
            else:
                call_kwargs[keyword.arg] = item
        if len(arrays) == 1 and arrays[0][0] is None and isinstance(arrays[0][1], (list, tuple)):
            inputs = ("list", [(None, item) for item in arrays[0][1]])
        else:
            inputs = ("args", arrays)
        if not inputs[1] or not all(isinstance(item, Array) for _, item in inputs[1]):
            return self.skip("input not a literal-shaped array")
        self.emit(layer, inputs, call_kwargs, node, emitted)

    def emit(self, layer: LayerCall, inputs, call_kwargs, node: ast.Call, emitted: list) -> None:
        if isinstance(inputs, Unresolved) or not inputs[1] or not all(isinstance(a, Array) for _, a in inputs[1]):
            return self.skip("input not literal")
        style, arrays = inputs
        problem = (
            unresolved_in([layer])
            or unresolved_in([call_kwargs])
            or unresolved_in([array.shape for _, array in arrays])
            or unresolved_in([array.dtype for _, array in arrays])
        )
        if problem is not None:
            return self.skip(f"not literal: {problem.reason.split(' ')[0]}")
        if not all(len(array.shape) >= 1 for _, array in arrays):
            return self.skip("input without a batch axis")
        try:
            case = {
                "class_name": layer.name,
                "init_kwargs": jsonable(layer.init_kwargs),
                "input_shapes": [list(array.shape) for _, array in arrays],
                "input_dtypes": [array.dtype for _, array in arrays],
                "input_style": style,
                "input_names": [name for name, _ in arrays],
                "call_kwargs": jsonable(call_kwargs),
            }
        except TypeError:
            return self.skip("value JSON cannot hold")
        emitted.append((case, node.lineno))

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1


def shape_inputs(shape, dtype):
    """run_layer_test's input_shape: one shape, a tuple/list of shapes, or a dict of `*_shape`."""
    if unresolved_in([shape, dtype]) is not None:
        return Unresolved("input_shape")
    if isinstance(shape, dict):
        dtypes = dtype if isinstance(dtype, dict) else {key: dtype or "float32" for key in shape}
        return "args", [
            (key.removesuffix("_shape"), Array(tuple(value), normalized_dtype(dtypes.get(key))))
            for key, value in shape.items()
        ]
    if isinstance(shape, (tuple, list)) and shape and all(isinstance(item, (tuple, list)) for item in shape):
        dtypes = dtype if isinstance(dtype, (tuple, list)) else [dtype or "float32"] * len(shape)
        return "list", [(None, Array(tuple(item), normalized_dtype(dt))) for item, dt in zip(shape, dtypes)]
    if isinstance(shape, (tuple, list)) and unresolved_in(shape) is None:
        return "args", [(None, Array(tuple(shape), normalized_dtype(dtype or "float32")))]
    return Unresolved("input_shape")


def data_inputs(data):
    if isinstance(data, Array):
        return "args", [(None, data)]
    if isinstance(data, dict) and all(isinstance(v, Array) for v in data.values()):
        return "args", list(data.items())
    if isinstance(data, (tuple, list)) and data and all(isinstance(v, Array) for v in data):
        return "list", [(None, item) for item in data]
    return Unresolved("input_data")


def jsonable(value):
    if isinstance(value, LayerCall):
        return {"__layer__": value.name, "init_kwargs": jsonable(value.init_kwargs)}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("non-string key")
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(type(value).__name__)


def _names(target) -> list[str]:
    if target is None:
        return []
    return [node.id for node in ast.walk(target) if isinstance(node, ast.Name)]


def dedup_key(case: dict) -> str:
    return json.dumps(
        [
            case["class_name"],
            case["init_kwargs"],
            [shape[1:] for shape in case["input_shapes"]],
            case["input_dtypes"],
            case["input_style"],
            case["input_names"],
            case["call_kwargs"],
        ],
        sort_keys=True,
    )


def keras_layers_dir() -> Path:
    spec = importlib.util.find_spec("keras")  # finds the package without importing it
    return Path(next(iter(spec.submodule_search_locations))) / "src/layers"


def harvest(layers_dir: Path | None = None) -> dict:
    layers_dir = layers_dir or keras_layers_dir()
    files = sorted(layers_dir.rglob("*_test.py"))
    state = Harvest(layers_dir, Evaluator(layer_init_signatures(layers_dir)))
    for path in files:
        state.file(path)
    seen, cases = set(), []
    for case in state.cases:
        key = dedup_key(case)
        if key not in seen:
            seen.add(key)
            parts = case["source"].split("/")
            cases.append(
                {
                    "id": case["id"],
                    "class_name": case["class_name"],
                    "group": parts[0] if len(parts) > 1 else "base",
                    **{k: v for k, v in case.items() if k not in ("id", "class_name")},
                }
            )
    return {
        "keras_version": importlib.metadata.version("keras"),
        "files": len(files),
        "harvested_calls": len(state.cases),
        "duplicates_removed": len(state.cases) - len(cases),
        "skipped": dict(sorted(state.skipped.items(), key=lambda item: (-item[1], item[0]))),
        "cases": cases,
    }


def write(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data = harvest()
    write(data, args.out)
    groups = Counter(case["group"] for case in data["cases"])
    print(
        f"Keras {data['keras_version']}: {data['files']} test files, {data['harvested_calls']} configurations, "
        f"{len(data['cases'])} cases after removing {data['duplicates_removed']} duplicates -> {args.out}"
    )
    for group, count in sorted(groups.items()):
        print(f"  {group:16s} {count:4d}")
    print(f"skipped {sum(data['skipped'].values())}:")
    for reason, count in data["skipped"].items():
        print(f"  {count:4d}  {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
