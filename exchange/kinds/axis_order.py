"""Data layout between the frameworks: Keras holds images channels-last (N, H, W, C), the torch
side channels-first (N, C, H, W). Tensors of rank 2 (N, F) are the same in both.

Shapes in the graph are Keras's without the batch axis; `rank` below is that length.
"""

from __future__ import annotations

from typing import TypeVar

from exchange.errors import UnsupportedLayerError


def to_torch_order(rank: int) -> tuple[int, ...]:
    """Axes (batch included) taking a Keras tensor to the torch layout: (0, rank, 1, …, rank-1)."""
    if rank < 2:
        return tuple(range(rank + 1))
    return (0, rank) + tuple(range(1, rank))


def to_keras_order(rank: int) -> tuple[int, ...]:
    """The inverse of `to_torch_order`: (0, 2, …, rank, 1)."""
    if rank < 2:
        return tuple(range(rank + 1))
    return (0,) + tuple(range(2, rank + 1)) + (1,)


Size = TypeVar("Size")  # int, or int | None for a size known only at run time


def torch_shape(keras_shape: tuple[Size, ...]) -> tuple[Size, ...]:
    """A Keras shape (no batch axis) in torch's layout."""
    if len(keras_shape) < 2:
        return tuple(keras_shape)
    return (keras_shape[-1],) + tuple(keras_shape[:-1])


def keras_axis(axis: int, rank: int, where: str) -> int:
    """A Keras axis (batch included, may be negative) as a positive axis in 1..rank."""
    positive = axis + rank + 1 if axis < 0 else axis
    if not 1 <= positive <= rank:
        raise UnsupportedLayerError(f"{where}: axis {axis} of a rank-{rank + 1} tensor is not a feature axis")
    return positive


def torch_axis(axis: int, rank: int, where: str) -> int:
    """The torch dim holding the Keras axis `axis` of a tensor of Keras shape rank `rank`."""
    return to_keras_order(rank)[keras_axis(axis, rank, where)]
