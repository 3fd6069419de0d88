"""The one table of layout rules: how each layer kind's Keras variables map to file tensors.

The file uses the PyTorch layout, so the PyTorch side needs no rules at all; Keras differs. Each
rule names the Keras variable, the file tensor, and the axis permutation from Keras layout to the
file layout. The reverse direction is derived from the same permutation (`np.argsort`), so the two
directions cannot drift apart. Adding a layer kind means adding one entry to `LAYOUT_RULES`.

Conversions are pure: they never modify the arrays they are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exchange.architecture import Architecture
from exchange.errors import TensorMismatchError, UnsupportedLayerError
from exchange.tensors import LazyTensor, transpose_contiguous


@dataclass(frozen=True)
class TensorRule:
    """How one Keras variable of a layer is stored in the file."""

    keras_name: str                             # Keras variable name, e.g. "kernel"
    file_name: str                              # file key suffix: layers.{i}.<file_name>
    keras_to_file_axes: tuple[int, ...] | None  # permutation Keras -> file; None keeps the layout
    only_if: str | None = None                  # layer attribute that switches the tensor on

    def applies_to(self, layer) -> bool:
        return self.only_if is None or bool(getattr(layer, self.only_if))

    def to_file(self, keras_array):
        """Keras layout -> file layout; a `LazyTensor` stays lazy (only its shape moves now)."""
        return _permute(keras_array, self.keras_to_file_axes)

    def to_keras(self, file_array):
        axes = self.keras_to_file_axes
        return _permute(file_array, None if axes is None else tuple(int(a) for a in np.argsort(axes)))


def _permute(tensor, axes: tuple[int, ...] | None):
    if axes is None:
        return tensor
    if len(tensor.shape) != len(axes):
        return tensor  # wrong rank: left as it is, so the shape check names it
    if isinstance(tensor, LazyTensor):
        return tensor.permuted(axes)
    # safetensors refuses strided views, so the transposed copy is made contiguous.
    return transpose_contiguous(tensor, axes)


LAYOUT_RULES: dict[str, tuple[TensorRule, ...]] = {
    # Keras Dense computes x @ kernel with kernel (in, out); torch Linear computes x @ weight.T
    # with weight (out, in). The bias is (out,) in both.
    "dense": (
        TensorRule("kernel", "weight", keras_to_file_axes=(1, 0)),
        TensorRule("bias", "bias", keras_to_file_axes=None, only_if="use_bias"),
    ),
}


def rules_for(layer) -> tuple[TensorRule, ...]:
    """The rules that apply to one layer of an architecture."""
    if layer.kind not in LAYOUT_RULES:
        raise UnsupportedLayerError(f"no layout rule for layer kind {layer.kind!r}")
    return tuple(rule for rule in LAYOUT_RULES[layer.kind] if rule.applies_to(layer))


def keras_to_file(architecture: Architecture,
                  keras_variables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-layer Keras variables ({"kernel": …, "bias": …} per layer) -> flat file tensors."""
    if len(keras_variables) != len(architecture.layers):
        raise TensorMismatchError([], [], [f"{len(keras_variables)} layers of weights for an "
                                           f"architecture of {len(architecture.layers)} layers"])
    file_tensors = {}
    for index, (layer, variables) in enumerate(zip(architecture.layers, keras_variables)):
        rules = rules_for(layer)
        missing = [f"layer {index} ({layer.kind}) variable {rule.keras_name!r}"
                   for rule in rules if rule.keras_name not in variables]
        if missing:
            raise TensorMismatchError(missing, [], [])
        for rule in rules:
            file_tensors[f"layers.{index}.{rule.file_name}"] = rule.to_file(variables[rule.keras_name])
    return file_tensors


def file_to_keras(architecture: Architecture,
                  file_tensors: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Flat file tensors -> per-layer Keras variables, the inverse of `keras_to_file`."""
    return [{rule.keras_name: rule.to_keras(file_tensors[f"layers.{index}.{rule.file_name}"])
             for rule in rules_for(layer)}
            for index, layer in enumerate(architecture.layers)]
