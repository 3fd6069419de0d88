"""Running a model on a batch in chunks of rows, so that `--verify` holds a bounded amount of memory.

The frameworks keep a layer's output until its last reader has run (the fx module and the
generated code free it there; TensorFlow's executor too), so the most a forward pass holds is the
largest set of outputs alive at once, per row. `live_values_per_row` reads that off the graph,
and `chunk_rows` picks how many rows fit in CHUNK_BYTES at 8 bytes a value (a float64 run, or a
float32 run with as much again for the frameworks' workspaces: an im2col buffer, a reordered copy
of a convolution's input). `predict_in_chunks` runs a framework on consecutive chunks and
concatenates the outputs.

The bound `--verify` keeps: its child's peak RSS stays under the RSS it has after importing
TensorFlow and torch (about 715 MiB), plus `verify.WEIGHT_COPIES` copies of the weights, plus
VERIFY_MEMORY (1 GiB): one chunk's activations (CHUNK_BYTES), the batch's
inputs and outputs (at most `verify.VERIFY_ACTIVATION_ELEMENTS` values each) and their
comparison, the layer-by-layer search (on at most a chunk of rows) and what the frameworks
allocate to build the models. A model of which one row alone needs more than CHUNK_BYTES is
refused. Not counted: what a layer holds inside itself beyond its output (an attention's scores,
steps x steps per head; a recurrent layer's gates for every step), which the graph does not state
and the factor of 2 in 8 bytes a value covers only where it is no larger than the layer's output.
Measured (`scripts/bench_convert.py --memory`): 12 parallel 256x256 convolutions, 15
rows, 986 MiB with the imports' 712 (1,985 MiB before the chunks; 3,082 MiB for the generated
code, which kept every tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from exchange.errors import ExchangeError
from exchange.graph import Graph

VERIFY_MEMORY = 1 << 30  # the stated bound: the child's peak RSS beyond imports and weights
CHUNK_BYTES = 256 << 20  # one chunk's live activations, 8 bytes a value
BYTES_PER_VALUE = 8


def live_values_per_row(graph: Graph, unknown: int = 1) -> tuple[int, str]:
    """The most values one row holds at once when the nodes run in graph order (the inputs, held
    by the caller throughout, and every output not yet read for the last time), and the node
    where that happens. An unknown axis counts `unknown` (the length the inputs give it)."""
    from exchange.kinds import kind_of

    def values(shape) -> int:
        return math.prod(unknown if size is None else size for size in shape)

    last_reader: dict[str, int] = {name: len(graph.nodes) for name in graph.outputs}
    for index, node in enumerate(graph.nodes):
        for name in node.inputs:
            last_reader[name] = max(last_reader.get(name, -1), index)
    live = sum(values(spec.shape) for spec in graph.inputs)
    peak, where = live, graph.inputs[0].name if graph.inputs else ""
    held: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        kind = kind_of(node.kind)
        if kind.selects_output:  # one output of a layer that made several: no new memory
            size = 0
        elif kind.output_count(node.config) > 1:
            size = sum(
                values(shape)
                for shape in kind.output_shapes(node.config, tuple(graph.shapes[name] for name in node.inputs))
            )
        else:
            size = values(graph.shapes[node.name])
        held[node.name] = size
        live += size
        if live > peak:
            peak, where = live, node.name
        for name in set(node.inputs) | {node.name}:
            if last_reader.get(name, index) <= index and name in held:
                live -= held.pop(name)
    return peak, where


def chunk_rows(graph: Graph, arrays: Sequence[np.ndarray] = ()) -> int:
    """How many rows one forward pass may take at once: CHUNK_BYTES over a row's live values.
    ExchangeError when one row alone needs more."""
    unknown = max(
        [
            size
            for array, spec in zip(arrays, graph.inputs)
            for size, declared in zip(array.shape[1:], spec.shape)
            if declared is None
        ],
        default=1,
    )
    values, where = live_values_per_row(graph, unknown)
    per_row = BYTES_PER_VALUE * max(values, 1)
    if per_row > CHUNK_BYTES:
        raise ExchangeError(
            f"--verify refused: one sample holds {values:,} values at once (at {where!r}), "
            f"{per_row / (1 << 20):,.1f} MiB at {BYTES_PER_VALUE} bytes a value, more than the "
            f"{CHUNK_BYTES >> 20} MiB --verify gives one chunk of rows"
        )
    return CHUNK_BYTES // per_row


def predict_in_chunks(predict: Callable, model, graph: Graph, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """`predict(model, arrays)` run on chunks of `chunk_rows` rows, the outputs concatenated: the
    same outputs (each row is computed on its own), in bounded memory."""
    rows = chunk_rows(graph, arrays)
    count = len(arrays[0]) if arrays else 0
    if count <= rows:
        return predict(model, arrays)
    parts = [predict(model, [array[start : start + rows] for array in arrays]) for start in range(0, count, rows)]
    return [np.concatenate(outputs) for outputs in zip(*parts)]
