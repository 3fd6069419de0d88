"""Training state through the exchange: a Keras run's optimizer, loss and regularizers, to continue it.

A `.keras` file that was compiled and trained holds, beside the weights, its compile config
(`config.json`: optimizer, loss) and the optimizer's variables (`model.weights.h5`,
`optimizer/vars/0, 1, …`): the iteration count, the learning rate (a variable unless it is a
schedule), then the slots, each of its variable's shape, in the order of the model's trainable
variables. Keras 3.15 stores them as `add_optimizer_variables` made them: one call's slot names
interleaved per variable (Adam: momentum, velocity of the first variable, then of the second, …),
successive calls one after the other (RMSprop: every velocity, then every momentum); an
optimizer's own scalar variables come last (Nadam's `u_product`, the running product of its
momentum schedule).

A slot goes through its variable's port, so it is in the torch layout of its parameter (a Dense
kernel's moments transposed like the kernel); the exchange file keeps it under
`optimizer/<parameter key>/<slot name>`, the optimizer's checked config, iteration and scalars
(float32 values, exact in JSON) in the `optimizer` metadata, the loss and the regularization
factors in `training`. `exchange.optimizers` continues the run in torch with Keras's update
rules; `keras_model_with_training` writes a torch run's state back into a compiled Keras model
that resumes from it.

Conventions that differ:
- Which variables train: Keras's trainable variables are the torch module's parameters whose port
  leads to a Keras variable (BatchNorm's moving statistics are buffers in torch, non-trainable in
  Keras); a torch-only parameter (the zero bias of a BatchNorm with `center=False`) has no slots
  and is not trained, as in Keras.
- Regularizers are options of Keras layers that compute nothing at inference (the architecture
  leaves them out); training needs them, so they are read here from the layer configs.

- One Keras variable, two torch parameters (an LSTM's bias is `bias_ih` + `bias_hh`): the first
  trains as Keras's variable, with its slots; the second keeps its value (zeros from Keras) and is
  left out of the optimizer, so the sum moves as Keras's bias does.
- An Embedding's gradient: Keras 3 on TensorFlow updates the slots lookup by lookup
  (`exchange.optimizers.per_lookup`), tf-keras (Keras 2) after summing a token's lookups; the
  state records which (`summed_lookups`), and `torch_optimizer` makes torch's gradient sparse or not.

Refused, each in one line naming what and why: optimizers and options without a Keras-exact torch
rule here (EMA, gradient clipping, gradient accumulation, loss scaling, AMSGrad, Lion, …),
frozen layers, activity regularizers, files whose slots do not match the model's trainable
variables in number or shape, a ReversibleEmbedding or LoRA Embedding under any optimizer but SGD
(its torch module's gradient is dense), Keras 2's legacy optimizers and its Nadam (whose
`u_product` it does not save). A file compiled but saved before its first step stores no
slots: it is read as the fresh state Keras resumes from (`_fresh_state`).
Generated code's training functions
(`exchange.training_code`) also need a loss of `LOSS_OPTIONS` with Keras's reduction, one
output, and no renormalising BatchNormalization (`check_trainable_in_code`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import h5py
import numpy as np

from exchange import fileformat, filekinds, keras_files, untrusted
from exchange.errors import ExchangeError, ExchangeFileError, UnsupportedLayerError
from exchange.graph import Graph
from exchange.kinds import kind_of
from exchange.kinds.axis_order import torch_axis
from exchange.ports import KerasOnly, Packed, Summed, TorchOnly, torch_keys

OPTIMIZER_METADATA = "optimizer"
TRAINING_METADATA = "training"
SLOT_KEY = re.compile(r"optimizer/([A-Za-z0-9_.]+)/([a-z_]+)")
MAX_ITERATIONS = 1 << 53  # an int64 step count past float64's integers is not a real run
MAX_SCHEDULE_BOUNDARIES = 1 << 12

# Options every Keras optimizer has, with the only values reproduced here (None or False: the option must
# be unset, None or False; a rule name: a value that rule checks).
COMMON_OPTIONS: dict[str, str | Literal[False] | None] = {
    "name": "text",
    "learning_rate": "rate",
    "weight_decay": "number or none",
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": "number",
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}
WHY_NOT = {
    "clipnorm": "gradient clipping",
    "global_clipnorm": "gradient clipping",
    "clipvalue": "gradient clipping",
    "use_ema": "an exponential moving average of the weights",
    "ema_overwrite_frequency": "EMA",
    "loss_scale_factor": "loss scaling",
    "gradient_accumulation_steps": "gradient accumulation",
    "amsgrad": "AMSGrad",
}
# Per class: its own options.
CLASS_OPTIONS: dict[str, dict[str, str | Literal[False] | None]] = {
    "Adam": {"beta_1": "number", "beta_2": "number", "epsilon": "number", "amsgrad": False},
    "AdamW": {"beta_1": "number", "beta_2": "number", "epsilon": "number", "amsgrad": False},
    "SGD": {"momentum": "number", "nesterov": "flag"},
    "RMSprop": {"rho": "number", "momentum": "number", "epsilon": "number", "centered": "flag"},
    "Adagrad": {"initial_accumulator_value": "number", "epsilon": "number"},
    "Adamax": {"beta_1": "number", "beta_2": "number", "epsilon": "number"},
    "Nadam": {"beta_1": "number", "beta_2": "number", "epsilon": "number"},
}
SCHEDULE_OPTIONS = {
    "ExponentialDecay": {
        "initial_learning_rate": "number",
        "decay_steps": "steps",
        "decay_rate": "number",
        "staircase": "flag",
    },
    "InverseTimeDecay": {
        "initial_learning_rate": "number",
        "decay_steps": "steps",
        "decay_rate": "number",
        "staircase": "flag",
    },
    "PiecewiseConstantDecay": {"boundaries": "list", "values": "list"},
    "PolynomialDecay": {
        "initial_learning_rate": "number",
        "decay_steps": "steps",
        "end_learning_rate": "number",
        "power": "number",
        "cycle": "flag",
    },
    "CosineDecay": {
        "initial_learning_rate": "number",
        "decay_steps": "steps",
        "alpha": "number",
        "warmup_target": "number or none",
        "warmup_steps": "count",
    },
}
REGULARIZERS = {"L1": ("l1",), "L2": ("l2",), "L1L2": ("l1", "l2")}


# Per class: its slot groups (names interleaved per variable within a group) in the order Keras
# 3.15's `build` creates them, given the optimizer's options (see the module docstring).
SLOT_GROUPS: dict[str, Callable[[dict], list]] = {  # each a list of tuple[str, ...]
    "Adam": lambda options: [("momentum", "velocity")],
    "AdamW": lambda options: [("momentum", "velocity")],
    "SGD": lambda options: [("momentum",)] if options["momentum"] != 0 else [],
    "RMSprop": lambda options: (
        [("velocity",)]
        + ([("momentum",)] if options["momentum"] > 0 else [])
        + ([("average_gradient",)] if options["centered"] else [])
    ),
    "Adagrad": lambda options: [("accumulator",)],
    "Adamax": lambda options: [("momentum", "norm")],
    "Nadam": lambda options: [("momentum", "velocity")],
}
# Per class: the scalar variables Keras 3.15's `build` creates after the slots, with their
# initial values (a fresh optimizer's), in that order.
SCALAR_VARIABLES = {"Nadam": {"u_product": 1.0}}
# Classes whose step is linear in the gradient: an Embedding's gradient rows (one per lookup,
# see `exchange.optimizers.per_lookup`) may be summed first, whatever layer looks them up.
LINEAR_IN_GRADIENT = {"SGD"}
# Options a class needs although every optimizer has them (AdamW's decay is what makes it AdamW).
REQUIRED_COMMON_OPTIONS = {"AdamW": ("weight_decay",)}
# Per schedule: a rule its options together must keep, and what it says when they do not.
SCHEDULE_RULES = {
    "PiecewiseConstantDecay": (
        lambda options: len(options["values"]) == len(options["boundaries"]) + 1,
        "needs one value more than boundaries",
    ),
}


def slot_groups(class_name: str, options: dict) -> list[tuple[str, ...]]:
    """The optimizer's slot names as Keras 3.15's `build` creates them (`SLOT_GROUPS`)."""
    return SLOT_GROUPS[class_name](options)


@dataclass(frozen=True)
class OptimizerSpec:
    """A Keras optimizer reproduced by `exchange.optimizers`: its class and the options its torch
    counterpart takes (`learning_rate` a number or a schedule's `{"class_name", "config"}`)."""

    class_name: str
    options: dict

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(name for group in slot_groups(self.class_name, self.options) for name in group)

    @property
    def initial_scalars(self) -> dict[str, float]:
        return dict(SCALAR_VARIABLES.get(self.class_name, {}))

    @property
    def learning_rate_is_variable(self) -> bool:
        return not isinstance(self.options["learning_rate"], dict)

    def to_json(self) -> dict:
        return {"class_name": self.class_name, "config": self.options}


@dataclass(frozen=True)
class TrainingState:
    """What a run needs to continue: the optimizer, its step count and slots (torch layout, by
    parameter key then slot name), the loss as Keras's compile config names it, the
    regularization factors by parameter key (`{"l1": a, "l2": b}`), the optimizer's scalar
    variables (`SCALAR_VARIABLES`; empty: their initial values), and whether the run sums a
    token's Embedding lookups before the update (Keras 2) or takes them one by one (Keras 3,
    `exchange.optimizers.per_lookup`)."""

    optimizer: OptimizerSpec
    iteration: int
    slots: dict[str, dict[str, np.ndarray]]
    loss: object = None
    regularizers: dict[str, dict[str, float]] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    summed_lookups: bool = False

    def file_parts(self) -> tuple[dict[str, str], dict[str, np.ndarray]]:
        """(metadata, tensors) for `fileformat.save(..., training=...)`."""
        described = {**self.optimizer.to_json(), "iteration": self.iteration}
        if self.optimizer.initial_scalars:
            described["scalars"] = {**self.optimizer.initial_scalars, **self.scalars}
        if self.summed_lookups:
            described["lookups"] = "summed"
        metadata = {
            OPTIMIZER_METADATA: json.dumps(described),
            TRAINING_METADATA: json.dumps({"loss": self.loss, "regularizers": self.regularizers}),
        }
        tensors = {
            f"optimizer/{key}/{slot}": value for key, slots in self.slots.items() for slot, value in slots.items()
        }
        return metadata, tensors


# ---------------------------------------------------------------------------------------------
# Checking configs from files


def check_optimizer(description, where: str) -> OptimizerSpec:
    """A Keras optimizer config (`{"class_name": "Adam", "config": {...}}`) from a file, checked
    option by option; anything not reproduced exactly is refused in one line."""
    if not isinstance(description, dict) or not isinstance(description.get("config"), dict):
        raise ExchangeFileError(f"{where}: the optimizer config is not an object with a config")
    class_name = description.get("class_name")
    if class_name not in CLASS_OPTIONS:
        raise UnsupportedLayerError(
            f"{where}: optimizer {str(class_name)[:60]!r} is not supported for training "
            f"state (supported: {', '.join(CLASS_OPTIONS)})"
        )
    known = {**COMMON_OPTIONS, **CLASS_OPTIONS[class_name]}
    config = description["config"]
    options = {}
    for key, value in config.items():
        if key not in known:
            raise UnsupportedLayerError(f"{where}: optimizer {class_name} option {str(key)[:60]!r} is not supported")
        rule = known[key]
        if rule is None or rule is False:
            if value not in (None, False):
                raise UnsupportedLayerError(
                    f"{where}: optimizer {class_name} {key}={str(value)[:40]}: "
                    f"{WHY_NOT[key]} is not reproduced in torch"
                )
            continue
        if key in ("name", "ema_momentum"):
            continue
        options[key] = (
            _schedule_or_number(value, f"{where}: optimizer {class_name} learning_rate")
            if rule == "rate"
            else _value(value, rule, f"{where}: optimizer {class_name} {key}")
        )
    missing = sorted(
        key
        for key, rule in known.items()
        if rule not in (None, False) and key not in config and key not in ("name", "ema_momentum", "weight_decay")
    )
    if missing:
        raise ExchangeFileError(f"{where}: optimizer {class_name} config lacks {', '.join(missing)}")
    for key in REQUIRED_COMMON_OPTIONS.get(class_name, ()):
        if options.get(key) is None:
            raise ExchangeFileError(f"{where}: optimizer {class_name} config lacks {key}")
    options.setdefault("weight_decay", None)
    return OptimizerSpec(class_name, options)


def check_lookups(graph: Graph, spec: OptimizerSpec, where: str) -> None:
    """Refuse the layers whose Keras gradient is one row per lookup (`tf.IndexedSlices`) but whose
    torch module gives a dense one, under an optimizer that squares the rows one by one: only
    a plain Embedding (`nn.Embedding`, made sparse by `torch_sparse_lookups`) is reproduced."""
    if spec.class_name in LINEAR_IN_GRADIENT:
        return
    for node in graph.layers:
        if kind_of(node.kind).dense_lookup_gradient(node.config):
            raise UnsupportedLayerError(
                f"{where}: layer {node.name!r} ({node.kind}, LoRA or reversible) is not supported for training "
                f"with {spec.class_name}: Keras applies it to each lookup's gradient row, not reproduced for this layer"
            )


def _schedule_or_number(value, where: str):
    if not isinstance(value, dict):
        return _value(value, "number", where)
    class_name = value.get("class_name")
    config = value.get("config")
    if class_name not in SCHEDULE_OPTIONS or not isinstance(config, dict):
        raise UnsupportedLayerError(
            f"{where}: schedule {str(class_name)[:60]!r} is not supported (supported: {', '.join(SCHEDULE_OPTIONS)})"
        )
    known = SCHEDULE_OPTIONS[class_name]
    options = {}
    for key, item in config.items():
        if key == "name":
            continue
        if key not in known:
            raise UnsupportedLayerError(f"{where}: {class_name} option {str(key)[:60]!r} is not supported")
        options[key] = _value(item, known[key], f"{where}: {class_name} {key}")
    missing = sorted(set(known) - set(options))
    if missing:
        raise ExchangeFileError(f"{where}: {class_name} config lacks {', '.join(missing)}")
    rule, broken = SCHEDULE_RULES.get(class_name, (None, ""))
    if rule is not None and not rule(options):
        raise ExchangeFileError(f"{where}: {class_name} {broken}")
    return {"class_name": class_name, "config": options}


def _value(value, rule: str, where: str):
    if rule == "flag":
        if not isinstance(value, bool):
            raise ExchangeFileError(f"{where} must be true or false, found {str(value)[:40]}")
        return value
    if rule == "number or none" and value is None:
        return None
    if rule == "list":
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_SCHEDULE_BOUNDARIES:
            raise ExchangeFileError(f"{where} must be a list of 1 to {MAX_SCHEDULE_BOUNDARIES} numbers")
        return [_value(item, "number", where) for item in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ExchangeFileError(f"{where} must be a number, found {str(value)[:40]}")
    if rule in ("steps", "count"):
        if value != int(value) or not (1 if rule == "steps" else 0) <= value <= MAX_ITERATIONS:
            raise ExchangeFileError(f"{where} must be a whole number of steps, found {str(value)[:40]}")
        return int(value)
    return float(value)


def check_loss(loss, where: str):
    """The compile config's loss, kept as Keras names it (a name, or a serialized loss object)."""
    if loss is None or (isinstance(loss, str) and len(loss) <= 200):
        return loss
    if isinstance(loss, dict) and isinstance(loss.get("class_name"), str) and len(json.dumps(loss)) <= 4096:
        return loss
    raise UnsupportedLayerError(
        f"{where}: the compile config's loss is not a single named loss (several outputs' losses are not supported)"
    )


# The losses reproduced in torch (`exchange.optimizers`, generated code): Keras's names for each,
# and each one's options with their rules and Keras's defaults (beside `name`, and `dtype`,
# `reduction` and `ignore_class` at Keras's defaults).
LOSS_OPTIONS: dict[str, dict[str, bool | float]] = {
    "categorical_crossentropy": {"from_logits": False, "label_smoothing": 0.0, "axis": -1},
    "sparse_categorical_crossentropy": {"from_logits": False, "axis": -1},
    "binary_crossentropy": {"from_logits": False, "label_smoothing": 0.0, "axis": -1},
    "mean_squared_error": {},
    "mean_absolute_error": {},
}
LOSS_ALIASES = {
    "CategoricalCrossentropy": "categorical_crossentropy",
    "SparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
    "BinaryCrossentropy": "binary_crossentropy",
    "MeanSquaredError": "mean_squared_error",
    "mse": "mean_squared_error",
    "MeanAbsoluteError": "mean_absolute_error",
    "mae": "mean_absolute_error",
}
LOSS_DEFAULTS = {"dtype": (None, "float32"), "reduction": ("sum_over_batch_size",), "ignore_class": (None,)}


def make_loss(description, from_logits: bool | None = None):
    """Keras's compiled loss (a name, or `{"class_name", "config"}`, checked by `loss_call`) as
    `loss(y_pred, y_true)` in torch (`exchange.optimizers.LOSSES`): the per-sample losses averaged
    over the batch (`sum_over_batch_size`, Keras's default). Keras takes a softmax or sigmoid
    output's cross-entropy from its logits: `from_logits=True` makes a cross-entropy take those.
    Its `axis` is Keras's, for arrays in Keras's layout; `torch_loss` gives the loss of the torch
    module's channels-first output (`torch_loss_call`)."""
    from exchange import optimizers

    name, options = loss_call(description, "loss")
    if from_logits is not None and "from_logits" in options:
        options["from_logits"] = from_logits
    function = cast("Callable[..., Any]", optimizers.LOSSES[name])  # LOSSES' functions differ in options
    return lambda y_pred, y_true: function(y_pred, y_true, **options).mean()


def loss_call(loss, where: str) -> tuple[str, dict]:
    """(function name, every option explicit) of a checked compile config's loss, as
    `exchange.optimizers` names its functions; a loss or option not reproduced is refused."""
    name: object  # a class_name from a file: checked below
    if isinstance(loss, str):
        name, config = loss, {}
    elif isinstance(loss, dict) and isinstance(loss.get("config"), dict):
        name, config = loss.get("class_name"), loss["config"]
    else:
        raise UnsupportedLayerError(f"{where}: the compile config has no loss to train with")
    function = LOSS_ALIASES.get(name, name) if isinstance(name, str) else None
    if function not in LOSS_OPTIONS:
        raise UnsupportedLayerError(
            f"{where}: loss {str(name)[:60]!r} is not supported for training (supported: {', '.join(LOSS_OPTIONS)})"
        )
    options = dict(LOSS_OPTIONS[function])
    for key, value in config.items():
        if key == "name":
            continue
        if key in LOSS_DEFAULTS:
            if value not in LOSS_DEFAULTS[key] or isinstance(value, bool):
                raise UnsupportedLayerError(
                    f"{where}: loss {function} {key}={str(value)[:40]!r} is not supported "
                    f"(only {LOSS_DEFAULTS[key][0]!r} is reproduced)"
                )
            continue
        if key not in options:
            raise UnsupportedLayerError(f"{where}: loss {function} option {str(key)[:60]!r} is not supported")
        label = f"{where}: loss {function} {key}"
        if key == "from_logits":
            options[key] = _value(value, "flag", label)
        elif key == "axis":
            if type(value) is not int or not -64 <= value <= 64:
                raise ExchangeFileError(f"{label} must be an axis, found {str(value)[:40]}")
            options[key] = value
        else:
            options[key] = _value(value, "number", label)
            if not 0.0 <= options[key] <= 1.0:
                raise ExchangeFileError(f"{label} must be between 0 and 1, found {options[key]}")
    return function, options


# ---------------------------------------------------------------------------------------------
# Which torch parameters Keras trains, in Keras's order


def trainable_variables(graph: Graph, parameter_keys: set[str]) -> list[tuple]:
    """(node, Keras variable name, Keras shape, port) of each variable Keras trains, in the order
    of `model.trainable_variables` (layers in the model's order, each in its variable order):
    the Keras variables whose ports lead to torch parameters (`parameter_keys`)."""
    found = []
    for node in graph.layers:
        prefix = graph.torch_names[node.name]
        keras_shapes = dict(graph.keras_variables(node))
        claimed = {}
        for port in graph.ports(node):
            if isinstance(port, (TorchOnly, KerasOnly)):
                continue
            keys = [f"{prefix}.{suffix}" for suffix in port.torch_shapes(keras_shapes)]
            if not any(key in parameter_keys for key in keys):
                continue
            for name in port.keras_names:
                claimed[name] = port
        found += [
            (node, name, tuple(shape), claimed[name]) for name, shape in graph.keras_variables(node) if name in claimed
        ]
    return found


def trained_keys(graph: Graph, node, port) -> list[str]:
    """The torch parameters a port's Keras variables train: all of them, except that of a `Summed`
    port (an LSTM's `bias_ih` + `bias_hh`) only the first trains, as Keras's one variable; the
    others keep their values (zeros from Keras) and have no slots."""
    suffixes = list(port.torch_shapes(dict(graph.keras_variables(node))))
    prefix = graph.torch_names[node.name]
    return [f"{prefix}.{suffix}" for suffix in (suffixes[:1] if isinstance(port, Summed) else suffixes)]


def slots_to_torch(
    graph: Graph, variables: list[tuple], slot_names: tuple[str, ...], keras_slots: list[dict[str, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """Keras-layout slots (one dict slot -> array per trainable variable) -> torch layout by key."""
    by_port: dict[int, tuple] = {}
    for (node, name, _, port), slots in zip(variables, keras_slots):
        by_port.setdefault(id(port), (node, port, {}))[2][name] = slots
    result: dict[str, dict[str, np.ndarray]] = {}
    for node, port, per_name in by_port.values():
        prefix = graph.torch_names[node.name]
        for slot in slot_names:
            arrays = port.to_torch({name: per_name[name][slot] for name in per_name})
            for key in trained_keys(graph, node, port):
                result.setdefault(key, {})[slot] = np.ascontiguousarray(arrays[key[len(prefix) + 1 :]])
    return result


def slots_to_keras(
    graph: Graph, variables: list[tuple], slot_names: tuple[str, ...], torch_slots: dict[str, dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """The inverse of `slots_to_torch`: one dict slot -> Keras-layout array per trainable variable."""
    out = []
    for node, name, _, port in variables:
        prefix = graph.torch_names[node.name]
        keras_shapes = dict(graph.keras_variables(node))
        slots = {}
        trained = trained_keys(graph, node, port)
        for slot in slot_names:
            arrays = {
                suffix: torch_slots[f"{prefix}.{suffix}"][slot]
                if f"{prefix}.{suffix}" in trained
                else np.zeros(shape, dtype=np.float32)
                for suffix, shape in port.torch_shapes(keras_shapes).items()
            }
            slots[slot] = np.asarray(port.to_keras(arrays, keras_shapes)[name])
        out.append(slots)
    return out


# ---------------------------------------------------------------------------------------------
# Keras files


def read_keras_training(path: str | Path, graph: Graph, parameter_keys: set[str]) -> TrainingState | None:
    """The training state of a compiled `.keras` file (None when it was saved uncompiled)."""
    path = Path(path)
    with keras_files._open_zip(path) as archive:
        config = keras_files._json(keras_files._config_member(archive, path), f"{path}:config.json")
        start, size = keras_files._stored_member(path, archive, keras_files.KERAS_WEIGHTS_MEMBER)
    compile_config = config.get("compile_config")
    if not compile_config:
        return None
    if not isinstance(compile_config, dict):
        raise ExchangeFileError(f"{path}: compile_config is not an object")
    where = f"{path}"
    spec = check_optimizer(compile_config.get("optimizer"), where)
    loss = check_loss(compile_config.get("loss"), where)
    regularizers = read_regularizers(config, graph, where)
    check_lookups(graph, spec, where)
    variables = trainable_variables(graph, parameter_keys)
    source = keras_files._Hdf5Source(path, start, size, member=keras_files.KERAS_WEIGHTS_MEMBER)
    try:
        with keras_files.hdf5_errors(source.label):
            stored = _optimizer_variables(source, spec, variables)
            head = 2 if spec.learning_rate_is_variable else 1  # the step count, and the rate
            if not stored or (variables and spec.slot_names and len(stored) == head):
                return _fresh_state(config, graph, variables, spec, loss, regularizers, where)
            iteration, spec, keras_slots, scalars = _unpack(stored, spec, variables, source.label)
    finally:
        source.close()
    return TrainingState(
        spec, iteration, slots_to_torch(graph, variables, spec.slot_names, keras_slots), loss, regularizers, scalars
    )


# Slots Keras's `build` starts at another value than zeros: (class, slot) -> the option holding it.
INITIAL_SLOT_OPTIONS = {("Adagrad", "accumulator"): "initial_accumulator_value"}


def _fresh_state(config: dict, graph: Graph, variables: list, spec, loss, regularizers, where: str) -> TrainingState:
    """A compiled `.keras` saved before any training step stores no slots, only the step count
    (and the learning rate unless it is a schedule). Keras, resuming, builds its optimizer afresh
    (the stored count of variables differs from its own, so it loads none): step 0, each slot at
    its initial value (zeros; Adagrad's `initial_accumulator_value`), the rate of the config.
    Which variables Keras trains is then not checked by the count: a frozen layer is refused."""
    frozen = _frozen_layer(config.get("config"))
    if frozen is not None:
        raise UnsupportedLayerError(
            f"{where}: layer {str(frozen)[:60]!r} is frozen (trainable=false): not supported for training state"
        )
    specs = graph.tensor_specs
    slots: dict[str, dict[str, np.ndarray]] = {}
    for node, _, _, port in variables:
        for key in trained_keys(graph, node, port):
            shape, dtype = specs[key]
            slots[key] = {}
            for slot in spec.slot_names:
                option = INITIAL_SLOT_OPTIONS.get((spec.class_name, slot))
                slots[key][slot] = np.full(shape, 0.0 if option is None else spec.options[option], dtype)
    return TrainingState(spec, 0, slots, loss, regularizers, spec.initial_scalars)


def _frozen_layer(value):
    """The name of a layer config (nested models' included) with `trainable: false`, else None
    (the config's nesting is capped when read: `untrusted.MAX_JSON_DEPTH`)."""
    if isinstance(value, dict):
        if value.get("trainable") is False:
            return value.get("name", "?")
        items = list(value.values())
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        found = _frozen_layer(item)
        if found is not None:
            return found
    return None


def _stored_count(spec: OptimizerSpec, variables: list[tuple]) -> int:
    """How many `optimizer/vars` Keras 3.15 stores for `spec` over `variables` once it is built."""
    head = 2 if spec.learning_rate_is_variable else 1  # the step count, and the rate
    return head + len(spec.slot_names) * len(variables) + len(spec.initial_scalars)


def _count_refused(label: str, spec: OptimizerSpec, count: int, variables: list[tuple]) -> ExchangeFileError:
    return ExchangeFileError(
        f"{label}: optimizer {spec.class_name} stores {count} variables; the model's "
        f"{len(variables)} trainable variables need {_stored_count(spec, variables)} (frozen layers or another "
        "model's optimizer are not supported)"
    )


def _optimizer_variables(source, spec: OptimizerSpec, variables: list[tuple]) -> list:
    """`optimizer/vars` as lazy tensors, in order; more entries than `spec` stores are refused by
    their count (cheap in HDF5), before any is listed or opened."""
    group = untrusted.hdf5_get(source.h5, "optimizer/vars", source.label, source.groups)
    if not isinstance(group, h5py.Group):
        return []
    count = len(group)
    if count > _stored_count(spec, variables):
        raise _count_refused(source.label, spec, count, variables)
    if sorted(group) != sorted(str(index) for index in range(count)):
        raise ExchangeFileError(f"{source.label}: unexpected entries in optimizer/vars")
    return [source.lazy(f"optimizer/vars/{index}") for index in range(count)]


def _unpack(stored: list, spec: OptimizerSpec, variables: list[tuple], label: str):
    """(iteration, spec with the stored learning rate, per-variable slots, scalars) from
    `optimizer/vars`, every count and shape checked before any slot is read."""
    groups = slot_groups(spec.class_name, spec.options)
    head = 2 if spec.learning_rate_is_variable else 1
    if len(stored) != _stored_count(spec, variables):
        raise _count_refused(label, spec, len(stored), variables)
    if stored[0].shape != () or not np.issubdtype(stored[0].dtype, np.integer):
        raise ExchangeFileError(f"{label}: optimizer/vars/0 is not the iteration count")
    iteration = int(stored[0].load())
    if not 0 <= iteration <= MAX_ITERATIONS:
        raise ExchangeFileError(f"{label}: iteration count {iteration} is out of range")
    options = dict(spec.options)
    if spec.learning_rate_is_variable:
        if stored[1].shape != () or not np.issubdtype(stored[1].dtype, np.floating):
            raise ExchangeFileError(f"{label}: optimizer/vars/1 is not the learning rate")
        options["learning_rate"] = _value(float(stored[1].load()), "number", f"{label}: learning rate")
    keras_slots: list[dict[str, np.ndarray]] = [{} for _ in variables]
    index = head
    for group in groups:
        for position, (node, name, shape, _) in enumerate(variables):
            for slot in group:
                tensor = stored[index]
                if tuple(tensor.shape) != shape or not np.issubdtype(tensor.dtype, np.floating):
                    raise ExchangeFileError(
                        f"{label}: optimizer/vars/{index} ({slot} of {node.name}/{name}) has shape "
                        f"{tuple(tensor.shape)}, the variable {shape}"
                    )
                keras_slots[position][slot] = tensor.load()
                index += 1
    scalars = {}
    for name in spec.initial_scalars:
        if stored[index].shape != () or not np.issubdtype(stored[index].dtype, np.floating):
            raise ExchangeFileError(f"{label}: optimizer/vars/{index} is not {spec.class_name}'s {name}")
        scalars[name] = _value(float(stored[index].load()), "number", f"{label}: optimizer {name}")
        index += 1
    return iteration, OptimizerSpec(spec.class_name, options), keras_slots, scalars


def read_regularizers(config: dict, graph: Graph, where: str) -> dict[str, dict[str, float]]:
    """`{parameter key: {"l1": a, "l2": b}}` from the top-level layers' `*_regularizer` options.
    A regularizer on a variable that is not one whole torch parameter, or inside a nested model,
    or an activity regularizer, is refused."""
    layers = (config.get("config") or {}).get("layers") if isinstance(config.get("config"), dict) else None
    if not isinstance(layers, list):
        return {}
    nodes = {node.name: node for node in graph.layers}
    found = {}
    for layer in layers:
        layer_config = layer.get("config") if isinstance(layer, dict) else None
        if not isinstance(layer_config, dict):
            continue
        name = layer_config.get("name")
        if isinstance(layer_config.get("layers"), list):
            if '_regularizer": {' in json.dumps(layer_config):
                raise UnsupportedLayerError(
                    f"{where}: regularizers inside nested model {str(name)[:60]!r} are not supported for training"
                )
            continue
        for key, value in layer_config.items():
            if not key.endswith("_regularizer") or value is None:
                continue
            if key == "activity_regularizer":
                raise UnsupportedLayerError(
                    f"{where}: layer {str(name)[:60]!r} activity_regularizer is not supported "
                    "for training (it penalizes outputs, not a variable)"
                )
            if name not in nodes:
                raise UnsupportedLayerError(
                    f"{where}: layer {str(name)[:60]!r} {str(key)[:60]} is not supported for "
                    "training (the layer has no variables of its own in the architecture)"
                )
            found.update(_regularizer(graph, nodes[name], key, value, where))
    return found


def _regularizer(graph: Graph, node, option: str, value, where: str) -> dict:
    label = f"{where}: layer {node.name!r} {option}"
    if (
        not isinstance(value, dict)
        or value.get("class_name") not in REGULARIZERS
        or not isinstance(value.get("config"), dict)
    ):
        raise UnsupportedLayerError(f"{label}: only L1, L2 and L1L2 regularizers are supported")
    factors = {
        key: _value(value["config"].get(key, 0.0), "number", f"{label} {key}")
        for key in REGULARIZERS[value["class_name"]]
    }
    variable = option.removesuffix("_regularizer")
    keras_shapes = dict(graph.keras_variables(node))
    candidates = [variable, f"{variable}_kernel"] if variable in ("depthwise", "pointwise", "recurrent") else [variable]
    for port in graph.ports(node):
        if isinstance(port, (TorchOnly, KerasOnly)):
            continue  # neither is a Keras variable held by a torch parameter
        names = port.keras_names
        if any(candidate in names for candidate in candidates):
            if isinstance(port, (Packed, Summed)) or len(names) != 1 or len(port.torch_shapes(keras_shapes)) != 1:
                raise UnsupportedLayerError(f"{label}: its variable is not one whole torch parameter")
            (suffix,) = port.torch_shapes(keras_shapes)
            return {f"{graph.torch_names[node.name]}.{suffix}": factors}
    raise UnsupportedLayerError(f"{label}: no variable {variable!r} to regularize")


# ---------------------------------------------------------------------------------------------
# Keras 2 `.h5` files (tf-keras 2.11 and later: its optimizers, not the legacy ones)

# tf-keras's slot names (`Adam/m/dense/kernel:0`) -> Keras 3's. Its update rules are Keras 3's
# (rounding aside: RMSprop multiplies by `rsqrt`) except for an Embedding: tf-keras sums a
# token's lookups first (`_deduplicate_sparse_grad`), then its rules on those rows are the dense
# ones, so the state says `summed_lookups` and torch keeps its dense Embedding gradient.
KERAS2_SLOT_NAMES = {
    "Adam": {"m": "momentum", "v": "velocity"},
    "AdamW": {"m": "momentum", "v": "velocity"},
    "SGD": {"m": "momentum"},
    "RMSprop": {"velocity": "velocity", "momentum": "momentum", "average_gradient": "average_gradient"},
    "Adagrad": {"accumulator": "accumulator"},
    "Adamax": {"m": "momentum", "u": "norm"},
}
KERAS2_REFUSED = {
    "Nadam": "Keras 2's Nadam does not save its u_product (the running product of its momentum schedule)",
}
KERAS2_WEIGHT = re.compile(r"([^/]+)/([a-z_]+)/(.+):0")  # optimizer / slot / variable


def read_keras2_training(path: str | Path, graph: Graph, parameter_keys: set[str]) -> TrainingState | None:
    """The training state of a Keras 2 full-model `.h5` saved after `compile` (None without a
    `training_config`): the optimizer config from `training_config`, its variables from the
    `optimizer_weights` group (`iteration:0`, then `<optimizer>/<slot>/<variable>:0`), each
    matched by name to a trainable variable of the model and checked before any is read."""
    path = Path(path)
    source = keras_files._Hdf5Source(path)
    label = source.label
    try:
        with keras_files.hdf5_errors(label):
            raw = source.attribute(source.h5, "training_config")
            if raw is None:
                return None
            if not keras_files._keras2_version(source.attribute(source.h5, "keras_version")):
                raise UnsupportedLayerError(
                    f"{label}: a full-model .h5 saved by Keras 3: its training state is not read here "
                    "(save the model as .keras to carry it)"
                )
            training = untrusted.load_json(
                untrusted.check_path_text(raw, label, "training_config"), label, "training_config"
            )
            if not isinstance(training, dict):
                raise ExchangeFileError(f"{label}: training_config is not an object")
            spec = _keras2_optimizer(training.get("optimizer_config"), label)
            if training.get("loss_weights") is not None:
                raise UnsupportedLayerError(f"{label}: loss_weights are not supported for training state")
            loss = check_loss(_keras2_loss(training.get("loss")), label)
            model_config = keras_files._json(keras_files._model_config_text(source), label)
            regularizers = read_regularizers(model_config, graph, label)
            variables = trainable_variables(graph, parameter_keys)
            stored = _keras2_optimizer_weights(source, spec, variables, label)
            if stored is None:  # compiled, never trained
                return TrainingState(spec, 0, {}, loss, regularizers, spec.initial_scalars, summed_lookups=True)
            iteration, keras_slots = stored
    finally:
        source.close()
    slots = slots_to_torch(graph, variables, spec.slot_names, keras_slots)
    return TrainingState(spec, iteration, slots, loss, regularizers, summed_lookups=True)


def _keras2_optimizer(description, label: str) -> OptimizerSpec:
    """tf-keras's optimizer config as Keras 3's: `Custom>Adam` is Adam; `jit_compile` is how it
    runs, not what; a legacy optimizer (`is_legacy_optimizer`, or Keras 2.10 and earlier) is
    refused."""
    if not isinstance(description, dict) or not isinstance(description.get("config"), dict):
        raise ExchangeFileError(f"{label}: training_config has no optimizer config")
    class_name = str(description.get("class_name", ""))[:60].removeprefix("Custom>")
    config = dict(description["config"])
    if config.pop("is_legacy_optimizer", None) is not False:
        raise UnsupportedLayerError(
            f"{label}: optimizer {class_name!r} is a legacy Keras 2 optimizer (tf.keras before 2.11, or "
            "optimizers.legacy); its state is not read"
        )
    if class_name in KERAS2_REFUSED:
        raise UnsupportedLayerError(f"{label}: optimizer {class_name}: {KERAS2_REFUSED[class_name]}")
    if class_name not in KERAS2_SLOT_NAMES:
        raise UnsupportedLayerError(
            f"{label}: Keras 2 optimizer {class_name!r} is not supported for training state "
            f"(supported: {', '.join(KERAS2_SLOT_NAMES)})"
        )
    _value(config.pop("jit_compile", False), "flag", f"{label}: optimizer {class_name} jit_compile")
    return check_optimizer({"class_name": class_name, "config": config}, label)


def _keras2_loss(loss):
    """A Keras 2 loss config as Keras 3 writes it: `reduction="auto"` is `sum_over_batch_size` in
    `fit`, and `fn` names the function the class wraps."""
    if not isinstance(loss, dict) or not isinstance(loss.get("config"), dict):
        return loss
    config = {key: value for key, value in loss["config"].items() if key != "fn"}
    if config.get("reduction") == "auto":
        config["reduction"] = "sum_over_batch_size"
    return {"class_name": loss.get("class_name"), "config": config}


def _keras2_optimizer_weights(source, spec: OptimizerSpec, variables: list[tuple], label: str):
    """(iteration, per-variable Keras-layout slots) from `optimizer_weights`, or None when the
    optimizer was never built. Every name is matched and every shape checked before a slot is read."""
    group = untrusted.hdf5_get(source.h5, "optimizer_weights", label, source.groups)
    if not isinstance(group, h5py.Group):
        return None
    names = keras_files._weight_names(source, group)
    slot_names = KERAS2_SLOT_NAMES[spec.class_name]
    groups = slot_groups(spec.class_name, spec.options)
    wanted = {name for group_names in groups for name in group_names}
    keras2_slots = {keras3: keras2 for keras2, keras3 in slot_names.items() if keras3 in wanted}
    expected = 1 + len(keras2_slots) * len(variables)
    if len(names) != expected or names[:1] != ["iteration:0"]:
        raise ExchangeFileError(
            f"{label}: optimizer_weights holds {len(names)} variables; the model's {len(variables)} trainable "
            f"variables need iteration:0 and {expected - 1} slots (frozen layers are not supported)"
        )
    model_names = _keras2_variable_names(source, variables, label)
    known = set(model_names.values())
    by_name = {}
    for name in names[1:]:
        match = KERAS2_WEIGHT.fullmatch(name)
        if not match or match.group(2) not in keras2_slots.values() or match.group(3) not in known:
            raise ExchangeFileError(f"{label}: unexpected optimizer weight {name[:120]!r}")
        by_name[(match.group(3), match.group(2))] = name
    iteration_tensor = source.lazy("optimizer_weights/iteration:0")
    if iteration_tensor.shape != () or not np.issubdtype(iteration_tensor.dtype, np.integer):
        raise ExchangeFileError(f"{label}: optimizer_weights/iteration:0 is not the iteration count")
    lazy_slots = []
    for (node, name, shape, _), model_name in zip(variables, model_names.values()):
        per_variable = {}
        for keras3, keras2 in keras2_slots.items():
            weight = by_name.get((model_name, keras2))
            if weight is None:
                raise ExchangeFileError(f"{label}: optimizer_weights lacks the {keras2} slot of {model_name!r:.120}")
            tensor = source.lazy(f"optimizer_weights/{weight}")
            if tuple(tensor.shape) != shape or not np.issubdtype(tensor.dtype, np.floating):
                raise ExchangeFileError(
                    f"{label}: optimizer weight {weight!r:.120} has shape {tuple(tensor.shape)}, "
                    f"{node.name:.60}/{name} {shape}"
                )
            per_variable[keras3] = tensor
        lazy_slots.append(per_variable)
    iteration = int(iteration_tensor.load())
    if not 0 <= iteration <= MAX_ITERATIONS:
        raise ExchangeFileError(f"{label}: iteration count {iteration} is out of range")
    return iteration, [{slot: tensor.load() for slot, tensor in slots.items()} for slots in lazy_slots]


def _keras2_variable_names(source, variables: list[tuple], label: str) -> dict[tuple[str, str], str]:
    """(node, variable) -> its Keras 2 name without `:0` (`hidden/kernel`), from the layer's group
    in `model_weights`, in the order of `variables`; a variable not found there is refused."""
    found = {}
    for node, name, _, _ in variables:
        group = untrusted.hdf5_get(source.h5, f"model_weights/{node.name}", label, source.groups)
        candidates = []
        if isinstance(group, h5py.Group):
            candidates = [
                weight.removesuffix(":0")
                for weight in keras_files._weight_names(source, group)
                if re.sub(r":\d+$", "", weight.split("/")[-1]) == name
            ]
        if len(candidates) != 1:
            raise UnsupportedLayerError(
                f"{label}: no one Keras 2 weight for {node.name:.60}/{name} in model_weights "
                "(nested models and renamed weights are not supported for training state)"
            )
        found[(node.name, name)] = candidates[0]
    return found


# ---------------------------------------------------------------------------------------------
# Exchange files


def read_exchange_training(exchange_file: fileformat.ExchangeFile, parameter_keys: set[str]) -> TrainingState | None:
    """The training state of a loaded exchange file (None when it holds none), checked: the
    config as from a Keras file, and one slot of each name for each trained parameter, of its shape."""
    metadata = exchange_file.metadata
    if OPTIMIZER_METADATA not in metadata:
        if exchange_file.training_tensors:
            raise ExchangeFileError("the exchange file holds optimizer slots but no optimizer metadata")
        return None
    description: Any = untrusted.load_json(metadata[OPTIMIZER_METADATA], "exchange file", "optimizer metadata")
    spec = check_optimizer(description, "exchange file")  # refuses anything but an object
    iteration = description.get("iteration")
    if type(iteration) is not int or not 0 <= iteration <= MAX_ITERATIONS:
        raise ExchangeFileError(f"exchange file: optimizer iteration must be a step count, found {str(iteration)[:40]}")
    scalars = description.get("scalars", {})
    if not isinstance(scalars, dict) or sorted(scalars) != sorted(spec.initial_scalars):
        raise ExchangeFileError(
            f"exchange file: optimizer {spec.class_name} scalars must be exactly "
            f"{sorted(spec.initial_scalars)}, found {str(scalars)[:80]}"
        )
    scalars = {
        name: _value(value, "number", f"exchange file: optimizer {spec.class_name} {name}")
        for name, value in scalars.items()
    }
    lookups = description.get("lookups", "one by one")
    if lookups not in ("summed", "one by one"):
        raise ExchangeFileError(
            f"exchange file: optimizer lookups must be 'summed' if given, found {str(lookups)[:40]}"
        )
    extra = untrusted.load_json(metadata.get(TRAINING_METADATA, "{}"), "exchange file", "training metadata")
    if not isinstance(extra, dict):
        raise ExchangeFileError("exchange file: training metadata is not an object")
    loss = check_loss(extra.get("loss"), "exchange file")
    regularizers = _check_regularizers(extra.get("regularizers") or {}, parameter_keys)
    if lookups != "summed":  # a Keras 2 run sums a token's lookups: any module's dense gradient does
        check_lookups(exchange_file.architecture, spec, "exchange file")
    graph = exchange_file.architecture
    trained = sorted(
        {
            key
            for node, _, _, port in trainable_variables(graph, parameter_keys)
            for key in trained_keys(graph, node, port)
        }
    )
    specs = graph.tensor_specs
    slots: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in exchange_file.training_tensors.items():
        match = SLOT_KEY.fullmatch(key)
        if not match or match.group(1) not in trained or match.group(2) not in spec.slot_names:
            raise ExchangeFileError(f"exchange file: unexpected optimizer tensor {key[:120]!r}")
        if tuple(tensor.shape) != tuple(specs[match.group(1)][0]):
            raise ExchangeFileError(
                f"exchange file: optimizer tensor {key} has shape {tuple(tensor.shape)}, "
                f"its parameter {tuple(specs[match.group(1)][0])}"
            )
        slots.setdefault(match.group(1), {})[match.group(2)] = tensor
    if slots and (sorted(slots) != trained or any(len(found) != len(spec.slot_names) for found in slots.values())):
        raise ExchangeFileError(
            f"exchange file: optimizer slots are missing (each of {trained[:3]}… needs {', '.join(spec.slot_names)})"
        )
    return TrainingState(spec, iteration, slots, loss, regularizers, scalars, lookups == "summed")


def _check_regularizers(regularizers, parameter_keys: set[str]) -> dict:
    if not isinstance(regularizers, dict):
        raise ExchangeFileError("exchange file: regularizers must be an object")
    checked = {}
    for key, factors in regularizers.items():
        if key not in parameter_keys or not isinstance(factors, dict) or not set(factors) <= {"l1", "l2"}:
            raise ExchangeFileError(f"exchange file: unexpected regularizer for {str(key)[:80]!r}")
        checked[key] = {
            name: _value(value, "number", f"exchange file: regularizer {key} {name}") for name, value in factors.items()
        }
    return checked


# ---------------------------------------------------------------------------------------------
# Torch (imported when used)


def parameter_keys_of(graph: Graph) -> set[str]:
    """The state_dict keys that are parameters (not buffers) of the graph's torch module, read off
    the layers' ports (`buffer=True` marks a buffer) without importing torch (4 s here, most of a
    conversion that carries the optimizer state). Checked against torch's modules in
    tests/test_training_state.py."""
    found = set()
    for node in graph.layers:
        prefix = graph.torch_names[node.name]
        for port in graph.ports(node):
            if not isinstance(port, KerasOnly) and not port.buffer:
                found |= {f"{prefix}.{key}" for key in torch_keys(port)}
    return found


def training_module(graph: Graph, file_tensors: dict):
    """The torch module (an `exchange.torch_adapter` one, in eval mode) to continue a Keras run
    with `torch_optimizer` and `torch_loss`: its dropout and noise layers act in `train()` mode as
    Keras's do in training (`TorchGraphBuilder.training`; the identity in `eval()`), its
    BatchNorms move their statistics as Keras's do (`optimizers.KerasBatchNorm`). Its state_dict
    is the inference module's."""
    from exchange import optimizers, torch_adapter

    return optimizers.use_keras_batch_norm(torch_adapter.model_from_tensors(graph, file_tensors, training=True))


def torch_optimizer(model, state: TrainingState):
    """A Keras-rule torch optimizer (`exchange.optimizers`) over the model's parameters that Keras
    trains (`trained_keys`), with the state's slots and step count loaded. The model's Embeddings
    are made to give sparse gradients, one row per lookup, as Keras 3's (`torch_sparse_lookups`),
    unless the state's run sums them (Keras 2)."""
    import torch

    from exchange import optimizers

    graph = model.exchange_graph
    parameters = dict(model.named_parameters())
    keys = []
    for node, _, _, port in trainable_variables(graph, set(parameters)):
        keys += [key for key in trained_keys(graph, node, port) if key not in keys]
    if not state.summed_lookups:
        optimizers.torch_sparse_lookups(model)  # an Embedding's gradient as Keras 3 on TensorFlow has it
    optimizer = optimizers.make_optimizer(
        [parameters[key] for key in keys], state.optimizer.class_name, state.optimizer.options
    )
    for key, slots in state.slots.items():
        parameter = parameters[key]
        optimizer.state[parameter] = {
            slot: torch.tensor(np.asarray(value), dtype=parameter.dtype, device=parameter.device)
            for slot, value in slots.items()
        }
    optimizer.iterations = state.iteration
    for name, value in state.scalars.items():
        optimizer.scalars[name] = torch.tensor(value, dtype=torch.float32)
    return optimizer


def state_of_torch_optimizer(model, optimizer, previous: TrainingState) -> TrainingState:
    """The training state of a torch run (its slots and step count) in `previous`'s terms."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    slots = {
        names[id(parameter)]: {slot: value.detach().cpu().numpy().copy() for slot, value in state.items()}
        for parameter, state in optimizer.state.items()
        if state
    }
    scalars = {name: float(value) for name, value in optimizer.scalars.items()}
    return TrainingState(
        previous.optimizer,
        optimizer.iterations,
        slots,
        previous.loss,
        previous.regularizers,
        scalars,
        previous.summed_lookups,
    )


# ---------------------------------------------------------------------------------------------
# Keras (imported when used)


def keras_model_with_training(graph: Graph, file_tensors: dict, state: TrainingState):
    """A compiled Keras model with the tensors and the optimizer state loaded: `model.save` writes
    a `.keras` that Keras resumes from, and `fit` continues the run."""
    import keras

    from exchange import keras_adapter

    model = keras_adapter.model_from_tensors(graph, file_tensors)
    _apply_regularizers(keras, model, graph, state.regularizers)
    options = dict(state.optimizer.options)
    if isinstance(options["learning_rate"], dict):
        options["learning_rate"] = keras.optimizers.schedules.deserialize(options["learning_rate"])
    optimizer = getattr(keras.optimizers, state.optimizer.class_name)(**options)
    model.compile(optimizer=optimizer, loss=state.loss)
    optimizer.build(model.trainable_variables)
    variables = trainable_variables(graph, parameter_keys_of(graph))
    if len(variables) != len(model.trainable_variables) or any(
        tuple(variable.shape) != shape for variable, (_, _, shape, _) in zip(model.trainable_variables, variables)
    ):
        raise ExchangeError("the Keras model's trainable variables differ from the architecture's")
    optimizer.iterations.assign(state.iteration)
    index = 2 if state.optimizer.learning_rate_is_variable else 1
    if state.slots:
        keras_slots = slots_to_keras(graph, variables, state.optimizer.slot_names, state.slots)
        for group in slot_groups(state.optimizer.class_name, state.optimizer.options):
            for slots in keras_slots:
                for slot in group:
                    optimizer.variables[index].assign(slots[slot])
                    index += 1
    else:
        index += len(state.optimizer.slot_names) * len(variables)
    for name, initial in state.optimizer.initial_scalars.items():
        optimizer.variables[index].assign(state.scalars.get(name, initial))
        index += 1
    return model


def _apply_regularizers(keras, model, graph: Graph, regularizers: dict) -> None:
    """Set the regularizers (by torch key) back on the Keras layers that own the variables."""
    if not regularizers:
        return
    by_key = {}
    for node, name, _, port in trainable_variables(graph, set(regularizers) | parameter_keys_of(graph)):
        for suffix in port.torch_shapes(dict(graph.keras_variables(node))):
            by_key[f"{graph.torch_names[node.name]}.{suffix}"] = (node, name)
    layers = {layer.name: layer for layer in model.layers}
    for key, factors in regularizers.items():
        node, name = by_key[key]
        layer = layers[node.name]
        regularizer = keras.regularizers.L1L2(l1=factors.get("l1", 0.0), l2=factors.get("l2", 0.0))
        setattr(layer, f"{name}_regularizer", regularizer)
        variable = next(variable for variable in layer.weights if variable.path.split("/")[-1] == name)
        variable.regularizer = regularizer


# ---------------------------------------------------------------------------------------------
# Conversions (`exchange.cli.convert`)


def for_conversion(
    in_path: Path,
    in_kind: filekinds.FileKind,
    out_kind: filekinds.FileKind,
    graph: Graph,
    notes: list | None,
    carry_keras_state: bool = False,
    holds_training: bool | None = None,
    traced: bool = False,
) -> TrainingState | None:
    """The training state a conversion carries: a compiled `.keras`'s (or Keras 2 `.h5`'s) into an
    exchange file when asked (`--optimizer-state`: such a file is no longer a plain state_dict), an
    exchange file's into an exchange file or a `.keras`, and any of them into generated code,
    always (its weights file holds the slots, which its `load()` leaves out and its
    `make_optimizer` reads; the code gets the training functions: `exchange.training_code`). Never
    into a `.pt`, which is read whole into `load_state_dict`. A state that is not carried, or
    cannot be carried exactly, is left out with a note saying why; the weights convert as without
    it. `holds_training`, when the reader already knows, saves opening the input again to ask.
    A `traced` input (a subclassed model, `exchange.subclassed`) keeps its state out: Keras orders
    its optimizer's variables by the class's attributes, which the traced graph does not know."""
    if not (_holds_training(in_path, in_kind) if holds_training is None else holds_training):
        return None
    carried = {
        (filekinds.KERAS, filekinds.SAFETENSORS),
        (filekinds.HDF5, filekinds.SAFETENSORS),
        (filekinds.SAFETENSORS, filekinds.SAFETENSORS),
        (filekinds.SAFETENSORS, filekinds.KERAS),
        (filekinds.KERAS, filekinds.CODE),
        (filekinds.HDF5, filekinds.CODE),
        (filekinds.SAFETENSORS, filekinds.CODE),
    }
    what = "optimizer state and training functions" if out_kind is filekinds.CODE else "optimizer state"
    if (in_kind, out_kind) not in carried:
        reason = f"a {out_kind.suffixes[0]} output does not carry it (convert to .safetensors)"
    elif in_kind in (filekinds.KERAS, filekinds.HDF5) and out_kind is filekinds.SAFETENSORS and not carry_keras_state:
        reason = (
            "pass --optimizer-state to carry it into the .safetensors (which then holds optimizer/... keys "
            "beside the state_dict's)"
        )
    elif traced:
        reason = (
            "a subclassed model's optimizer variables follow the order of its class's attributes, not "
            "of its traced calls: they are not matched to the variables"
        )
    else:
        try:
            parameter_keys = parameter_keys_of(graph)
            if in_kind is filekinds.KERAS:
                state = read_keras_training(in_path, graph, parameter_keys)
            elif in_kind is filekinds.HDF5:
                state = read_keras2_training(in_path, graph, parameter_keys)
            else:
                state = read_exchange_training(fileformat.load(in_path), parameter_keys)
            if out_kind is filekinds.CODE and state is not None:
                check_trainable_in_code(graph, state, str(in_path))
            if state is not None and notes is not None:
                notes += training_only_notes(graph)
            return state
        except ImportError:
            reason = "carrying it needs torch, which is not installed"
        except (UnsupportedLayerError, ExchangeFileError) as err:
            reason = str(err)
    if notes is not None:
        notes.append(f"{what} left out: {reason}")
    return None


def training_only_notes(graph: Graph) -> list[str]:
    """One note naming the layers that act in Keras training but are the identity in torch even
    when built for training (`LayerKind.acts_in_training`: the random augmentations; the
    dropouts, noises and activity penalties act, see `training_module`): a run continued in torch trains without them.
    The note lets the user add torch's own if needed."""
    acting = [
        f"{node.name!r:.60} ({reason})"
        for node in graph.layers
        if (reason := kind_of(node.kind).acts_in_training(node.config)) is not None
    ]
    if not acting:
        return []
    return [
        f"training in torch goes on without what {len(acting)} layer(s) do only in Keras training, "
        f"the identity in the torch module: {'; '.join(acting[:5])}{'; …' if len(acting) > 5 else ''}"
    ]


def check_trainable_in_code(graph: Graph, state: TrainingState, where: str) -> None:
    """What generated code's `train_step` needs beyond a carried state: one output, a loss it
    reproduces (`loss_call`), and BatchNormalizations whose training `KerasBatchNorm` is."""
    if len(graph.outputs) != 1:
        raise UnsupportedLayerError(f"{where}: training a model of {len(graph.outputs)} outputs is not supported")
    loss_call(state.loss, where)
    from exchange import torch_adapter

    module = torch_adapter.build_module(graph, training=True)  # refuses a dropout it cannot train
    activation = logits_activation(graph, state.loss, where)
    if activation is not None:
        logits_model(module, activation, where)
    for node in graph.layers:
        reason = kind_of(node.kind).training_not_reproduced(node.config)
        if reason is not None:
            raise UnsupportedLayerError(f"{where}: layer {node.name!r} {reason}")


# ---------------------------------------------------------------------------------------------
# A softmax or sigmoid output's cross-entropy, which Keras takes from the logits

CROSS_ENTROPIES = ("categorical_crossentropy", "sparse_categorical_crossentropy", "binary_crossentropy")


def logits_activation(graph: Graph, loss, where: str) -> str | None:
    """ "softmax" or "sigmoid" where Keras 3.15 (TensorFlow backend) takes the compiled loss, a
    cross-entropy, from the logits of the output's final activation, else None.

    Keras's softmax and sigmoid attach their input to their output (`_keras_logits`); its three
    cross-entropies use it whenever present, whatever `from_logits` says and whichever of the two
    made it (a sigmoid output's categorical cross-entropy is a softmax cross-entropy of its
    logits), along the loss's own axis. The output carries them when its layer ends with that
    activation (its kind's `output_activation`), also through layers that pass the tensor itself
    on (`passes_input_in_training`); a float32 one only (the loss casts another to float32, a new
    tensor without them)."""
    function, _ = loss_call(loss, where)
    if function not in CROSS_ENTROPIES or len(graph.outputs) != 1:
        return None
    name = graph.outputs[0]
    while name not in graph.input_arguments:
        node = graph.node(name)
        kind = kind_of(node.kind)
        if node.dtype != "float32":
            return None
        if kind.passes_input_in_training(node.config):
            name = node.inputs[0]
            continue
        reason = kind.logits_not_reproduced(node.config)
        if reason is not None:
            raise UnsupportedLayerError(f"{where}: output layer {node.name!r} {reason}")
        activation = kind.output_activation(node.config)
        return activation if activation in ("softmax", "sigmoid") else None
    return None


def logits_model(model, activation: str, where: str = "the model"):
    """(a module sharing `model`'s parameters that returns the input of its output's final
    `activation`, that activation's fx node): what Keras takes the cross-entropy from
    (`logits_activation`). `model`: an `exchange.torch_adapter` module (a `torch.fx` one)."""
    import torch
    from torch import fx

    (output,) = [node for node in model.graph.nodes if node.op == "output"]
    final = output.args[0]
    target = {"softmax": torch.softmax, "sigmoid": torch.sigmoid}[activation]
    if not (isinstance(final, fx.Node) and final.op == "call_function" and final.target is target):
        raise UnsupportedLayerError(
            f"{where}: Keras takes the loss from the logits of the output's {activation}, which the torch "
            "module does not end with"
        )
    graph = fx.Graph()
    copies: dict = {}
    graph.graph_copy(model.graph, copies)
    graph.output(copies[final.args[0]])
    logits = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Logits")
    logits.graph.eliminate_dead_code()
    logits.recompile()
    return logits, final


def torch_loss(model, state: TrainingState):
    """(forward, loss) that train `model` (an `exchange.torch_adapter` module) as Keras trains it:
    `loss(forward(x), y_true)`, the compiled loss averaged over the batch. Where Keras takes the
    cross-entropy from the logits of the output's softmax or sigmoid (`logits_activation`),
    `forward` is a module sharing `model`'s parameters that stops before that activation and
    `loss` takes logits; otherwise `forward` is `model`. A `training_module`'s ActivityRegularizations
    add their penalty of the last forward pass to `loss`, as Keras adds it (`optimizers.activity_penalty`)."""
    from exchange import optimizers, torch_modules

    graph = model.exchange_graph
    activation = logits_activation(graph, state.loss, "the training state")
    forward = model if activation is None else logits_model(model, activation)[0]
    name, options = torch_loss_call(graph, state.loss, "the training state", activation is not None)
    function = optimizers.LOSSES[name]

    penalized = any(isinstance(part, torch_modules.KerasActivityRegularization) for part in model.modules())

    def loss(y_pred, y_true):
        value = function(y_pred, y_true, **options).mean()
        return value + optimizers.activity_penalty(model) if penalized else value

    return forward, loss


def torch_loss_call(graph: Graph, loss, where: str, from_logits: bool = False) -> tuple[str, dict]:
    """`loss_call` for the torch module's output, which is channels-first: a Keras `axis` (the
    classes, last in Keras's layout) as the torch dim holding it (-1 where that is the last);
    `from_logits` where the loss takes the logits of the output's activation (`logits_activation`)."""
    function, options = loss_call(loss, where)
    if "axis" in options:
        rank = len(graph.shapes[graph.outputs[0]])
        dim = torch_axis(options["axis"], rank, "the loss")
        options["axis"] = -1 if dim == rank else dim
    if from_logits:
        options["from_logits"] = True
    return function, options


def _holds_training(path: Path, kind: filekinds.FileKind) -> bool:
    """Whether a compiled `.keras`, a Keras 2 `.h5` with a `training_config`, or an exchange file
    with training state (read cheaply: the config, an attribute's presence, or the header's
    metadata)."""
    try:
        if kind is filekinds.KERAS:
            with keras_files._open_zip(path) as archive:
                config = keras_files._json(keras_files._config_member(archive, path), f"{path}:config.json")
            return bool(config.get("compile_config"))
        if kind is filekinds.SAFETENSORS:
            return OPTIMIZER_METADATA in fileformat.read_metadata(path)
        if kind is filekinds.HDF5:
            source = keras_files._Hdf5Source(path)
            try:
                with keras_files.hdf5_errors(source.label):
                    return "training_config" in source.h5.attrs
            finally:
                source.close()
    except ExchangeFileError:
        return False
    return False
