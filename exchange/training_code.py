"""The training functions of generated code: `make_optimizer`, `loss_fn`, `train_step`.

A model converted to code from a compiled Keras run (`exchange.training_state.for_conversion`
carries its state into the weights file beside the `.py`) gets, beside its class and `load()`:
- `make_optimizer(model)`: Keras's optimizer (the class of `exchange.optimizers`, copied into the
  file with what it uses, like `exchange.torch_modules`'s helpers) with the run's options written
  out, and the step count and slots read from the weights file, as `load()` reads the weights;
- `loss_fn(y_pred, y_true)`: the compiled loss with Keras's semantics (`exchange.optimizers`'s
  function of that name, its options written out); `loss_fn(logits, y_true)` where Keras takes a
  cross-entropy from the logits of the output's softmax or sigmoid: the model class then has
  `pre_activation`, and `forward` is that activation of it (`training_state.logits_activation`);
- `regularization_penalty(model)`, when Keras had regularizers: their terms written out. It takes
  the model, so it is not part of `loss_fn` (which takes what Keras's loss takes) but of
  `train_step`, which adds it as Keras adds its regularization losses to the compiled loss;
- `train_step(model, optimizer, x, y)`: one step of Keras's `train_on_batch`; the loss it returns
  includes the penalty, as the loss Keras reports does, and the activity penalty of the model's
  ActivityRegularizations (`activity_penalty`, copied from `exchange.optimizers`) when it has any.
The model's BatchNorms are `KerasBatchNorm`s (same state_dict; torch's BatchNorm in eval mode), so
they move their statistics as Keras's do when trained: written into the class, not swapped in.

Every value written comes from the checked state (`training_state.check_optimizer`,
`loss_call`, regularizer factors), formatted by `codegen._format`; parameter names are the
module's own.
"""

from __future__ import annotations

import ast
import inspect
import keyword
import textwrap

import numpy as np

from exchange import optimizers, training_state
from exchange.graph import Graph

SLOT_PREFIX = "optimizer/"


def _definitions() -> dict[str, tuple[str, set[str]]]:
    """Each top-level definition of `exchange.optimizers` (class, function, constant) in module
    order: its source lines (a trailing comment included) and the names it uses."""
    source = inspect.getsource(optimizers)
    lines = source.splitlines()
    found = {}
    for statement in ast.parse(source).body:
        if isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
            names = [statement.name]
        elif isinstance(statement, ast.Assign) and all(isinstance(target, ast.Name) for target in statement.targets):
            names = [target.id for target in statement.targets if isinstance(target, ast.Name)]
        else:
            continue
        first = min([statement.lineno] + [decorator.lineno for decorator in getattr(statement, "decorator_list", [])])
        text = "\n".join(lines[first - 1 : statement.end_lineno]) + "\n"
        used = {node.id for node in ast.walk(statement) if isinstance(node, ast.Name)}
        for name in names:
            found[name] = (text, used)
    return found


DEFINITIONS = _definitions()


def copied_sources(names: set[str]) -> list[str]:
    """The sources of `names` and of every definition they use, in `exchange.optimizers`'s order."""
    needed = set()
    pending = [name for name in names if name in DEFINITIONS]
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending += [used for used in DEFINITIONS[name][1] if used in DEFINITIONS and used not in needed]
    sources = []
    for name, (text, _) in DEFINITIONS.items():
        if name in needed and text not in sources:
            sources.append(text)
    return sources


def helper_names(state: training_state.TrainingState, uses_batch_norm: bool, activity: bool = False) -> set[str]:
    """What the training functions use from `exchange.optimizers` (`activity`: the model has
    `KerasActivityRegularization`s, whose penalties `train_step` adds)."""
    names = {state.optimizer.class_name, training_state.loss_call(state.loss, "the training state")[0]}
    if activity:
        names.add(optimizers.activity_penalty.__name__)
    learning_rate = state.optimizer.options["learning_rate"]
    if isinstance(learning_rate, dict):
        names.add(learning_rate["class_name"])
    if uses_batch_norm:
        names.add(optimizers.KerasBatchNorm.__name__)
    return names


def functions(
    graph: Graph,
    state: training_state.TrainingState,
    parameter_names: list[str],
    weights_name: str,
    input_names: list[str],
    activity: bool = False,
) -> list[str]:
    """The sources of `load` (the weights without the slots), `make_optimizer`, `loss_fn`,
    `regularization_penalty` (when Keras had regularizers) and `train_step`."""
    from exchange.codegen import _format, quoted

    sources = [
        f"def load(path={quoted(weights_name)}):\n"
        '    """The weights file as a state_dict: `model.load_state_dict(load(), strict=True)`. The\n'
        '    optimizer\'s slots beside them (`optimizer/<parameter>/<slot>`) are `make_optimizer`\'s."""\n'
        "    from safetensors.torch import load_file\n\n"
        f'    return {{key: value for key, value in load_file(path).items() if not key.startswith("{SLOT_PREFIX}")}}\n'
    ]
    sources.append(_make_optimizer(graph, state, parameter_names, weights_name, _format, quoted))
    activation = training_state.logits_activation(graph, state.loss, "the training state")
    sources.append(_loss_fn(graph, state, _format, activation))
    if state.regularizers:
        sources.append(_regularization_penalty(state.regularizers, _format, quoted))
    sources.append(_train_step(bool(state.regularizers), input_names, activation is not None, activity))
    return sources


def usage(state: training_state.TrainingState) -> str:
    """The module docstring's lines on training."""
    return (
        f"Continue training where the Keras run stopped ({state.optimizer.class_name} with its step count and\n"
        "slots from the weights file; the loss and regularizers as compiled):\n\n"
        "    optimizer = make_optimizer(model)\n"
        "    for x, y in batches:\n"
        "        loss = train_step(model, optimizer, x, y)\n\n"
    )


def _make_optimizer(graph, state, parameter_names, weights_name, _format, quoted) -> str:
    trained = set()
    for node, _, _, port in training_state.trainable_variables(graph, set(parameter_names)):
        trained.update(training_state.trained_keys(graph, node, port))
    untrained = [name for name in parameter_names if name not in trained]
    spec = state.optimizer
    arguments = []
    for name, parameter in list(inspect.signature(optimizers.OPTIMIZERS[spec.class_name]).parameters.items())[1:]:
        value = spec.options.get(name)
        if value is None and parameter.default is None:
            continue
        if isinstance(value, dict):  # a schedule, its options in its signature's order
            config = value["config"]
            schedule = ", ".join(
                f"{key}={_format(config[key])}"
                for key in inspect.signature(optimizers.SCHEDULES[value["class_name"]]).parameters
                if key in config
            )
            arguments.append(f"{name}={value['class_name']}({schedule})")
        elif name == "learning_rate":  # Keras's float32 variable: its shortest float32 form
            arguments.append(f"{name}={_format(float(str(np.float32(value))))}")
        else:
            arguments.append(f"{name}={_format(value)}")
    lines = [
        f"def make_optimizer(model, path={quoted(weights_name)}):",
        _docstring(
            f"Keras's {spec.class_name} where the Keras run left it: its update rule (`{spec.class_name}` above) "
            "and options, and the step count and slots it had reached, read from the weights file "
            "(`optimizer/<parameter>/<slot>`), over the parameters Keras trains."
        ),
        "    from safetensors import safe_open",
        "",
    ]
    if untrained:
        lines += [
            "    # Keras has no variable of its own for these (an LSTM's second bias, a BatchNorm's fixed",
            "    # scale or offset): they keep their values.",
            f"    untrained = {{{', '.join(quoted(name) for name in untrained)}}}",
            "    parameters = [parameter for name, parameter in model.named_parameters() if name not in untrained]",
        ]
        parameters = "parameters"
    else:
        parameters = "model.parameters()"
    lines += [f"    optimizer = {spec.class_name}(", f"        {parameters},"]
    lines += [f"        {argument}," for argument in arguments]
    lines += [
        "    )",
        '    with safe_open(path, framework="pt") as weights:',
        '        metadata = json.loads(weights.metadata()["optimizer"])',
        '        optimizer.iterations = int(metadata["iteration"])',
    ]
    if spec.initial_scalars:
        lines += [
            f"        for name, value in metadata[{quoted('scalars')}].items():  # {', '.join(spec.initial_scalars)}",
            "            optimizer.scalars[name] = torch.tensor(value, dtype=torch.float32)",
        ]
    lines += [
        "        for key in weights.keys():",
        f'            if key.startswith("{SLOT_PREFIX}"):',
        f'                name, slot = key.removeprefix("{SLOT_PREFIX}").rsplit("/", 1)',
        "                parameter = model.get_parameter(name)",
        "                optimizer.state[parameter][slot] = weights.get_tensor(key).to(parameter.device)",
        "    return optimizer",
    ]
    return "\n".join(lines) + "\n"


def _loss_fn(graph, state, _format, activation: str | None) -> str:
    """`activation`: the output's softmax or sigmoid whose logits Keras takes the loss from
    (`training_state.logits_activation`), then `loss_fn` takes them; else None."""
    function, options = training_state.torch_loss_call(graph, state.loss, "the training state", activation is not None)
    arguments = "".join(f", {key}={_format(value)}" for key, value in options.items())
    prediction = "logits" if activation is not None else "y_pred"
    if activation is not None:
        note = (
            f"\n    `logits`: the model's output before its final {activation} (`model.pre_activation`),"
            f"\n    which Keras takes a {activation} output's cross-entropy from (no clipping)."
        )
    elif not options.get("from_logits", True):
        note = "\n    Probabilities are clipped to [1e-7, 1 - 1e-7], as Keras clips them."
    else:
        note = ""
    return (
        f"def loss_fn({prediction}, y_true):\n"
        f'    """Keras\'s {function} as compiled, averaged over the batch (Keras\'s reduction\n'
        f"    'sum_over_batch_size'); `y_true` in the layout of the model's output.{note}\"\"\"\n"
        f"    return {function}({prediction}, y_true{arguments}).mean()\n"
    )


def _parameter(key: str, quoted) -> str:
    """`model.conv.weight`, or `model.get_parameter('blocks.0.weight')` where a part is no name."""
    parts = key.split(".")
    if all(part.isidentifier() and not keyword.iskeyword(part) for part in parts):
        return "model." + ".".join(parts)
    return f"model.get_parameter({quoted(key)})"


def _regularization_penalty(regularizers: dict, _format, quoted) -> str:
    terms = []
    for key, factors in regularizers.items():
        if factors.get("l1"):
            terms.append(f"{_format(factors['l1'])} * torch.sum(torch.abs({_parameter(key, quoted)}))")
        if factors.get("l2"):
            terms.append(f"{_format(factors['l2'])} * torch.sum(torch.square({_parameter(key, quoted)}))")
    if not terms:
        body = "    return torch.zeros(())\n"
    elif len(terms) == 1:
        body = f"    return {terms[0]}\n"
    else:
        body = "    return (\n" + "".join(
            f"        {'+ ' if index else ''}{term}\n" for index, term in enumerate(terms)
        )
        body += "    )\n"
    return (
        "def regularization_penalty(model):\n"
        '    """Keras\'s regularizers, which it adds to the loss (torch has no such term): `l1 * sum(|w|)`\n'
        '    and `l2 * sum(w ** 2)` of each regularized parameter."""\n' + body
    )


def _train_step(penalty: bool, input_names: list[str], from_logits: bool = False, activity: bool = False) -> str:
    several = len(input_names) > 1
    inputs = (
        f"`x`: the inputs ({', '.join(input_names)}) as a tuple, channels-first as `forward` takes them"
        if several
        else "`x`: channels-first, as `forward` takes it"
    )
    method = "model.pre_activation" if from_logits else "model"
    loss = f"loss_fn({method}(*x), y)" if several else f"loss_fn({method}(x), y)"
    return (
        "def train_step(model, optimizer, x, y):\n"
        + _docstring(
            f"One step of Keras's `train_on_batch`. {inputs}; `y`: in the layout of the output. "
            "The model in training mode (its BatchNorms move their statistics as Keras's do, its dropouts "
            "and noises act as Keras's in training), the loss"
            + (" plus Keras's regularization penalty" if penalty else "")
            + (" plus its ActivityRegularizations' penalty of this forward pass" if activity else "")
            + (" (from `model.pre_activation`'s logits, as Keras takes it)" if from_logits else "")
            + ", its gradients, one optimizer step. Returns the loss as Keras reports it"
            + (" (the penalties included)." if penalty or activity else ".")
        )
        + "\n"
        "    model.train()\n"
        "    optimizer.zero_grad()\n"
        f"    loss = {loss}"
        + (" + regularization_penalty(model)" if penalty else "")
        + (" + activity_penalty(model)" if activity else "")
        + "\n    loss.backward()\n"
        "    optimizer.step()\n"
        "    return loss.detach()\n"
    )


def _docstring(text: str) -> str:
    """A function's docstring lines, wrapped as a person would (no trailing newline)."""
    return textwrap.fill(
        f'"""{text}"""', width=100, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False
    )
