"""Keras variables <-> file tensors for a whole graph, through each layer kind's ports.

The rules themselves live with their layer kinds (`exchange.kinds`, each kind's `ports`); this
module runs them over every node. Every stored Keras variable must be claimed by a port: a layer
with more or other variables than its kind expects (a Dense with LoRA weights, say) is an error
naming the layer and the variable, never a silently dropped tensor.

Conversions are pure: they never modify the arrays they are given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from exchange.errors import ExchangeError, TensorMismatchError
from exchange.graph import Graph, Node
from exchange.ports import KerasOnly, Packed, Port, Stacked, Summed, TorchOnly
from exchange.tensors import AnyTensor, materialize

# One stored Keras variable: its name where the format records one (None for Keras 3's vars/N),
# and its array (or LazyTensor).
StoredVariable = tuple[str | None, AnyTensor]


def keras_to_file(
    graph: Graph,
    stored: Mapping[str, Sequence[StoredVariable]],
    where: str = "",
    class_names: dict[str, str] | None = None,
) -> dict[str, AnyTensor]:
    """Per-node stored Keras variables -> the file's tensors (lazy ones stay lazy where they can).

    All problems (unclaimed, missing or mis-shaped variables) are reported in one error.
    """
    from exchange.kinds import kind_of

    class_names = class_names or {}
    problems: list[str] = []
    tensors: dict[str, AnyTensor] = {}
    for node in graph.layers:  # a shared layer's weights once
        expected = graph.keras_variables(node)
        aliases = kind_of(node.kind).variable_aliases
        found = _unmerged(node, expected, stored.get(node.name, []), kind_of(node.kind).merged_when_saved(node.config))
        if found and all(name is None for name, _ in found):  # a Keras 3 file's
            found = kind_of(node.kind).keras3_file_variables(node.config, found)
        label = f"layer {node.name!r} ({class_names.get(node.name, node.kind)})"
        if len(found) != len(expected) or any(
            not _same_variable(name, want, aliases) for (name, _), (want, _) in zip(found, expected)
        ):
            found_names = [name if name is not None else f"vars/{index}" for index, (name, _) in enumerate(found)]
            unclaimed = [name for name in found_names[len(expected) :]] + [
                name for (name, _), (want, _) in zip(found, expected) if not _same_variable(name, want, aliases)
            ]
            problems.append(
                f"{label} stores variables {found_names}, expected {[want for want, _ in expected]}"
                + (f"; no port claims {unclaimed}" if unclaimed else "")
            )
            continue
        variables: dict[str, AnyTensor] = {}
        for (want, shape), (_, array) in zip(expected, found):
            if tuple(array.shape) != tuple(shape):
                problems.append(f"{label} variable {want!r}: expected shape {tuple(shape)}, found {tuple(array.shape)}")
            variables[want] = array
        if problems:
            continue
        prefix = graph.torch_names[node.name]
        for port in graph.ports(node):
            if isinstance(port, TorchOnly):
                tensors[f"{prefix}.{port.torch}"] = np.full(port.shape, port.fill, dtype=port.dtype or node.dtype)
            elif not isinstance(port, KerasOnly):
                tensors.update({f"{prefix}.{suffix}": tensor for suffix, tensor in port.to_torch(variables).items()})
    if problems:
        raise TensorMismatchError(
            [],
            [],
            problems,
            where=f"{where}: config and weights do not match" if where else "config and weights do not match",
        )
    return tensors


def _unmerged(
    node: Node, expected: list[tuple[str, tuple[int, ...]]], found: Sequence[StoredVariable], merged: tuple[str, ...]
) -> list[StoredVariable]:
    """A Keras 3 file's variables (no names stored) of a layer that merged some into another when
    saved (LoRA): zeros in their places, as Keras loads them; other lists as they are."""
    if not merged or len(found) != len(expected) - len(merged) or any(name is not None for name, _ in found):
        return list(found)
    rest = iter(found)
    return [(name, np.zeros(shape, dtype=node.dtype)) if name in merged else next(rest) for name, shape in expected]


def _same_variable(stored_name: str | None, expected: str, aliases: dict) -> bool:
    """Keras 3 numbers unnamed variables `variable`, `variable_1`, … across a model; Keras 3
    files store no names (None); some variables have another name in Keras 2 (`aliases`)."""
    return stored_name is None or any(
        re.fullmatch(rf"{re.escape(name)}(_\d+)?", stored_name)
        for name in (expected,) + tuple(aliases.get(expected, ()))
    )


def file_to_keras(graph: Graph, tensors: Mapping[str, AnyTensor]) -> dict[str, list[np.ndarray | None]]:
    """File tensors -> per-node Keras variable arrays in the layer's variable order; None for a
    Keras-only variable (left as the Keras layer has it). The inverse of `keras_to_file`."""
    per_node = {}
    for node in graph.layers:  # a shared layer's weights once
        prefix = graph.torch_names[node.name]
        keras_shapes = dict(graph.keras_variables(node))
        variables: dict[str, np.ndarray | None] = {}
        for port in graph.ports(node):
            if isinstance(port, KerasOnly):
                variables[port.keras] = None
            elif isinstance(port, TorchOnly) and port.must_equal_fill:
                value = materialize(tensors[f"{prefix}.{port.torch}"])
                if not np.all(value == port.fill):
                    raise ExchangeError(
                        f"{prefix}.{port.torch} must be {port.fill} everywhere to go back "
                        f"to Keras ({port.why}); it holds other values"
                    )
            elif not isinstance(port, TorchOnly):
                torch_arrays = {suffix: tensors[f"{prefix}.{suffix}"] for suffix in port.torch_shapes(keras_shapes)}
                variables.update(
                    {name: materialize(array) for name, array in port.to_keras(torch_arrays, keras_shapes).items()}
                )
        per_node[node.name] = [variables[name] for name, _ in graph.keras_variables(node)]
    return per_node


def folded_tensors(graph: Graph, tensors: Mapping[str, AnyTensor]) -> list[str]:
    """Torch tensors that a torch -> Keras conversion folds into another (a `Summed` port: an
    LSTM's nonzero `bias_hh_l0` added to `bias_ih_l0` as Keras's one bias). The outputs stay the
    same; going back to torch gives the canonical split (the sum, then zeros)."""
    found = []
    for node in graph.layers:  # a shared layer's weights once
        prefix = graph.torch_names[node.name]
        for port in graph.ports(node):
            if isinstance(port, (Port, Stacked, Packed, Summed)) and port.lossy:
                found += [
                    f"{prefix}.{key}" for key in port.torch[1:] if np.any(materialize(tensors[f"{prefix}.{key}"]))
                ]
    return found
