"""Weight ports: how one Keras variable becomes one torch tensor, built from invertible steps.

A `Port` names a Keras variable, the torch key suffix it becomes, and the steps that take the
Keras array to the torch array. Every step maps shapes as well as arrays, so a whole file is
checked from its header before any data is read, and every step has an exact inverse, so the
torch -> Keras direction is derived from the same description and the two cannot drift apart.

Most ports map one Keras variable to one torch tensor. Three map several:
- `Stacked`: one Keras variable holds several torch tensors along its first axis (GRU's bias of
  shape (2, 3H) is torch's `bias_ih` and `bias_hh`).
- `Packed`: several Keras variables are concatenated into one torch tensor (MultiHeadAttention's
  query, key and value kernels are torch's `in_proj_weight`).
- `Summed`: torch holds two tensors whose sum is the one Keras variable (an LSTM's `bias_ih` and
  `bias_hh`). Keras -> torch puts the variable in the first and zeros in the others; torch ->
  Keras sums them. It is declared lossy: a torch -> Keras -> torch round trip keeps the outputs,
  not the separate tensors.

Two kinds of tensor live on one side only:
- `TorchOnly`: a torch tensor with no Keras source (BatchNorm's `num_batches_tracked`, the bias
  of an affine BatchNorm whose Keras layer has `center=False`). Keras -> torch writes `fill`;
  torch -> Keras drops it, and with `must_equal_fill` refuses a value that Keras cannot hold.
- `KerasOnly`: a Keras variable that computes nothing at inference (Normalization's `count`).
  Keras -> torch drops it; torch -> Keras leaves the Keras variable as it is.

A port whose torch tensors are buffers of the torch module, not parameters (BatchNorm's running
statistics and counter, Normalization's mean and variance), says so with `buffer=True`: which
tensors are parameters, and so which variables an optimizer trains, is read off the ports without
building the module.

Steps are pure: they never modify the array they are given.

Example:
    >>> port = Port("kernel", "weight", (Permute((1, 0)),))
    >>> port.torch_shape((784, 50))
    (50, 784)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import prod
from typing import cast

import numpy as np

from exchange.errors import ExchangeError
from exchange.tensors import AnyTensor, LazyTensor, materialize, transpose_contiguous


@dataclass(frozen=True)
class Permute:
    """Reorder axes: torch[...] = transpose(keras, axes)."""

    axes: tuple[int, ...]

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[axis] for axis in self.axes)

    def apply(self, array: np.ndarray) -> np.ndarray:
        return transpose_contiguous(array, self.axes)

    def inverse(self) -> Permute:
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

    def inverse(self) -> Reshape:
        return Reshape(self.target, self.source)


@dataclass(frozen=True)
class Blocks:
    """Reorder equal blocks along an axis: block `order[i]` of the input becomes block i (a GRU's
    gates are z, r, h in Keras and r, z, n in torch: `Blocks(0, (1, 0, 2))`)."""

    axis: int
    order: tuple[int, ...]

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if shape[self.axis] % len(self.order):
            raise ExchangeError(f"axis {self.axis} of {tuple(shape)} does not split into {len(self.order)} blocks")
        return tuple(shape)

    def apply(self, array: np.ndarray) -> np.ndarray:
        self.shape(array.shape)
        blocks = np.split(np.asarray(array), len(self.order), axis=self.axis)
        return np.ascontiguousarray(np.concatenate([blocks[index] for index in self.order], axis=self.axis))

    def inverse(self) -> Blocks:
        return Blocks(self.axis, tuple(int(index) for index in np.argsort(self.order)))


Step = Permute | Reshape | Blocks


def _shape_through(steps: tuple[Step, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    for step in steps:
        shape = step.shape(shape)
    return tuple(shape)


def _inverse(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    return tuple(step.inverse() for step in reversed(steps))


@dataclass(frozen=True)
class Port:
    """Keras variable `keras` (in the layer's variable order) <-> torch tensor `torch`.

    Every weight port (`Port`, `Stacked`, `Packed`, `Summed`) answers the same four questions:
    which Keras variables and torch tensors it joins, the torch shapes from the Keras shapes,
    and the arrays in each direction (dicts keyed by Keras name or torch suffix).
    """

    keras: str
    torch: str
    steps: tuple[Step, ...] = ()
    shape: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)  # the Keras variable's shape
    buffer: bool = dataclasses.field(default=False, kw_only=True)  # torch holds it as a buffer
    lossy = False

    @property
    def keras_names(self) -> tuple[str, ...]:
        return (self.keras,)

    @property
    def keras_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.keras: tuple(self.shape)}

    def torch_shape(self, keras_shape: tuple[int, ...]) -> tuple[int, ...]:
        return _shape_through(self.steps, keras_shape)

    def torch_shapes(self, keras_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {self.torch: self.torch_shape(keras_shapes[self.keras])}

    def to_torch(self, keras_arrays: dict[str, AnyTensor]) -> dict[str, AnyTensor]:
        """Keras layout -> torch layout. A `LazyTensor` stays lazy when the steps are permutations."""
        return {self.torch: _run(self.steps, keras_arrays[self.keras])}

    def to_keras(
        self, torch_arrays: dict[str, AnyTensor], keras_shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, AnyTensor]:
        return {self.keras: _run(_inverse(self.steps), torch_arrays[self.torch])}


@dataclass(frozen=True)
class Stacked:
    """One Keras variable whose first axis stacks several torch tensors, each then taken
    through `steps` (a GRU's (2, 3H) bias is `bias_ih` and `bias_hh`)."""

    keras: str
    torch: tuple[str, ...]
    steps: tuple[Step, ...] = ()
    shape: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)  # the Keras variable's shape
    buffer: bool = dataclasses.field(default=False, kw_only=True)  # torch holds it as a buffer
    lossy = False

    @property
    def keras_names(self) -> tuple[str, ...]:
        return (self.keras,)

    @property
    def keras_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.keras: tuple(self.shape)}

    def torch_shapes(self, keras_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        shape = tuple(keras_shapes[self.keras])
        if not shape or shape[0] != len(self.torch):
            raise ExchangeError(f"{self.keras}: expected {len(self.torch)} stacked tensors, found shape {shape}")
        return {key: _shape_through(self.steps, shape[1:]) for key in self.torch}

    def to_torch(self, keras_arrays: dict[str, AnyTensor]) -> dict[str, AnyTensor]:
        array = materialize(keras_arrays[self.keras])
        return {key: _run(self.steps, np.ascontiguousarray(array[index])) for index, key in enumerate(self.torch)}

    def to_keras(
        self, torch_arrays: dict[str, AnyTensor], keras_shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, AnyTensor]:
        return {
            self.keras: np.stack([materialize(_run(_inverse(self.steps), torch_arrays[key])) for key in self.torch])
        }


@dataclass(frozen=True)
class Packed:
    """Several Keras variables, each taken through its own steps, concatenated along torch axis
    `axis` into one torch tensor (MultiHeadAttention's query, key and value kernels are
    `in_proj_weight`)."""

    keras: tuple[str, ...]
    torch: str
    steps: tuple[tuple[Step, ...], ...]
    axis: int = 0
    shapes: tuple[tuple[int, ...], ...] = dataclasses.field(default=(), kw_only=True)  # each Keras variable's
    buffer: bool = dataclasses.field(default=False, kw_only=True)  # torch holds it as a buffer
    lossy = False

    @property
    def keras_names(self) -> tuple[str, ...]:
        return self.keras

    @property
    def keras_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(shape) for name, shape in zip(self.keras, self.shapes)}

    def _pieces(self, keras_shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [_shape_through(steps, tuple(keras_shapes[name])) for name, steps in zip(self.keras, self.steps)]

    def torch_shapes(self, keras_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        pieces = self._pieces(keras_shapes)
        rest = {piece[: self.axis] + piece[self.axis + 1 :] for piece in pieces}
        if len(rest) != 1:
            raise ExchangeError(f"{', '.join(self.keras)}: shapes {pieces} do not concatenate on axis {self.axis}")
        shape = list(pieces[0])
        shape[self.axis] = sum(piece[self.axis] for piece in pieces)
        return {self.torch: tuple(shape)}

    def to_torch(self, keras_arrays: dict[str, AnyTensor]) -> dict[str, AnyTensor]:
        return {
            self.torch: np.concatenate(
                [materialize(_run(steps, keras_arrays[name])) for name, steps in zip(self.keras, self.steps)],
                axis=self.axis,
            )
        }

    def to_keras(
        self, torch_arrays: dict[str, AnyTensor], keras_shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, AnyTensor]:
        sizes = [piece[self.axis] for piece in self._pieces(keras_shapes)]
        parts = np.split(materialize(torch_arrays[self.torch]), np.cumsum(sizes)[:-1], axis=self.axis)
        return {
            name: _run(_inverse(steps), np.ascontiguousarray(part))
            for name, steps, part in zip(self.keras, self.steps, parts)
        }


@dataclass(frozen=True)
class Summed:
    """Torch tensors whose sum, taken through `steps` backwards, is one Keras variable (an LSTM's
    `bias_ih` + `bias_hh`). Lossy by declaration: Keras -> torch writes the variable into the
    first tensor and zeros into the rest, its canonical inverse."""

    keras: str
    torch: tuple[str, ...]
    steps: tuple[Step, ...] = ()
    shape: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)  # the Keras variable's shape
    buffer: bool = dataclasses.field(default=False, kw_only=True)  # torch holds it as a buffer
    lossy = True

    @property
    def keras_names(self) -> tuple[str, ...]:
        return (self.keras,)

    @property
    def keras_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.keras: tuple(self.shape)}

    def torch_shapes(self, keras_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {key: _shape_through(self.steps, tuple(keras_shapes[self.keras])) for key in self.torch}

    def to_torch(self, keras_arrays: dict[str, AnyTensor]) -> dict[str, AnyTensor]:
        first = materialize(_run(self.steps, keras_arrays[self.keras]))
        return {key: first if index == 0 else np.zeros_like(first) for index, key in enumerate(self.torch)}

    def to_keras(
        self, torch_arrays: dict[str, AnyTensor], keras_shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, AnyTensor]:
        total = cast(np.ndarray, sum(materialize(torch_arrays[key]) for key in self.torch))
        return {self.keras: _run(_inverse(self.steps), total)}


WeightPort = Port | Stacked | Packed | Summed


@dataclass(frozen=True)
class TorchOnly:
    """A torch tensor with no Keras variable behind it (see the module docstring)."""

    torch: str
    shape: tuple[int, ...]
    fill: float
    dtype: str | None = None  # None: the node's dtype
    must_equal_fill: bool = False  # torch -> Keras refuses any other value (Keras cannot hold it)
    why: str = ""
    buffer: bool = False  # torch holds it as a buffer (BatchNorm's counter), not a parameter


@dataclass(frozen=True)
class KerasOnly:
    """A Keras variable that computes nothing at inference (see the module docstring)."""

    keras: str
    why: str = ""
    shape: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)  # the Keras variable's shape

    @property
    def keras_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.keras: tuple(self.shape)}


AnyPort = WeightPort | TorchOnly | KerasOnly


def torch_keys(port: AnyPort) -> tuple[str, ...]:
    """The torch state_dict suffixes that `port` joins (none for a `KerasOnly`)."""
    if isinstance(port, KerasOnly):
        return ()
    return (port.torch,) if isinstance(port.torch, str) else port.torch


def _run(steps: tuple[Step, ...], tensor: AnyTensor) -> AnyTensor:
    if not steps:
        return tensor
    permutations = [step for step in steps if isinstance(step, Permute)]
    if isinstance(tensor, LazyTensor) and len(permutations) == len(steps):
        for permutation in permutations:
            tensor = tensor.permuted(permutation.axes)
        return tensor
    array = materialize(tensor)
    for step in steps:
        array = step.apply(array)
    return array
