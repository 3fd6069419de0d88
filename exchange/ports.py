"""Weight ports: how one Keras variable becomes one torch tensor, built from invertible steps.

A `Port` names a Keras variable, the torch key suffix it becomes, and the steps that take the
Keras array to the torch array. Every step maps shapes as well as arrays, so a whole file is
checked from its header before any data is read, and every step has an exact inverse, so the
torch -> Keras direction is derived from the same description and the two cannot drift apart.

Two kinds of tensor live on one side only:
- `TorchOnly`: a torch tensor with no Keras source (BatchNorm's `num_batches_tracked`, the bias
  of an affine BatchNorm whose Keras layer has `center=False`). Keras -> torch writes `fill`;
  torch -> Keras drops it, and with `must_equal_fill` refuses a value that Keras cannot hold.
- `KerasOnly`: a Keras variable that computes nothing at inference (Normalization's `count`).
  Keras -> torch drops it; torch -> Keras leaves the Keras variable as it is.

Steps are pure: they never modify the array they are given.

Example:
    >>> port = Port("kernel", "weight", (Permute((1, 0)),))
    >>> port.torch_shape((784, 50))
    (50, 784)
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from exchange.errors import ExchangeError
from exchange.tensors import LazyTensor, materialize, transpose_contiguous


@dataclass(frozen=True)
class Permute:
    """Reorder axes: torch[...] = transpose(keras, axes)."""

    axes: tuple[int, ...]

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[axis] for axis in self.axes)

    def apply(self, array: np.ndarray) -> np.ndarray:
        return transpose_contiguous(array, self.axes)

    def inverse(self) -> "Permute":
        return Permute(tuple(int(axis) for axis in np.argsort(self.axes)))


@dataclass(frozen=True)
class Reshape:
    """An exact reshape between two shapes of the same size (never a silent squeeze or pad)."""

    source: tuple[int, ...]
    target: tuple[int, ...]

    def __post_init__(self) -> None:
        if prod(self.source) != prod(self.target):
            raise ExchangeError(f"reshape {self.source} -> {self.target} changes the size")

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if tuple(shape) != self.source:
            raise ExchangeError(f"expected shape {self.source}, found {tuple(shape)}")
        return self.target

    def apply(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array).reshape(self.shape(array.shape))

    def inverse(self) -> "Reshape":
        return Reshape(self.target, self.source)


Step = Permute | Reshape


@dataclass(frozen=True)
class Port:
    """Keras variable `keras` (in the layer's variable order) <-> torch tensor `torch`."""

    keras: str
    torch: str
    steps: tuple[Step, ...] = ()

    def torch_shape(self, keras_shape: tuple[int, ...]) -> tuple[int, ...]:
        for step in self.steps:
            keras_shape = step.shape(keras_shape)
        return tuple(keras_shape)

    def to_torch(self, keras_array):
        """Keras layout -> torch layout. A `LazyTensor` stays lazy when the steps are permutations."""
        return _run(self.steps, keras_array)

    def to_keras(self, torch_array):
        return _run(tuple(step.inverse() for step in reversed(self.steps)), torch_array)


@dataclass(frozen=True)
class TorchOnly:
    """A torch tensor with no Keras variable behind it (see the module docstring)."""

    torch: str
    shape: tuple[int, ...]
    fill: float
    dtype: str | None = None          # None: the node's dtype
    must_equal_fill: bool = False     # torch -> Keras refuses any other value (Keras cannot hold it)
    why: str = ""


@dataclass(frozen=True)
class KerasOnly:
    """A Keras variable that computes nothing at inference (see the module docstring)."""

    keras: str
    why: str = ""


AnyPort = Port | TorchOnly | KerasOnly


def _run(steps: tuple[Step, ...], tensor):
    if not steps:
        return tensor
    if isinstance(tensor, LazyTensor) and all(isinstance(step, Permute) for step in steps):
        for step in steps:
            tensor = tensor.permuted(step.axes)
        return tensor
    array = materialize(tensor)
    for step in steps:
        array = step.apply(array)
    return array
