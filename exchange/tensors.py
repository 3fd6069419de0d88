"""Moving tensor data: lazy tensors and a fast, parallel transpose.

A `LazyTensor` is known by shape and dtype before any data is read, so every shape can be
checked first, and a large model is converted one tensor at a time, straight from a memory map of
the input into a memory map of the output, without a whole copy of the model in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from exchange.errors import ExchangeFileError

# Above this many elements a 2-D transpose is copied in cache-sized blocks by several threads
# (numpy releases the GIL while copying a block): measured on this project's 2-core machines,
# 4096x4096 float32 takes 0.16 s with np.ascontiguousarray(a.T) and about 0.06 s this way.
PARALLEL_TRANSPOSE_MIN_SIZE = 1 << 20
TRANSPOSE_BLOCK = 256
TRANSPOSE_THREADS = max(1, min(4, os.cpu_count() or 1))
_transpose_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class LazyTensor:
    """A stored tensor (`source()` returns it, e.g. as a read-only memory map) seen through an
    axis permutation `axes` (None: as stored). `shape` is the shape after the permutation."""

    shape: tuple[int, ...]
    dtype: np.dtype
    source: Callable[[], np.ndarray]
    axes: tuple[int, ...] | None = None

    def permuted(self, axes: tuple[int, ...]) -> LazyTensor:
        combined = axes if self.axes is None else tuple(self.axes[axis] for axis in axes)
        return LazyTensor(tuple(self.shape[axis] for axis in axes), self.dtype, self.source, combined)

    def load(self) -> np.ndarray:
        """The tensor as a new C-contiguous array."""
        array = np.empty(self.shape, dtype=self.dtype)
        self.copy_into(array)
        return array

    def copy_into(self, out: np.ndarray) -> None:
        """Copy into `out`, which must have exactly this tensor's shape: nothing is broadcast."""
        stored = self.source()
        stored_shape = self.shape if self.axes is None else tuple(self.shape[axis] for axis in np.argsort(self.axes))
        if tuple(stored.shape) != stored_shape or tuple(out.shape) != self.shape:
            raise ExchangeFileError(
                f"stored tensor is {tuple(stored.shape)}, declared {stored_shape}; "
                f"output {tuple(out.shape)}, declared {self.shape}"
            )
        if self.axes is None:
            np.copyto(out, stored)
        else:
            transpose_into(stored, self.axes, out)


# What a tensor table holds: an array in memory, or a `LazyTensor` read when it is needed.
AnyTensor = np.ndarray | LazyTensor


def materialize(tensor: AnyTensor) -> np.ndarray:
    return tensor.load() if isinstance(tensor, LazyTensor) else tensor


def transpose_into(array: np.ndarray, axes: tuple[int, ...], out: np.ndarray) -> None:
    """out[...] = np.transpose(array, axes), in parallel blocks for large matrices."""
    if array.ndim != 2 or tuple(axes) != (1, 0) or array.size < PARALLEL_TRANSPOSE_MIN_SIZE:
        np.copyto(out, np.transpose(array, axes))
        return
    columns = array.shape[1]
    step = -(-columns // (TRANSPOSE_THREADS * TRANSPOSE_BLOCK)) * TRANSPOSE_BLOCK
    spans = [(start, min(start + step, columns)) for start in range(0, columns, step)]
    list(_pool().map(lambda span: _transpose_columns(array, out, *span), spans))


def transpose_contiguous(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """`np.ascontiguousarray(np.transpose(array, axes))`, faster for large matrices."""
    out = np.empty(tuple(array.shape[axis] for axis in axes), dtype=array.dtype)
    transpose_into(array, axes, out)
    return out


def _transpose_columns(array: np.ndarray, out: np.ndarray, first: int, last: int) -> None:
    """out[first:last, :] = array[:, first:last].T, one cache-sized block at a time."""
    rows = array.shape[0]
    for column in range(first, last, TRANSPOSE_BLOCK):
        column_end = min(column + TRANSPOSE_BLOCK, last)
        for row in range(0, rows, TRANSPOSE_BLOCK):
            out[column:column_end, row : row + TRANSPOSE_BLOCK] = array[
                row : row + TRANSPOSE_BLOCK, column:column_end
            ].T


def _pool() -> ThreadPoolExecutor:
    global _transpose_pool
    if _transpose_pool is None:
        _transpose_pool = ThreadPoolExecutor(TRANSPOSE_THREADS, thread_name_prefix="transpose")
    return _transpose_pool
